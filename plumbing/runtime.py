# plumbing/runtime.py: what both training scripts need besides the method, the models and the data: errors as one
# line (cli), the flags both scripts share (their defaults come from each script's defaults block), the one step
# line, device and dtype choice and the machine record, several processes under torchrun (and the per-micro-batch
# seed that makes them equal one process), atomic files, the run directory and the one checkpoint format with its
# resume rule. The scripts import it; it imports balora.py, model.py and data.py for their error classes only.

import argparse
import atexit
import datetime
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import traceback
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

import balora
import data
import model
from balora import _no_duplicate_keys, atomic_write  # balora.py stays standalone, so these live there
from data import decode_utf8
from plumbing.assets import AssetError

# ---- errors --------------------------------------------------------------------------------------------------


class InputError(ValueError):
    # Bad input (a file, key, shape, line or flag), never a bug: the message names what and where, and cli()
    # prints it as one line without a traceback.
    pass


class NonFiniteLoss(FloatingPointError):
    # a step whose loss or gradient is NaN / inf: the run stops without applying it and keeps its last checkpoint
    pass


class Interrupted(KeyboardInterrupt):
    # Ctrl-C inside a training loop: `interrupted at step N; ...` with the step of the checkpoint on disk (it is
    # whole: every file is written atomically), exit status 130
    def __init__(self, step, out):
        saved = checkpoint_step(out)
        super().__init__(f"interrupted at step {step}; " + (
            f"`--resume --out {out}` (and the same flags) continues from its checkpoint at step {saved}"
            if saved is not None else "no checkpoint was written yet: nothing to resume"))


# A user error or a non-finite stop is one line on stderr, `train_nlu.py: error: <file>:<line>: <what>`, exit
# status 1, no traceback (`--debug` or BALORA_DEBUG=1 shows it). Anything else is a bug and shows its traceback.
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


# ---- the flags both scripts share: one name, one meaning -------------------------------------------------------

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


def step_line(step, total, terms, lambdas, lr, grad_norm, examples, tokens, seconds, elapsed, eta):
    # the one line per optimizer step, the same in both scripts: task loss, each regulariser, λ, lr, gradient
    # norm, throughput, time
    regs = " ".join(f"{k} {terms[k]:+.4f}" for k in ("consistency", "diversity", "svd") if k in terms)
    return (f"step {step}/{total} | task {terms['task']:.4f} | {regs or 'no regularisers'} | "
            f"λ {'/'.join(f'{x:.3g}' for x in lambdas)} | lr {lr:.2e} | |g| {grad_norm:.3f} | "
            f"{examples / seconds:.1f} ex/s, {tokens / seconds:.0f} tok/s | {fmt_time(elapsed)} elapsed, "
            f"ETA {fmt_time(eta)}")


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


# ---- where it runs: device, autocast dtype, the machine record --------------------------------------------------
# bf16 pays only where the matmuls run natively in it: on a GPU with bf16 units (compute capability >= 8.0; a T4
# or V100 emulates it, slowly), on a CPU with AVX512-BF16 or AMX *and* torch using them. On an AVX2 CPU torch has
# no fast bf16 matmul (pytorch issues #118499, #111456), so `auto` is fp32 there.


