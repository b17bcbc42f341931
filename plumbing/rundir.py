# plumbing/rundir.py: the run directory a training script writes (a new runs/TASK-METHOD-TIME or a given --out),
# its lock against a second live process, its log.jsonl (cut back to the checkpoint on --resume) and the JSONL
# output files. Both training scripts import it; it imports balora.py (atomic_write), plumbing/checkpoints.py (the
# checkpoint's name) and plumbing/errors.py.

import atexit
import datetime
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from balora import atomic_write
from plumbing.checkpoints import CHECKPOINT
from plumbing.errors import InputError


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


def write_jsonl(path, records):
    # JSON Lines (one record a line: samples, GSM8K outputs), written atomically; JSON files: balora.write_json
    atomic_write(path, lambda p: Path(p).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8"))

