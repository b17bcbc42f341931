# balora.py: everything BA-LoRA adds to a model, in one file to read top to bottom and to copy.
# Part 1 PiSSA adapters (paper Sec. 3.1). Part 2 the equations, one plain function each, in the paper's order
# (Sec. 3.2 Eqs. 4-7, Sec. 3.3 Eqs. 9-12), then the λ schedules and the total (Eqs. 8, 13). Part 3 the total's
# fast path for token-level logits, equal to the Part-2 functions. Part 4 adapters on disk, in peft's layout.
# Chang, Chang & Wu, "Bias-Alleviating Low-Rank Adaptation", ICLR 2026 (arXiv 2408.04556). Tests: test_balora.py.

import functools
import json
import math
import os
import re
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

# =============================================================================================================
# Part 1. PiSSA adapters (Sec. 3.1)
#
# Orientation. nn.Linear stores W as [out, in] and computes y = x Wᵀ. The adapter is stored the same way:
# A is [r, in], B is [out, r], and the layer computes y = x W_resᵀ + b + scale·(x Aᵀ) Bᵀ, scale = alpha / r.
# The paper writes y = x (W_res + A B) on row vectors: its A is our Aᵀ, its B our Bᵀ. These are peft's
# lora_A / lora_B weights.


class AdapterError(ValueError):
    """An adapter that cannot be built (rank, init, targets), loaded (names the file and key) or written."""


def _check_rank(r, shape, where="a"):
    out_f, in_f = shape
    if not 0 < r <= min(out_f, in_f):
        raise AdapterError(f"rank r={r} must be in [1, min(out, in)={min(out_f, in_f)}] for {where} "
                           f"[{out_f}, {in_f}] linear layer")


class PiSSALinear(nn.Module):
    """A frozen nn.Linear (taken over) plus a trainable rank-r adapter: y = x W_resᵀ + b + (α/r)·x Aᵀ Bᵀ.
    init "pissa": W = U S Vᵀ, A = (S_r/scale)^½ V_rᵀ [r, in], B = U_r (S_r/scale)^½ [out, r], W_res = W − scale·B A,
    so the output is unchanged at step 0. "pissa_niter_N": the same from a seeded randomized SVD with N power
    iterations. "lora": A Kaiming-uniform, B = 0, W_res = W. Keeps A0, B0 (the initial adapter) for the teacher."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, init: str = "pissa"):
        super().__init__()
        _check_rank(r, base.weight.shape)
        out_f, in_f = base.weight.shape
        self.r, self.alpha, self.scale, self.init = r, alpha, alpha / r, init
        dtype, device = base.weight.dtype, base.weight.device
        W = base.weight.detach().float()  # every SVD in float32, whatever the model's dtype
        if init == "lora":
            A = torch.empty(r, in_f, device=device)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # peft's / Microsoft LoRA's init
            B = torch.zeros(out_f, r, device=device)
        elif init == "pissa" or re.fullmatch(r"pissa_niter_\d+", init):
            if init == "pissa":
                U, S, Vh = torch.linalg.svd(W, full_matrices=False)
                U, S, Vh = U[:, :r], S[:r], Vh[:r]
            else:
                # Seeded, so re-injecting into the same base model (e.g. to resume) gives the same W_res and
                # teacher, without consuming the caller's random stream.
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    torch.manual_seed(0)
                    U, S, V = torch.svd_lowrank(W, q=r, niter=int(init.rsplit("_", 1)[1]))
                Vh = V.T
            sqrt_s = (S / self.scale).sqrt()  # S divided by scale: scale·B A = U_r S_r V_rᵀ for any alpha (as peft)
            A = sqrt_s[:, None] * Vh          # [r, in]
            B = U * sqrt_s[None, :]           # [out, r]
            W = W - self.scale * (B @ A)      # the residual keeps the "minor" singular directions
        else:
            raise AdapterError(f"unknown init {init!r}: use 'pissa', 'pissa_niter_<N>' or 'lora'")
        # a fresh tensor: never writes into a weight tied to another module
        base.weight = nn.Parameter(W.to(dtype), requires_grad=False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        self.base = base
        # float32 master weights (AdamW updates them); forward casts them to the activation dtype
        self.lora_A = nn.Parameter(A.contiguous())
        self.lora_B = nn.Parameter(B.contiguous())
        # The teacher: W = W_res + scale·B0 A0, so the initial adapter (r·(in+out) numbers) recovers the
        # pretrained layer; a LoRA-init teacher is the adapter switched off.
        self.register_buffer("A0", None if init == "lora" else A.clone())
        self.register_buffer("B0", None if init == "lora" else B.clone())
        self.teacher_mode = False

    def forward(self, x):
        y = self.base(x)
        if self.teacher_mode:
            if self.A0 is None:
                return y
            A, B = self.A0, self.B0
        else:
            A, B = self.lora_A, self.lora_B
        # two thin matmuls (x Aᵀ) Bᵀ, never the [out, in] product B A
        return y + self.scale * F.linear(F.linear(x, A.to(x.dtype)), B.to(x.dtype))

    def merge(self) -> nn.Linear:
        """A plain nn.Linear with weight W_res + scale·B A: the same outputs, no adapter."""
        out_f, in_f = self.base.weight.shape
        merged = nn.Linear(in_f, out_f, bias=self.base.bias is not None,
                           device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            merged.weight.copy_(self.base.weight.float() + self.scale * (self.lora_B.float() @ self.lora_A.float()))
            if self.base.bias is not None:
                merged.bias.copy_(self.base.bias)
        return merged

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, init={self.init!r}"


def check_targets(model: nn.Module, targets, r: int) -> list:
    """The names of the nn.Linear layers that `targets` selects (a name ending in one of them, e.g. "q_proj");
    an AdapterError when a target matches nothing or r exceeds a chosen layer's smaller side."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    matches = lambda n, t: n == t or n.endswith("." + t)
    unknown = [t for t in targets if not any(matches(n, t) for n in names)]
    if unknown:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise AdapterError(f"target(s) {unknown} match no nn.Linear in the model. Linear layers "
                           f"by leaf name: {leaves}; e.g. {names[:6]}")
    chosen = [n for n in names if any(matches(n, t) for t in targets)]
    for n in chosen:
        _check_rank(r, model.get_submodule(n).weight.shape, f"{n}, a")
    return chosen


