# balora.py: everything BA-LoRA adds to a model, in one file you can read top to bottom and copy.
# Part 1, PiSSA adapters (paper Sec. 3.1): PiSSALinear, inject/merge, a teacher without a second model,
# adapters on disk in the peft LoRA layout. Part 2, the three regularisers (Sec. 3.2 NLU, Eqs. 4-7;
# Sec. 3.3 NLG, Eqs. 9-12), their swappable formulations and schedules, and one function combining them.
# Paper: Chang, Chang & Wu, "Bias-Alleviating Low-Rank Adaptation", ICLR 2026 (arXiv 2408.04556).
# Tests: `python -m pytest test_balora.py -q`.

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

# -----------------------------------------------------------------------------------------------
# Part 1. PiSSA adapters
#
# Orientation. nn.Linear stores W as [out, in] and computes y = x Wᵀ. We store the adapter the same
# way: A is [r, in], B is [out, r], and the layer computes
#     y = x W_resᵀ + b + scale · (x Aᵀ) Bᵀ,     scale = alpha / r.
# The paper writes y = x (W_res + A B) with A ∈ R^{m×r}, B ∈ R^{r×n} acting on row vectors x ∈ R^m;
# its A is our Aᵀ and its B is our Bᵀ. These are also peft's lora_A / lora_B weights.


class AdapterError(ValueError):
    # an adapter that cannot be built (rank, init, targets), loaded (a bad file: names it and the key) or
    # written (non-finite values): the user's input, not a bug; the scripts print it as one line
    pass


class PiSSALinear(nn.Module):
    # Wraps (and takes ownership of) an nn.Linear whose weight becomes the frozen residual W_res.

    def __init__(self, base: nn.Linear, r: int, alpha: float, init: str = "pissa"):
        super().__init__()
        out_f, in_f = base.weight.shape
        if not 0 < r <= min(out_f, in_f):
            raise AdapterError(f"rank r={r} must be in [1, min(out, in)={min(out_f, in_f)}] for a "
                             f"[{out_f}, {in_f}] linear layer")
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
                # Seeded, so re-injecting into the same base model (e.g. to resume) gives the same
                # W_res and teacher, without consuming the caller's random stream.
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    torch.manual_seed(0)
                    U, S, V = torch.svd_lowrank(W, q=r, niter=int(init.rsplit("_", 1)[1]))
                Vh = V.T
            # Divide S by scale so that scale·B A = U_r S_r Vh_r for any alpha (as peft does).
            sqrt_s = (S / self.scale).sqrt()
            A = sqrt_s[:, None] * Vh          # [r, in]
            B = U * sqrt_s[None, :]           # [out, r]
            W = W - self.scale * (B @ A)      # the residual keeps the "minor" singular directions
        else:
            raise AdapterError(f"unknown init {init!r}: use 'pissa', 'pissa_niter_<N>' or 'lora'")

        base.weight = nn.Parameter(W.to(dtype), requires_grad=False)  # a fresh tensor: never
        if base.bias is not None:                                     # writes into a tied weight
            base.bias.requires_grad_(False)
        self.base = base
        # Adapters stay float32 (they are the master weights AdamW updates); autocast or an explicit
        # cast in forward brings them to the activation dtype.
        self.lora_A = nn.Parameter(A.contiguous())
        self.lora_B = nn.Parameter(B.contiguous())
        # The teacher. W = W_res + scale·B0 A0, so keeping the initial adapter (r·(in+out) numbers)
        # is enough to recover the pretrained layer; a LoRA-init teacher is the adapter switched off.
        if init == "lora":
            self.register_buffer("A0", None)
            self.register_buffer("B0", None)
        else:
            self.register_buffer("A0", A.clone())
            self.register_buffer("B0", B.clone())
        self.teacher_mode = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, alpha: float, init: str = "pissa"):
        return cls(linear, r, alpha, init)

    def forward(self, x):
        y = self.base(x)
        if self.teacher_mode:
            if self.A0 is None:
                return y
            A, B = self.A0, self.B0
        else:
            A, B = self.lora_A, self.lora_B
        # Two thin matmuls (x Aᵀ) Bᵀ, never the [out, in] product B A.
        return y + self.scale * F.linear(F.linear(x, A.to(x.dtype)), B.to(x.dtype))

    def merge(self) -> nn.Linear:
        out_f, in_f = self.base.weight.shape
        merged = nn.Linear(in_f, out_f, bias=self.base.bias is not None,
                           device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            W = self.base.weight.float() + self.scale * (self.lora_B.float() @ self.lora_A.float())
            merged.weight.copy_(W)
            if self.base.bias is not None:
                merged.bias.copy_(self.base.bias)
        return merged

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, init={self.init!r}"


def _linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _set_submodule(model, name, module):
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def check_targets(model: nn.Module, targets, r: int) -> list:
    # The names of the nn.Linear layers `targets` selects (a name ending with one of them, e.g. "q_proj" or
    # "attention.output.dense"); an AdapterError when a target matches nothing or r exceeds a chosen layer.
    targets = [targets] if isinstance(targets, str) else list(targets)
    names = _linear_names(model)
    matches = lambda n, t: n == t or n.endswith("." + t)
    unknown = [t for t in targets if not any(matches(n, t) for n in names)]
    if unknown:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise AdapterError(f"target(s) {unknown} match no nn.Linear in the model. Linear layers "
                           f"by leaf name: {leaves}; e.g. {names[:6]}")
    chosen = [n for n in names if any(matches(n, t) for t in targets)]
    for n in chosen:
        out_f, in_f = model.get_submodule(n).weight.shape
        if not 0 < r <= min(out_f, in_f):
            raise AdapterError(f"rank r={r} must be in [1, min(out, in)={min(out_f, in_f)}] for {n}, a "
                               f"[{out_f}, {in_f}] linear layer")
    return chosen


def inject(model: nn.Module, targets, r: int, alpha: float, init: str = "pissa") -> int:
    # Replace every nn.Linear that check_targets selects by a PiSSALinear, and freeze everything but the
    # adapters, as peft does. A caller that also trains a head (NLU) re-enables its parameters afterwards.
    chosen = check_targets(model, targets, r)
    for p in model.parameters():
        p.requires_grad_(False)
    for n in chosen:
        _set_submodule(model, n, PiSSALinear.from_linear(model.get_submodule(n), r, alpha, init))
    return len(chosen)


def pissa_layers(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PiSSALinear)]


