# plumbing/rundir.py: the run directory a training script writes (a new runs/TASK-METHOD-TIME or a given --out),
# its lock against a second live process, what it refuses to follow out of it (a symbolic link among its files),
# the leftovers of a killed save it removes, its log.jsonl (cut back to the checkpoint on --resume) and the JSONL
# output files. Both training scripts import it; it imports balora.py (atomic_write), data.py (file_kind),
# plumbing/checkpoints.py (the checkpoint's name), plumbing/errors.py and plumbing/parallel.py (agree: torchrun's
# ranks run with equal flags).

import atexit
import datetime
import errno
import fnmatch
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

import torch

import data
from balora import atomic_write
from plumbing.checkpoints import CHECKPOINT
from plumbing.errors import InputError
from plumbing.parallel import agree

# what a run writes in its directory: files, directories (whose files it writes too) and name patterns
FILES = (CHECKPOINT, "log.jsonl", "metrics.json")
DIRS = ("adapter", "adapter_lora", "merged")
PATTERNS = ("samples_*.jsonl", "gsm8k_*.jsonl")
# flags that may differ between torchrun's ranks: the rank's own device and threads, and the paths of the inputs,
# whose contents are compared instead (checkpoints.fingerprints: another node may keep them elsewhere)
PER_RANK = {"device", "threads", "debug", "model", "train_file", "val_file", "test_file", "eval_text", "eval_gsm8k"}


