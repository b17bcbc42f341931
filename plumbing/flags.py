# plumbing/flags.py: the flags both training scripts share (one name, one meaning; each script's defaults block
# gives their defaults and each adds its own flags beside them), the argparse type that keeps a number in range,
# and the checks argparse cannot make alone. Both training scripts import it; it imports balora.py for the
# names of the regularisers' forms (--consistency, --diversity, --svd).

import argparse
import math
from pathlib import Path

import balora


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
    o.add_argument("--seed", type=int, default=d["seed"])
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
    args.out = str(Path(args.out)) if args.out else None  # None: run_dir makes a new one
    return args

