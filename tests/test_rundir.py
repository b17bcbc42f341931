# tests/test_rundir.py: plumbing/rundir.py: the default run directory (two processes started together make two
# runs), the lock (a live writer refuses a second run, a dead one's lock is taken over), an --out that cannot be
# written, and a resume that cleans a crash's leftovers so that its log equals an uninterrupted run's.

import json
import os
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
    assert (out / rundir.LOCK).exists()  # left behind by a killed owner: stale, taken over
    proc = run_script("train_nlu.py", *argv(encoders["plain"], files, out, "--method", "pissa"))
    assert proc.returncode == 0, proc.stderr
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
