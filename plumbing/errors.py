# plumbing/errors.py: how a training script fails: its own error classes, the one top level (cli) that prints a
# user error as one line and is the only place a process ends (leave), and the check that fails a run whose
# evaluation is NaN. Both training scripts and plumbing/{devices,flags,parallel,rundir,checkpoints}.py import it; it
# imports balora.py, model.py, data.py and plumbing/assets.py for their error classes only (the user errors cli
# prints as one line), and plumbing/interrupts.py (Ctrl-C, wherever it lands, ends the process with 130).

import atexit
import errno
import math
import os
import sys
import traceback

import torch

import balora
import data
import model
import plumbing.interrupts as interrupts
from plumbing.assets import AssetError


class InputError(ValueError):
    # Bad input (a file, key, shape, line or flag), never a bug: the message names what and where, and cli()
    # prints it as one line without a traceback. quiet=True: a torchrun rank that leaves the saying to rank 0
    # (plumbing/parallel.agree): it exits 1 without a line of its own.
    def __init__(self, message, quiet=False):
        super().__init__(message)
        self.quiet = quiet


class OutputError(OSError):
    # A file of the run could not be written (disk full, quota, read-only): the message names it and says which
    # file on disk is kept whole (every write goes to a temporary file renamed into place)
    pass


class NonFiniteLoss(FloatingPointError):
    # a step whose loss or gradient is NaN / inf: the run stops without applying it and keeps its last checkpoint
    pass


class Ended(BaseException):
    # torchrun's SIGTERM to a rank whose peer failed (plumbing/parallel.distributed installs the handler): one line,
    # exit status 1. A BaseException, so that no `except Exception` on the way swallows it.
    pass


# A user error or a non-finite stop is one line on stderr, `train_nlu.py: error: <file>:<line>: <what>`, exit
# status 1, no traceback (`--debug` or BALORA_DEBUG=1 shows it). Anything else is a bug and shows its traceback.
# Ctrl-C (any KeyboardInterrupt; the scripts raise plumbing/checkpoints.Interrupted) is one line, exit status 130,
# wherever it lands (plumbing/interrupts.py).
USER_ERRORS = (InputError, OutputError, AssetError, data.DataError, model.ModelError, balora.AdapterError,
               FloatingPointError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
               PermissionError)
# what the machine says, not the program: one line naming the file
FULL = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def peer_lost(e) -> bool:
    # a collective whose peer process died (a rank killed, out of memory): gloo's and NCCL's errors, not a bug here
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    text = str(e)
    return isinstance(e, getattr(torch.distributed, "DistError", ())) or isinstance(e, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "remote worker crashing",
                            "Broken pipe", "NCCL communicator was aborted"))


def rank_prefix():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return f"rank {torch.distributed.get_rank()}: "
    return ""


def cli(main, prog):
    # The top level of both scripts, and the only place a process ends: main() returns or raises, and this tears
    # torchrun's process group down on every path (see leave()).
    debug = "--debug" in sys.argv[1:] or os.environ.get("BALORA_DEBUG", "") not in ("", "0")
    interrupts.install()
    code, name = 0, os.path.basename(prog)

    def say(line):
        # one write of the whole line: under torchrun every rank writes to the same stderr, and print()'s two
        # writes (text, newline) can interleave with the other rank's into one garbled line
        sys.stdout.flush()
        sys.stderr.flush()
        os.write(2, f"{line}\n".encode("utf-8", "replace"))

    try:
        interrupts.run(main, sys.argv[1:])  # a Ctrl-C raises KeyboardInterrupt inside main() only
    except USER_ERRORS as e:
        if debug:
            traceback.print_exc()
        if not getattr(e, "quiet", False):
            say(f"{name}: error: {e}")
        code = 1
    except KeyboardInterrupt as e:  # Ctrl-C: one line; every file on disk is whole (each is written atomically)
        say(f"{name}: {e if str(e) else 'interrupted'}")
        code = 130
    except SystemExit as e:  # argparse's errors and --help
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Ended as e:
        say(f"{name}: error: {e}")
        code = 1
    except BaseException as e:
        if isinstance(e, OSError) and e.errno in FULL:
            if debug:
                traceback.print_exc()
            say(f"{name}: error: {e.filename or 'a file of the run'}: {e.strerror}; nothing half-written is kept "
                f"(every file is written to a temporary name and renamed into place)")
        elif type(e).__name__ == "SafetensorError" and "IoError" in str(e) and not debug:
            say(f"{name}: error: a safetensors file could not be written ({e}); nothing half-written is kept")
        elif peer_lost(e) and not debug:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            say(f"{name}: error: {rank_prefix()}another process of this torchrun run ended (its own message says "
                f"why): {first[:300]}")
        else:
            traceback.print_exc()
        code = 1
    leave(code, prog)


def leave(code, prog=None):
    # A process ends with os._exit, not through interpreter shutdown. Under torchrun, after destroying its group:
    # gloo's worker thread may still release the last collective's tensors, the release needs the GIL, and a thread
    # asking for it during shutdown aborts the process ("terminate called without an active exception",
    # pytorch/pytorch#179291). In one process, after the atexit functions: a Ctrl-C during the shutdown would kill it
    # silently (Python restores the default handler there) or be dropped with exit status 0; until os._exit it is
    # only remembered and settles the status (plumbing/interrupts.settle). Every file is closed by now (logs in
    # `finally`, outputs written atomically). cli called inside another program (a test): SystemExit as usual.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        import signal
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the one line is out: torchrun's SIGTERM may end it now
        torch.distributed.destroy_process_group()
        code = interrupts.settle(code, prog or sys.argv[0])
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if prog is not None and interrupts.is_main_script(prog):
        sys.stdout.flush()
        sys.stderr.flush()
        atexit._run_exitfuncs()
        code = interrupts.settle(code, prog)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(interrupts.settle(code, prog or sys.argv[0], restore=True))


def check_finite_metrics(metrics: dict, what: str):
    # a run whose evaluation is NaN or inf has failed: say so instead of writing "done" and a final adapter
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"{what}: {', '.join(bad)} non-finite ({metrics[bad[0]]}); the run failed (a "
                                 f"learning rate too large?); no final adapter or metrics.json is written")
