# tests/test_rundir.py: plumbing/rundir.py: the default run directory (two processes started together make two
# runs), the lock (a live writer refuses a second run, a dead one's lock is taken over), an --out that cannot be
# written, and a resume that cleans a crash's leftovers so that its log equals an uninterrupted run's; nothing the
# run writes follows a symbolic link out of --out, a lock or log that is not what it should be is one line, and
# --out is never the model directory.

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_nlg
import train_nlu
from plumbing import errors, rundir

torch.set_num_threads(2)
from helpers import *  # noqa: F401,F403  the shared tiny models, files and runners


@slow
def test_two_processes_started_together_with_the_default_out_make_two_complete_runs(encoders, files, tmp_path):
    # both name runs/nlu-pissa-TIME in the same second (or neighbouring ones): mkdir gives one of them TIME-2
    args = [a for a in argv(encoders["plain"], files, "unused", "--method", "pissa", "--epochs", "2")]
    i = args.index("--out")
    del args[i:i + 2]
    env = {k: v for k, v in os.environ.items() if k != "BALORA_DEBUG"}
    procs = [subprocess.Popen([sys.executable, str(HERE / "train_nlu.py"), *args], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2, runs
    for run in runs:
        log = read_log(run)
        assert [r["event"] for r in log if "event" in r].count("start") == 1
        assert [r["step"] for r in log if "event" not in r] == list(range(1, 11))
        assert json.loads((run / "metrics.json").read_text())["steps"] == 10
        assert not (run / rundir.LOCK).exists()  # released at exit


def test_two_runs_named_in_the_same_second_get_two_directories(tmp_path):
    # the one mkdir that fails takes the next name
    stem = tmp_path / "same" / "nlu-pissa-20260101-000000"
    assert [rundir.new_run_dir(stem), rundir.new_run_dir(stem)] == [stem, Path(f"{stem}-2")]


def test_a_locked_out_is_refused_by_the_pid_in_its_lock_and_unlocking_removes_the_lock(tmp_path):
    import fcntl
    out = tmp_path / "r"
    out.mkdir()
    with open(out / rundir.LOCK, "a+") as holder:  # another writer (flock: per open file, so also in one process)
        fcntl.flock(holder, fcntl.LOCK_EX)
        holder.write("12345\n")
        holder.flush()
        with pytest.raises(errors.InputError, match="process 12345 is writing this run"):
            rundir.lock_run_dir(out)
    rundir.lock_run_dir(out)  # the holder is gone: its lock file is taken over
    assert (out / rundir.LOCK).read_text() == f"{os.getpid()}\n"
    rundir.unlock_run_dir(out)
    assert not (out / rundir.LOCK).exists()


@slow
def test_an_out_that_a_live_process_writes_is_refused_and_a_stale_lock_is_taken_over(encoders, files, tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               f"f = open({str(out / rundir.LOCK)!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
                               "f.write(str(os.getpid())); f.flush(); print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    try:
        proc = run_script("train_nlu.py", *argv(encoders["plain"], files, out, "--method", "pissa"))
        assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert f"process {holder.pid} is writing this run" in proc.stderr
    finally:
        holder.kill()
        holder.wait()
    assert (out / rundir.LOCK).exists()  # left behind by a killed owner: stale, taken over (in this process)
    train_nlu.main(argv(encoders["plain"], files, out, "--method", "pissa"))
    assert (out / "metrics.json").exists() and not (out / rundir.LOCK).exists()


def test_out_on_a_read_only_filesystem_is_one_line(encoders, files, tmp_path, monkeypatch):
    def read_only(*args, **kwargs):  # what a read-only filesystem answers (root included)
        raise OSError(30, "Read-only file system")
    monkeypatch.setattr(rundir.tempfile, "NamedTemporaryFile", read_only)
    with pytest.raises(ValueError, match="--out .*run: cannot write there \\(Read-only file system\\)"):
        train_nlu.main(argv(encoders["plain"], files, tmp_path / "run"))


def test_resume_after_a_crash_cleans_leftovers_and_the_log_equals_an_uninterrupted_one(
        encoders, files, tiny_llama, tmp_path):
    # NLU: a run killed after step 5 with its last checkpoint at step 4 (and a half-written save beside it)
    common = ("--epochs", "2", "--save-every", "2", "--method", "balora")
    a, b = tmp_path / "a", tmp_path / "b"
    train_nlu.main(argv(encoders["plain"], files, a, *common))
    train_nlu.main(argv(encoders["plain"], files, b, *common, "--stop-after", "4"))
    with open(b / "log.jsonl", "a") as f:  # the step the crash lost after the checkpoint
        f.write(json.dumps({"step": 5, "task": 0.1}) + "\n")
    (b / ".tmp-checkpoint-xyz").write_bytes(b"half")
    (b / ".tmp-abc").write_text("half")
    train_nlu.main(argv(encoders["plain"], files, b, *common, "--resume"))
    la, lb = ([UNTIMED(json.loads(l)) for l in open(d / "log.jsonl")] for d in (a, b))
    la[0].pop("args"), lb[0].pop("args")  # --stop-after differs
    assert la == lb
    assert not list(b.glob(".tmp-*"))
    # NLG: the same with --save-every
    a, b = tmp_path / "ga", tmp_path / "gb"
    train_nlg.main(cli(tiny_llama, a, "--save-every", "2"))
    train_nlg.main(cli(tiny_llama, b, "--save-every", "2", "--stop-after", "2"))
    with open(b / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss": 1.0}) + "\n")
    (b / ".tmp-checkpoint-zzz").write_bytes(b"half")
    train_nlg.main(cli(tiny_llama, b, "--save-every", "2", "--resume"))
    la, lb = ([UNTIMED(json.loads(l)) for l in open(d / "log.jsonl")] for d in (a, b))
    for log in (la, lb):
        log[0]["args"].pop("stop_after"), log[0]["args"].pop("out"), log[0]["args"].pop("resume")
    assert la == lb and not list(b.glob(".tmp-*"))


def cli_run(monkeypatch, capfd, main, args):
    # errors.cli in this process, as the scripts run it: -> (exit status, stderr)
    monkeypatch.setattr(sys, "argv", ["train_nlu.py", *map(str, args)])
    monkeypatch.delenv("BALORA_DEBUG", raising=False)
    capfd.readouterr()
    with pytest.raises(SystemExit) as e:
        errors.cli(main, "train_nlu.py")
    return e.value.code, capfd.readouterr().err


def one_line(code, err, *parts):
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("train_nlu.py: error: ") and all(p in lines[0] for p in parts), lines[0]


def test_no_symbolic_link_in_the_run_directory_is_followed_out_of_it(encoders, files, tmp_path, monkeypatch, capfd):
    # OUT/.lock, OUT/log.jsonl, OUT/adapter as links to files outside --out: one line naming the link, exit 1, and
    # the file outside byte for byte as it was (before, .lock's target was overwritten with the pid, then deleted)
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "notes.txt").write_bytes(b"do not touch\n")
    (outside / "adapter_config.json").write_bytes(b"{}\n")
    before = {p.name: p.read_bytes() for p in outside.iterdir()}
    for name, target in ((rundir.LOCK, outside / "notes.txt"), ("log.jsonl", outside / "notes.txt"),
                         ("adapter", outside), ("metrics.json", outside / "new.json")):
        out = tmp_path / f"run-{name.strip('.')}"
        out.mkdir()
        (out / name).symlink_to(target)
        code, err = cli_run(monkeypatch, capfd, train_nlu.main, argv(encoders["plain"], files, out))
        one_line(code, err, str(out / name), "symbolic link")
        assert {p.name: p.read_bytes() for p in outside.iterdir()} == before
        assert (out / name).is_symlink() and not (out / "checkpoint.safetensors").exists()
    # the same on --resume: a run stopped at step 2 whose log.jsonl was then replaced by a link
    out = tmp_path / "resumed"
    assert train_nlu.main(argv(encoders["plain"], files, out, "--max-steps", "4", "--stop-after", "2")) is None
    (out / "log.jsonl").unlink()
    (out / "log.jsonl").symlink_to(outside / "notes.txt")
    code, err = cli_run(monkeypatch, capfd, train_nlu.main, argv(encoders["plain"], files, out, "--max-steps", "4",
                                                                  "--resume"))
    one_line(code, err, "log.jsonl", "symbolic link")
    assert {p.name: p.read_bytes() for p in outside.iterdir()} == before
    # the log is opened without following a link even if one appears after the checks
    (out / "log.jsonl").unlink()
    (out / "log.jsonl").symlink_to(outside / "notes.txt")
    with pytest.raises(errors.InputError, match="symbolic link"):
        rundir.open_log(out, 2, resume=False)
    assert {p.name: p.read_bytes() for p in outside.iterdir()} == before


def test_a_lock_that_is_a_directory_or_unreadable_is_one_line(encoders, files, tmp_path, monkeypatch, capfd):
    out = tmp_path / "r"
    (out / rundir.LOCK).mkdir(parents=True)
    code, err = cli_run(monkeypatch, capfd, train_nlu.main, argv(encoders["plain"], files, out))
    one_line(code, err, str(out / rundir.LOCK), "a directory, not the run's lock file")
    (out / rundir.LOCK).rmdir()
    (out / rundir.LOCK).write_text("123\n")
    real_open = os.open

    def no_permission(path, *a, **k):  # another user's lock (root reads everything, so the refusal is simulated)
        if str(path).endswith(rundir.LOCK):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)
    monkeypatch.setattr(rundir.os, "open", no_permission)
    code, err = cli_run(monkeypatch, capfd, train_nlu.main, argv(encoders["plain"], files, out))
    one_line(code, err, str(out / rundir.LOCK), "permission denied")


def test_out_equal_to_or_inside_the_model_directory_is_refused(encoders, files, tmp_path):
    model = copy_model_dir(encoders["plain"], tmp_path / "model")
    listing = sorted(p.name for p in model.iterdir())
    for out, what in ((model, "is the model directory"), (model / "runs" / "a", "inside the model directory")):
        with pytest.raises(errors.InputError, match=f"--out {out}: {what}"):
            train_nlu.main(argv(model, files, out))
    assert sorted(p.name for p in model.iterdir()) == listing


def test_leftovers_of_a_killed_save_are_removed_when_the_run_takes_the_lock(encoders, files, tmp_path, capsys):
    # a SIGKILL during --merge (or any atomic_write) leaves .tmp-* files: never finished files, removed by the next
    # run that takes the directory, in OUT and in its adapter / merged directories; a link among them goes itself
    out = tmp_path / "r"
    assert train_nlu.main(argv(encoders["plain"], files, out, "--max-steps", "4", "--stop-after", "2")) is None
    (out / "merged").mkdir()
    (out / "merged" / ".tmp-abc123").write_bytes(b"half a model")
    (out / "adapter").mkdir()
    (out / "adapter" / ".tmp-q").write_bytes(b"half")
    (out / ".tmp-dir").mkdir()
    (out / ".tmp-dir" / "x").write_bytes(b"half")
    keep = tmp_path / "keep.txt"
    keep.write_bytes(b"outside")
    (out / ".tmp-link").symlink_to(keep)
    capsys.readouterr()
    assert train_nlu.main(argv(encoders["plain"], files, out, "--max-steps", "4", "--resume"))["steps"] == 4
    assert "removed the leftovers of an interrupted save" in capsys.readouterr().out
    assert not [p for p in out.rglob(".tmp-*")] and keep.read_bytes() == b"outside"


def test_the_log_of_a_resume_is_checked_line_by_line_and_a_new_one_starts_afresh(tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    log = out / "log.jsonl"
    records = [{"event": "start"}, {"step": 1}, {"step": 2}, {"step": 3}]
    # a deleted log: the resumed run's log is new (the script writes its start record, rundir.open_log's `new`)
    f = rundir.open_log(out, 2, resume=True)
    assert f.new
    f.close()
    # a last line cut by a kill: dropped with a note naming it, the rest kept up to the checkpoint's step
    log.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 4, "ta')
    f = rundir.open_log(out, 2, resume=True)
    assert not f.new and "log.jsonl:5, a record cut short" in capsys.readouterr().out
    f.close()
    assert [json.loads(l) for l in log.read_text().splitlines()] == records[:3]
    # a broken line elsewhere: one line naming the file and line (before: a JSONDecodeError traceback)
    log.write_text('{"event": "start"}\n{"step": 1\n{"step": 2}\n')
    with pytest.raises(errors.InputError, match=re.escape(f"{log}:2: not a JSON record")):
        rundir.open_log(out, 2, resume=True)
    log.write_text('{"event": "start"}\n[1, 2]\n')
    with pytest.raises(errors.InputError, match=re.escape(f"{log}:2: not a record of these scripts")):
        rundir.open_log(out, 2, resume=True)
    log.write_bytes(b'{"step": 1}\n\xff\n')
    with pytest.raises(errors.InputError, match="log.jsonl: not UTF-8"):
        rundir.open_log(out, 2, resume=True)
