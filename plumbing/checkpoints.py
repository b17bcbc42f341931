# plumbing/checkpoints.py: the one checkpoint format of both training scripts (OUT/checkpoint.safetensors: trained
# tensors, AdamW's state, the RNG, extra tensors, the JSON state in its metadata), what a --resume checks before
# anything is loaded (every setting, every input file's fingerprint, every optimizer tensor), and the Ctrl-C report
# that names the checkpoint to resume from. Both training scripts and plumbing/rundir.py (the checkpoint's name)
# import it; it imports balora.py (atomic_write, parse_json), model.py (open_safetensors), data.py (open_input: an
# input that is not a regular file), plumbing/errors.py and plumbing/parallel.py (agree: torchrun's ranks check
# that they read the same inputs and checkpoint).

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

import data
import model
from balora import atomic_write, parse_json
from plumbing.errors import InputError, OutputError
from plumbing.parallel import agree


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
    path = Path(out) / CHECKPOINT
    try:
        atomic_write(path, lambda p: save_file(tensors, p, metadata={"train_state": json.dumps(state)}))
    except (OSError, SafetensorError) as e:  # disk full, quota, read-only: the old checkpoint is untouched
        why = getattr(e, "strerror", None) or str(e)
        kept = checkpoint_step(out)
        raise OutputError(f"{path}: the checkpoint of step {state['step']} could not be written ({why}); "
                          + (f"the checkpoint of step {kept} is kept whole" if kept is not None else
                             "no earlier checkpoint exists") + "; free space and --resume") from None


# What may change between a run and its --resume: where and how fast it runs, and when it saves. Every other
# setting (each script adds the few of its own that cannot change a number) is refused by name.
RESUME_MAY_CHANGE = {"resume", "stop_after", "out", "threads", "device", "save_every", "debug", "grad_checkpoint"}


def fingerprints(paths) -> dict:
    # {file: {"size", "sha256"}} of every input (a directory: its top-level files; hidden ones skipped), recorded in
    # the checkpoint so that --resume refuses an input that changed. A *.safetensors file's hash covers its header
    # (names, dtypes, shapes, offsets) only: with the size it catches a swapped weights file without reading
    # gigabytes at every start. Only regular files are read (data.open_input: a FIFO or /dev/zero is one line, never a
    # hang). Under torchrun every rank must find the same contents (parallel.agree).
    out, seen = {}, {}
    for i, p in enumerate(paths):
        if p is None:
            continue
        p = Path(p).resolve()
        try:
            files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")) if p.is_dir() else [p]
        except OSError as e:
            raise InputError(f"{p}: cannot list the directory ({e.strerror})") from None
        for f in files:
            h = hashlib.sha256()
            with data.open_input(f) as fh:
                size = os.fstat(fh.fileno()).st_size
                try:
                    n = int.from_bytes(fh.read(8), "little") if f.suffix == ".safetensors" else None
                    fh.seek(0)
                    if n is not None and n <= size - 8:  # the header alone (a bad length: the whole file)
                        h.update(fh.read(8 + n))
                    else:
                        for block in iter(lambda: fh.read(1 << 20), b""):
                            h.update(block)
                except OSError as e:
                    raise InputError(f"{f}: cannot be read ({e.strerror})") from None
            out[str(f)] = {"size": size, "sha256": h.hexdigest()}
            seen[f"input {i} {f.name if p.is_dir() else ''}"] = (
                f"{f} (size {size}, sha256 {h.hexdigest()[:12]}…)", f"{size}:{h.hexdigest()}")
    agree(seen, "input files")
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


def train_state(path, text):
    # the checkpoint's JSON state (its metadata "train_state"), read as strictly as every JSON file of the project
    # (balora.parse_json): invalid JSON, a second "step" (json.loads would keep the later one and skip steps
    # silently) or a non-object is one line naming the checkpoint
    return parse_json(text, f"{path} (train_state)", InputError)


# a header larger than this is not one the scripts wrote (theirs hold a few hundred tensor names and the state)
MAX_HEADER = 100 << 20


def read_header(path) -> tuple:
    # The checkpoint's metadata, read as strictly as every JSON of the project: the 8-byte length and the JSON
    # header parsed here with balora.parse_json (a key written twice, e.g. two "train_state", is an error naming it;
    # safetensors would keep one of them silently). -> (metadata, sha256 of the header). Only a regular file is read.
    try:
        with data.open_input(path) as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n <= min(size - 8, MAX_HEADER):
                raise InputError(f"{path}: not a readable safetensors file (truncated or edited? its header length "
                                 f"{n if n >= 0 else 'is missing'} does not fit its {size} bytes)")
            raw = f.read(n)
    except data.DataError as e:
        raise InputError(str(e).replace("(cannot read it)", "(this user cannot read the checkpoint: a run of "
                                        "another user?)")) from None
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not a readable safetensors file (its header is not UTF-8: {e.reason})") from None
    header = parse_json(text, f"{path} (header)", InputError)
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise InputError(f"{path} (header): __metadata__ should be an object of strings")
    return meta, hashlib.sha256(raw).hexdigest()


def open_checkpoint(path, header_read=False):
    # model.py's safetensors opener, after the strict header (read_header, unless the caller just read it); an
    # unreadable checkpoint is bad input, not a bad model directory
    if not header_read:
        read_header(path)
    try:
        return model.open_safetensors(path)
    except model.ModelError as e:
        raise InputError(str(e)) from None


def checkpoint_state(out, script, args, may_change=(), inputs=None):
    # the JSON state of OUT's checkpoint, written by `script`, its settings checked against this run's before
    # anything is loaded: every flag must be equal but those in RESUME_MAY_CHANGE and may_change, and every input
    # file's fingerprint (`inputs`, from fingerprints()) equal to the one recorded. Under torchrun every rank must
    # resume from rank 0's checkpoint (parallel.agree: another node's --out may hold another one).
    path = Path(out) / CHECKPOINT
    meta, digest = read_header(path)
    agree({"checkpoint": (f"{path} (header sha256 {digest[:12]}…)", digest)}, "checkpoint to resume from")
    with open_checkpoint(path, header_read=True):  # (a safetensors file as a whole, not just its header)
        pass
    if "train_state" not in meta:
        raise InputError(f"{path}: not a checkpoint of these scripts (no 'train_state' metadata)")
    state = train_state(path, meta["train_state"])
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
    path = Path(out) / CHECKPOINT
    try:
        return train_state(path, read_header(path)[0]["train_state"])["step"]
    except (OSError, KeyError, TypeError, ValueError):  # ValueError: InputError (unreadable, not JSON)
        return None


def load_tensors(path) -> dict:
    # every tensor of a safetensors file (model.py's opener); one that cannot be read is one line naming it
    with open_checkpoint(path) as f:
        try:
            return {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise InputError(f"{path}: not a readable safetensors file (truncated or edited? {e})") from None


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


class Interrupted(KeyboardInterrupt):
    # Ctrl-C inside a training loop: `interrupted at step N; ...` with the step of the checkpoint on disk (it is
    # whole: every file is written atomically); plumbing/errors.cli prints it as one line, exit status 130
    def __init__(self, step, out):
        saved = checkpoint_step(out)
        super().__init__(f"interrupted at step {step}; " + (
            f"`--resume --out {out}` (and the same flags) continues from its checkpoint at step {saved}"
            if saved is not None else "no checkpoint was written yet: nothing to resume"))
