# test_balora.py: the proofs, in balora.py's order. Part 1: PiSSA init reproduces W, the teacher is the pretrained
# model, merge equals the unmerged model. Part 2: every regulariser against a naive line-by-line transcription of
# its equation. Part 3: the fast path equals the plain functions in value and gradient. Part 4: adapters on disk
# load in peft. Then balora.py alone (the README snippet) and model.py against transformers on tiny random
# checkpoints (tests/reference_models.py). Run: `python -m pytest test_balora.py -q` (`python -m pytest -q`: everything).

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers  # the reference the hand-written models are checked against; test-only
from safetensors.torch import load_file, save_file

import balora
import model as M
from balora import PiSSALinear

sys.path.insert(0, str(Path(__file__).resolve().parent / "tests"))
from reference_models import TOL, _batch, _maxdiff, ckpt  # noqa: E402,F401  tiny transformers checkpoints (a fixture)

HERE = Path(__file__).resolve().parent
torch.set_num_threads(2)
# a test that starts a subprocess: BALORA_QUICK=1 skips it (as tests/helpers.py's `slow` does for the harness)
slow = pytest.mark.skipif(os.environ.get("BALORA_QUICK", "") not in ("", "0"), reason="BALORA_QUICK=1: a quick run")


# -------------------------------------------------------------------------------------------------------------
# Part 1. PiSSA adapters: init, teacher, merge

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
    layer = PiSSALinear(lin, r=r, alpha=alpha)
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
    layer = PiSSALinear(lin, r=r, alpha=r, init="pissa_niter_4")
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
        PiSSALinear(nn.Linear(16, 16), r=17, alpha=1)
    with pytest.raises(ValueError, match="unknown init"):
        PiSSALinear(nn.Linear(16, 16), r=2, alpha=1, init="olora")

# -------------------------------------------------------------------------------------------------------------
# Part 2. The equations, each against a naive line-by-line formula

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


def naive_svd_ratio(z, k):  # Eq. (7); σ_i = √λ_i(ZᵀZ) by numpy's symmetric eigensolver, not by svdvals
    a = np.array(z.tolist(), dtype=np.float64)
    gram = a.T @ a if a.shape[0] >= a.shape[1] else a @ a.T
    s = sorted(np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0.0, None)), reverse=True)
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



def test_nlg_regularisers_match_naive_equations_with_padding_mask():
    torch.manual_seed(2)
    B, T, V = 3, 6, 30
    zs, zt = torch.randn(B, T, V) * 2, torch.randn(B, T, V) * 2
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 0]], dtype=torch.bool)
    zs_pad = zs.clone()
    zs_pad[~mask] = 1e4  # garbage at padded positions must not leak into any term
    rs, rt = masked_rows(zs, mask), masked_rows(zt, mask)
    assert close(balora.consistency_nlu(rs, rt, T=2.0), naive_kl(rs, rt, 2.0))  # Eq. (9): Eq. (4), tokens as rows
    assert close(balora.diversity_nlg(rs, K=5), naive_topk_negentropy(rs, 5))
    assert close(balora.diversity_nlg(rs, K=V), naive_topk_negentropy(rs, V))
    # regularizers(mask=...) gives every term exactly the masked rows: the padding garbage leaks into none
    cfg = balora.BALoRAConfig.nlg(lambda1_schedule="constant", focus_schedule="constant", top_k=5, svd_k=3)
    _, got = balora.regularizers(cfg, zs_pad, zt, mask, generator=torch.Generator().manual_seed(0))
    assert close(got["consistency"], naive_kl(rs, rt, 2.0)) and close(got["diversity"], naive_topk_negentropy(rs, 5))
    assert close(got["svd"], balora.svd_nlg(rs, k=3, generator=torch.Generator().manual_seed(0)))
    # Eq. (12) with the exact top-k σ replaced by the randomized ones: on a matrix of rank ≤ q the
    # range finder is exact, so compare with the exact σ (numpy) and ‖Z‖_F.
    rl = masked_rows(torch.randn(B, T, 4) @ torch.randn(4, V), mask)
    a = np.array(rl.tolist(), dtype=np.float64)
    s = np.linalg.svd(a, compute_uv=False)
    assert close(balora.svd_nlg(rl, k=3), -s[:3].sum() / np.sqrt((a * a).sum()))