def pick_device(requested):
    # the device string, or one line saying why it cannot be used (before anything is loaded)
    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(requested)
    except RuntimeError:
        raise InputError(f"--device {requested}: not a device (cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise InputError(f"--device {requested}: {why}; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise InputError(f"--device {requested}: MPS is not available on this machine; use --device cpu")
    elif dev.type != "cpu":
        raise InputError(f"--device {requested}: the scripts run on cpu, cuda or mps")
    return requested


def _probe(name):
    # torch's private CPU probes, guarded: a torch without them (or one that raises) counts as "no"
    try:
        return bool(getattr(torch.cpu, name)())
    except Exception:
        return False


def cpu_bf16_native():
    # -> (bool, reason). Follows what torch will use, not only the CPU's flags: ATEN_CPU_CAPABILITY and
    # ONEDNN_MAX_CPU_ISA lower both, which is how an AMX machine is tested as an AVX2 one.
    cap = torch.backends.cpu.get_cpu_capability()
    amx, avx512_bf16 = _probe("_is_amx_tile_supported"), _probe("_is_avx512_bf16_supported")
    try:
        onednn = torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        onednn = False
    if not (amx or avx512_bf16):
        return False, f"this CPU has no native bf16 matmul ({cap}, no AVX512-BF16 or AMX)"
    if cap != "AVX512" or not onednn:
        return False, f"torch runs this CPU without its bf16 units ({cap}, oneDNN bf16 {onednn})"
    return True, f"this CPU runs bf16 matmuls natively ({cap} with {'AMX' if amx else 'AVX512-BF16'})"


def cuda_bf16_native(device):
    # native bf16 tensor cores from Ampere on (compute capability 8.0); is_bf16_supported() alone also counts
    # emulation (a T4 at 7.5 says True), so the capability decides
    major, minor = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    if major >= 8:
        return True, f"{name} (compute capability {major}.{minor}) runs bf16 natively"
    return False, f"{name} (compute capability {major}.{minor}) only emulates bf16"


def resolve_dtype(requested, device):
    # "auto" | "bf16" | "fp32" -> ("bf16" | "fp32", one line saying what was chosen and why)
    device = torch.device(device)
    if device.type == "cuda":
        native, reason = cuda_bf16_native(device)
    elif device.type == "mps":
        native, reason = False, "MPS: bf16 autocast depends on the macOS version, so auto stays fp32"
    else:
        native, reason = cpu_bf16_native()
    if requested == "auto":
        chosen = "bf16" if native else "fp32"
        return chosen, f"dtype auto -> {chosen}: {reason}" + ("" if native else "; --dtype bf16 forces it")
    if requested == "bf16" and not native:
        return "bf16", f"warning: --dtype bf16 on a device without native bf16 will be much slower: {reason}"
    return requested, f"dtype {requested} (as asked; {reason})"


def setup(args, default_model):
    # threads, device (one line if it cannot be used), torchrun, the autocast dtype (its reason is the first log
    # line), and args.model: a --model that names a file is one line, none is the script's default model
    # (default_model() fetches it once); before anything is loaded. Returns this process's Dist.
    if args.threads:
        torch.set_num_threads(args.threads)
    dist = distributed(pick_device(args.device))  # torchrun: this rank's device; else one process
    args.device = dist.device
    args.dtype, why = resolve_dtype(args.dtype, args.device)
    print(why, flush=True)
    if args.model and not Path(args.model).is_dir():
        raise InputError(f"--model {args.model}: not a model directory (config.json, model.safetensors, "
                         f"tokenizer.json)")
    args.model = str(args.model or default_model())
    return dist


def autocast(device, dtype):
    # the forward's autocast context: bf16 when chosen, else nothing (float32)
    if dtype != "bf16":
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform
        return platform.processor() or platform.machine()


def machine(device, dtype, threads=None):
    # what every result records next to its numbers (metrics.json, log.jsonl, bench.json)
    device = torch.device(device)
    rec = {"cpu": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "cpu_bf16_native": cpu_bf16_native()[0], "threads": threads or torch.get_num_threads(),
           "torch": torch.__version__, "device": str(device), "dtype": dtype}
    if device.type == "cuda":
        rec["gpu"] = torch.cuda.get_device_name(device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rec["world_size"] = torch.distributed.get_world_size()
    return rec


# ---- more than one process: torchrun ----------------------------------------------------------------------------
# `torchrun --nproc_per_node N train_nlu.py ...` sets WORLD_SIZE, RANK and LOCAL_RANK, as in nanoGPT's train.py.
# Data parallel: every rank holds the whole model, takes a disjoint share of each step's batch, and
# DistributedDataParallel all-reduces the adapter (and head) gradients once per optimizer step. Without torchrun
# nothing here does anything.


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: str = "cpu"

    @property
    def main(self):  # rank 0: the one process that prints, logs, evaluates and writes files
        return self.rank == 0


def distributed(device):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(0, 1, device)
    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if torch.device(device).type == "cuda":
        device = f"cuda:{local}"  # one GPU per process
        torch.cuda.set_device(device)
    # Rank 0 evaluates alone (the base model, each validation) while the others wait in the next collective:
    # the timeout allows for a long evaluation.
    torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                         timeout=datetime.timedelta(hours=2))
    if rank:  # one console: the other ranks' prints go nowhere (their errors still reach stderr)
        sys.stdout = open(os.devnull, "w")
    return Dist(rank, world, device)


def data_parallel(net, dist):
    # DDP over the trainable parameters; buffers (the teacher's A0/B0, RoPE tables) are equal on every rank and
    # never change, so they are not broadcast each forward; the gradients live in DDP's all-reduce buckets. The
    # unwrapped model stays `net` (teacher, evaluation, saving); the wrapper is only for the training forward.
    if dist.world == 1:
        return net
    ids = [dist.device] if dist.device.startswith("cuda") else None
    return nn.parallel.DistributedDataParallel(net, device_ids=ids, broadcast_buffers=False,
                                               gradient_as_bucket_view=True)


def sync_gradients(net, last: bool):
    # DDP all-reduces the gradients in the backward of a step's last micro-batch only (nanoGPT's
    # require_backward_grad_sync; no_sync is the public switch); a plain module always accumulates locally
    return net.no_sync() if not last and hasattr(net, "no_sync") else nullcontext()


def all_sum(values: dict, dist) -> dict:
    # {name: float} summed over the ranks (the logged terms: each rank adds its weighted share)
    if dist.world == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=dist.device)
    torch.distributed.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def step_seed(seed, step, micro):
    # The randomness of one micro-batch (dropout; NLG's range finder) depends only on (seed, optimizer step,
    # micro-batch index within the step's global batch), so N ranks x G micro-batches draw what one process
    # with N*G micro-batches draws, and a resumed run draws what an uninterrupted one did.
    return seed * 1_000_003 + step * 1009 + micro


