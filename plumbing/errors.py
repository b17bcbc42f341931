# plumbing/errors.py: how a training script fails: its own error classes, the one top level (cli) that prints a
# user error as one line and is the only place a process ends (leave), and the check that fails a run whose
# evaluation is NaN. Both training scripts and plumbing/{devices,parallel,rundir,checkpoints}.py import it; it
# imports balora.py, model.py, data.py and plumbing/assets.py for their error classes only (the user errors cli
# prints as one line).

import math
import os
import sys
import traceback

import torch

import balora
import data
import model
from plumbing.assets import AssetError


class InputError(ValueError):
    # Bad input (a file, key, shape, line or flag), never a bug: the message names what and where, and cli()
    # prints it as one line without a traceback.
    pass


class NonFiniteLoss(FloatingPointError):
    # a step whose loss or gradient is NaN / inf: the run stops without applying it and keeps its last checkpoint
    pass


# A user error or a non-finite stop is one line on stderr, `train_nlu.py: error: <file>:<line>: <what>`, exit
# status 1, no traceback (`--debug` or BALORA_DEBUG=1 shows it). Anything else is a bug and shows its traceback.
# Ctrl-C (any KeyboardInterrupt; the scripts raise plumbing/checkpoints.Interrupted) is one line, exit status 130.
USER_ERRORS = (InputError, AssetError, data.DataError, model.ModelError, balora.AdapterError, FloatingPointError,
               FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


def cli(main, prog):
    # The top level of both scripts, and the only place a process ends: main() returns or raises, and this tears
    # torchrun's process group down on every path (see leave()).
    debug = "--debug" in sys.argv[1:] or os.environ.get("BALORA_DEBUG", "") not in ("", "0")
    code = 0
    try:
        main(sys.argv[1:])
    except USER_ERRORS as e:
        if debug:
            traceback.print_exc()
        # one write of the whole line: under torchrun every rank writes to the same stderr, and print()'s two
        # writes (text, newline) can interleave with the other rank's into one garbled line
        sys.stderr.flush()
        os.write(2, f"{os.path.basename(prog)}: error: {e}\n".encode("utf-8", "replace"))
        code = 1
    except KeyboardInterrupt as e:  # Ctrl-C: one line; every file on disk is whole (each is written atomically)
        sys.stderr.flush()
        os.write(2, f"{os.path.basename(prog)}: {e if str(e) else 'interrupted'}\n".encode("utf-8", "replace"))
        code = 130
    except SystemExit as e:  # argparse's errors and --help
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    leave(code)


def leave(code):
    # Under torchrun a rank leaves with os._exit after destroying its group, not through interpreter shutdown:
    # gloo's worker thread may still release the last collective's tensors, the release needs the GIL, and a
    # thread asking for it during shutdown aborts the process ("terminate called without an active exception",
    # pytorch/pytorch#179291). Every file is closed by now (logs in `finally`, outputs written atomically).
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def check_finite_metrics(metrics: dict, what: str):
    # a run whose evaluation is NaN or inf has failed: say so instead of writing "done" and a final adapter
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"{what}: {', '.join(bad)} non-finite ({metrics[bad[0]]}); the run failed (a "
                                 f"learning rate too large?); no final adapter or metrics.json is written")