def merge(model: nn.Module) -> nn.Module:
    # Explicit, in place: every PiSSALinear becomes a plain nn.Linear with W_res + scale·B A.
    for name, layer in pissa_layers(model):
        _set_submodule(model, name, layer.merge())
    return model


@contextmanager
def teacher(model: nn.Module):
    # The frozen pretrained model (Eq. 4's Z_P) from the same weights: every PiSSALinear uses its
    # initial adapter A0/B0, no gradient is recorded, and dropout is off (eval mode) so the teacher
    # is the deterministic pretrained function. Each module's train/eval flag is restored afterwards.
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


# -- adapters on disk: the peft LoRA layout, safetensors only, atomic writes --------------------

ADAPTER_FILE, CONFIG_FILE = "adapter_model.safetensors", "adapter_config.json"

PEFT_PREFIX = "base_model.model."


def _hf_name(model, name):
    # model.py's models map their own module names to the Hugging Face names (so peft finds the
    # same modules in the transformers model); any other nn.Module keeps its own names.
    return model.hf_name(name) if hasattr(model, "hf_name") else name


def atomic_write(path, write):
    # Write beside the target, then rename: a crash leaves the old file or the new one, never half.
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _adapter_tensors(model, convert_to_lora, modules_to_save):
    tensors, targets, ranks = {}, [], set()
    for name, m in pissa_layers(model):
        A, B = m.lora_A.detach().float(), m.lora_B.detach().float()
        if convert_to_lora and m.A0 is not None:
            # ΔW = scale·(B A − B0 A0) as a rank-2r LoRA [A; A0], [B, −B0]; doubling r and alpha keeps
            # the scale, so W + ΔW = W_res + scale·B A on the *untouched* base model.
            A, B = torch.cat([A, m.A0.float()], 0), torch.cat([B, -m.B0.float()], 1)
        path = _hf_name(model, name)
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = A.contiguous()
        tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = B.contiguous()
        targets.append(path)
        ranks.add((m.r, m.alpha, m.init))
    if not targets:
        raise ValueError("the model has no PiSSALinear layers: call balora.inject first")
    if len(ranks) != 1:
        raise ValueError(f"save_adapter needs one (r, alpha, init) for all layers, found {ranks}")
    saved_modules = []
    for mod_name in modules_to_save:
        saved_modules.append(_hf_name(model, mod_name))
        for pname, p in model.get_submodule(mod_name).named_parameters():
            tensors[PEFT_PREFIX + _hf_name(model, f"{mod_name}.{pname}")] = p.detach().contiguous()
    return tensors, targets, ranks.pop(), saved_modules


