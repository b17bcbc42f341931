# tests/test_errors.py: plumbing/errors.py: cli, the one top level: a user error (in both scripts, on every rank
# under torchrun) is one line naming what and where, exit status 1, the traceback only with --debug; a bug shows its
# traceback; Ctrl-C exits 130 wherever it lands (plumbing/interrupts.py); bad inputs and a non-finite evaluation stop
# a run before it writes a result.

import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import model as M
import train_nlg
import train_nlu
from plumbing import errors

torch.set_num_threads(2)
from helpers import *  # noqa: F401,F403  the shared tiny models, files and runners


@pytest.mark.parametrize("raised, code, err", [
    (None, 0, ""),
    (errors.InputError("bad.jsonl:2: not UTF-8"), 1, "train_x.py: error: bad.jsonl:2: not UTF-8\n"),
    (errors.NonFiniteLoss("step 3: non-finite task nan"), 1, "train_x.py: error: step 3: non-finite task nan\n"),
    (FileNotFoundError("x.jsonl: not found"), 1, "train_x.py: error: x.jsonl: not found\n"),
    (KeyboardInterrupt(), 130, "train_x.py: interrupted\n"),
    (KeyboardInterrupt("interrupted at step 4; ..."), 130, "train_x.py: interrupted at step 4; ...\n"),
    (SystemExit(2), 2, ""),  # argparse's error (it has printed its own lines)
])
def test_cli_ends_the_process_with_one_line_for_a_user_error(monkeypatch, capfd, raised, code, err):
    # main() returns or raises; cli() is where the process ends, with the exit status and the one line
    def main(argv):
        assert argv == ["--lr", "1"]
        if raised is not None:
            raise raised
    monkeypatch.setattr(sys, "argv", ["train_x.py", "--lr", "1"])
    monkeypatch.delenv("BALORA_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        errors.cli(main, "/somewhere/train_x.py")
    assert e.value.code == code and capfd.readouterr().err == err


def test_cli_shows_the_traceback_of_a_bug_and_of_a_user_error_with_debug(monkeypatch, capfd):
    def bug(argv):
        raise RuntimeError("a bug")

    def user_error(argv):
        raise errors.InputError("bad.jsonl:2: not UTF-8")
    monkeypatch.delenv("BALORA_DEBUG", raising=False)
    for main, argv in ((bug, ["train_x.py"]), (user_error, ["train_x.py", "--debug"])):
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as e:
            errors.cli(main, "train_x.py")
        err = capfd.readouterr().err
        assert e.value.code == 1 and "Traceback" in err and ("a bug" in err or "bad.jsonl:2" in err)


def test_a_non_finite_metric_fails_the_run_by_name():
    errors.check_finite_metrics({"accuracy": 0.5, "loss": 1.0, "n": 3, "note": None}, "validation")
    with pytest.raises(FloatingPointError, match=r"test: loss, mcc non-finite \(nan\); the run failed"):
        errors.check_finite_metrics({"accuracy": 0.5, "loss": float("nan"), "mcc": float("inf")}, "test")


@slow
def test_cli_user_error_is_one_line_without_traceback_and_debug_shows_it(tmp_path, monkeypatch, capfd):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"sentence": "fine", "label": "a"}\n{"sentence": "caf\xe9", "label": "b"}\n')
    cases = (("train_nlu.py", train_nlu.main, ["--train-file", bad, "--val-file", bad, "--out", tmp_path / "u"]),
             ("train_nlg.py", train_nlg.main, ["--train-file", tmp_path / "missing.jsonl", "--model", tmp_path,
                                               "--out", tmp_path / "g"]))
    said = {}
    for script, main, args in cases:  # the real process: exit status 1, one line
        proc = run_script(script, *args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert len(lines) == 1 and lines[0].startswith(f"{script}: error: "), proc.stderr
        said[script] = lines[0]
    assert "bad.jsonl:2: not UTF-8" in said["train_nlu.py"], said
    assert "missing.jsonl: no such file" in said["train_nlg.py"], said
    monkeypatch.delenv("BALORA_DEBUG", raising=False)
    for script, main, args in cases:  # --debug adds the traceback (the same cli, in this process)
        monkeypatch.setattr(sys, "argv", [script, *map(str, args), "--debug"])
        capfd.readouterr()
        with pytest.raises(SystemExit) as e:
            errors.cli(main, script)
        err = capfd.readouterr().err
        assert e.value.code == 1 and "Traceback" in err and f"{script}: error: " in err, err


@slow
def test_empty_training_set_is_a_clear_error_not_a_hang(tiny_llama, tmp_path):
    # every prompt longer than --max-len: nothing to train on. The old loop waited forever for a batch.
    code = ("import sys, train_nlg\n"
            "try:\n    train_nlg.main(sys.argv[1:])\nexcept ValueError as e:\n    print('ERR', e)\n")
    args = drop_flag(cli(tiny_llama, tmp_path / "o", "--max-len", "4", "--val-examples", "0"), "--val-file")
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert "ERR" in proc.stdout, proc.stdout + proc.stderr
    msg = proc.stdout.split("ERR", 1)[1]
    assert "train.jsonl" in msg and "no training examples" in msg and "24 records" in msg and "24 dropped" in msg
    assert not (tmp_path / "o" / "checkpoint.safetensors").exists()


def test_scripts_refuse_the_wrong_architecture_and_a_tokenizer_larger_than_the_model(
        encoders, files, tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="train_nlu.py takes encoders"):
        train_nlg.main(cli(tiny_llama, tmp_path / "g", "--model", str(encoders["plain"])))
    with pytest.raises(ValueError, match="train_nlg.py takes decoders"):
        train_nlu.main(argv(tiny_llama / "model", files, tmp_path / "u"))
    small = copy_model_dir(encoders["plain"], tmp_path / "small", vocab_size=8)
    with pytest.raises(ValueError, match=r"tokenizer\.json has \d+ tokens, the model's embedding table 8"):
        train_nlu.main(argv(small, files, tmp_path / "u2"))


def test_a_non_finite_evaluation_fails_the_run_and_writes_no_final_adapter(encoders, files, tiny_llama, tmp_path):
    with pytest.raises(FloatingPointError, match="non-finite"):
        train_nlu.main(argv(encoders["plain"], files, tmp_path / "u", "--lr", "1e30", "--max-steps", "1"))
    assert not (tmp_path / "u" / "adapter").exists() and not (tmp_path / "u" / "metrics.json").exists()
    with pytest.raises(FloatingPointError, match="non-finite"):
        train_nlg.main(cli(tiny_llama, tmp_path / "g", "--lr", "1e30", "--max-steps", "1"))
    assert not (tmp_path / "g" / "adapter").exists() and not (tmp_path / "g" / "metrics.json").exists()


def test_bad_inputs_are_one_line_naming_what_and_where(encoders, files, tiny_llama, tmp_path):
    # an integer weight names the file and the tensor; a huge finite one is a warning naming it
    src = encoders["plain"]
    for kind, value in (("int", None), ("huge", 3.5e36)):
        d = tmp_path / kind
        shutil.copytree(src, d)
        t = load_file(str(d / "model.safetensors"))
        key = next(k for k in t if k.endswith("query.weight"))
        if value is None:
            t[key] = t[key].long()
        else:
            t[key] = t[key].clone()
            t[key][0, 0] = value
        save_file(t, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match=r"int/model.safetensors: tensor '.*query.weight' is int64"):
        M.from_pretrained(tmp_path / "int", num_labels=2)
    with pytest.warns(UserWarning, match=r"huge/model.safetensors: tensor '.*query.weight' holds a value of magnitude 3.5e\+36"):
        M.from_pretrained(tmp_path / "huge", num_labels=2)
    # --out naming a file, or a directory that cannot be written
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="a file, not a directory"):
        train_nlu.main(argv(src, files, tmp_path / "afile"))
    # an empty --eval-text, a GSM8K reference without '#### n', --model naming a file
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match=r"empty.txt: 0 tokens, fewer than one window"):
        train_nlg.main(cli(tiny_llama, tmp_path / "e", "--eval-text", str(tmp_path / "empty.txt")))
    (tmp_path / "g.jsonl").write_text('{"question": "q", "answer": "#### 3"}\n{"question": "q", "answer": "none"}\n')
    with pytest.raises(ValueError, match=r"g.jsonl:2: GSM8K reference has no"):
        train_nlg.main(cli(tiny_llama, tmp_path / "f", "--eval-gsm8k", str(tmp_path / "g.jsonl")))
    with pytest.raises(ValueError, match="not a model directory"):
        train_nlg.main(cli(tiny_llama, tmp_path / "h", "--model", str(tiny_llama / "model" / "config.json")))
    # a resume with a trailing slash on --out works like without it
    out = tmp_path / "r"
    train_nlg.main(cli(tiny_llama, out, "--stop-after", "2"))
    assert train_nlg.main(cli(tiny_llama, str(out) + "/", "--resume"))["steps"] == 4
    # train_nlu.py given the weights file for --model, or told to resume train_nlg.py's run
    with pytest.raises(ValueError, match="model.safetensors: not a model directory"):
        train_nlu.main(argv(src, files, tmp_path / "i", "--model", str(src / "model.safetensors")))
    with pytest.raises(ValueError, match="a train_nlg.py checkpoint; resume it with train_nlg.py, not train_nlu.py"):
        train_nlu.main(argv(src, files, out, "--resume"))