def check_world(n: int, batch_size: int, grad_accum: int, world: int, steps: int):
    # Before training: every step must give every rank the same number of examples, and the epoch's last,
    # smaller step (when the run reaches it) at least one each: a rank with none would wait forever in the
    # gradient all-reduce.
    if world == 1:
        return
    if batch_size % (world * grad_accum):
        raise InputError(f"--batch-size {batch_size} (examples per optimizer step, all processes together) is not "
                         f"divisible by {world} processes x --grad-accum {grad_accum}")
    last = n % batch_size
    if last and steps > n // batch_size and math.ceil(last / math.ceil(last / world)) < world:
        raise InputError(f"the epoch's last step has {last} of the {n} training examples, too few to give each of "
                         f"{world} processes a share: choose another --batch-size, or a --max-steps that ends sooner")


# ---- files: JSON, tensors, the run directory, the one checkpoint format ----------------------------------------


def loads_strict(text, path, what="JSON"):
    # JSON text -> object; invalid JSON or a duplicate key is one line naming the file
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)  # balora's: json.loads keeps the last silently
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid {what} (truncated or edited? {e})") from None
    except KeyError as e:
        raise InputError(f"{path}: the key {e.args[0]!r} appears twice") from None


def read_json(path, what="JSON") -> dict:
    path = Path(path)
    try:
        obj = loads_strict(decode_utf8(path.read_bytes(), path), path, what)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found") from None
    except IsADirectoryError:
        raise InputError(f"{path}: a directory, not a {what} file") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a JSON object, got a {type(obj).__name__}")
    return obj


