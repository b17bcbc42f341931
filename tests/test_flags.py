# tests/test_flags.py: plumbing/flags.py: the flags both scripts share, out-of-range values as argparse errors
# naming the flag, what argparse cannot check alone, and --batch-size meaning examples per optimizer step.

import argparse
import math
import re

import pytest
import torch
from safetensors.torch import load_file

import train_nlg
import train_nlu
from plumbing import flags

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
