# plumbing/flags.py: the flags both training scripts share (one name, one meaning; each script's defaults block
# gives their defaults and each adds its own flags beside them), the argparse type that keeps a number in range,
# and the checks argparse cannot make alone, among them what each path flag names (a regular file, a model
# directory) before anything reads it. Both training scripts import it; it imports balora.py for the names of the
# regularisers' forms (--consistency, --diversity, --svd), data.py (file_kind) and plumbing/errors.py.

import argparse
import math
import os
import stat
from pathlib import Path

import balora
import data
from plumbing.errors import InputError

# |--seed| at most this: seed x 1 000 003 + step x 1009 (parallel.step_seed, data.batches) stays inside torch's 64-bit
# seed for any number of steps a run can take
SEED_LIMIT = 10 ** 12
# the path flags of both scripts: files read whole (and fingerprinted), and the model directory
FILE_FLAGS = ("train_file", "val_file", "test_file", "eval_text", "eval_gsm8k", "base_from")
DIR_FLAGS = ("model",)


def arg_range(kind, low, high=math.inf, low_open=False, high_open=False):
    # an argparse type: a finite number of `kind` in [low, high] (an open end with low_open / high_open), so that
    # a flag out of range is an argparse error naming the flag, before anything runs
    def parse(text):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(x) or x < low or (low_open and x == low) or x > high or (high_open and x == high):
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be in {'(' if low_open else '['}{low}, "
                                             f"{high}{')' if high_open or high == math.inf else ']'}")
        return x
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def shared_args(p, d):
    # d: the script's defaults block (method, init, rank, alpha, targets, lr, warmup_ratio, clip, batch_size,
    # grad_accum, max_len, epochs, max_steps, seed, dtype, save_every, eval_batch_size, task: "nlu" | "nlg").
    # Returns the argument groups, so that each script adds its own flags beside the shared ones.
    R = arg_range
    m = p.add_argument_group("method")
    m.add_argument("--method", choices=("balora", "lora", "pissa"), default=d["method"],
                   help="lora: LoRA init; pissa: PiSSA init; balora: PiSSA init + the three regularisers "
                        "(sets the λ defaults: the paper's for balora, 0 otherwise; explicit flags always apply)")
    m.add_argument("--init", default=None, help=f"override the method's init: lora | pissa (exact SVD) | "
                   f"pissa_niter_N (randomized SVD, N power iterations) (default: {d['init']})")
    for i, what in ((1, "consistency"), (2, "diversity"), (3, "SVD")):
        m.add_argument(f"--lambda{i}", type=R(float, 0), default=None, help=f"{what} weight")
    m.add_argument("--temperature", type=R(float, 0, low_open=True), default=None, help="T of Eqs. 4 / 9")
    m.add_argument("--svd-k", type=R(int, 1), default=None, help="k of Eqs. 7 / 12")
    m.add_argument("--top-k", type=R(int, 1), default=None, help="K of the top-K-entropy diversity (Eq. 10)")
    m.add_argument("--consistency", choices=balora.CONSISTENCY, default=None)  # the forms: each NLU / NLG term
    m.add_argument("--diversity", choices=balora.DIVERSITY, default=None)
    m.add_argument("--svd", choices=balora.SVD, default=None)
    m.add_argument("--lambda1-schedule", choices=("constant", "cosine"), default=None)
    m.add_argument("--focus-schedule", choices=("constant", "two_phase"), default=None)
    m.add_argument("--rank", type=R(int, 1), default=d["rank"])
    m.add_argument("--alpha", type=R(float, 0, low_open=True), default=d["alpha"],
                   help="scale = alpha / rank (default: rank, scale 1)")
    m.add_argument("--targets", default=d["targets"], help="comma-separated suffixes of nn.Linear names")
    g = p.add_argument_group("data")
    g.add_argument("--model", default=None, help="HF model directory (default: the task's model, fetched once)")
    g.add_argument("--train-file", default=None, help="training file (default: the built-in task)")
    g.add_argument("--val-file", default=None, help="validation file")
    g.add_argument("--max-len", type=R(int, 2), default=d["max_len"], help="tokens per example (longer: cut, counted)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--lr", type=R(float, 0, low_open=True), default=d["lr"])
    o.add_argument("--warmup-ratio", type=R(float, 0, 1, high_open=True), default=d["warmup_ratio"],
                   help="fraction of the steps with a linear warm-up")
    o.add_argument("--clip", type=R(float, 0), default=d["clip"], help="max global gradient norm (0: no clipping)")
    o.add_argument("--batch-size", type=R(int, 1), default=d["batch_size"], help="examples per optimizer step")
    o.add_argument("--grad-accum", type=R(int, 1), default=d["grad_accum"],
                   help="micro-batches per optimizer step (must divide --batch-size)")
    o.add_argument("--epochs", type=R(int, 1), default=d["epochs"], help="passes over the training set")
    o.add_argument("--max-steps", type=R(int, 0), default=d["max_steps"],
                   help="cap on the optimizer steps of --epochs (0: no cap)")
    o.add_argument("--seed", type=R(int, -SEED_LIMIT, SEED_LIMIT), default=d["seed"])
    r = p.add_argument_group("run")
    r.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default=d["dtype"],
                   help="autocast dtype; auto: bf16 where the device runs it natively, else fp32")
    r.add_argument("--device", default=None, help="cpu | cuda[:N] | mps (default: cuda when available, else cpu)")
    r.add_argument("--threads", type=R(int, 0), default=0, help="torch CPU threads (0: torch's default)")
    r.add_argument("--eval-batch-size", type=R(int, 1), default=d["eval_batch_size"])
    r.add_argument("--out", default=None, help=f"run directory (default: a new runs/{d['task']}-METHOD-TIME[-N]); "
                   "one that already holds a run needs --resume; one another process is writing is refused")
    r.add_argument("--save-every", type=R(int, 0), default=d["save_every"],
                   help="checkpoint every N optimizer steps (0: only where the script always does)")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    r.add_argument("--stop-after", type=R(int, 0), default=0, help="checkpoint and stop after this many steps, as "
                   "if interrupted (the schedule still spans the whole budget; --resume continues)")
    r.add_argument("--grad-checkpoint", action="store_true",
                   help="activation checkpointing per layer: less memory, one more forward in backward")
    r.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return m, g, o, r