def write_json(path, obj):
    atomic_write(path, lambda p: Path(p).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8"))


def write_jsonl(path, records):
    atomic_write(path, lambda p: Path(p).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8"))


def load_tensors(path) -> dict:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found") from None
    except (SafetensorError, OSError) as e:
        raise InputError(f"{path}: not a readable safetensors file (truncated or edited? {e})") from None


def open_safetensors(file):
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as e:
        raise InputError(f"{file}: not a readable safetensors file ({e})") from None


def run_dir(args, dist, task):
    # The run directory, locked by this process until it exits (rank 0 under torchrun). The default is a new
    # runs/TASK-METHOD-TIME, made by one mkdir, which fails for all but one of two processes started in the same
    # second (the other takes TIME-2). A given --out is a new directory or, with --resume, the run to continue:
    # never a file, never a run overwritten without --resume, never a run that another live process writes.
    if args.out is None:
        args.out = str(new_run_dir(f"runs/{task}-{args.method}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
                       if dist.main else None)
        if dist.world > 1:  # every rank uses rank 0's directory
            name = [args.out]
            torch.distributed.broadcast_object_list(name, src=0)
            args.out = name[0]
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: a file, not a directory")
    if args.resume and not (out / CHECKPOINT).exists():
        raise InputError(f"--resume: {out / CHECKPOINT} not found: no checkpoint to continue in {out}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out, prefix=".tmp-probe-")
        probe.close()
    except OSError as e:
        raise InputError(f"--out {out}: cannot write there ({e.strerror})") from None
    if dist.main:
        lock_run_dir(out)  # before the check below: two runs given one new --out cannot both pass it
        started = [n for n in (CHECKPOINT, "log.jsonl", "metrics.json") if (out / n).exists()]
        if started and not args.resume:
            raise InputError(f"{out} already holds a run ({', '.join(started)}): pass --resume to continue it, "
                             f"or another --out")
    return out


def new_run_dir(stem):
    # stem, or stem-2, stem-3, ...: the first that this process creates itself (mkdir is atomic)
    for n in range(1, 1000):
        path = Path(stem if n == 1 else f"{stem}-{n}")
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
        except OSError as e:
            raise InputError(f"{path}: cannot create the run directory ({e.strerror}); pass --out") from None
    raise InputError(f"{stem}: 999 run directories of this name exist; pass --out")


# OUT/.lock names the pid of the process writing OUT. The lock itself is an flock on that file, which the OS
# releases when the process ends however it ends (a crash, SIGKILL): a live owner refuses a second run; a lock
# file a dead process left behind is taken over. The file is removed when the owner exits normally.
LOCK = ".lock"
_locks = {}  # path -> open lock file of this process (a second main() in one process reuses it)


def lock_run_dir(out):
    path = (Path(out) / LOCK).resolve()
    if path in _locks:
        return
    try:
        import fcntl
    except ImportError:  # Windows: no flock
        print(f"note: no run-directory lock on this system (no fcntl); do not start two runs in {out}")
        return
    for _ in range(10):
        f = open(path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner = f.read().strip() or "unknown"
            f.close()
            raise InputError(f"--out {out}: process {owner} is writing this run ({path} is locked); wait for it to "
                             f"end, or pass another --out") from None
        if path.exists() and os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
            break
        f.close()  # the owner removed the file between our open and our lock: lock the new one
    else:
        raise InputError(f"--out {out}: could not lock {path}")
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _locks[path] = f


def unlock_run_dir(out):
    # the lock released (the scripts' main() on its way out; at exit for any still held): the file is removed
    # while still locked, so that no other process can hold a lock on a removed file
    f = _locks.pop((Path(out) / LOCK).resolve(), None)
    if f is not None:
        Path(f.name).unlink(missing_ok=True)
        f.close()


atexit.register(lambda: [unlock_run_dir(Path(p).parent) for p in list(_locks)])


def open_log(out, step, resume, main=True):
    # log.jsonl; a resumed run first drops what a killed save left behind and the records of the steps after its
    # checkpoint (it replays them), so that the log ends up as an uninterrupted run's
    if not main:
        return open(os.devnull, "w")
    path = Path(out) / "log.jsonl"
    if resume:
        stale = [p for p in Path(out).glob(".tmp-*")]
        for p in stale:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        if stale:
            print(f"resume: removed the leftovers of an interrupted save: {', '.join(p.name for p in stale)}")
        if path.exists():
            keep = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
                    if line.strip() and json.loads(line).get("step", 0) <= step]
            atomic_write(path, lambda p: Path(p).write_text("".join(keep), encoding="utf-8"))
    return open(path, "a" if resume else "w", encoding="utf-8")


# One checkpoint format for both scripts: OUT/checkpoint.safetensors, written atomically, holding the trained
# tensors ("param.NAME"), AdamW's state ("opt.I.KEY"), the RNG ("rng.cpu", "rng.cuda.I"), any extra tensors the
# script keeps ("extra.NAME": NLU's teacher cache) and, in its metadata, the JSON state (step, settings, ...).
CHECKPOINT = "checkpoint.safetensors"


def save_checkpoint(out, net, opt, state, extra=None):
    params = {f"param.{n}": p.detach().cpu().contiguous() for n, p in net.named_parameters() if p.requires_grad}
    bad = [k for k, t in params.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise FloatingPointError(f"step {state['step']}: {bad[0]} holds non-finite values; the checkpoint is not "
                                 f"written")
    tensors = dict(params)
    for i, s in opt.state_dict()["state"].items():
        tensors.update({f"opt.{i}.{k}": v.detach().cpu().contiguous() for k, v in s.items()})
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    tensors.update({f"extra.{k}": v.detach().cpu().contiguous() for k, v in (extra or {}).items()})
    atomic_write(Path(out) / CHECKPOINT, lambda p: save_file(tensors, p, metadata={"train_state": json.dumps(state)}))


# What may change between a run and its --resume: where and how fast it runs, and when it saves. Every other
# setting (each script adds the few of its own that cannot change a number) is refused by name.
RESUME_MAY_CHANGE = {"resume", "stop_after", "out", "threads", "device", "save_every", "debug", "grad_checkpoint"}


def fingerprints(paths) -> dict:
    # {file: {"size", "sha256"}} of every input (a directory: its top-level files; hidden ones skipped), recorded in
    # the checkpoint so that --resume refuses an input that changed. A *.safetensors file's hash covers its header
    # (names, dtypes, shapes, offsets) only: with the size it catches a swapped weights file without reading
    # gigabytes at every start.
    out = {}
    for p in paths:
        if p is None:
            continue
        p = Path(p).resolve()
        files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")) if p.is_dir() else [p]
        for f in files:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                if f.suffix == ".safetensors":
                    head = fh.read(8)
                    h.update(head + fh.read(int.from_bytes(head, "little") if len(head) == 8 else 0))
                else:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        h.update(block)
            out[str(f)] = {"size": f.stat().st_size, "sha256": h.hexdigest()}
    return out


def check_inputs(path, saved, now):
    # the checkpoint's input fingerprints against this run's: any file added, gone or changed is refused by name
    for f in sorted(set(saved) | set(now)):
        was, new = saved.get(f), now.get(f)
        if was == new:
            continue
        what = ("is not an input of this run" if new is None else "is a new input" if was is None else
                f"changed (size {was['size']} -> {new['size']} bytes)" if was["size"] != new["size"] else
                f"changed (same size, sha256 {was['sha256'][:12]}… -> {new['sha256'][:12]}…)")
        raise InputError(f"{path}: {f} {what} since the checkpoint was written; a resume trains on the inputs "
                         f"it started with")


def checkpoint_state(out, script, args, may_change=(), inputs=None):
    # the JSON state of OUT's checkpoint, written by `script`, its settings checked against this run's before
    # anything is loaded: every flag must be equal but those in RESUME_MAY_CHANGE and may_change, and every input
    # file's fingerprint (`inputs`, from fingerprints()) equal to the one recorded
    path = Path(out) / CHECKPOINT
    with open_safetensors(path) as f:
        meta = f.metadata() or {}
    if "train_state" not in meta:
        raise InputError(f"{path}: not a checkpoint of these scripts (no 'train_state' metadata)")
    state = loads_strict(meta["train_state"], f"{path} (train_state)")
    step, saved = state.get("step"), state.get("args")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0 or not isinstance(saved, dict):
        raise InputError(f"{path}: 'step' = {step!r} should be an integer >= 0 and 'args' an object")
    if state.get("script", script) != script:
        raise InputError(f"{path}: a {state['script']} checkpoint; resume it with {state['script']}, not {script}")
    allowed, now, missing = RESUME_MAY_CHANGE | set(may_change), vars(args), object()
    differ = sorted(k for k in set(saved) | set(now) if k not in allowed and saved.get(k, missing) != now.get(k, missing))
    if differ:
        k = differ[0]
        was = repr(saved[k]) if k in saved else "no such setting"
        raise InputError(f"{path}: was written with --{k.replace('_', '-')} {was}, this run has "
                         f"{now.get(k, 'no such setting')!r}; resume with the same settings"
                         + (f" ({len(differ)} differ: {', '.join(differ)})" if len(differ) > 1 else ""))
    if inputs is not None:
        if not isinstance(state.get("inputs"), dict):
            raise InputError(f"{path}: no input fingerprints ('inputs'): written by an older version of {script}")
        check_inputs(path, state["inputs"], inputs)
    return state


def checkpoint_step(out):
    # the step of OUT's checkpoint, or None when there is none (or it cannot be read)
    try:
        with safe_open(str(Path(out) / CHECKPOINT), framework="pt") as f:
            return json.loads((f.metadata() or {})["train_state"])["step"]
    except (OSError, SafetensorError, KeyError, TypeError, ValueError):
        return None


def load_checkpoint(out, net, opt, step):
    # the trained tensors, AdamW's state (complete, and at the run's `step`) and the RNG back in place; returns the
    # extra tensors
    path = Path(out) / CHECKPOINT
    tensors = load_tensors(path)
    params = {n: p for n, p in net.named_parameters() if p.requires_grad}
    want, have = {f"param.{n}" for n in params}, {k for k in tensors if k.startswith("param.")}
    if want != have:
        raise InputError(f"{path}: trained tensors missing {sorted(want - have)[:3]}, unexpected {sorted(have - want)[:3]}")
    for k, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise InputError(f"{path}: {k} holds non-finite values")
    for n, p in params.items():
        if tensors[f"param.{n}"].shape != p.shape:
            raise InputError(f"{path}: param.{n} has shape {tuple(tensors[f'param.{n}'].shape)}, the model "
                             f"expects {tuple(p.shape)}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"param.{n}"])
    opt.load_state_dict(optimizer_state(opt, tensors, "opt.", path, step))
    if "rng.cpu" not in tensors or tensors["rng.cpu"].dtype != torch.uint8:
        raise InputError(f"{path}: no rng.cpu tensor of bytes")
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    return {k[len("extra."):]: t for k, t in tensors.items() if k.startswith("extra.")}


def optimizer_state(opt, tensors: dict, prefix: str, path, step) -> dict:
    # {f"{prefix}{i}.{name}": tensor} -> a state_dict for opt, every tensor checked against its parameter (torch's
    # load_state_dict does not compare shapes; a wrong one would only fail inside opt.step()), and complete: every
    # parameter has its exp_avg, exp_avg_sq and a step equal to the run's (a fresh AdamW would resume silently)
    sd = opt.state_dict()
    params = [p for g in opt.param_groups for p in g["params"]]
    state = {}
    for key, t in tensors.items():
        if not key.startswith(prefix):
            continue
        idx, _, name = key[len(prefix):].partition(".")
        if not idx.isdigit() or int(idx) >= len(params):
            raise InputError(f"{path}: {key} names parameter {idx}, the optimizer has {len(params)}")
        p = params[int(idx)]
        if name in ("exp_avg", "exp_avg_sq") and t.shape != p.shape:
            raise InputError(f"{path}: {key} has shape {tuple(t.shape)}, its parameter {tuple(p.shape)}")
        state.setdefault(int(idx), {})[name] = t.to(p.device) if name != "step" else t
    want = {"step", "exp_avg", "exp_avg_sq"}
    for i in range(len(params) if step > 0 else 0):
        if set(state.get(i, {})) != want:
            raise InputError(f"{path}: the optimizer state of parameter {i} has {sorted(state.get(i, {}))}, it needs "
                             f"{sorted(want)}")
        if state[i]["step"].numel() != 1 or float(state[i]["step"]) != step:
            raise InputError(f"{path}: {prefix}{i}.step is {state[i]['step'].tolist()}, the run is at step {step}")
    return {**sd, "state": state}


def check_finite_metrics(metrics: dict, what: str):
    # a run whose evaluation is NaN or inf has failed: say so instead of writing "done" and a final adapter
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"{what}: {', '.join(bad)} non-finite ({metrics[bad[0]]}); the run failed (a "
                                 f"learning rate too large?); no final adapter or metrics.json is written")