def _set_submodule(model, name, module):
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def inject(model: nn.Module, targets, r: int, alpha: float, init: str = "pissa") -> int:
    """Replace each nn.Linear that `targets` selects by a PiSSALinear and freeze everything else (as peft
    does); returns how many. A caller that also trains a head re-enables its parameters afterwards."""
    chosen = check_targets(model, targets, r)
    for p in model.parameters():
        p.requires_grad_(False)
    for n in chosen:
        _set_submodule(model, n, PiSSALinear(model.get_submodule(n), r, alpha, init))
    return len(chosen)


def pissa_layers(model: nn.Module):
    """[(name, PiSSALinear)] of the model, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PiSSALinear)]


def merge(model: nn.Module) -> nn.Module:
    """Explicit and in place: every PiSSALinear becomes a plain nn.Linear with W_res + scale·B A."""
    for name, layer in pissa_layers(model):
        _set_submodule(model, name, layer.merge())
    return model


@contextmanager
def teacher(model: nn.Module):
    """`with teacher(model):` the model is the frozen pretrained one (Eq. 4's Z_P): every PiSSALinear uses its
    initial A0, B0 (W_res + scale·B0 A0 = W), eval mode (no dropout), no gradient. Modes are restored after."""
    layers = [m for _, m in pissa_layers(model)]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    for m in layers:
        m.teacher_mode = True
    try:
        with torch.no_grad():
            yield model
    finally:
        for m in layers:
            m.teacher_mode = False
        for m, training in modes:
            m.training = training


# =============================================================================================================
# Part 2. The equations
#
# Every term takes logits, one row per example (NLU, Z ∈ R^{N×D}) or per target token (NLG, Z ∈ R^{M×V}),
# and returns a scalar. They run in float32 with autocast off (_fp32): the SVDs, the covariance and the
# softmaxes are precision-sensitive, and under bf16 autocast a plain matmul would silently drop to bf16.
# Each is the equation as written; `regularizers` (Eqs. 8, 13) sums them. First the small guards they share.


def _fp32(fn):
    # fn in float32 with autocast off, on the device of its first tensor argument
    @functools.wraps(fn)  # help() shows fn's own signature and docstring
    def wrapped(*args, **kwargs):
        device_type = next(a for a in args if torch.is_tensor(a)).device.type
        with torch.autocast(device_type=device_type, enabled=False):
            return fn(*args, **kwargs)
    return wrapped


def _zero(z):
    # a differentiable exact 0 with zero gradient, for a term that is undefined on this input
    return z.sum() * 0.0


_warned = set()


def _warn_once(reason):
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(reason, stacklevel=4)  # points at the caller of the term


def _safe_ratio(num, den, ok):
    # num/den where `ok`, else exactly 0 with zero gradient (all-zero logits: the ratio is undefined). The
    # where() alone is not enough: the unused branch must be finite too, or 0·NaN poisons backward.
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


@_fp32
def consistency_nlu(z_student, z_teacher, T: float = 2.0):
    """Eq. (4): L_cr = T²·KL(softmax(Z_P/T) ‖ softmax(Z_F/T)), averaged over the rows.
    z_student Z_F, z_teacher Z_P: [N, D] (or [M, V] tokens, Eq. 9); the gradient flows into Z_F only."""
    zs, zt = z_student.float(), z_teacher.detach().float()
    if tuple(zt.shape) != tuple(zs.shape):
        raise ValueError(f"consistency: student logits {tuple(zs.shape)}, teacher {tuple(zt.shape)}")
    if zs.shape[0] == 0:
        return _zero(zs)
    if zs.shape[1] == 1:
        _warn_once("consistency (KL) on D=1 logits is the constant 0: softmax over one class is 1; "
                   "use consistency='mse' for regression")
    log_ps = F.log_softmax(zs / T, dim=-1)             # log p_s, the student (fine-tuned)
    log_pt = F.log_softmax(zt / T, dim=-1)             # log p_t, the teacher (pretrained)
    return T * T * F.kl_div(log_ps, log_pt, log_target=True, reduction="sum") / zs.shape[0]


@_fp32
def diversity_nlu(z):
    """Eqs. (5)-(6): L_dr = (1/D) Σ_{i≠j} C_ij², C = Zcᵀ Zc / (N−1) the covariance of the D logit columns over
    the N rows (Zc: z with each column's mean removed). z: [N, D]."""
    z = z.float()
    N, D = z.shape
    if D == 1:
        _warn_once("diversity (covariance) on D=1 logits is the constant 0: there is no off-diagonal")
    if N < 2:  # the unbiased covariance of one example is undefined
        return _zero(z)
    zc = z - z.mean(0, keepdim=True)                           # [N, D]
    C = zc.T @ zc / (N - 1)                                    # [D, D], Eq. (5)
    return (C.pow(2).sum() - C.diagonal().pow(2).sum()) / D    # Eq. (6): the off-diagonal entries only


@_fp32
def svd_nlu(z, k: int = 5):
    """Eq. (7): L_svd = −Σ_{i≤k} σ_i / Σ_j σ_j, the exact singular values of z: [N, D]. svdvals' gradient
    U diag(1) Vᵀ stays stable where singular values repeat (no 1/(σ_i − σ_j) terms)."""
    z = z.float()
    if z.shape[0] == 0:
        return _zero(z)
    if k >= min(z.shape):
        _warn_once(f"svd term with k={k} >= min(N, D)={min(z.shape)} keeps every singular value: the ratio is "
                   f"the constant 1 and the term has zero gradient (e.g. k=5 with binary labels); lower --svd-k "
                   f"or set lambda3=0")
    if not bool(torch.isfinite(z).all()):  # a NaN term for the caller to report, never a LinAlgError from svdvals
        return z.sum() * float("nan")
    s = torch.linalg.svdvals(z)
    return -_safe_ratio(s[:k].sum(), s.sum(), s[0] > 1e-12)


# Eq. (9), NLG consistency, is Eq. (4) with one row per target token: consistency_nlu on the M rows that carry
# task loss, averaged over them. `regularizers(mask=...)` selects those rows for every term at once
# (train_nlg.py selects the same rows inside the model, so that no logits are made for prompt tokens).

@_fp32
def diversity_nlg(z, K: int = 20):
    """Eqs. (10)-(11): per row, p' = the softmax renormalised over the top-K logits; L_dr = mean_rows Σ p' log p'
    (the negative entropy: minimising it spreads probability over the K plausible tokens). z: [M, V]."""
    z = z.float()
    if z.shape[0] == 0:
        return _zero(z)
    K = min(K, z.shape[1])
    if K == 1:
        _warn_once("diversity (top-K entropy) with K=1 or V=1 is the constant 0")
    log_p = F.log_softmax(z.topk(K, dim=-1).values, dim=-1)  # [M, K]
    return (log_p.exp() * log_p).sum(-1).mean()


OVERSAMPLE, POWER_ITERATIONS = 5, 2  # Eq. (12)'s range finder: q = k + 5 columns, 2 power iterations


def range_finder(z, q: int, niter: int = POWER_ITERATIONS, generator=None):
    """Halko et al.'s randomized range finder: an orthonormal Q [M, q] spanning z Ω (Ω a Gaussian [V, q]),
    refined by `niter` power iterations Q ← qr(z zᵀ Q). No gradient: Q only chooses the subspace of Eq. (12)."""
    with torch.no_grad():
        omega = torch.randn(z.shape[1], q, device=z.device, generator=generator)
        Q = torch.linalg.qr(z @ omega).Q
        for _ in range(niter):
            Q = torch.linalg.qr(z @ (Q.T @ z).T).Q  # z zᵀ Q, z read row-major; re-orthonormalised each round
    return Q


@_fp32
def svd_nlg(z, k: int = 10, oversample: int = OVERSAMPLE, niter: int = POWER_ITERATIONS, generator=None):
    """Eq. (12): L_svd = −Σ_{i≤k} σ̃_i / ‖Z‖_F, σ̃ = σ(Qᵀ Z) with Q from range_finder (q = k + oversample).
    z: [M, V]. The gradient is autograd's through σ(QᵀZ) and ‖Z‖_F for the fixed subspace Q (none through the QR)."""
    z = z.float()
    M, V = z.shape
    if M == 0:
        return _zero(z)
    Q = range_finder(z, min(k + oversample, M, V), niter, generator)
    if not bool(torch.isfinite(Q).all()):  # non-finite logits: a NaN term for the caller to report, never a
        return z.sum() * float("nan")      # LinAlgError from the SVD below (an M×q check, not M×V)
    s, frob = torch.linalg.svdvals(Q.T @ z), torch.linalg.vector_norm(z)
    return -_safe_ratio(s[:k].sum(), frob, frob > 1e-12)


@_fp32
def consistency_mse(z_student, z_teacher):
    """Swap-in for Eqs. (4)/(9) (not the paper's): the mean squared logit difference, for regression heads."""
    zs, zt = z_student.float(), z_teacher.detach().float()
    if zs.numel() == 0:
        return _zero(zs)
    return (zs - zt).pow(2).mean()


# Each term's NLU and NLG form, selectable on either task (BALoRAConfig's consistency / diversity / svd).
CONSISTENCY = ("kl", "mse")
DIVERSITY = ("covariance", "topk_entropy")
SVD = ("exact_ratio", "randomized_frobenius")


def lambda1_at(lam, schedule, progress):
    """λ1 at `progress` ∈ [0, 1] of training: "constant", or "cosine" (the official NLG code) from λ1 to 0.1·λ1."""
    if schedule == "constant":
        return lam
    if schedule == "cosine":
        return 0.1 * lam + 0.9 * lam * 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    raise ValueError(f"unknown lambda1 schedule {schedule!r}: use 'constant' or 'cosine'")


def focus_at(schedule, progress, off=0.20, ramp=0.05):
    """The factor on λ2 and λ3: "constant" 1, or "two_phase" (the official NLG code): 0 for the first 20 % of
    steps (the task loss settles first), a linear ramp over the next 5 %, then 1."""
    if schedule == "constant":
        return 1.0
    if schedule == "two_phase":
        return min(max((progress - off) / ramp, 0.0), 1.0)
    raise ValueError(f"unknown focus schedule {schedule!r}: use 'constant' or 'two_phase'")


@dataclass
class BALoRAConfig:
    """The regularisers' weights, temperature, k, K, forms and schedules. BALoRAConfig.nlu() and .nlg() are the
    paper's presets; a λ of 0 switches its term off (and λ1 = 0 the teacher)."""
    lambda1: float = 0.15              # consistency
    lambda2: float = 0.03              # diversity
    lambda3: float = 0.03              # SVD
    temperature: float = 2.0           # T of Eqs. (4), (9)
    svd_k: int = 5                     # k of Eqs. (7), (12)
    top_k: int = 20                    # K of Eq. (10)
    consistency: str = "kl"            # kl | mse
    diversity: str = "covariance"      # covariance | topk_entropy
    svd: str = "exact_ratio"           # exact_ratio | randomized_frobenius
    lambda1_schedule: str = "constant"  # constant | cosine
    focus_schedule: str = "constant"   # constant | two_phase (λ2, λ3)

    @classmethod
    def nlu(cls, **kw):
        """Paper Sec. 4.1 / App. B.3: λ 0.15 / 0.03 / 0.03, k 5, T 2, covariance and exact SVD, constant."""
        return cls(**{**dict(lambda1=0.15, lambda2=0.03, lambda3=0.03, svd_k=5, temperature=2.0), **kw})

    @classmethod
    def nlg(cls, **kw):
        """Paper Sec. 4.1 / App. B.2 and the official NLG code: λ 0.025 / 0.005 / 0.005, k 10, K 20, T 2,
        top-K entropy, randomized SVD, λ1 cosine, λ2 and λ3 two-phase."""
        return cls(**{**dict(lambda1=0.025, lambda2=0.005, lambda3=0.005, svd_k=10, top_k=20, temperature=2.0,
                             diversity="topk_entropy", svd="randomized_frobenius", lambda1_schedule="cosine",
                             focus_schedule="two_phase"), **kw})

    def __post_init__(self):
        for name, allowed in (("consistency", CONSISTENCY), ("diversity", DIVERSITY), ("svd", SVD)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: choose one of {allowed}")
        lambda1_at(1.0, self.lambda1_schedule, 0.0)
        focus_at(self.focus_schedule, 0.0)

    def lambdas(self, step: int, total_steps: int):
        """(λ1, λ2, λ3) in force at optimizer step `step` (0-based) of `total_steps`."""
        progress = step / max(total_steps, 1)
        focus = focus_at(self.focus_schedule, progress)
        return lambda1_at(self.lambda1, self.lambda1_schedule, progress), self.lambda2 * focus, self.lambda3 * focus


def _rows(z, mask=None):
    # [..., V] logits (+ a bool mask over ...) -> the selected rows [M, V] in float32
    if mask is None and z.dim() == 2:
        return z.float()  # no view: every term's gradient then lands in one buffer, added in place
    return (z.reshape(-1, z.shape[-1]) if mask is None else z[mask]).float()


FUSE_MIN_COLUMNS = 1024  # logits this wide (a vocabulary, not a set of classes) take Part 3's fast path


def regularizers(cfg: BALoRAConfig, z_student, z_teacher, mask=None, step=0, total_steps=1, generator=None,
                 plain=False):
    """Eqs. (8), (13) without the task loss: Σ λ_i(step)·L_i on the rows of the logits `mask` selects (None:
    every row; for NLG a [B, T] mask over [B, T, V] logits, True where a token has a target). A term whose λ is
    0 is skipped; z_teacher may be None when λ1 is 0. Returns (total, {term: its value, detached}). Logits with
    V ≥ FUSE_MIN_COLUMNS take the fast path (Part 3, equal values and gradient); plain=True never does."""
    l1, l2, l3 = cfg.lambdas(step, total_steps)
    if l1 > 0 and z_teacher is None:
        raise ValueError(f"lambda1={l1} at step {step} needs teacher logits")
    z = _rows(z_student, mask)  # [M, V]: the rows every term sees, gathered once
    fast = not plain and z.shape[1] >= FUSE_MIN_COLUMNS
    terms = fused_terms(cfg, z, z_teacher, mask, (l1, l2, l3), generator) if fast else {}
    if l1 > 0 and "consistency" not in terms:
        zt = _rows(z_teacher[:], mask)  # [M, V]; `[:]` makes Part 3's lazy TeacherLogits whole
        terms["consistency"] = consistency_nlu(z, zt, cfg.temperature) if cfg.consistency == "kl" \
            else consistency_mse(z, zt)
    if l2 > 0 and "diversity" not in terms:
        terms["diversity"] = diversity_nlu(z) if cfg.diversity == "covariance" else diversity_nlg(z, cfg.top_k)
    if l3 > 0 and "svd" not in terms:
        terms["svd"] = svd_nlu(z, cfg.svd_k) if cfg.svd == "exact_ratio" else \
            svd_nlg(z, cfg.svd_k, generator=generator)
    total, out = torch.zeros((), device=z.device), {}
    for name, lam in (("consistency", l1), ("diversity", l2), ("svd", l3)):  # Eq. (8) / (13), in the paper's order
        if name in terms:
            total, out[name] = total + lam * terms[name], terms[name].detach()
    return total, out


# =============================================================================================================
# Part 3. The fast path of `regularizers`, for token-level logits (V ≥ FUSE_MIN_COLUMNS)
#
# The Part-2 functions' values and gradient, tested equal (test_balora.py), with less memory and fewer passes over
# Z: the KL, top-K entropy and randomized-SVD gradients land in ONE M×V buffer instead of one each; the teacher's
# logits are made block by block, never held whole (TeacherLogits); the range finder passes over Z niter + 1
# times instead of 2·niter + 1; the covariance is formed as the smaller of the [V, V] and [M, M] Gram matrices.
# On NLU's N×D class logits none of this saves anything, so they run Part 2 as written (docs/speed-and-memory.md).


class TeacherLogits:
    """The teacher's logits Z_P = H Wᵀ [..., V] never held whole: rows are made on demand (`zt[rows]`, float32)
    from its final hidden states H [..., C] and the output embedding W [V, C], block by block inside the KL's
    sweep. On a 49k vocabulary this saves one M×V float32 matrix (200 MB at M = 1 024) and a pass over it."""

    def __init__(self, hidden, weight, dtype=None):
        # dtype: of the product (the autocast dtype the model's own LM head would use)
        dtype = dtype or hidden.dtype
        self.hidden, self.weight = hidden.detach().to(dtype), weight.detach().to(dtype)
        self.shape = (*hidden.shape[:-1], weight.shape[0])
        self.device = hidden.device

    def __getitem__(self, rows):
        return (self.hidden[rows] @ self.weight.T).float()

    def rows(self, mask=None):
        """The lazy teacher of the rows `mask` selects, [M, V] (as _rows does for a tensor)."""
        if mask is None and self.hidden.dim() == 2:
            return self
        h = self.hidden.reshape(-1, self.hidden.shape[-1]) if mask is None else self.hidden[mask]
        return TeacherLogits(h, self.weight)


# Elements of one row chunk of the fused sweep: 0.5 MB on a CPU (stays in cache), 64 MB elsewhere (few kernel
# launches); either way the sweep's temporaries are a bounded block, never M×V.
KL_CHUNK_ELEMENTS = {"cpu": 1 << 17}
KL_CHUNK_ELEMENTS_DEFAULT = 1 << 24
BLOCK_ROWS = 16  # rows of Z per block of the range finder and the backward on a CPU: 3 MB at V = 49 152, in cache


def kl_chunk_rows(V, device_type):
    """Rows of one chunk of the fused KL sweep for a vocabulary of V on this kind of device (at least 1)."""
    return max(1, KL_CHUNK_ELEMENTS.get(device_type, KL_CHUNK_ELEMENTS_DEFAULT) // V)


def _block_rows(V, device_type):
    return BLOCK_ROWS if device_type == "cpu" else max(1, KL_CHUNK_ELEMENTS_DEFAULT // V)


def basis_width(q):
    """Columns the fast range finder stores for q: q rounded up to 16. Products with 16 columns run the fast
    matmul kernels (a q = 15 product takes twice as long on a CPU); the extra columns are zeros and stay zero."""
    return -(-q // 16) * 16


def _wide(x, q):
    # x [n, q] in the first q columns of zeros [n, basis_width(q)]
    out = x.new_zeros(x.shape[0], basis_width(q))
    out[:, :q] = x
    return out


def range_finder_streamed(z, q: int, niter: int = POWER_ITERATIONS, generator=None):
    """range_finder's subspace with niter + 1 passes over z [M, V] instead of 2·niter + 1: range((Z Zᵀ)^n Z Ω) =
    range(Z (ZᵀZ)^n Ω), so each power iteration applies ZᵀZ to a V×q basis W in one sweep over row blocks
    (Z_b W, then Z_bᵀ(Z_b W) while Z_b is in cache), re-orthonormalised; then Q = qr(Z W). Ω is the same draw."""
    with torch.no_grad():
        M, V = z.shape
        W = _wide(torch.randn(V, q, device=z.device, generator=generator), q)
        rows = _block_rows(V, z.device.type)
        for _ in range(niter):
            Y = torch.zeros_like(W)
            for i in range(0, M, rows):
                zb = z[i:i + rows]
                Y.addmm_(zb.T, zb @ W)           # Σ_b Z_bᵀ Z_b W = ZᵀZ W
            W[:, :q] = torch.linalg.qr(Y[:, :q]).Q
        return torch.linalg.qr((z @ W)[:, :q]).Q


def _project(Q, z):
    # QᵀZ [q, V], accumulated over row blocks (on a CPU twice as fast as one q×M by M×V product)
    q, rows = Q.shape[1], _block_rows(z.shape[1], z.device.type)
    Qw, B = _wide(Q, q), z.new_zeros(basis_width(q), z.shape[1])
    for i in range(0, z.shape[0], rows):
        B.addmm_(Qw[i:i + rows].T, z[i:i + rows])
    return B[:q]


@_fp32
def _diversity_gram(z):
    # diversity_nlu through the smaller Gram matrix: Σ_ij C_ij² = ‖Zc Zcᵀ‖²_F / (N−1)², [N, N] when D > N
    N, D = z.shape
    if N < 2:
        return _zero(z)
    zc = z - z.mean(0, keepdim=True)
    gram = zc.T @ zc if D <= N else zc @ zc.T      # [D, D] or [N, N]: the same Frobenius norm
    diag = zc.pow(2).sum(0)                         # (N−1)·C_ii, [D]
    return (gram.pow(2).sum() - diag.pow(2).sum()) / ((N - 1) ** 2 * D)


@_fp32
def fused_terms(cfg, z, z_teacher, mask, lambdas, generator=None):
    """regularizers' fast path: {term: value} for each term that is on and has a fast form (the KL, the top-K
    entropy and the randomized SVD through one _SharedGradient; the covariance through _diversity_gram), each
    equal to its Part-2 function. z: the selected rows [M, V] (float32); z_teacher: as given to regularizers.
    Other forms, and edge cases whose warning lives in Part 2 (no rows, V = 1, K = 1), are left to Part 2."""
    l1, l2, l3 = lambdas
    M, V = z.shape
    out = {"diversity": _diversity_gram(z)} if l2 > 0 and cfg.diversity == "covariance" and V > 1 else {}
    kl = l1 > 0 and cfg.consistency == "kl"
    K = min(cfg.top_k, V) if l2 > 0 and cfg.diversity == "topk_entropy" else 0
    energy = l3 > 0 and cfg.svd == "randomized_frobenius"
    if M == 0 or V == 1 or K == 1 or not (kl or K or energy):
        return out
    zt = None
    if kl:  # the teacher's selected rows, left lazy when it is a TeacherLogits
        zt = z_teacher.rows(mask) if isinstance(z_teacher, TeacherLogits) else _rows(z_teacher.detach(), mask)
    Q = range_finder_streamed(z, min(cfg.svd_k + OVERSAMPLE, M, V), POWER_ITERATIONS, generator) if energy else None
    if energy and not bool(torch.isfinite(Q).all()):
        return {**out, "svd": z.sum() * float("nan")}  # non-finite logits: a NaN term to report (svd_nlg's guard)
    cr, dr, sv = _SharedGradient.apply(z, zt, cfg.temperature, K, Q, cfg.svd_k)
    return {**out, **{name: v for name, v, on in (("consistency", cr, kl), ("diversity", dr, K > 0),
                                                   ("svd", sv, energy)) if on}}


class _SharedGradient(torch.autograd.Function):
    # The token-level terms at once, each equal to its Part-2 function, with the closed-form gradients
    #   consistency_nlu (Eqs. 4/9):  T·(p_s − p_t) / M
    #   diversity_nlg (Eqs. 10-11):  p'·(log p' − Σ p' log p') / M, at the K entries of each row only
    #   svd_nlg (Eq. 12), fixed Q:   −Q U_k V_kᵀ / ‖Z‖_F + (Σ_{i≤k} σ̃_i / ‖Z‖_F³)·Z,   QᵀZ = U S Vᵀ
    # Forward: the KL in one sweep over row chunks (each stays in cache; the teacher's rows made block by block),
    # which writes p_s − p_t into the gradient buffer; the top-K of each row; QᵀZ and ‖Z‖_F. Backward: all three
    # gradients land in that ONE M×V buffer: scaled and given the energy term block by block (one pass over the
    # buffer and Z), then the top-K entropy's M×K entries added in place. Autograd then adds the task loss's
    # gradient into it: the buffer is handed over with no other reference.
    @staticmethod
    def forward(ctx, z, zt, T, K, Q, k):
        M, V = z.shape
        values = [torch.zeros((), device=z.device) for _ in range(3)]
        grad = idx = w = G = ctx.energy = None
        if zt is not None:  # Eq. (4): T²/M Σ p_t (log p_t − log p_s), and p_s − p_t into the buffer
            grad = torch.empty_like(z)
            chunk = kl_chunk_rows(V, z.device.type)
            # lazy teacher rows come in blocks of >= 128 rows (whole chunks): the output embedding is read once per
            # block
            block = chunk * -(-128 // chunk) if isinstance(zt, TeacherLogits) else chunk
            total = torch.zeros((), dtype=torch.float64, device=z.device)
            for b in range(0, M, block):
                zt_b = zt[b:b + block]
                for i in range(b, min(b + block, M), chunk):
                    log_ps = F.log_softmax(z[i:i + chunk] / T, dim=-1)
                    log_pt = F.log_softmax(zt_b[i - b:i - b + chunk] / T, dim=-1)
                    p_t = log_pt.exp()
                    total += (p_t * (log_pt - log_ps)).sum().double()  # float64 across chunks
                    torch.sub(log_ps.exp_(), p_t, out=grad[i:i + chunk])
            values[0] = (total * (T * T / M)).float()
        if K:  # Eqs. (10)-(11): h = Σ p' log p' over each row's top K; ∂h/∂(top-K logits) = p'(log p' − h)
            top, idx = z.topk(K, dim=-1)                                  # [M, K]
            log_p = F.log_softmax(top, dim=-1)
            p = log_p.exp()
            h = (p * log_p).sum(-1, keepdim=True)
            values[1], w = h.mean(), p * (log_p - h)
        if Q is not None:  # Eq. (12)
            U, S, Vh = torch.linalg.svd(_project(Q, z), full_matrices=False)  # [q, q], [q], [q, V]
            frob, top_k = torch.linalg.vector_norm(z), S[:k].sum()
            if frob > 1e-12:  # all-zero logits: the ratio is undefined, the term is 0 with zero gradient
                values[2], G = -top_k / frob, U[:, :k] @ Vh[:k]
                ctx.energy = (float(top_k), float(frob))
            else:
                values[2] = top_k * 0.0
        ctx.grad, ctx.kl, ctx.T, ctx.K, ctx.shape, ctx.device, ctx.used = grad, zt is not None, T, K, (M, V), z.device, False
        ctx.save_for_backward(z if G is not None else None, Q if G is not None else None, G, idx, w)
        return tuple(values)

    @staticmethod
    def backward(ctx, g1, g2, g3):
        if ctx.used:
            raise RuntimeError("regularizers: backward through the fused terms twice (retain_graph) is not supported")
        ctx.used = True
        z, Q, G, idx, w = ctx.saved_tensors
        grad, ctx.grad = ctx.grad, None  # the KL's buffer (None without the KL): no reference to it stays here
        M, V = ctx.shape
        if grad is None:  # no KL: the one buffer is made here; zeros only when the top-K alone writes into it
            grad = (torch.empty if G is not None else torch.zeros)(M, V, device=ctx.device)
        if ctx.kl or G is not None:  # one pass over the buffer, block by block: the KL's scale, the energy term
            if G is not None:
                top_k, frob = ctx.energy
                alpha, beta = float(-g3 / frob), float(g3 * top_k / frob ** 3)
            rows = _block_rows(V, grad.device.type)
            for i in range(0, M, rows):
                gb = grad[i:i + rows]
                if ctx.kl:
                    gb.mul_(g1 * (ctx.T / M))
                if G is not None:
                    if ctx.kl:
                        gb.add_(z[i:i + rows], alpha=beta)
                    else:
                        torch.mul(z[i:i + rows], beta, out=gb)
                    gb.addmm_(Q[i:i + rows], G, alpha=alpha)
        if ctx.K:
            grad.scatter_add_(1, idx, w * (g2 / M))  # the top-K entropy: only the K entries of each row
        return grad, None, None, None, None, None


# =============================================================================================================
# Part 4. Adapters on disk: peft's LoRA layout, safetensors only, every write atomic

ADAPTER_FILE, CONFIG_FILE = "adapter_model.safetensors", "adapter_config.json"
PEFT_PREFIX = "base_model.model."


def atomic_write(path, write):
    """write(tmp) beside `path`, then rename over it: a crash leaves the old file or the new one, never half.
    The file's mode is 0666 less the umask, as open() would make it (mkstemp alone makes it 0600)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)  # (a symlink at `path` is replaced itself: nothing is written where it points)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _hf_name(model, name):
    # model.py's models map their module names to the Hugging Face ones (so peft finds the same modules in
    # the transformers model); any other nn.Module keeps its own names
    return model.hf_name(name) if hasattr(model, "hf_name") else name


def _randomized(init):
    return init.startswith("pissa_niter_")


def _layers_settings(model, what):
    layers = pissa_layers(model)
    if not layers:
        raise AdapterError(f"the model has no PiSSALinear layers: call balora.inject before {what}")
    settings = {(m.r, m.alpha, m.init) for _, m in layers}
    if len(settings) != 1:
        raise AdapterError(f"{what} needs one (r, alpha, init) for all layers, found {settings}")
    return layers, settings.pop()


def _non_finite(tensors):
    return [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def save_adapter(model: nn.Module, out_dir, convert_to_lora=None, modules_to_save=()):
    """Write adapter_model.safetensors + adapter_config.json as peft does; returns the form written.
    "pissa"/"lora": the adapter itself (peft rebuilds W_res from the base by the same exact SVD). "lora_2r": the
    rank-2r LoRA [A; A0], [B, −B0] that applies to the untouched base (convert_to_lora=True, and always for a
    randomized pissa_niter_N init, whose W_res peft cannot rebuild). modules_to_save: heads saved in full."""
    layers, (r, alpha, init) = _layers_settings(model, "save_adapter")
    converted = init != "lora" and (convert_to_lora or (convert_to_lora is None and _randomized(init)))
    tensors, targets = {}, []
    for name, m in layers:
        A, B = m.lora_A.detach().float(), m.lora_B.detach().float()
        if converted:  # scale·(B A − B0 A0) = W_res + scale·B A − W; doubling r and alpha keeps the scale
            A, B = torch.cat([A, m.A0.float()], 0), torch.cat([B, -m.B0.float()], 1)
        path = _hf_name(model, name)
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = A.contiguous()
        tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = B.contiguous()
        targets.append(path)
    saved_modules = [_hf_name(model, n) for n in modules_to_save]
    for mod_name in modules_to_save:
        for pname, p in model.get_submodule(mod_name).named_parameters():
            tensors[PEFT_PREFIX + _hf_name(model, f"{mod_name}.{pname}")] = p.detach().contiguous()
    bad = _non_finite(tensors)
    if bad:  # never replace a good adapter on disk with NaN / inf
        raise AdapterError(f"not writing {out_dir}: {len(bad)} tensor(s) hold non-finite values, e.g. {bad[0]}")
    config = {"peft_type": "LORA", "r": 2 * r if converted else r, "lora_alpha": 2 * alpha if converted else alpha,
              "target_modules": targets, "init_lora_weights": True if (converted or init == "lora") else init,
              "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
              "modules_to_save": saved_modules or None,
              "base_model_name_or_path": getattr(getattr(model, "config", None), "name_or_path", None),
              "task_type": None}
    os.makedirs(out_dir, exist_ok=True)
    atomic_write(os.path.join(out_dir, ADAPTER_FILE), lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    write_json(os.path.join(out_dir, CONFIG_FILE), config)
    return "lora_2r" if converted else init


# adapter_config.json keys that change what peft builds: (peft's default when absent, the values read here)
_PEFT_AS_WRITTEN = {"peft_type": (None, ("LORA",)), "bias": ("none", ("none",)),
                    "fan_in_fan_out": (False, (False,)), "use_rslora": (False, (False,)),
                    "use_dora": (False, (False,)), "layers_to_transform": (None, (None, [])),
                    "layers_pattern": (None, (None, [], "")), "rank_pattern": ({}, ({}, None)),
                    "alpha_pattern": ({}, ({}, None))}


def _read_adapter_config(cfg_path):
    config = read_json(cfg_path, AdapterError)
    for key, kinds, what in (("r", int, "an integer"), ("lora_alpha", (int, float), "a number"),
                             ("modules_to_save", (list, type(None)), "a list of module names or null")):
        v = config.get(key)
        if not isinstance(v, kinds) or isinstance(v, bool) or (key == "modules_to_save" and v is not None
                                                                and not all(isinstance(x, str) for x in v)):
            raise AdapterError(f"{cfg_path}: {key} = {v!r} should be {what}")
    for key, (default, allowed) in _PEFT_AS_WRITTEN.items():  # what would make peft build another adapter
        if config.get(key, default) not in allowed:
            raise AdapterError(f"{cfg_path}: {key} = {config.get(key, default)!r}: this loader reads only "
                               f"{allowed[0]!r} (peft would build a different adapter)")
    return config


def _check_target_modules(model, config, cfg_path, layers):
    # the layers peft would adapt by the config's target_modules (a list of name suffixes, or one regex matched
    # against the whole name) must be exactly the model's adapters
    t = config.get("target_modules")
    if not (isinstance(t, str) or (isinstance(t, list) and all(isinstance(x, str) for x in t))):
        raise AdapterError(f"{cfg_path}: target_modules = {t!r} should be a list of module names or a regex")
    match = (lambda n: re.fullmatch(t, n) is not None) if isinstance(t, str) else \
        (lambda n: any(n == x or n.endswith("." + x) for x in t))
    adapted = {n for n, _ in layers}
    ours = {_hf_name(model, n) for n in adapted}
    linears = set(ours)
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear) and n.rpartition(".")[0] not in adapted:  # (not a PiSSALinear's own base)
            try:
                linears.add(_hf_name(model, n))
            except KeyError:  # a layer with no Hugging Face counterpart: peft cannot target it either
                pass
    chosen = {n for n in linears if match(n)}
    if chosen != ours:
        diff = sorted(chosen - ours) or sorted(ours - chosen)
        raise AdapterError(f"{cfg_path}: target_modules = {t!r} selects {len(chosen)} layers, the model has "
                           f"adapters on {len(ours)} (e.g. {diff[0]!r} differs): peft would build another model")


def parse_json(text, where, error=ValueError):
    """The JSON object in `text`, strictly: invalid JSON, a key that appears twice (which json.loads would
    resolve silently to the last) or a non-object raises `error` naming `where` (a file, or a file and key)."""
    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        dup = next((k for k in keys if keys.count(k) > 1), None)
        if dup is not None:
            raise error(f"{where}: the key {dup!r} appears twice")
        return dict(pairs)
    try:
        obj = json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise error(f"{where}: expected a JSON object, got a {type(obj).__name__}")
    return obj


def read_json(path, error=ValueError):
    """parse_json of the UTF-8 file `path`; a file that is not UTF-8 raises `error` naming it too."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return parse_json(raw.decode("utf-8"), path, error)
    except UnicodeDecodeError as e:
        raise error(f"{path}: not valid JSON ({e})") from None


def write_json(path, obj):
    """json.dumps(obj, indent=1) into `path` atomically (atomic_write): the old file or the new one, never half."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(obj, indent=1) + "\n")
    atomic_write(path, write)


def load_adapter(model: nn.Module, in_dir):
    """Load what save_adapter wrote into a model injected with the same (r, alpha, init), strictly: every key
    must match in name and shape. A rank-2r converted adapter loads too: its second half must be this model's
    own initial adapter (A0, −B0), else it was trained from another init and is refused."""
    cfg_path, st_path = os.path.join(in_dir, CONFIG_FILE), os.path.join(in_dir, ADAPTER_FILE)
    for p in (cfg_path, st_path):
        if not os.path.isfile(p):
            raise AdapterError(f"adapter file missing: {p}")
    config = _read_adapter_config(cfg_path)
    try:
        tensors = load_file(st_path)
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{st_path}: not a readable safetensors file ({e})") from None
    bad = _non_finite(tensors)
    if bad:
        raise AdapterError(f"{st_path}: {bad[0]} holds non-finite values (NaN or inf)")
    layers, (r, alpha, init) = _layers_settings(model, "load_adapter")
    _check_target_modules(model, config, cfg_path, layers)
    found = (config.get("r"), config.get("lora_alpha"), config.get("init_lora_weights"))
    converted = init != "lora" and found == (2 * r, 2 * alpha, True)
    if found != (r, alpha, True if init == "lora" else init) and not converted:
        raise AdapterError(f"{cfg_path}: adapter has r={found[0]}, lora_alpha={found[1]}, init_lora_weights="
                           f"{found[2]!r} but the model was injected with r={r}, alpha={alpha}, init={init!r}")
    expected, halves = {}, {}  # file key -> the tensor to fill; converted: file key -> (its A0 / −B0 half)
    for name, m in layers:
        path = PEFT_PREFIX + _hf_name(model, name)
        expected[path + ".lora_A.weight"], expected[path + ".lora_B.weight"] = m.lora_A, m.lora_B
        if converted:
            halves[path + ".lora_A.weight"], halves[path + ".lora_B.weight"] = m.A0, -m.B0
    for mod_name in _saved_module_names(model, config.get("modules_to_save") or []):
        for pname, p in model.get_submodule(mod_name).named_parameters():
            expected[PEFT_PREFIX + _hf_name(model, f"{mod_name}.{pname}")] = p
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise AdapterError(f"{st_path}: missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                           f"unexpected keys {extra[:5]}{'...' if len(extra) > 5 else ''}")
    for key, dst in expected.items():
        t = tensors[key]
        if key in halves:  # [A; A0] along rows, [B, −B0] along columns
            dim = 0 if key.endswith("lora_A.weight") else 1
            if t.shape[dim] != 2 * dst.shape[dim]:
                raise AdapterError(f"{st_path}: {key} has shape {tuple(t.shape)}, a rank-2r adapter of this "
                                   f"model needs {2 * dst.shape[dim]} along dim {dim}")
            t, own = t.split(dst.shape[dim], dim)
            if own.shape != halves[key].shape or not torch.allclose(own, halves[key].float().cpu(), rtol=1e-4,
                                                                     atol=1e-6):
                raise AdapterError(f"{st_path}: {key}'s second half is not this model's initial adapter: the "
                                   f"adapter was trained from another base model or init")
            tensors[key] = t
        if tensors[key].shape != dst.shape:
            raise AdapterError(f"{st_path}: {key} has shape {tuple(tensors[key].shape)}, the model expects "
                               f"{tuple(dst.shape)}")
    with torch.no_grad():
        for key, dst in expected.items():
            dst.copy_(tensors[key])
    return model


def _saved_module_names(model, hf_names):
    # the HF module names written in the config, mapped back to this model's module names
    ours = {}
    for n, _ in model.named_modules():
        try:
            ours[_hf_name(model, n)] = n
        except KeyError:  # a container with no HF counterpart (model.py's `encoder`, `head`, ...)
            pass
    for h in hf_names:
        if h not in ours:
            raise AdapterError(f"adapter config lists modules_to_save {h!r}, which this model lacks")
    return [ours[h] for h in hf_names]