def test_randomized_svd_approaches_exact_sigma():
    torch.manual_seed(3)
    # rank-8 signal + small noise, 200 × 1000: σ̃_1..k within 1 % of exact
    z = torch.randn(200, 8) @ torch.randn(8, 1000) + 0.01 * torch.randn(200, 1000)
    s = torch.linalg.svdvals(z)
    for k in (1, 4, 8):
        expected = -s[:k].sum() / z.norm()
        got = balora.svd_nlg(z, k=k)
        assert abs(got - expected) <= 0.01 * abs(expected)


def test_regularisers_run_in_float32_under_bf16_autocast():
    torch.manual_seed(4)
    z = torch.randn(16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for fn in (lambda a: balora.diversity_nlu(a), lambda a: balora.svd_nlg(a, k=2,
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
        "diversity_nlg": lambda a: balora.diversity_nlg(a, K=3),
        "svd_nlu": lambda a: balora.svd_nlu(a, k=2),
        "svd_nlg": lambda a: balora.svd_nlg(a, k=2),
        "svd_nlu k>=rank": lambda a: balora.svd_nlu(a, k=50),
        "diversity_nlg K>=V": lambda a: balora.diversity_nlg(a, K=50),
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
    cfg = balora.BALoRAConfig.nlg(lambda1_schedule="constant", focus_schedule="constant")
    for kind in balora.CONSISTENCY:
        total, terms = balora.regularizers(dataclasses.replace(cfg, consistency=kind), z, z.detach() + 1, mask)
        assert total == 0 and set(terms) == {"consistency", "diversity", "svd"}
        assert all(v == 0 for v in terms.values())
        total.backward()
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
    # each kind reaches its own function: the total and its gradient equal the named functions' sum
    fn = {"kl": lambda a, t: balora.consistency_nlu(a, t, 2.0), "mse": balora.consistency_mse,
          "covariance": lambda a: balora.diversity_nlu(a), "topk_entropy": lambda a: balora.diversity_nlg(a, K=3),
          "exact_ratio": lambda a: balora.svd_nlu(a, k=2),
          "randomized_frobenius": lambda a: balora.svd_nlg(a, k=2, generator=torch.Generator().manual_seed(0))}
    for z, mask in [(torch.randn(8, 4), None), (torch.randn(2, 5, 50), torch.rand(2, 5) > 0.3)]:
        t = torch.randn_like(z)
        a = z.clone().requires_grad_(True)
        total, _ = balora.regularizers(cfg, a, t, mask, generator=torch.Generator().manual_seed(0))
        total.backward()
        rows, trows = (z, t) if mask is None else (z[mask], t[mask])
        b = rows.clone().requires_grad_(True)
        want = 0.15 * fn[consistency](b, trows) + 0.03 * fn[diversity](b) + 0.03 * fn[svd](b)
        want.backward()
        assert torch.allclose(total, want, rtol=1e-5, atol=1e-7)
        assert torch.allclose(a.grad if mask is None else a.grad[mask], b.grad, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="diversity='entropy'"):
        balora.BALoRAConfig(diversity="entropy")

# -------------------------------------------------------------------------------------------------------------
# Part 3. The fast path equals the plain functions (values and gradients)

def test_covariance_gram_trick_equals_explicit_vxv():
    torch.manual_seed(1)
    for N, D in [(5, 40), (40, 5), (7, 7)]:
        z = torch.randn(N, D)
        C = torch.cov(z.T)  # explicit D×D unbiased covariance
        explicit = (C.pow(2).sum() - C.diagonal().pow(2).sum()) / D
        assert close(balora.diversity_nlu(z), explicit)
        assert close(balora.diversity_nlu(z), naive_cov(z), 1e-4)


@pytest.mark.parametrize("M, V", [(1, 7), (5, 3), (7, 40000), (9, 65536 + 3)])  # one chunk; chunks of 3 / 2 / 1 rows
@pytest.mark.parametrize("path", ["plain", "fast"])
def test_kl_value_and_gradient_equal_float64_kl_div_on_both_paths(M, V, path):
    # consistency_nlu (plain) and the fast path's chunked sweep (fused_terms, KL alone) against Eq. (4) in float64
    kl_only = balora.BALoRAConfig.nlu(lambda2=0.0, lambda3=0.0)
    g = torch.Generator().manual_seed(M)
    zs = torch.randn(M, V, generator=g) * 4
    zt = torch.randn(M, V, generator=g) * 4
    zs[0] = zt[0] = 1.5                                  # an all-equal row: KL 0, gradient 0
    if M > 2:
        zs[1, 0], zt[2, -1] = 80.0, -80.0               # extreme (finite) logits: saturated softmaxes
    for T in (1.0, 2.0):
        a = zs.clone().requires_grad_(True)
        b = zs.double().requires_grad_(True)  # F.kl_div in float64: the reference without float32 rounding
        ours = balora.consistency_nlu(a, zt, T) if path == "plain" else \
            balora.fused_terms(dataclasses.replace(kl_only, temperature=T), a, zt, None, (1.0, 0, 0))["consistency"]
        # Eq. (4) in float64, the reference without float32 rounding
        ref = T * T * F.kl_div(F.log_softmax(b / T, -1), F.log_softmax(zt.double() / T, -1), log_target=True,
                               reduction="sum") / M
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
    # the KL and the MSE, fast (the lazy teacher streamed) and plain (made whole), against the dense teacher
    for form in ("kl", "mse"):
        cfg = balora.BALoRAConfig.nlu(lambda2=0.0, lambda3=0.0, consistency=form)
        grads = []
        for teacher, plain in ((lazy, False), (lazy, True), (h @ W.T, True)):
            a = zs.clone().requires_grad_(True)
            balora.regularizers(cfg, a, teacher, plain=plain)[0].backward()
            grads.append(a.grad)
        assert all(torch.allclose(gr, grads[-1], rtol=1e-5, atol=1e-8) for gr in grads), form
    # with a mask: the lazy teacher's rows are the dense teacher's masked rows
    mask = torch.rand(20, 15, generator=g) > 0.5
    H, Z = torch.randn(20, 15, 16, generator=g), torch.randn(20, 15, 50, generator=g)
    cfg = balora.BALoRAConfig.nlu(lambda2=0.0, lambda3=0.0)
    for plain in (False, True):
        lazy_kl = balora.regularizers(cfg, Z, balora.TeacherLogits(H, W), mask, plain=plain)[1]["consistency"]
        assert torch.allclose(lazy_kl, balora.consistency_nlu(Z[mask], (H @ W.T)[mask]), rtol=1e-5)


def test_svd_nlg_closed_form_gradient_equals_autograd_and_sigma_error_is_bounded(monkeypatch):
    g = torch.Generator().manual_seed(0)
    # logits with a decaying spectrum, like real ones (a few strong directions over noise)
    U = torch.linalg.qr(torch.randn(300, 40, generator=g)).Q
    Vt = torch.linalg.qr(torch.randn(2000, 40, generator=g)).Q.T
    z0 = (U * (100.0 * 0.8 ** torch.arange(40.0))) @ Vt + 0.05 * torch.randn(300, 2000, generator=g)
    a, b = z0.clone().requires_grad_(True), z0.clone().requires_grad_(True)
    cfg = balora.BALoRAConfig.nlg(lambda1=0.0, lambda2=0.0, lambda3=1.0, focus_schedule="constant")
    ours = balora.regularizers(cfg, a, None, generator=torch.Generator().manual_seed(1))[0]  # the fast path
    ref = balora.svd_nlg(b, generator=torch.Generator().manual_seed(1))  # autograd through QᵀZ, svdvals, the norm
    (2 * ours).backward()
    (2 * ref).backward()
    # (the two Q differ by float32 rounding: the gradients agree to 1e-4 of their scale)
    assert torch.allclose(ours, ref, rtol=1e-5)
    assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-4 * b.grad.abs().max().item())
    # the streamed range finder (niter + 1 passes over Z) spans the textbook's subspace for the same Gaussian:
    # the same projector QQᵀ and the same σ(QᵀZ) to float32 rounding
    for niter in (0, 1, 2):
        Qt = balora.range_finder(z0, 15, niter, torch.Generator().manual_seed(1))
        Qs = balora.range_finder_streamed(z0, 15, niter, torch.Generator().manual_seed(1))
        assert torch.allclose(Qs.T @ Qs, torch.eye(15), atol=1e-5)
        assert torch.allclose(Qs @ Qs.T, Qt @ Qt.T, atol=1e-4), niter
        assert torch.allclose(torch.linalg.svdvals(Qs.T @ z0), torch.linalg.svdvals(Qt.T @ z0), rtol=1e-5)
    # balora.range_finder's subspace: σ(QᵀZ) against the exact top-10 singular values (numpy, float64). Two
    # power iterations bring them within 0.1 % here; skipping them (niter=0) leaves errors 10x larger
    exact = np.linalg.svd(np.array(z0.tolist(), dtype=np.float64), compute_uv=False)[:10]
    err = {}
    for niter in (0, 2):
        Q = balora.range_finder(z0, 15, niter, torch.Generator().manual_seed(1))
        assert torch.allclose(Q.T @ Q, torch.eye(15), atol=1e-5)  # orthonormal
        approx = np.array(torch.linalg.svdvals(Q.T @ z0)[:10].tolist())
        err[niter] = np.abs((exact - approx) / exact).max()
    assert err[2] < 1e-3 and err[0] > 10 * err[2], err
    assert ours.item() == pytest.approx(-exact.sum() / np.sqrt((np.array(z0.tolist()) ** 2).sum()), rel=1e-4)
    monkeypatch.setattr(balora, "FUSE_MIN_COLUMNS", 1)  # the fast path at any width
    for plain in (False, True):  # all-zero logits: the term is 0 with zero gradient on both paths
        zero = torch.zeros(4, 30, requires_grad=True)
        total, terms = balora.regularizers(cfg, zero, None, plain=plain)
        total.backward()
        assert terms["svd"].item() == 0.0 and torch.equal(zero.grad, torch.zeros(4, 30))


TERMS_ON = [(1, 1, 1), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (0, 1, 1), (1, 0, 1)]


@pytest.mark.parametrize("M, V", [(1, 7), (5, 3), (9, 65536 + 3), (300, 2000)])
@pytest.mark.parametrize("on", TERMS_ON)
@pytest.mark.parametrize("forms", ["nlg", "nlu"])
def test_fused_regularizers_equal_the_plain_functions(M, V, on, forms, monkeypatch):
    # regularizers' fast path (Part 3) against the Part-2 functions as written (plain=True), for every subset of
    # the terms, in both tasks' forms: each value and the gradient, with a dense and with a lazy teacher, on
    # [M, V] rows and on [2, M, V] logits with a mask that drops some rows
    if forms == "nlu" and V > 4096:
        pytest.skip("the covariance as written is [V, V]: 17 GB at V = 65 539 (the fast path's Gram form is [M, M])")
    monkeypatch.setattr(balora, "FUSE_MIN_COLUMNS", 1)  # the fast path at any width, to reach its edge cases
    g = torch.Generator().manual_seed(M)
    zs, h, W = torch.randn(2, M, V, generator=g) * 4, torch.randn(2, M, 8, generator=g), torch.randn(V, 8, generator=g)
    mask = torch.rand(2, M, generator=g) > 0.3
    preset = balora.BALoRAConfig.nlg if forms == "nlg" else balora.BALoRAConfig.nlu
    cfg = preset(lambda1=0.3 * on[0], lambda2=0.2 * on[1], lambda3=0.5 * on[2], svd_k=min(3, M), top_k=5,
                 lambda1_schedule="constant", focus_schedule="constant")
    for z0, hidden, m in ((zs[0], h[0], None), (zs, h, mask)):
        for teacher in (hidden @ W.T, balora.TeacherLogits(hidden, W)):
            runs = {}
            for plain in (False, True):
                a = z0.clone().requires_grad_(True)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # (constant-term warnings at tiny shapes)
                    total, terms = balora.regularizers(cfg, a, teacher, m, generator=torch.Generator().manual_seed(1),
                                                       plain=plain)
                (total * 0.7).backward()
                runs[plain] = (total.detach(), terms, a.grad)
            (t1, terms1, g1), (t0, terms0, g0) = runs[False], runs[True]
            assert terms1.keys() == terms0.keys() == {n for n, o in zip(("consistency", "diversity", "svd"), on) if o}
            for name in terms0:
                torch.testing.assert_close(terms1[name], terms0[name], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(t1, t0, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-7)


def test_the_fast_path_runs_only_for_token_level_logits(monkeypatch):
    # NLU's class logits run the Part-2 functions as written; logits FUSE_MIN_COLUMNS wide go through fused_terms,
    # and plain=True never does
    calls = []
    real = balora.fused_terms
    monkeypatch.setattr(balora, "fused_terms", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    g = torch.Generator().manual_seed(0)
    for preset, V, plain, fused in ((balora.BALoRAConfig.nlu, 2, False, False),
                                    (balora.BALoRAConfig.nlu, balora.FUSE_MIN_COLUMNS - 1, False, False),
                                    (balora.BALoRAConfig.nlg, balora.FUSE_MIN_COLUMNS, False, True),
                                    (balora.BALoRAConfig.nlg, balora.FUSE_MIN_COLUMNS, True, False)):
        calls.clear()
        z = torch.randn(32, V, generator=g, requires_grad=True)
        cfg = preset(svd_k=1, lambda1_schedule="constant", focus_schedule="constant")
        balora.regularizers(cfg, z, z.detach() + 1, plain=plain)[0].backward()
        assert bool(calls) == fused, (V, plain)


@pytest.mark.parametrize("on", TERMS_ON)
def test_one_gradient_buffer_and_a_bounded_working_set_on_every_device(on, monkeypatch):
    # forward + backward of the fused terms allocate exactly one new M×V storage, the gradient buffer they share
    # (no M×V zeros for the top-K entropy, no M×V sum of the terms' gradients), and every other temporary is a
    # bounded block: a sweep chunk, a range-finder block, or a V×q basis
    from torch.utils._python_dispatch import TorchDispatchMode

    class Allocations(TorchDispatchMode):  # every tensor any op inside returns: (elements, storage)
        def __init__(self):
            super().__init__()
            self.sizes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if torch.is_tensor(t):
                    self.sizes.append((t.numel(), t.untyped_storage().data_ptr()))
            return out

    M, V = 256, 8192  # an unbounded KL (the chunk = M rows) would allocate 4x the larger budget below in one tensor
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(M, V, generator=g), torch.randn(M, V, generator=g)
    cfg = balora.BALoRAConfig.nlg(lambda1=0.3 * on[0], lambda2=0.2 * on[1], lambda3=0.5 * on[2],
                                  lambda1_schedule="constant", focus_schedule="constant")
    # the CPU's chunk, and a GPU's (KL_CHUNK_ELEMENTS_DEFAULT, 2^24) scaled down with M×V to 2^19
    for device_type, budget in (("cpu", balora.KL_CHUNK_ELEMENTS["cpu"]), ("gpu-like", 1 << 19)):
        monkeypatch.setitem(balora.KL_CHUNK_ELEMENTS, "cpu", budget)  # run the CPU with that chunk
        a = zs.clone().requires_grad_(True)
        with Allocations() as seen:
            total, _ = balora.regularizers(cfg, a, zt, generator=torch.Generator().manual_seed(0))
            total.backward()
        inputs = {a.untyped_storage().data_ptr(), zt.untyped_storage().data_ptr()}
        whole = {ptr for n, ptr in seen.sizes if ptr not in inputs and n >= M * V}  # new M×V storages
        temps = [n for n, ptr in seen.sizes if ptr not in inputs | whole]  # (not views of those: blocks of them)
        assert len(whole) == 1 and a.grad.untyped_storage().data_ptr() in whole, (device_type, len(whole))
        bound = budget if on == (1, 0, 0) else max(budget, balora.BLOCK_ROWS * V, 16 * V)  # V×q, q padded to 16
        assert max(temps) <= bound, (device_type, max(temps), bound)

# -------------------------------------------------------------------------------------------------------------
# Part 4. Adapters on disk, in peft's layout

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
    # it loads back into a model injected the same way (its second half is that model's own A0, −B0) ...
    fresh = tiny()
    balora.inject(fresh, TARGETS, r=4, alpha=8)
    balora.load_adapter(fresh, tmp_path)
    assert (fresh(x) - model(x)).abs().max() <= 1e-6
    # ... and not into one whose initial adapter differs (another init): clear error naming the key
    other = tiny()
    balora.inject(other, TARGETS, r=4, alpha=8, init="pissa_niter_0")
    with pytest.raises(ValueError, match=r"lora_A.weight's second half is not this model's initial adapter"):
        balora.load_adapter(other, tmp_path)
    with pytest.raises(ValueError, match="r=8.*r=3"):  # nor into another rank
        wrong = tiny()
        balora.inject(wrong, TARGETS, r=3, alpha=8)
        balora.load_adapter(wrong, tmp_path)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "lora"])
@pytest.mark.parametrize("convert", [None, True])
def test_peft_loads_our_adapter_onto_the_original_model(tmp_path, init, convert):
    # whatever the init, the directory save_adapter writes gives our logits when peft loads it on the untouched
    # model: a randomized init (peft would re-run its own unseeded SVD) is written as the rank-2r LoRA
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = tiny()
    balora.inject(model, TARGETS, r=4, alpha=8, init=init)
    train_steps(model)
    form = balora.save_adapter(model, tmp_path, convert_to_lora=convert)
    assert form == ("lora" if init == "lora" else "lora_2r" if convert or init != "pissa" else "pissa")
    x = torch.randn(7, 16)
    peft_model = peft.PeftModel.from_pretrained(tiny(), str(tmp_path))
    assert (peft_model(x) - model(x)).abs().max() <= 1e-5
    fresh = tiny()  # and it loads back here, into a model injected the same way
    torch.manual_seed(0)
    balora.inject(fresh, TARGETS, r=4, alpha=8, init=init)
    balora.load_adapter(fresh, tmp_path)
    assert (fresh(x) - model(x)).abs().max() <= 1e-6


def test_adapter_errors_name_the_key(tmp_path):
    model = tiny()
    balora.inject(model, TARGETS, r=4, alpha=8)
    balora.save_adapter(model, tmp_path)
    from safetensors.torch import load_file, save_file
    st = tmp_path / "adapter_model.safetensors"
    good = load_file(st)

    other = tiny()
    balora.inject(other, ["q_proj", "up_proj"], r=4, alpha=8)
    with pytest.raises(ValueError, match="target_modules .* selects 3 layers, the model has adapters on 2"):
        balora.load_adapter(other, tmp_path)
    cfg = json.loads((tmp_path / balora.CONFIG_FILE).read_text())  # the config says two, the tensors three
    (tmp_path / balora.CONFIG_FILE).write_text(json.dumps({**cfg, "target_modules": ["q_proj", "up_proj"]}))
    with pytest.raises(ValueError, match="unexpected keys.*down_proj.lora_A"):
        balora.load_adapter(other, tmp_path)
    (tmp_path / balora.CONFIG_FILE).write_text(json.dumps(cfg))

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


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_honour_the_umask_and_symlinks_are_replaced_not_followed(tmp_path, umask):
    # atomic_write's files get 0666 less the umask, as open() would give them (a colleague can load a shared
    # run); a symlink where a file goes is replaced itself, and the file it pointed to is untouched
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / balora.CONFIG_FILE).symlink_to(outside)
    net = TinyNet()
    balora.inject(net, ["q_proj"], 2, 2)
    old = os.umask(umask)
    try:
        balora.save_adapter(net, tmp_path / "run")
    finally:
        os.umask(old)
    for name in (balora.CONFIG_FILE, balora.ADAPTER_FILE):
        f = tmp_path / "run" / name
        assert not f.is_symlink() and f.stat().st_mode & 0o777 == 0o666 & ~umask, name
    assert outside.read_text() == "keep"


@pytest.mark.parametrize("key, value, loads", [
    ("r", "8", False), ("modules_to_save", "head", False), ("lora_alpha", None, False),  # wrong types
    ("target_modules", ["q_proj"], True), ("target_modules", ".*q_proj", True),  # peft's list and regex forms
    ("target_modules", ["up_proj"], False), ("target_modules", ["q_proj", "up_proj"], False),
    ("target_modules", ".*proj", False), ("target_modules", 3, False), ("peft_type", "IA3", False),
    ("peft_type", None, False), ("use_dora", True, False), ("use_rslora", True, False), ("bias", "all", False),
    ("fan_in_fan_out", True, False), ("rank_pattern", {"q_proj": 4}, False), ("layers_to_transform", [0], False)])
def test_adapter_config_of_the_wrong_type_or_that_peft_would_build_differently_is_refused(tmp_path, key, value, loads):
    # load_adapter reads only what peft would rebuild as written, the same layers and a plain LoRA; the error
    # names the file and the key
    net = TinyNet()
    balora.inject(net, ["q_proj"], 2, 2)
    balora.save_adapter(net, tmp_path)
    cfg = json.loads((tmp_path / balora.CONFIG_FILE).read_text())
    cfg[key] = value
    (tmp_path / balora.CONFIG_FILE).write_text(json.dumps(cfg))
    if loads:
        balora.load_adapter(net, tmp_path)
    else:
        with pytest.raises(balora.AdapterError, match=f"{balora.CONFIG_FILE}: {key}"):
            balora.load_adapter(net, tmp_path)


# -------------------------------------------------------------------------------------------------------------
# balora.py alone: the README snippet

def ast_literal(line):
    # "step 0 task 4.8621 {'consistency': ...}" -> ((0, 4.8621), {...})
    import ast
    head, _, terms = line.partition(" {")
    _, step, _, task = head.split()
    return (int(step), float(task)), ast.literal_eval("{" + terms)


def readme_snippet():
    readme = (HERE / "README.md").read_text(encoding="utf-8")
    block = readme.split("<!-- snippet: begin -->")[1].split("<!-- snippet: end -->")[0]
    code = block.split("```python\n")[1].split("```")[0]
    assert len(code.strip().splitlines()) <= 30
    return code


@slow
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

# -------------------------------------------------------------------------------------------------------------
# model.py against transformers (tiny random checkpoints from tests/reference_models.py)

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