def _non_finite(tensors):
    return [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def save_adapter(model: nn.Module, out_dir: str, convert_to_lora: bool = False, modules_to_save=()):
    # Writes adapter_model.safetensors + adapter_config.json as peft does. The plain PiSSA adapter
    # (init_lora_weights "pissa") is what peft itself saves: loading it, peft recomputes W_res from
    # the base model by the same SVD. convert_to_lora=True writes the rank-2r LoRA that applies to
    # the untouched base weights (peft's documented PiSSA → LoRA conversion), for vLLM and friends.
    # modules_to_save: names of fully trained modules (e.g. a classification head) saved alongside.
    tensors, targets, (r, alpha, init), saved_modules = _adapter_tensors(
        model, convert_to_lora, modules_to_save)
    bad = _non_finite(tensors)
    if bad:  # never replace a good adapter on disk with NaN / inf
        raise AdapterError(f"not writing {out_dir}: {len(bad)} tensor(s) hold non-finite values, e.g. {bad[0]}")
    converted = convert_to_lora and init != "lora"
    config = {
        "peft_type": "LORA",
        "r": 2 * r if converted else r,
        "lora_alpha": 2 * alpha if converted else alpha,
        "target_modules": targets,
        "init_lora_weights": True if (converted or init == "lora") else init,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": saved_modules or None,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "name_or_path", None),
        "task_type": None,
    }
    os.makedirs(out_dir, exist_ok=True)
    atomic_write(os.path.join(out_dir, ADAPTER_FILE),
                  lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    atomic_write(os.path.join(out_dir, CONFIG_FILE),
                  lambda p: open(p, "w").write(json.dumps(config, indent=2) + "\n"))
    return out_dir


def load_adapter(model: nn.Module, in_dir: str):
    # Restores what save_adapter wrote (not a converted rank-2r adapter: that one belongs on the
    # untouched base model, e.g. in peft). Strict: every key must match in name and shape.
    cfg_path, st_path = os.path.join(in_dir, CONFIG_FILE), os.path.join(in_dir, ADAPTER_FILE)
    for p in (cfg_path, st_path):
        if not os.path.isfile(p):
            raise AdapterError(f"adapter file missing: {p}")
    try:
        config = json.loads(open(cfg_path, "rb").read().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{cfg_path}: expected a JSON object, got a {type(config).__name__}")
    for key, kinds, what in (("r", int, "an integer"), ("lora_alpha", (int, float), "a number"),
                             ("modules_to_save", (list, type(None)), "a list of module names or null")):
        v = config.get(key)
        if not isinstance(v, kinds) or isinstance(v, bool) or (key == "modules_to_save" and v is not None
                                                                and not all(isinstance(x, str) for x in v)):
            raise AdapterError(f"{cfg_path}: {key} = {v!r} should be {what}")
    try:
        tensors = load_file(st_path)
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{st_path}: not a readable safetensors file ({e})") from None
    bad = _non_finite(tensors)
    if bad:
        raise AdapterError(f"{st_path}: {bad[0]} holds non-finite values (NaN or inf)")
    layers = pissa_layers(model)
    if not layers:
        raise AdapterError("the model has no PiSSALinear layers: call balora.inject before load_adapter")
    r, alpha, init = layers[0][1].r, layers[0][1].alpha, layers[0][1].init
    want_init = True if init == "lora" else init
    if (config.get("r"), config.get("lora_alpha"), config.get("init_lora_weights")) != (r, alpha, want_init):
        raise AdapterError(
            f"{cfg_path}: adapter has r={config.get('r')}, lora_alpha={config.get('lora_alpha')}, "
            f"init_lora_weights={config.get('init_lora_weights')!r} but the model was injected with "
            f"r={r}, alpha={alpha}, init={init!r} (a rank-2r converted adapter loads in peft on the "
            f"untouched base model, not here)")
    expected = {}  # file key -> the tensor to fill
    for name, m in layers:
        path = PEFT_PREFIX + _hf_name(model, name)
        expected[path + ".lora_A.weight"] = m.lora_A
        expected[path + ".lora_B.weight"] = m.lora_B
    for mod_name in _saved_module_names(model, config.get("modules_to_save") or []):
        for pname, p in model.get_submodule(mod_name).named_parameters():
            expected[PEFT_PREFIX + _hf_name(model, f"{mod_name}.{pname}")] = p
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise AdapterError(f"{st_path}: missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected keys {extra[:5]}{'...' if len(extra) > 5 else ''}")
    for key, dst in expected.items():
        if tensors[key].shape != dst.shape:
            raise AdapterError(f"{st_path}: {key} has shape {tuple(tensors[key].shape)}, "
                             f"the model expects {tuple(dst.shape)}")
    with torch.no_grad():
        for key, dst in expected.items():
            dst.copy_(tensors[key])
    return model


def _saved_module_names(model, hf_names):
    # Map the HF module names written in the config back to this model's module names.
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


# -----------------------------------------------------------------------------------------------
# Part 2. The regularisers
#
# All take logits and return a scalar tensor. NLU functions take Z ∈ R^{N×D} (one row per example);
# NLG functions take Z of shape [..., V] and a boolean mask over the leading dims (True = counted),
# and see only the M selected rows. mask=None means "every row". Everything runs in float32 with
# autocast off: the SVDs, the covariance and the softmaxes are precision-sensitive, and under bf16
# autocast a plain matmul would silently drop back to bf16.

_warned = set()


def _warn_once(reason):
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(reason, stacklevel=4)  # point at the caller of the term


def _rows(z, mask=None):
    # [..., V] (+ mask over ...) -> [M, V] float32 (TeacherLogits: the same rows, still lazy)
    if isinstance(z, TeacherLogits):
        if mask is None and z.hidden.dim() == 2:
            return z
        return TeacherLogits(z.hidden.reshape(-1, z.hidden.shape[-1]) if mask is None else z.hidden[mask], z.weight,
                             z.weight.dtype)
    if mask is None and z.dim() == 2:
        return z.float()  # no view: every term's gradient then lands in one autograd buffer, added in place
    z = z.reshape(-1, z.shape[-1]) if mask is None else z[mask]
    return z.float()


def _zero(z):
    # A differentiable exact 0 with zero gradient, for terms that are undefined on this input.
    return z.sum() * 0.0


def _fp32(fn):
    def wrapped(*args, **kwargs):
        device_type = next(a for a in args if torch.is_tensor(a)).device.type
        with torch.autocast(device_type=device_type, enabled=False):
            return fn(*args, **kwargs)
    wrapped.__name__, wrapped.__doc__ = fn.__name__, fn.__doc__
    return wrapped


# Each term's plain form (the equation as written, autograd for the gradient) stands beside its fast form
# (one sweep with a closed-form gradient). FUSED = False makes every term take the plain form; the tests check
# that both give the same value and gradient.
FUSED = True

# -- consistency --------------------------------------------------------------------------------


def kl_plain(zs, zt, T):
    # Eqs. (4)/(9) as written: T² · (1/M) Σ_rows KL(softmax(zt/T) ‖ softmax(zs/T)), a KL of log-softmaxes
    zt = zt[:] if isinstance(zt, TeacherLogits) else zt
    log_ps = F.log_softmax(zs / T, dim=-1)
    log_pt = F.log_softmax(zt / T, dim=-1)
    return T * T * F.kl_div(log_ps, log_pt, log_target=True, reduction="sum") / zs.shape[0]


class TeacherLogits:
    # The teacher's logits Z_P = H Wᵀ (M×V) without ever holding them: the rows are computed chunk by chunk from
    # the teacher's final hidden states H (M×C) and the output embedding W (V×C), inside the consistency sweep.
    # On a 49k vocabulary this saves one M×V float32 matrix (200 MB at M = 1 024) and a pass over it.
    def __init__(self, hidden, weight, dtype=None):
        # dtype: of the product (the autocast dtype the model's own LM head would use); float32 rows come out
        dtype = dtype or hidden.dtype
        self.hidden, self.weight = hidden.detach().to(dtype), weight.detach().to(dtype)
        self.shape = (*hidden.shape[:-1], weight.shape[0])
        self.device = hidden.device

    def __getitem__(self, rows):
        return (self.hidden[rows] @ self.weight.T).float()


# Elements of one row chunk of the fused KL: 0.5 MB on a CPU (stays in cache), 64 MB elsewhere (few kernel
# launches); either way the KL's temporaries are a bounded block, never M×V.
KL_CHUNK_ELEMENTS = {"cpu": 1 << 17}
KL_CHUNK_ELEMENTS_DEFAULT = 1 << 24


def kl_chunk_rows(V, device_type):
    return max(1, KL_CHUNK_ELEMENTS.get(device_type, KL_CHUNK_ELEMENTS_DEFAULT) // V)


class _KLDiv(torch.autograd.Function):
    # kl_plain with its closed-form gradient ∂/∂z_s = T·(p_s − p_t) / M, in one sweep over row chunks: the value
    # and the gradient (kept for backward) come out of the same softmaxes, with no M×V temporary besides the
    # gradient itself (F.kl_div + autograd make ~8 passes over M×V and hold several M×V tensors).
    @staticmethod
    def forward(ctx, zs, zt, T):
        M, V = zs.shape
        chunk = kl_chunk_rows(V, zs.device.type)
        # lazy teacher rows come in blocks of >= 128 rows: the output embedding is read once per block, not per chunk
        block = max(chunk, 128) if isinstance(zt, TeacherLogits) else chunk
        grad, total = torch.empty_like(zs), torch.zeros((), dtype=torch.float64, device=zs.device)
        for b in range(0, M, block):
            zt_b = zt[b:b + block]
            for i in range(b, min(b + block, M), chunk):
                log_ps = F.log_softmax(zs[i:i + chunk] / T, dim=-1)
                log_pt = F.log_softmax(zt_b[i - b:i - b + chunk] / T, dim=-1)
                p_t = log_pt.exp()
                total += (p_t * (log_pt - log_ps)).sum().double()  # float64 across chunks
                torch.sub(log_ps.exp_(), p_t, out=grad[i:i + chunk])
        ctx.grad = grad.mul_(T / M)  # not save_for_backward: backward hands this very buffer over (below)
        return (total * (T * T / M)).float()

    @staticmethod
    def backward(ctx, g):
        # Scaled in place and handed over with no other reference left, so that autograd can add the other
        # terms' gradients into it in place instead of allocating M×V sums.
        if ctx.grad is None:
            raise RuntimeError("consistency: backward through the KL twice (retain_graph) is not supported")
        grad, ctx.grad = ctx.grad, None
        return grad.mul_(g), None, None


@_fp32
def consistency_nlu(z_student, z_teacher, T: float = 2.0):
    # Eq. (4): L_cr = T² · KL(softmax(Z_P/T) ‖ softmax(Z_F/T)), averaged over the N examples, i.e.
    #     (T²/N) Σ_n Σ_v p_t log(p_t / p_s),   p_t = softmax(Z_P/T), p_s = softmax(Z_F/T),
    # Z_P (teacher, pretrained) is the target distribution; gradients flow into Z_F only. kl_plain is the
    # equation; _KLDiv computes the same value and gradient in one sweep (the default, FUSED).
    zs = _rows(z_student)
    zt = z_teacher if isinstance(z_teacher, TeacherLogits) else _rows(z_teacher).detach()
    if zs.shape[0] == 0:
        return _zero(zs)
    if zs.shape[1] == 1:
        _warn_once("consistency (KL) on D=1 logits is the constant 0: softmax over one class is 1; "
                   "use consistency='mse' for regression")
    if tuple(zt.shape) != tuple(zs.shape):
        raise ValueError(f"consistency: student logits {tuple(zs.shape)}, teacher {tuple(zt.shape)}")
    return _KLDiv.apply(zs, zt, T) if FUSED else kl_plain(zs, zt, T)


def consistency_nlg(z_student, z_teacher, mask, T: float = 2.0):
    # Eq. (9): the same T²·KL per token, averaged over the M valid tokens.
    return consistency_nlu(_rows(z_student, mask), _rows(z_teacher, mask), T)


@_fp32
def consistency_mse(z_student, z_teacher, mask=None):
    # Swap-in for Eqs. (4)/(9): mean squared logit difference (logit matching), per element.
    zs, zt = _rows(z_student, mask), _rows(z_teacher, mask)
    zt = zt[:] if isinstance(zt, TeacherLogits) else zt.detach()
    if zs.numel() == 0:
        return _zero(zs)
    return (zs - zt).pow(2).mean()


# -- diversity ----------------------------------------------------------------------------------

@_fp32
def diversity_nlu(z):
    # Eqs. (5)-(6): C = Zcᵀ Zc / (N−1), the unbiased covariance of the D logit dimensions over the
    # batch; L_dr = (1/D) Σ_{i≠j} C_ij². Σ_ij C_ij² = ‖ZcᵀZc‖_F² / (N−1)² = ‖Zc Zcᵀ‖_F² / (N−1)², so we
    # form whichever Gram matrix is smaller: D×D for classification, N×N (M×M) for a vocabulary.
    z = _rows(z)
    N, D = z.shape
    if D == 1:
        _warn_once("diversity (covariance) on D=1 logits is the constant 0: there is no off-diagonal")
    if N < 2:  # the unbiased covariance of one example is undefined
        return _zero(z)
    zc = z - z.mean(0, keepdim=True)
    gram = zc.T @ zc if D <= N else zc @ zc.T      # [D, D] or [N, N]
    diag = zc.pow(2).sum(0)                         # (N−1)·C_ii, [D]
    off = gram.pow(2).sum() - diag.pow(2).sum()     # (N−1)²·Σ_{i≠j} C_ij²
    return off / ((N - 1) ** 2 * D)


@_fp32
def diversity_nlg(z, mask=None, K: int = 20):
    # Eqs. (10)-(11): per token, renormalise the softmax over the top-K logits (p'), and penalise
    # the negative entropy Σ p' log p'; averaged over the M valid tokens. Minimising it spreads the
    # probability over the K plausible candidates instead of collapsing on one.
    z = _rows(z, mask)
    if z.shape[0] == 0:
        return _zero(z)
    K = min(K, z.shape[1])
    if K == 1:
        _warn_once("diversity (top-K entropy) with K=1 or V=1 is the constant 0")
    log_p = F.log_softmax(z.topk(K, dim=-1).values, dim=-1)  # [M, K]
    return (log_p.exp() * log_p).sum(-1).mean()


# -- SVD energy ---------------------------------------------------------------------------------

def _safe_ratio(num, den, ok):
    # num/den where `ok`, else exactly 0 with zero gradient (the term is undefined: all-zero logits).
    # The where() alone is not enough: the unused branch must be finite too, or 0·NaN poisons backward.
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


@_fp32
def svd_nlu(z, k: int = 5):
    # Eq. (7): L_svd = −Σ_{i≤k} σ_i / Σ_j σ_j with the exact singular values of Z. svdvals has a
    # stable gradient U diag(1) Vᵀ-style even where singular values repeat (no 1/(σ_i−σ_j) terms).
    z = _rows(z)
    if z.shape[0] == 0:
        return _zero(z)
    if k >= min(z.shape):
        _warn_once(f"svd term with k={k} >= min(N, D)={min(z.shape)} keeps every singular value: "
                   f"the ratio is the constant 1 and the term has zero gradient (e.g. k=5 with "
                   f"binary labels); lower --svd-k or set lambda3=0")
    s = torch.linalg.svdvals(z)
    return -_safe_ratio(s[:k].sum(), s.sum(), s[0] > 1e-12)


def energy_ratio_plain(z, Q, k):
    # Eq. (12) as written, for the subspace Q: −Σ_{i≤k} σ_i(QᵀZ) / ‖Z‖_F through svdvals and autograd
    s, frob = torch.linalg.svdvals(Q.T @ z), torch.linalg.vector_norm(z)
    return -_safe_ratio(s[:k].sum(), frob, frob > 1e-12)


class _EnergyRatio(torch.autograd.Function):
    # −Σ_{i≤k} σ̃_i / ‖Z‖_F with σ̃ = σ(QᵀZ) for a fixed orthonormal basis Q (M×q), and its closed-form gradient
    #     ∂/∂Z = −Q U_k V_kᵀ / ‖Z‖_F + (Σ_{i≤k} σ̃_i / ‖Z‖_F³) · Z,      QᵀZ = U S Vᵀ,
    # one addmm that reads Z once and writes the gradient (autograd through matmul, svdvals and the norm makes
    # ~6 passes over M×V). The same gradient as svdvals' (U diag(1) Vᵀ, stable where σ repeat).
    @staticmethod
    def forward(ctx, z, Q, k):
        U, S, Vh = torch.linalg.svd(Q.T @ z, full_matrices=False)     # (q, q), (q,), (q, V)
        frob, top = torch.linalg.vector_norm(z), S[:k].sum()
        ctx.ok = bool(frob > 1e-12)  # all-zero logits: the ratio is undefined, the term is 0 with zero gradient
        ctx.save_for_backward(z, Q, U[:, :k] @ Vh[:k], top, frob)
        return -top / frob if ctx.ok else top * 0.0

    @staticmethod
    def backward(ctx, g):
        z, Q, G, top, frob = ctx.saved_tensors
        if not ctx.ok:
            return torch.zeros_like(z), None, None
        return torch.addmm(z, Q, G, beta=float(g * top / frob ** 3), alpha=float(-g / frob)), None, None


@_fp32
def svd_nlg(z, mask=None, k: int = 10, oversample: int = 5, niter: int = 2, generator=None):
    # Eq. (12): L_svd = −Σ_{i≤k} σ̃_i / ‖Z‖_F, σ̃ from a randomized range finder (Halko et al.):
    # Q spans Z Ω (Ω a V×q Gaussian, q = k+5), refined by `niter` power iterations; σ̃ = svdvals(QᵀZ).
    # Q is detached: it only chooses the subspace. The gradient is then exactly that of σ(QᵀZ) for
    # that subspace (which captures the top-k directions), and we skip back-propagating through QR,
    # which is costly and unstable when σ's are close. svdvals of the small q×V matrix is cheap.
    # Every product reads Z row-major (Z Zᵀ Q as Z (QᵀZ)ᵀ): 2 + 2·niter passes over Z, one more for ‖Z‖_F.
    z = _rows(z, mask)
    M, V = z.shape
    if M == 0:
        return _zero(z)
    q = min(k + oversample, M, V)
    with torch.no_grad():
        omega = torch.randn(V, q, device=z.device, generator=generator)
        Q = torch.linalg.qr(z @ omega).Q                       # [M, q]
        for _ in range(niter):
            Q = torch.linalg.qr(z @ (Q.T @ z).T).Q             # re-orthonormalise each round
        if not bool(torch.isfinite(Q).all()):  # non-finite logits (M×q to check, not M×V): a NaN term for the
            return z.sum() * float("nan")      # caller's guard to report, never a LinAlgError from the SVD below
    return _EnergyRatio.apply(z, Q, k) if FUSED else energy_ratio_plain(z, Q, k)


# -- the swappable formulations (the seed documents' ablation) ------------------------------------

CONSISTENCY = ("kl", "mse")
DIVERSITY = ("covariance", "topk_entropy")
SVD = ("exact_ratio", "randomized_frobenius")


def consistency_term(kind, z_student, z_teacher, T):
    return consistency_nlu(z_student, z_teacher, T) if kind == "kl" else consistency_mse(z_student, z_teacher)


def diversity_term(kind, z, K):
    return diversity_nlu(z) if kind == "covariance" else diversity_nlg(z, None, K)


def svd_term(kind, z, k, generator=None):
    return svd_nlu(z, k) if kind == "exact_ratio" else svd_nlg(z, None, k, generator=generator)


# -- schedules and the config ---------------------------------------------------------------------

def lambda1_at(lam, schedule, progress):
    # "cosine" (official NLG code): λ1 decays from λ1 to 0.1·λ1 over training.
    if schedule == "constant":
        return lam
    if schedule == "cosine":
        return 0.1 * lam + 0.9 * lam * 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    raise ValueError(f"unknown lambda1 schedule {schedule!r}: use 'constant' or 'cosine'")


def focus_at(schedule, progress, off=0.20, ramp=0.05):
    # "two_phase" (official NLG code): diversity and SVD are off for the first 20 % of steps (let the
    # task loss settle first), ramp linearly over the next 5 %, then hold.
    if schedule == "constant":
        return 1.0
    if schedule == "two_phase":
        return min(max((progress - off) / ramp, 0.0), 1.0)
    raise ValueError(f"unknown focus schedule {schedule!r}: use 'constant' or 'two_phase'")


@dataclass
class BALoRAConfig:
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
    def nlu(cls, **kw):  # paper Sec. 4.1 / App. B.3
        return cls(**{**dict(lambda1=0.15, lambda2=0.03, lambda3=0.03, svd_k=5, temperature=2.0), **kw})

    @classmethod
    def nlg(cls, **kw):  # paper Sec. 4.1 / App. B.2, schedules of the official NLG code
        return cls(**{**dict(lambda1=0.025, lambda2=0.005, lambda3=0.005, svd_k=10, top_k=20,
                             temperature=2.0, diversity="topk_entropy", svd="randomized_frobenius",
                             lambda1_schedule="cosine", focus_schedule="two_phase"), **kw})

    def __post_init__(self):
        for name, allowed in (("consistency", CONSISTENCY), ("diversity", DIVERSITY), ("svd", SVD)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: choose one of {allowed}")
        lambda1_at(1.0, self.lambda1_schedule, 0.0)
        focus_at(self.focus_schedule, 0.0)

    def lambdas(self, step: int, total_steps: int):
        # λ1, λ2, λ3 in force at optimizer step `step` (0-based) of `total_steps`.
        progress = step / max(total_steps, 1)
        focus = focus_at(self.focus_schedule, progress)
        return lambda1_at(self.lambda1, self.lambda1_schedule, progress), self.lambda2 * focus, self.lambda3 * focus


def regularizers(cfg: BALoRAConfig, z_student, z_teacher, mask=None, step=0, total_steps=1, generator=None):
    # Σ λ_i(step)·L_i on the rows of the logits selected by `mask` (None: all rows; [N, D] for NLU).
    # A term whose λ is 0 is not computed; pass z_teacher=None when λ1 is 0 (see cfg.lambdas) and
    # skip the teacher forward. Returns (total, {term: float, lambda: float}) for logging.
    l1, l2, l3 = cfg.lambdas(step, total_steps)
    z = _rows(z_student, mask)  # gather the M rows once; the terms below reuse them
    total, log = _zero(z), {"lambda1": l1, "lambda2": l2, "lambda3": l3}
    if l1 > 0:
        if z_teacher is None:
            raise ValueError(f"lambda1={l1} at step {step} needs teacher logits")
        term = consistency_term(cfg.consistency, z, _rows(z_teacher, mask), cfg.temperature)
        total, log["consistency"] = total + l1 * term, term.item()
    if l2 > 0:
        term = diversity_term(cfg.diversity, z, cfg.top_k)
        total, log["diversity"] = total + l2 * term, term.item()
    if l3 > 0:
        term = svd_term(cfg.svd, z, cfg.svd_k, generator)
        total, log["svd"] = total + l3 * term, term.item()
    return total, log
