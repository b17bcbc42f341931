# tests/test_devices.py: plumbing/devices.py through both scripts: the device (one line when it cannot be used),
# the autocast dtype (bf16 only where native, on a CPU and on a GPU), the machine record; on a real GPU, both
# scripts against the CPU and the fast path of the regularisers against the plain forms.

import json
from pathlib import Path

import pytest
import torch

import balora
import train_nlg
import train_nlu
from plumbing import devices, errors

torch.set_num_threads(2)
from helpers import *  # noqa: F401,F403  the shared tiny models, files and runners


@slow
def test_dtype_auto_is_fp32_on_an_avx2_cpu_and_bf16_where_native():
    # torch under the AVX2 emulation has no fast bf16 matmul: auto must pick fp32 there
    assert resolved_dtype_in_subprocess(EMULATE_AVX2) == "fp32"
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    if not ({"amx_bf16", "avx512_bf16"} & set(flags)):
        pytest.skip("this CPU has no native bf16 (no amx_bf16 / avx512_bf16 flag): only the fp32 half applies")
    assert devices.resolve_dtype("auto", "cpu")[0] == "bf16"  # this process: the CPU's own capability


def test_dtype_resolution_says_why_and_warns_when_forcing_bf16(monkeypatch):
    monkeypatch.setattr(devices, "cpu_bf16_native", lambda: (False, "no native bf16 (AVX2)"))
    assert devices.resolve_dtype("auto", "cpu") == ("fp32", "dtype auto -> fp32: no native bf16 (AVX2); --dtype bf16 forces it")
    dtype, why = devices.resolve_dtype("bf16", "cpu")
    assert dtype == "bf16" and why.startswith("warning:") and "slower" in why
    assert devices.resolve_dtype("fp32", "cpu")[0] == "fp32"
    monkeypatch.setattr(devices, "cpu_bf16_native", lambda: (True, "AMX"))
    assert devices.resolve_dtype("auto", "cpu")[0] == "bf16"


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
        assert rec["cpu_bf16_native"] == devices.cpu_bf16_native()[0]
        first = json.loads(open(out / "log.jsonl").readline())
        assert first["machine"] == rec
    assert m_nlg["machine"]["dtype"] == devices.resolve_dtype("auto", "cpu")[0]


@pytest.mark.parametrize("name, capability, want", [("Tesla T4", (7, 5), "fp32"), ("Tesla V100", (7, 0), "fp32"),
                                                    ("NVIDIA A100", (8, 0), "bf16"), ("NVIDIA H100", (9, 0), "bf16")])
def test_auto_dtype_on_a_gpu_is_bf16_only_where_it_is_native(monkeypatch, name, capability, want):
    monkeypatch.setattr(torch, "cuda", FakeCuda(name, capability))
    dtype, why = devices.resolve_dtype("auto", "cuda")
    assert dtype == want and name in why and f"{capability[0]}.{capability[1]}" in why
    assert devices.pick_device("cuda") == "cuda" and devices.pick_device(None) == "cuda"


def test_mps_and_unavailable_devices_are_one_line_before_anything_loads():
    dtype, why = devices.resolve_dtype("auto", "mps")
    assert dtype == "fp32" and why.startswith("dtype auto -> fp32: MPS")
    with pytest.raises(errors.InputError, match="--device tpu"):
        devices.pick_device("tpu")
    with pytest.raises(errors.InputError, match="--device cuda:99: (only|this torch|no CUDA GPU)"):
        devices.pick_device("cuda:99")
    if not torch.cuda.is_available():
        with pytest.raises(errors.InputError, match="--device cuda: this torch is built without CUDA|no CUDA GPU"):
            devices.pick_device("cuda")


@slow
def test_a_script_given_an_unusable_device_stops_before_anything_loads(tmp_path):
    r = run_script("train_nlu.py", "--device", "cuda:99", "--out", tmp_path / "x")  # no such GPU on any machine
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("train_nlu.py: error: --device cuda:")
    assert not (tmp_path / "x").exists()  # nothing loaded, nothing written


def test_private_cpu_probes_are_guarded(monkeypatch):
    def boom():
        raise RuntimeError("no such probe on this build")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", boom)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    native, why = devices.cpu_bf16_native()
    assert native is False and "no AVX512-BF16 or AMX" in why


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
def test_fast_paths_equal_the_plain_forms_on_cuda():
    # the GPU's own chunk and block sizes (64 MB), the shared gradient buffer of the three terms, against the
    # plain forms
    g = torch.Generator(device="cuda").manual_seed(0)
    zs, zt = (torch.randn(300, 50_000, generator=g, device="cuda") * 4 for _ in range(2))
    cfg = balora.BALoRAConfig.nlg(lambda1_schedule="constant", focus_schedule="constant")
    runs = {}
    for fused in (True, False):
        a = zs.clone().requires_grad_(True)
        gen = torch.Generator("cuda").manual_seed(1)
        value, terms = balora.regularizers(cfg, a, zt, generator=gen, plain=not fused)
        value.backward()
        runs[fused] = (value.detach(), terms, a.grad)
    for name in runs[False][1]:
        torch.testing.assert_close(runs[True][1][name], runs[False][1][name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(runs[True][2], runs[False][2], rtol=1e-4, atol=1e-8)
