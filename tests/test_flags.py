# tests/test_flags.py: plumbing/flags.py: the flags both scripts share, out-of-range values as argparse errors
# naming the flag, what argparse cannot check alone, and --batch-size meaning examples per optimizer step; every path
# flag is checked for what it is (a regular file, a model directory) before anything reads it.

import argparse
import math
import os
import re

import pytest
import torch
from safetensors.torch import load_file

import train_nlg
import train_nlu
from plumbing import errors, flags

torch.set_num_threads(2)
from helpers import *  # noqa: F401,F403  the shared tiny models, files and runners


def test_arg_range_says_the_range_and_refuses_what_is_not_a_finite_number():
    R = flags.arg_range
    assert R(int, 1)("3") == 3 and R(float, 0, 1, high_open=True)("0.5") == 0.5 and R(float, 0)("0") == 0.0
    for parse, text, why in ((R(int, 1), "0", "0 is out of range: must be in [1, inf)"),
                             (R(float, 0, low_open=True), "0", "0 is out of range: must be in (0, inf)"),
                             (R(float, 0, 1, high_open=True), "1", "1 is out of range: must be in [0, 1)"),
                             (R(float, 0), "nan", "nan is out of range"), (R(float, 0), "inf", "inf is out of range"),
                             (R(int, 0), "1.5", "'1.5' is not an integer"), (R(float, 0), "x", "'x' is not a number")):
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(why)):
            parse(text)


@pytest.mark.parametrize("script, flag, value", [
    ("nlg", "--max-steps", "-1"), ("nlg", "--batch-size", "0"), ("nlg", "--grad-accum", "0"), ("nlg", "--rank", "0"),
    ("nlg", "--lr", "0"), ("nlg", "--lr", "inf"), ("nlu", "--max-steps", "-1"), ("nlu", "--batch-size", "-8"),
    ("nlu", "--rank", "0"), ("nlu", "--lr", "-1e-3"), ("nlu", "--max-len", "0"), ("nlg", "--batch-size", "5")])
def test_out_of_range_flags_are_argparse_errors(script, flag, value, capsys):
    module = train_nlg if script == "nlg" else train_nlu
    with pytest.raises(SystemExit) as e:
        module.parse_args([flag, value] + (["--grad-accum", "2"] if flag == "--batch-size" and script == "nlg" else []))
    assert e.value.code == 2 and flag in capsys.readouterr().err


def test_grad_accum_must_divide_batch_size_in_both_scripts(encoders, files, tiny_llama, tmp_path):
    for parse, args in ((train_nlu.parse_args, argv(encoders["plain"], files, tmp_path / "a", "--batch-size", "4",
                                                      "--grad-accum", "8")),
                        (train_nlg.parse_args, cli(tiny_llama, tmp_path / "b", "--batch-size", "4", "--grad-accum", "3"))):
        with pytest.raises(SystemExit):
            parse(args)


def test_batch_size_means_examples_per_step_in_both_scripts_and_accumulation_does_not_change_it(
        encoders, files, tiny_llama, tmp_path):
    # 40 NLU / 24 NLG training examples, --batch-size 8, one epoch: 5 / 3 optimizer steps in both scripts,
    # and --grad-accum 1 vs 2 (same examples per step, split in two) gives the same adapters
    adapters = {}
    for script, n in (("nlu", 40), ("nlg", 24)):
        for accum in ("1", "2"):
            out = tmp_path / f"{script}{accum}"
            if script == "nlu":
                m = train_nlu.main(argv(encoders["plain"], files, out, "--batch-size", "8", "--grad-accum", accum,
                                        "--method", "pissa", "--epochs", "1"))
            else:
                m = train_nlg.main(cli(tiny_llama, out, "--batch-size", "8", "--grad-accum", accum, "--method",
                                       "pissa", "--max-steps", "0", "--epochs", "1", "--lr", "1e-3"))
            assert m["steps"] == math.ceil(n / 8)
            adapters[script, accum] = load_file(str(out / "adapter" / "adapter_model.safetensors"))
        a, b = adapters[script, "1"], adapters[script, "2"]
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"{script}: {k}")


def test_resume_needs_the_out_of_the_run_and_a_trailing_slash_names_the_same_run(encoders, files, tmp_path, capsys):
    args = argv(encoders["plain"], files, str(tmp_path / "run") + "/")
    assert train_nlu.parse_args(args).out == str(tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        train_nlu.parse_args(drop_flag(args, "--out") + ["--resume"])
    assert e.value.code == 2 and "--resume needs the --out" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["nlu", "nlg"])
