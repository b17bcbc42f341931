# tests/test_runtime.py: plumbing/runtime.py through both scripts: dtype and device choice, errors as one line,
# the run directory, checkpoints and resume, torchrun equal to one process, non-finite stops.

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers  # the reference the hand-written models are checked against; test-only
from safetensors.torch import load_file, save_file

import data
import model as M
import train_nlg
import train_nlu
from plumbing import runtime

torch.set_num_threads(2)
from helpers import *  # noqa: F401,F403  the shared tiny models, files and runners
from helpers import _copy_dir


def test_dtype_auto_is_fp32_on_an_avx2_cpu_and_bf16_where_native():
    # torch under the AVX2 emulation has no fast bf16 matmul: auto must pick fp32 there
    assert resolved_dtype_in_subprocess(EMULATE_AVX2) == "fp32"
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    if not ({"amx_bf16", "avx512_bf16"} & set(flags)):
        pytest.skip("this CPU has no native bf16 (no amx_bf16 / avx512_bf16 flag): only the fp32 half applies")
    assert resolved_dtype_in_subprocess({}) == "bf16"


def test_dtype_resolution_says_why_and_warns_when_forcing_bf16(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_bf16_native", lambda: (False, "no native bf16 (AVX2)"))
    assert runtime.resolve_dtype("auto", "cpu") == ("fp32", "dtype auto -> fp32: no native bf16 (AVX2); --dtype bf16 forces it")
    dtype, why = runtime.resolve_dtype("bf16", "cpu")
    assert dtype == "bf16" and why.startswith("warning:") and "slower" in why
    assert runtime.resolve_dtype("fp32", "cpu")[0] == "fp32"
    monkeypatch.setattr(runtime, "cpu_bf16_native", lambda: (True, "AMX"))
    assert runtime.resolve_dtype("auto", "cpu")[0] == "bf16"


def test_both_scripts_record_the_machine_and_leave_threads_to_torch(encoders, files, tiny_llama, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what a user's torch default would be; no --threads: the scripts must keep it
    try:
        m_nlu = train_nlu.main(drop_flag(argv(encoders["plain"], files, tmp_path / "nlu", "--max-steps", "1"), "--threads"))
        assert torch.get_num_threads() == 1
        m_nlg = train_nlg.main(cli(tiny_llama, tmp_path / "nlg", "--max-steps", "1", "--dtype", "auto"))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    for m, out in ((m_nlu, tmp_path / "nlu"), (m_nlg, tmp_path / "nlg")):
        rec = m["machine"]
        assert rec["threads"] == 1 and rec["cpu"] and rec["torch"] == torch.__version__ and rec["device"] == "cpu"
        assert rec["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
        assert rec["cpu_bf16_native"] == runtime.cpu_bf16_native()[0]
        first = json.loads(open(out / "log.jsonl").readline())
        assert first["machine"] == rec
    assert m_nlg["machine"]["dtype"] == runtime.resolve_dtype("auto", "cpu")[0]


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


@pytest.mark.parametrize("script, flag, value", [
    ("nlg", "--max-steps", "-1"), ("nlg", "--batch-size", "0"), ("nlg", "--grad-accum", "0"), ("nlg", "--rank", "0"),
    ("nlg", "--lr", "0"), ("nlg", "--lr", "inf"), ("nlu", "--max-steps", "-1"), ("nlu", "--batch-size", "-8"),
    ("nlu", "--rank", "0"), ("nlu", "--lr", "-1e-3"), ("nlu", "--max-len", "0"), ("nlg", "--batch-size", "5")])
def test_out_of_range_flags_are_argparse_errors(script, flag, value, capsys):
    module = train_nlg if script == "nlg" else train_nlu
    with pytest.raises(SystemExit) as e:
        module.parse_args([flag, value] + (["--grad-accum", "2"] if flag == "--batch-size" and script == "nlg" else []))
    assert e.value.code == 2 and flag in capsys.readouterr().err


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


@pytest.mark.parametrize("script", ["nlu", "nlg"])
@slow
def test_two_processes_under_torchrun_equal_one_process_with_two_micro_batches(encoders, files, tiny_llama, tmp_path,
                                                                                script):
    # 2 ranks x (batch 8, grad-accum 1) against 1 process x (batch 8, grad-accum 2): the same global batches,
    # the same micro-batches (rank r's share = micro-batch r), the same dropout masks and range-finder draws,
    # so the same adapters after 3 BA-LoRA steps and the same logged losses. The NLU encoder has dropout 0.1.
    common = ["--method", "balora", "--batch-size", "8", "--max-steps", "3", "--threads", "1"]
    if script == "nlu":
        make = lambda out, accum: argv(encoders["dropout"], files, out, *common, "--grad-accum", accum)
        single = train_nlu.main(make(tmp_path / "one", "2"))
    else:
        make = lambda out, accum: cli(tiny_llama, out, *common, "--grad-accum", accum, "--lr", "1e-3")
        single = train_nlg.main(make(tmp_path / "one", "2"))
    r = torchrun(f"train_{script}.py", make(tmp_path / "two", "1"))
    assert r.stdout.count("step 3/3") == 1  # one console: rank 1 prints nothing
    a = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)
    one, two = step_records(tmp_path / "one"), step_records(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3]
    terms = {"task", "consistency", "diversity", "svd", "loss", "lambda1", "lambda2", "lambda3", "grad_norm"}
    assert {"task", "consistency", "svd", "grad_norm"} <= set(one[-1])
    for r1, r2 in zip(one, two):
        assert terms & set(r1) == terms & set(r2)
        for t in terms & set(r1):
            assert r2[t] == pytest.approx(r1[t], rel=1e-5, abs=1e-6), (r1["step"], t)
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m2["machine"]["world_size"] == 2
    # every rank resumes from rank 0's checkpoint: stopped after step 2 and resumed = uninterrupted
    stop, resume = (["--stop-after", "2"], ["--resume"]) if script == "nlu" else \
        (["--stop-after", "2"], ["--resume"])
    torchrun(f"train_{script}.py", make(tmp_path / "three", "1") + stop)
    torchrun(f"train_{script}.py", make(tmp_path / "three", "1") + resume)
    c = load_file(str(tmp_path / "three" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(c[k], b[k]) for k in b)
    if script == "nlu":
        assert m2["test"]["accuracy"] == single["test"]["accuracy"]
        assert m2["test"]["loss"] == pytest.approx(single["test"]["loss"], rel=1e-5)
    else:
        assert m2["tuned"]["val_ppl"] == pytest.approx(single["tuned"]["val_ppl"], rel=1e-5)


def test_torchrun_refuses_a_batch_it_cannot_share_evenly(encoders, files, tmp_path):
    with pytest.raises(ValueError, match="not divisible by 2 processes"):
        runtime.check_world(40, 6, 2, 2, 10)
    with pytest.raises(ValueError, match="last step has 1 of the 41"):
        runtime.check_world(41, 8, 1, 2, 10)
    runtime.check_world(41, 8, 1, 2, 5)  # --max-steps ends before the short step: fine
    runtime.check_world(41, 8, 1, 1, 10)  # one process: anything goes
    assert data.shard(list(range(8)), 1, 2) == [4, 5, 6, 7] and data.shard([1, 2], 0, 1) == [1, 2]


def test_cli_user_error_is_one_line_without_traceback_and_debug_shows_it(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"sentence": "fine", "label": "a"}\n{"sentence": "caf\xe9", "label": "b"}\n')
    for script, args in (("train_nlu.py", ["--train-file", bad, "--val-file", bad, "--out", tmp_path / "u"]),
                         ("train_nlg.py", ["--train-file", tmp_path / "missing.jsonl", "--model", tmp_path,
                                           "--out", tmp_path / "g"])):
        proc = run_script(script, *args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert len(lines) == 1 and lines[0].startswith(f"{script}: error: "), proc.stderr
        debug = run_script(script, *args, "--debug")
        assert debug.returncode == 1 and "Traceback" in debug.stderr
    assert "bad.jsonl:2: not UTF-8" in run_script("train_nlu.py", "--train-file", bad, "--val-file", bad,
                                                   "--out", tmp_path / "u2").stderr


def test_scripts_refuse_the_wrong_architecture_and_a_tokenizer_larger_than_the_model(
        encoders, files, tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="train_nlu.py takes encoders"):
        train_nlg.main(cli(tiny_llama, tmp_path / "g", "--model", str(encoders["plain"])))
    with pytest.raises(ValueError, match="train_nlg.py takes decoders"):
        train_nlu.main(argv(tiny_llama / "model", files, tmp_path / "u"))
    small = _copy_dir(encoders["plain"], tmp_path / "small", vocab_size=8)
    with pytest.raises(ValueError, match=r"tokenizer\.json has \d+ tokens, the model's embedding table 8"):
        train_nlu.main(argv(small, files, tmp_path / "u2"))


def test_checkpoint_files_are_checked_before_anything_is_trained(encoders, files, tmp_path):
    common = ("--epochs", "2", "--save-every", "2", "--method", "pissa")
    out = tmp_path / "r"
    assert train_nlu.main(argv(encoders["plain"], files, out, *common, "--stop-after", "3")) is None
    ck = out / runtime.CHECKPOINT
    raw = ck.read_bytes()
    t = load_file(str(ck))
    from safetensors import safe_open
    with safe_open(str(ck), "pt") as f:
        meta = f.metadata()
    key = next(k for k in t if k.endswith("exp_avg"))
    save_file({**t, key: torch.zeros(3, 3)}, str(ck), metadata=meta)
    with pytest.raises(ValueError, match=rf"{re.escape(key)} has shape \(3, 3\)"):
        train_nlu.main(argv(encoders["plain"], files, out, *common, "--resume"))
    state = json.loads(meta["train_state"])
    state.pop("step")
    save_file(t, str(ck), metadata={"train_state": json.dumps(state)})
    with pytest.raises(ValueError, match="'step'"):
        train_nlu.main(argv(encoders["plain"], files, out, *common, "--resume"))
    ck.write_bytes(raw[:100])
    with pytest.raises(ValueError, match="checkpoint.safetensors: not a readable safetensors"):
        train_nlu.main(argv(encoders["plain"], files, out, *common, "--resume"))
    # a second "step" in the JSON state (json.loads would keep the later one and skip steps silently)
    text = meta["train_state"]
    save_file(t, str(ck), metadata={"train_state": text[:-1] + ', "step": 1}'})
    with pytest.raises(ValueError, match="the key 'step' appears twice"):
        train_nlu.main(argv(encoders["plain"], files, out, *common, "--resume"))
    # every optimizer tensor removed (a fresh AdamW would resume with exit 0), and AdamW's step not the run's
    save_file({k: v for k, v in t.items() if not k.startswith("opt.")}, str(ck), metadata=meta)
    with pytest.raises(ValueError, match=r"the optimizer state of parameter 0 has \[\], it needs"):
        train_nlu.main(argv(encoders["plain"], files, out, *common, "--resume"))
    save_file({k: (v + 1 if k.endswith(".step") else v) for k, v in t.items()}, str(ck), metadata=meta)
    with pytest.raises(ValueError, match=r"opt\.0\.step is 4\.0, the run is at step 3"):
        train_nlu.main(argv(encoders["plain"], files, out, *common, "--resume"))
    save_file(t, str(ck), metadata=meta)  # the untouched checkpoint resumes
    assert train_nlu.main(argv(encoders["plain"], files, out, *common, "--resume"))["steps"] == 10


def test_resume_refuses_a_changed_input_file_by_name(encoders, files, tmp_path):
    # every label of the training file flipped between a stop and its --resume: one line naming the file, exit 1
    train = tmp_path / "train.jsonl"
    shutil.copy(files["train"], train)
    own = {**files, "train": train}
    common = ("--epochs", "2", "--method", "pissa", "--save-every", "2")
    assert train_nlu.main(argv(encoders["plain"], own, tmp_path / "r", *common, "--stop-after", "3")) is None
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    write_jsonl(train, [{**r, "label": {"pos": "neg", "neg": "pos"}[r["label"]]} for r in rows])
    proc = run_script("train_nlu.py", *argv(encoders["plain"], own, tmp_path / "r", *common, "--resume"))
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert f"{train} changed (same size, sha256" in proc.stderr and "since the checkpoint" in proc.stderr
    # the model's weights are fingerprinted too (size + header): a swapped model.safetensors is refused
    write_jsonl(train, rows)
    model = _copy_dir(encoders["plain"], tmp_path / "m")
    assert train_nlu.main(argv(model, own, tmp_path / "s", *common, "--stop-after", "3")) is None
    w = load_file(str(model / "model.safetensors"))
    save_file({k: v.double() if v.is_floating_point() else v for k, v in w.items()}, str(model / "model.safetensors"))
    with pytest.raises(ValueError, match=re.escape(f"{(model / 'model.safetensors').resolve()} changed (size")):
        train_nlu.main(argv(model, own, tmp_path / "s", *common, "--resume"))


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
        assert not (run / runtime.LOCK).exists()  # released at exit
    # the same second, forced: the one mkdir that fails takes the next name
    stem = tmp_path / "same" / "nlu-pissa-20260101-000000"
    assert [runtime.new_run_dir(stem), runtime.new_run_dir(stem)] == [stem, Path(f"{stem}-2")]


def test_an_out_that_a_live_process_writes_is_refused_and_a_stale_lock_is_taken_over(encoders, files, tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               f"f = open({str(out / runtime.LOCK)!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
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
    assert (out / runtime.LOCK).exists()  # left behind by a killed owner: stale, taken over
    proc = run_script("train_nlu.py", *argv(encoders["plain"], files, out, "--method", "pissa"))
    assert proc.returncode == 0, proc.stderr
    assert (out / "metrics.json").exists() and not (out / runtime.LOCK).exists()


def test_ctrl_c_is_one_line_with_exit_130_and_the_checkpoint_resumes(encoders, files, tmp_path):
    import signal
    import time
    out = tmp_path / "r"
    args = argv(encoders["plain"], files, out, "--method", "pissa", "--epochs", "40", "--save-every", "1")
    env = {k: v for k, v in os.environ.items() if k != "BALORA_DEBUG"}
    proc = subprocess.Popen([sys.executable, str(HERE / "train_nlu.py"), *args], cwd=HERE, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and (not (out / "log.jsonl").exists()
                                      or (out / "log.jsonl").read_text().count("\n") < 8):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    m = re.fullmatch(rf"train_nlu\.py: interrupted at step (\d+); `--resume --out {re.escape(str(out))}` \(and the "
                     r"same flags\) continues from its checkpoint at step (\d+)", lines[0])
    assert m and 0 <= int(m[1]) - int(m[2]) <= 1, lines[0]  # --save-every 1: at most the step in progress lost
    assert ckpt_step(out) == int(m[2])
    assert train_nlu.main(args + ["--resume"])["steps"] == 200


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


@pytest.mark.parametrize("name, capability, want", [("Tesla T4", (7, 5), "fp32"), ("Tesla V100", (7, 0), "fp32"),
                                                    ("NVIDIA A100", (8, 0), "bf16"), ("NVIDIA H100", (9, 0), "bf16")])
def test_auto_dtype_on_a_gpu_is_bf16_only_where_it_is_native(monkeypatch, name, capability, want):
    monkeypatch.setattr(torch, "cuda", FakeCuda(name, capability))
    dtype, why = runtime.resolve_dtype("auto", "cuda")
    assert dtype == want and name in why and f"{capability[0]}.{capability[1]}" in why
    assert runtime.pick_device("cuda") == "cuda" and runtime.pick_device(None) == "cuda"


def test_mps_and_unavailable_devices_are_one_line_before_anything_loads(monkeypatch, tmp_path):
    dtype, why = runtime.resolve_dtype("auto", "mps")
    assert dtype == "fp32" and why.startswith("dtype auto -> fp32: MPS")
    with pytest.raises(runtime.InputError, match="--device cuda: this torch is built without CUDA|no CUDA GPU"):
        runtime.pick_device("cuda")
    with pytest.raises(runtime.InputError, match="--device tpu"):
        runtime.pick_device("tpu")
    if not torch.cuda.is_available():
        r = run_script("train_nlu.py", "--device", "cuda", "--out", tmp_path / "x")
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert r.stderr.strip().splitlines()[-1].startswith("train_nlu.py: error: --device cuda:")
        assert not (tmp_path / "x").exists()  # nothing loaded, nothing written


def test_private_cpu_probes_are_guarded(monkeypatch):
    def boom():
        raise RuntimeError("no such probe on this build")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", boom)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    native, why = runtime.cpu_bf16_native()
    assert native is False and "no AVX512-BF16 or AMX" in why


def test_grad_accum_must_divide_batch_size_in_both_scripts(encoders, files, tiny_llama, tmp_path):
    for parse, args in ((train_nlu.parse_args, argv(encoders["plain"], files, tmp_path / "a", "--batch-size", "4",
                                                      "--grad-accum", "8")),
                        (train_nlg.parse_args, cli(tiny_llama, tmp_path / "b", "--batch-size", "4", "--grad-accum", "3"))):
        with pytest.raises(SystemExit):
            parse(args)


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


def test_out_on_a_read_only_filesystem_is_one_line(encoders, files, tmp_path, monkeypatch):
    def read_only(*args, **kwargs):  # what a read-only filesystem answers (root included)
        raise OSError(30, "Read-only file system")
    monkeypatch.setattr(runtime.tempfile, "NamedTemporaryFile", read_only)
    with pytest.raises(ValueError, match="--out .*run: cannot write there \\(Read-only file system\\)"):
        train_nlu.main(argv(encoders["plain"], files, tmp_path / "run"))


def test_main_returns_and_the_process_ends_only_at_the_top_level():
    for script in ("train_nlu.py", "train_nlg.py"):
        src = (HERE / script).read_text()
        main_src = src[src.index("def main("):src.index('if __name__ == "__main__":')]
        assert "os._exit" not in main_src and "sys.exit" not in main_src and "close_distributed" not in src
        assert src.rstrip().endswith("runtime.cli(main, __file__)")


@slow
def test_a_user_error_under_torchrun_is_one_line_on_every_rank_five_times(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"sentence": "fine", "label": "a"}\n{"sentence": "caf\xe9", "label": "b"}\n')
    for i in range(5):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(HERE / "train_nlu.py"), "--train-file", str(bad), "--val-file", str(bad), "--threads", "1",
               "--out", str(tmp_path / f"o{i}")]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode != 0
        errors = [l for l in r.stderr.splitlines() if l.startswith("train_nlu.py: error:")]
        assert len(errors) == 2 and all("bad.jsonl:2: not UTF-8" in l for l in errors), r.stderr[-2000:]
        # both ranks exit 1 (not a signal: no abort at shutdown), and no traceback comes from the script itself
        # (torchrun's launcher prints its own ChildFailedError report whenever a rank fails)
        assert r.stderr.count("exitcode  : 1 ") == 2, r.stderr[-2000:]
        assert "terminate called" not in r.stderr and "core dumped" not in r.stderr
        assert f'File "{HERE / "train_nlu.py"}"' not in r.stderr


# ---- on a real GPU (skipped without one; run where one is lent) -------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


@cuda
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_both_scripts_run_on_cuda_and_agree_with_the_cpu(encoders, files, tiny_llama, tmp_path, dtype):
    # the same tiny runs on the GPU and the CPU: fp32 metrics agree to float rounding; bf16 runs finish with finite
    # metrics near fp32's, and the machine record names the GPU
    cpu_nlu = train_nlu.main(argv(encoders["plain"], files, tmp_path / "nlu-cpu", "--device", "cpu"))
    gpu_nlu = train_nlu.main(argv(encoders["plain"], files, tmp_path / "nlu-gpu", "--device", "cuda",
                                  "--dtype", dtype))
    # the exact-SVD init: pissa_niter_N draws its Gaussian from the device's own generator, so a CPU run and a GPU
    # run start from different (equally valid) residuals
    cpu_nlg = train_nlg.main(cli(tiny_llama, tmp_path / "nlg-cpu", "--device", "cpu", "--init", "pissa"))
    gpu_nlg = train_nlg.main(cli(tiny_llama, tmp_path / "nlg-gpu", "--device", "cuda", "--dtype", dtype,
                                 "--init", "pissa"))
    assert gpu_nlu["machine"]["gpu"] and gpu_nlg["machine"]["dtype"] == dtype
    tol = 1e-4 if dtype == "fp32" else 5e-2
    assert gpu_nlu["test"]["loss"] == pytest.approx(cpu_nlu["test"]["loss"], rel=tol)
    assert gpu_nlg["tuned"]["val_ppl"] == pytest.approx(cpu_nlg["tuned"]["val_ppl"], rel=tol)
    assert gpu_nlg["tuned"]["drift_ppl"] == pytest.approx(cpu_nlg["tuned"]["drift_ppl"], rel=tol)


@cuda
def test_fast_paths_equal_the_plain_forms_on_cuda(monkeypatch):
    # the GPU's own chunk and block sizes (64 MB), the shared gradient buffer of the three terms, against the
    # plain forms
    g = torch.Generator(device="cuda").manual_seed(0)
    zs, zt = (torch.randn(300, 50_000, generator=g, device="cuda") * 4 for _ in range(2))
    cfg = balora.BALoRAConfig.nlg(lambda1_schedule="constant", focus_schedule="constant")
    runs = {}
    for fused in (True, False):
        monkeypatch.setattr(balora, "FUSED", fused)
        a = zs.clone().requires_grad_(True)
        value, terms = balora.regularizers(cfg, a, zt, generator=torch.Generator("cuda").manual_seed(1))
        value.backward()
        runs[fused] = (value.detach(), terms, a.grad)
    for name in runs[False][1]:
        torch.testing.assert_close(runs[True][1][name], runs[False][1][name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(runs[True][2], runs[False][2], rtol=1e-4, atol=1e-8)