def run_dir(args, dist, task):
    # The run directory, locked by this process until it exits (rank 0 under torchrun). The default is a new
    # runs/TASK-METHOD-TIME, made by one mkdir, which fails for all but one of two processes started in the same
    # second (the other takes TIME-2). A given --out is a new directory or, with --resume, the run to continue:
    # never a file, never a run overwritten without --resume, never a run that another live process writes, never
    # the model directory or inside it, never one whose files are symbolic links (the run would write where they
    # point). Under torchrun every rank must have rank 0's flags (parallel.agree).
    agree({k: (f"--{k.replace('_', '-')} {v!r}", repr(v)) for k, v in sorted(vars(args).items()) if k not in PER_RANK},
          "flags")
    if args.out is None:
        args.out = str(new_run_dir(f"runs/{task}-{args.method}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
                       if dist.main else None)
        if dist.world > 1:  # every rank uses rank 0's directory
            name = [args.out]
            torch.distributed.broadcast_object_list(name, src=0)
            args.out = name[0]
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        mode = os.stat(out).st_mode
        raise InputError(f"--out {out}: {'a file' if stat.S_ISREG(mode) else data.file_kind(mode)}, not a directory")
    model = getattr(args, "model", None)
    if model and (out.resolve() == Path(model).resolve() or Path(model).resolve() in out.resolve().parents):
        raise InputError(f"--out {out}: {'is' if out.resolve() == Path(model).resolve() else 'inside'} the model "
                         f"directory {model}; a run writes its own directory and never the model's (a resume would "
                         f"find its own files among the inputs): pass another --out")
    if args.resume and not (out / CHECKPOINT).exists():
        raise InputError(f"--resume: {out / CHECKPOINT} not found: no checkpoint to continue in {out}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        if dist.main:  # the only rank that writes there
            probe = tempfile.NamedTemporaryFile(dir=out, prefix=".tmp-probe-")
            probe.close()
    except OSError as e:
        raise InputError(f"--out {out}: cannot write there ({e.strerror})") from None
    if dist.main:
        lock_run_dir(out)  # before the checks below: two runs given one new --out cannot both pass them
        check_entries(out)
        started = [n for n in FILES if os.path.lexists(out / n)]
        if started and not args.resume:
            raise InputError(f"{out} already holds a run ({', '.join(started)}): pass --resume to continue it, "
                             f"or another --out")
        remove_leftovers(out)
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


def ours(name):
    return name in FILES or name in DIRS or any(fnmatch.fnmatchcase(name, p) for p in PATTERNS)


def check_entries(out):
    # Nothing the run creates, writes or removes may lead out of its directory: a symbolic link among its files (or
    # in its adapter / merged directories) is refused by name, as is a file where a directory belongs and the other
    # way round. (Files are replaced by a rename, which replaces a link itself, but adapter/ as a link to another
    # directory would be written into, and merged/tokenizer.json as a link would be copied over.)
    def refuse(path, what):
        raise InputError(f"--out {out}: {path} is {what}; a run writes only inside its own directory and never follows "
                         f"a link out of it: remove it, or pass another --out")
    for entry in sorted(Path(out).iterdir()):
        if not ours(entry.name):
            continue
        mode = os.lstat(entry).st_mode
        if stat.S_ISLNK(mode):
            refuse(entry, f"a symbolic link (to {os.readlink(entry)})")
        if entry.name in DIRS:
            if not stat.S_ISDIR(mode):
                refuse(entry, "not a directory")
            for child in sorted(entry.iterdir()):
                if child.is_symlink():
                    refuse(child, f"a symbolic link (to {os.readlink(child)})")
        elif not stat.S_ISREG(mode):
            refuse(entry, "not a regular file")


def remove_leftovers(out):
    # atomic_write's temporary files (.tmp-*) that a killed save left behind, in the run directory and in its
    # adapter / merged directories: never a finished file (each is renamed into place once whole), so they go when
    # a run takes the directory's lock. A link among them is removed itself, never what it points to.
    out, stale = Path(out), []
    for d in [out] + [out / n for n in DIRS if stat.S_ISDIR(_lmode(out / n))]:
        for p in sorted(d.glob(".tmp-*")):
            shutil.rmtree(p) if stat.S_ISDIR(_lmode(p)) else p.unlink()
            stale.append(str(p.relative_to(out)))
    if stale:
        print(f"note: removed the leftovers of an interrupted save in {out}: {', '.join(stale)}")


def _lmode(path):
    try:
        return os.lstat(path).st_mode
    except FileNotFoundError:
        return 0


# OUT/.lock names the pid of the process writing OUT. The lock itself is an flock on that file, which the OS
# releases when the process ends however it ends (a crash, SIGKILL): a live owner refuses a second run; a lock
# file a dead process left behind is taken over. The file is removed when the owner exits normally. It is opened
# without following a link (O_NOFOLLOW): a .lock that is a symbolic link, a directory or anything but a regular
# file is refused by name, and nothing outside --out is written or removed.
LOCK = ".lock"
_locks = {}  # path -> open lock file of this process (a second main() in one process reuses it)


def _open_lock(out, path):
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | \
        getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        what = ("a symbolic link (a run never follows a link out of its directory)" if stat.S_ISLNK(_lmode(path))
                else "a directory, not the run's lock file" if e.errno == errno.EISDIR
                else "not readable by this user (a run of another user?): permission denied"
                if e.errno in (errno.EACCES, errno.EPERM) else f"not usable as the run's lock ({e.strerror})")
        raise InputError(f"--out {out}: {path} is {what}; remove it, or pass another --out") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise InputError(f"--out {out}: {path} is not a regular file (not the run's lock); remove it, or pass "
                         f"another --out")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "r+", encoding="utf-8")


def lock_run_dir(out):
    path = Path(out) / LOCK
    key = Path(out).resolve() / LOCK
    if key in _locks:
        return
    try:
        import fcntl
    except ImportError:  # Windows: no flock
        print(f"note: no run-directory lock on this system (no fcntl); do not start two runs in {out}")
        return
    for _ in range(10):
        f = _open_lock(out, path)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner = f.read(100).strip() or "unknown"
            f.close()
            raise InputError(f"--out {out}: process {owner} is writing this run ({path} is locked); wait for it to "
                             f"end, or pass another --out") from None
        st = os.fstat(f.fileno())
        try:
            now = os.lstat(path)
            if (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev):
                break
        except FileNotFoundError:
            pass
        f.close()  # the owner removed the file between our open and our lock: lock the new one
    else:
        raise InputError(f"--out {out}: could not lock {path}")
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _locks[key] = (f, path)


def unlock_run_dir(out):
    # the lock released (the scripts' main() on its way out; at exit for any still held): the file is removed
    # while still locked, so that no other process can hold a lock on a removed file; only our own file is removed
    f, path = _locks.pop(Path(out).resolve() / LOCK, (None, None))
    if f is not None:
        try:
            now, st = os.lstat(path), os.fstat(f.fileno())
            if (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev):
                os.unlink(path)
        except FileNotFoundError:
            pass
        f.close()


atexit.register(lambda: [unlock_run_dir(Path(p).parent) for p in list(_locks)])


def open_log(out, step, resume, main=True):
    # log.jsonl, opened without following a link. A resumed run first drops the records of the steps after its
    # checkpoint (it replays them), so that the log ends up as an uninterrupted run's; a last line cut by a kill is
    # dropped with a note, any other line that is not a JSON object is an error naming the file and line. The file
    # has `new` True when it starts empty (a new run, or a resume whose log was deleted): the script writes its start
    # record then.
    if not main:
        f = open(os.devnull, "w")
        f.new = not resume
        return f
    path = Path(out) / "log.jsonl"
    if resume and os.path.lexists(path):
        keep = kept_records(path, step)
        atomic_write(path, lambda p: Path(p).write_text("".join(keep), encoding="utf-8"))
    flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | \
        (os.O_APPEND if resume else os.O_TRUNC)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        what = "a symbolic link" if stat.S_ISLNK(_lmode(path)) else e.strerror
        raise InputError(f"--out {out}: {path} cannot be opened ({what}); a run writes only inside its own "
                         f"directory") from None
    f = os.fdopen(fd, "a" if resume else "w", encoding="utf-8")
    f.new = os.fstat(fd).st_size == 0
    return f


def kept_records(path, step):
    # the lines of a resumed run's log.jsonl up to its checkpoint's step, each checked
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 ({e.reason} at byte {e.start}); it is not a log these scripts "
                         f"wrote") from None
    lines = text.splitlines(keepends=True)
    last = max((n for n, line in enumerate(lines, 1) if line.strip()), default=0)
    keep = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if n == last and not line.endswith("\n"):  # the record a killed write cut short
                print(f"resume: dropped {path}:{n}, a record cut short when the run was stopped")
                continue
            raise InputError(f"{path}:{n}: not a JSON record ({e.msg}); remove or repair that line") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("step", 0), int):
            raise InputError(f"{path}:{n}: not a record of these scripts (a JSON object with an integer 'step')")
        if rec.get("step", 0) <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
    return keep


def write_jsonl(path, records):
    # JSON Lines (one record a line: samples, GSM8K outputs), written atomically; JSON files: balora.write_json
    atomic_write(path, lambda p: Path(p).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8"))