def test_a_path_flag_that_is_not_a_regular_file_is_one_line_before_anything_reads_it(
        encoders, files, tiny_llama, tmp_path, script):
    # A FIFO (with a writer whose data must stay unread), /dev/zero, /dev/urandom, a directory or a missing file as
    # --train-file, --val-file or --eval-text: one line naming the flag, never a hang (before: the fingerprint read
    # them forever, or took the FIFO's data). A watchdog fails the test instead of hanging it.
    import signal
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # a writer (O_RDWR: opening does not wait for a reader)
    os.write(writer, b'{"sentence": "good", "label": "pos"}\n')
    flags = ("--train-file", "--val-file") + (("--eval-text",) if script == "nlg" else ())
    cases = [(fifo, "a FIFO (named pipe), not a regular file"), ("/dev/zero", "a character device, not a regular file"),
             ("/dev/urandom", "a character device, not a regular file"), (tmp_path, "a directory, not a regular file"),
             (tmp_path / "missing.jsonl", "no such file")]

    def hang(signum, frame):
        raise AssertionError("hung")
    old = signal.signal(signal.SIGALRM, hang)
    try:
        for flag in flags:
            for path, what in cases:
                args = (argv(encoders["plain"], files, tmp_path / "o") if script == "nlu" else
                        cli(tiny_llama, tmp_path / "o")) + [flag, str(path)]
                signal.alarm(20)
                with pytest.raises(errors.InputError, match=re.escape(f"{flag} {path}: {what}")):
                    (train_nlu if script == "nlu" else train_nlg).main(args)
                signal.alarm(0)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert os.read(writer, 1000) == b'{"sentence": "good", "label": "pos"}\n'  # nobody took the writer's data
    os.close(writer)
    assert not (tmp_path / "o").exists()  # refused before the run directory is made


@slow
def test_a_fifo_given_to_a_script_is_one_line_and_exit_1_not_a_hang(encoders, files, tmp_path):
    fifo = tmp_path / "train.jsonl"
    os.mkfifo(fifo)
    proc = run_script("train_nlu.py", *argv(encoders["plain"], files, tmp_path / "o"), "--train-file", fifo)
    assert proc.returncode == 1 and proc.stderr == (f"train_nlu.py: error: --train-file {fifo}: a FIFO (named pipe), "
                                                    f"not a regular file\n"), proc.stderr


def test_the_model_directory_is_checked_before_anything_reads_it(encoders, files, tmp_path, monkeypatch):
    model = copy_model_dir(encoders["plain"], tmp_path / "m")
    with pytest.raises(errors.InputError, match=re.escape(f"--model {tmp_path / 'none'}: no such directory")):
        train_nlu.main(argv(tmp_path / "none", files, tmp_path / "o"))
    os.mkfifo(model / "vocab.txt")
    with pytest.raises(errors.InputError, match=re.escape(f"--model {model}: {model / 'vocab.txt'} is a FIFO")):
        train_nlu.main(argv(model, files, tmp_path / "o"))
    (model / "vocab.txt").unlink()
    real_access = os.access  # a directory this user cannot read (root reads everything: simulated)
    monkeypatch.setattr(flags.os, "access", lambda p, mode: False if str(p) == str(model) else real_access(p, mode))
    with pytest.raises(errors.InputError, match=re.escape(f"--model {model}: permission denied")):
        train_nlu.main(argv(model, files, tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_a_seed_beyond_what_torch_takes_is_an_argparse_error_naming_the_flag(capsys):
    # before: an overflow traceback from torch.manual_seed at the first step
    limit = flags.SEED_LIMIT
    assert train_nlu.parse_args(["--seed", str(limit)]).seed == limit
    assert train_nlu.parse_args(["--seed", str(-limit)]).seed == -limit
    for value in (str(2 ** 64), str(limit + 1), "-" + str(2 ** 63 + 1)):
        with pytest.raises(SystemExit) as e:
            train_nlg.parse_args(["--seed", value])
        assert e.value.code == 2 and f"argument --seed: {value} is out of range" in capsys.readouterr().err
    from plumbing import parallel
    for seed in (limit, -limit):  # the extremes still seed torch at any step a run can reach
        torch.manual_seed(parallel.step_seed(seed, 10 ** 12, 1024))
        torch.Generator().manual_seed(seed * 1_000_003 + 10 ** 6)  # data.batches' epoch seed