@slow
def test_a_user_error_under_torchrun_is_one_line_on_every_rank(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"sentence": "fine", "label": "a"}\n{"sentence": "caf\xe9", "label": "b"}\n')
    for i in range(1):  # (the ranks race: torchrun may stop one before it reads the file; both outcomes checked)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(HERE / "train_nlu.py"), "--train-file", str(bad), "--val-file", str(bad), "--threads", "1",
               "--out", str(tmp_path / f"o{i}")]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode != 0
        lines = [l for l in r.stderr.splitlines() if l.startswith("train_nlu.py: error:")]
        # each rank says its own error, unless torchrun stopped it first (it stops every rank once one has failed):
        # then that rank says so, in one line too
        assert len(lines) == 2 and any("bad.jsonl:2: not UTF-8" in l for l in lines), r.stderr[-2000:]
        assert all("bad.jsonl:2: not UTF-8" in l or ": stopped by SIGTERM (torchrun stops every process" in l
                   for l in lines), r.stderr[-2000:]
        # both ranks exit 1 (not a signal: no abort at shutdown), and no traceback comes from the script itself
        # (torchrun's launcher prints its own ChildFailedError report whenever a rank fails)
        assert r.stderr.count("exitcode  : 1 ") == 2, r.stderr[-2000:]
        assert "terminate called" not in r.stderr and "core dumped" not in r.stderr
        assert f'File "{HERE / "train_nlu.py"}"' not in r.stderr


