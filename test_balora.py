# test_balora.py: the proofs. PiSSA init, teacher, merge and adapter files (balora.py part 1); every
# regulariser against a naive line-by-line transcription of its equation (part 2); model.py against
# transformers; data.py; the training scripts end to end. Run: `python -m pytest test_balora.py -q`
# (add `-m "not network"` offline: those tests fetch the real default assets from PyPI once).

import json
import math
import os
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import balora
from balora import PiSSALinear

torch.set_num_threads(2)


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