def check_shared(p, args, task):
    # what argparse cannot check alone; then the derived values both scripts use
    if args.batch_size % args.grad_accum:
        p.error(f"--grad-accum {args.grad_accum} must divide --batch-size {args.batch_size} (examples per step)")
    if args.resume and not args.out:
        p.error("--resume needs the --out of the run to continue")
    check_paths(args)
    args.out = str(Path(args.out)) if args.out else None  # None: run_dir makes a new one
    return args


def _mode(flag, path, what):
    # os.stat(path)'s mode, or one line naming the flag
    try:
        return os.stat(path).st_mode
    except FileNotFoundError:
        raise InputError(f"{flag}: no such {what}") from None
    except OSError as e:
        raise InputError(f"{flag}: cannot be read ({e.strerror})") from None


def check_paths(args, files=FILE_FLAGS, dirs=DIR_FLAGS):
    # Every path flag given, checked for what it is before anything reads it: a file flag names a readable regular
    # file (a FIFO would hang the fingerprint or have its data taken, /dev/zero would never end), --model a readable
    # directory of regular files. Anything else is one line naming the flag (InputError, exit status 1). The scripts'
    # readers open only regular files too (data.open_input), so a path swapped after this check cannot hang them.
    for key in files:
        value = getattr(args, key, None)
        if value is None or (key == "eval_gsm8k" and value == "default"):
            continue
        flag = f"--{key.replace('_', '-')} {value}"
        mode = _mode(flag, value, "file")
        if not stat.S_ISREG(mode):
            raise InputError(f"{flag}: {data.file_kind(mode)}, not a regular file")
        if not os.access(value, os.R_OK):
            raise InputError(f"{flag}: permission denied (this user cannot read it)")
    for key in dirs:
        value = getattr(args, key, None)
        if value is None:
            continue
        flag = f"--{key.replace('_', '-')} {value}"
        mode = _mode(flag, value, "directory")
        if not stat.S_ISDIR(mode):
            raise InputError(f"{flag}: not a model directory (config.json, model.safetensors, tokenizer.json)")
        try:
            if not os.access(value, os.R_OK | os.X_OK):
                raise PermissionError
            entries = sorted(os.scandir(value), key=lambda e: e.name)
        except PermissionError:
            raise InputError(f"{flag}: permission denied (this user cannot list or read the directory)") from None
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                mode = os.stat(e.path).st_mode
            except FileNotFoundError:  # a dangling link: not read by anything
                continue
            except OSError as err:
                raise InputError(f"{flag}: {e.path} cannot be read ({err.strerror})") from None
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise InputError(f"{flag}: {e.path} is {data.file_kind(mode)}, not a regular file")
            if stat.S_ISREG(mode) and not os.access(e.path, os.R_OK):
                raise InputError(f"{flag}: {e.path}: permission denied (this user cannot read it)")