def test_a_ctrl_c_that_a_library_swallows_still_ends_the_process_with_130(monkeypatch, capfd):
    # cli in this process: main() whose Ctrl-C a library's broad `except` swallows and which then finishes, and
    # one whose Ctrl-C lands in a finalizer (a generator closed by the garbage collector: Python prints "Exception
    # ignored" and goes on). Both exit 130 with one line, never 0.
    import signal

    def swallowed(argv):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            sum(range(10_000))  # the handler runs here
        except KeyboardInterrupt:
            pass

    def in_a_finalizer(argv):
        def gen():
            try:
                yield 1
            finally:
                os.kill(os.getpid(), signal.SIGINT)
                sum(range(10_000))
        g = gen()
        next(g)
        del g  # closed here: the KeyboardInterrupt is raised inside the finalizer, then again right after it
        import time
        t0 = time.monotonic()
        while time.monotonic() - t0 < 10:  # the KeyboardInterrupt comes back here, a moment later (a busy loop:
            pass                           # a simulated signal does not wake a sleep)
        raise AssertionError("not interrupted")
    monkeypatch.setattr(sys, "argv", ["train_x.py"])
    monkeypatch.delenv("BALORA_DEBUG", raising=False)
    for main, err in ((swallowed, "train_x.py: interrupted (after the run finished: its files are complete)\n"),
                      (in_a_finalizer, "train_x.py: interrupted\n")):
        capfd.readouterr()
        with pytest.raises(SystemExit) as e:
            errors.cli(main, "train_x.py")
        assert e.value.code == 130 and capfd.readouterr().err == err
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the caller's handler is back


@slow
def test_ctrl_c_during_the_imports_and_during_the_exit_is_one_line_and_130(encoders, files, tmp_path):
    # The two windows outside main(): the imports (the scripts import plumbing/interrupts.py first) and the
    # interpreter's exit after `done` (an atexit function that takes a while stands for torch's teardown; before,
    # a Ctrl-C there was dropped with exit status 0, or killed the process without a word)
    import signal
    env = {k: v for k, v in os.environ.items() if k != "BALORA_DEBUG"}
    default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # also when the suite runs in background
    early = tmp_path / "importing.py"
    early.write_text("from plumbing import interrupts  # noqa: F401\nimport time\nprint('importing', flush=True)\n"
                     "time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, str(early)], env={**env, "PYTHONPATH": str(HERE)}, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    assert p.stdout.readline().strip() == "importing"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err == "importing.py: interrupted\n", (p.returncode, err)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import atexit, time\n"
                                           "atexit.register(lambda: (print('exiting', flush=True), time.sleep(0.5)))\n")
    p = subprocess.Popen([sys.executable, str(HERE / "train_nlu.py"),
                          *argv(encoders["plain"], files, tmp_path / "r", "--max-steps", "2")], cwd=HERE,
                         env={**env, "PYTHONPATH": str(site)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, preexec_fn=default_sigint)
    lines = iter(p.stdout.readline, "")
    assert any(line.startswith("done:") for line in lines)
    assert next(lines).strip() == "exiting"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, (p.returncode, err)
    assert err.strip().splitlines()[-1:] == ["train_nlu.py: interrupted (after the run finished: its files are "
                                             "complete)"] and "Traceback" not in err, err
    assert (tmp_path / "r" / "metrics.json").exists()
