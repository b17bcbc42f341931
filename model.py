# model.py — hand-written transformers that load Hugging Face safetensors checkpoints and match
# transformers' numbers: a LLaMA-style decoder (RMSNorm, RoPE, GQA, SwiGLU, KV-cache generation) and
# BERT / DeBERTa-v2/v3 encoders (disentangled attention, log-bucketed relative positions) with
# sequence-classification heads. The base models BA-LoRA (arXiv 2408.04556, §4) adapts.
# Use: m = from_pretrained(dir[, num_labels]); tok = load_tokenizer(dir); save_pretrained(m, out).

import math
import re
import shutil
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from balora import atomic_write, read_json, write_json  # the one atomic writer, JSON reader and JSON writer


class ModelError(ValueError):
    """A model directory that cannot be read as asked: the message names the file and the key or tensor."""



def open_safetensors(file):
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as e:
        raise ModelError(f"{file}: not a readable safetensors file ({e})") from None

ACT = {  # config.json hidden_act -> function (HF "gelu" is the exact erf form)
    "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu, "silu": F.silu, "swish": F.silu, "tanh": torch.tanh,
}


def _act(name):
    if name not in ACT:
        raise ModelError(f"config.json: activation {name!r} is not supported (known: {sorted(ACT)})")
    return name

# ----------------------------------------------------------------------------------------------
# Configs: one dataclass per family, read from config.json in both the 4.x and the 5.x layouts


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int = 4           # < n_head: grouped-query attention
    n_embd: int = 64
    head_dim: int = 16
    intermediate_size: int = 128
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_llama3: dict | None = None  # LLaMA-3.1/3.2 frequency rescaling parameters, or None
    tie_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    hf: dict = field(default_factory=dict, repr=False)  # the config.json it came from, for saving

    @classmethod
    def from_hf(cls, d):
        # 4.x: rope_theta + rope_scaling at top level; 5.x: rope_parameters holds both
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", "llama3"):
            raise ModelError(f"config.json: rope type {kind!r} is not supported (only default and llama3)")
        if rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ModelError("config.json: partial_rotary_factor != 1 is not supported")
        llama3 = None
        if kind == "llama3":
            llama3 = {k: rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor")}
            llama3["original_max_position_embeddings"] = d.get(
                "original_max_position_embeddings",
                rope.get("original_max_position_embeddings", d["max_position_embeddings"]))
        n_head = d["num_attention_heads"]
        return cls(
            vocab_size=d["vocab_size"], n_layer=d["num_hidden_layers"], n_head=n_head,
            n_kv_head=d.get("num_key_value_heads") or n_head, n_embd=d["hidden_size"],
            head_dim=d.get("head_dim") or d["hidden_size"] // n_head,
            intermediate_size=d["intermediate_size"], hidden_act=_act(d.get("hidden_act", "silu")),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", d.get("rope_theta", 10000.0)), rope_llama3=llama3,
            tie_embeddings=d.get("tie_word_embeddings", False),
            attention_bias=d.get("attention_bias", False), mlp_bias=d.get("mlp_bias", False),
            attention_dropout=d.get("attention_dropout", 0.0) or 0.0,
            initializer_range=d.get("initializer_range", 0.02),
            bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"), hf=d)


@dataclass
class BertConfig:
    vocab_size: int = 30522
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    intermediate_size: int = 128
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    classifier_dropout: float = 0.1
    initializer_range: float = 0.02
    pad_token_id: int | None = 0
    num_labels: int | None = None    # set by from_pretrained(..., num_labels)
    hf: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_hf(cls, d):
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ModelError(f"config.json: position_embedding_type {d['position_embedding_type']!r} "
                             "is not supported (only absolute)")
        if d.get("is_decoder") or d.get("add_cross_attention"):
            raise ModelError("config.json: decoder / cross-attention BERT is not supported")
        return cls(**cls._common(d), type_vocab_size=d.get("type_vocab_size", 2),
                   layer_norm_eps=d.get("layer_norm_eps", 1e-12),
                   classifier_dropout=_first(d.get("classifier_dropout"), d.get("hidden_dropout_prob", 0.1)))

    @staticmethod
    def _common(d):
        return dict(vocab_size=d["vocab_size"], n_layer=d["num_hidden_layers"],
                    n_head=d["num_attention_heads"], n_embd=d["hidden_size"],
                    intermediate_size=d["intermediate_size"],
                    hidden_act=_act(d.get("hidden_act", "gelu")),
                    max_position_embeddings=d.get("max_position_embeddings", 512),
                    hidden_dropout=d.get("hidden_dropout_prob", 0.1),
                    attention_dropout=d.get("attention_probs_dropout_prob", 0.1),
                    initializer_range=d.get("initializer_range", 0.02),
                    pad_token_id=d.get("pad_token_id", 0), hf=d)


@dataclass
class DebertaConfig(BertConfig):
    type_vocab_size: int = 0
    layer_norm_eps: float = 1e-7
    relative_attention: bool = True
    att_span: int = 256              # S: relative distances are clamped / bucketed into [-S, S)
    position_buckets: int = 256      # > 0: log buckets beyond ±buckets/2 (v3); <= 0: plain clamp (v2)
    max_relative_positions: int = 512
    pos_att_type: tuple = ("c2p", "p2c")  # content->position and position->content terms
    share_att_key: bool = True       # positions projected by query_proj/key_proj, not by own layers
    norm_rel_ebd: bool = True        # LayerNorm on the relative embeddings
    position_biased_input: bool = False  # add absolute position embeddings (v2/v1 style)
    pooler_act: str = "gelu"
    pooler_dropout: float = 0.0

    @classmethod
    def from_hf(cls, d):
        if d.get("conv_kernel_size", 0) > 0:
            raise ModelError("config.json: DeBERTa-v2's convolution layer (conv_kernel_size > 0) "
                             "is not supported")
        if d.get("embedding_size", d["hidden_size"]) != d["hidden_size"]:
            raise ModelError("config.json: embedding_size != hidden_size (embed_proj) is not supported")
        C, nh = d["hidden_size"], d["num_attention_heads"]
        if d.get("attention_head_size", C // nh) * nh != C or d.get("pooler_hidden_size", C) != C:
            raise ModelError("config.json: attention_head_size / pooler_hidden_size must match hidden_size")
        pat = d.get("pos_att_type") or []
        pat = [x.strip() for x in pat.lower().split("|")] if isinstance(pat, str) else list(pat)
        if set(pat) - {"c2p", "p2c"}:
            raise ModelError(f"config.json: pos_att_type {pat} is not supported (only c2p, p2c)")
        norm = [x.strip() for x in d.get("norm_rel_ebd", "none").lower().split("|")]
        if set(norm) - {"none", "layer_norm"}:
            raise ModelError(f"config.json: norm_rel_ebd {d['norm_rel_ebd']!r} is not supported")
        max_rel = d.get("max_relative_positions", -1)
        max_rel = max_rel if max_rel >= 1 else d.get("max_position_embeddings", 512)
        buckets = d.get("position_buckets", -1)
        return cls(**cls._common(d), type_vocab_size=d.get("type_vocab_size", 0),
                   layer_norm_eps=d.get("layer_norm_eps", 1e-7),
                   classifier_dropout=_first(d.get("cls_dropout"), d.get("hidden_dropout_prob", 0.1)),
                   relative_attention=d.get("relative_attention", False),
                   att_span=buckets if buckets > 0 else max_rel, position_buckets=buckets,
                   max_relative_positions=max_rel, pos_att_type=tuple(pat),
                   share_att_key=d.get("share_att_key", False), norm_rel_ebd="layer_norm" in norm,
                   position_biased_input=d.get("position_biased_input", True),
                   pooler_act=_act(d.get("pooler_hidden_act", "gelu")),
                   pooler_dropout=d.get("pooler_dropout", 0.0))


def _first(*xs):
    return next(x for x in xs if x is not None)

# ----------------------------------------------------------------------------------------------
# Name maps: our parameter names <-> HF names. One prefix table per architecture ({i} = layer index);
# loading, saving and hf_name() (used by the adapter writer for peft keys) all go through it.


def _rename(name, table):
    # "layers.3.attn.q_proj[.weight]" -> "model.layers.3.self_attn.q_proj[.weight]"; first matching prefix
    for ours, theirs in table:
        m = re.match(re.escape(ours).replace(r"\{i\}", r"(\d+)"), name + ".")
        if m:
            prefix = theirs.replace("{i}", m.group(1)) if m.groups() else theirs
            return (prefix + (name + ".")[m.end():])[:-1]
    raise KeyError(f"{name!r} has no Hugging Face name")


LLAMA_NAMES = [
    ("wte.", "model.embed_tokens."),
    ("layers.{i}.ln_1.", "model.layers.{i}.input_layernorm."),
    ("layers.{i}.attn.", "model.layers.{i}.self_attn."),
    ("layers.{i}.ln_2.", "model.layers.{i}.post_attention_layernorm."),
    ("layers.{i}.mlp.", "model.layers.{i}.mlp."),
    ("norm.", "model.norm."),
    ("lm_head.", "lm_head."),
]
ENCODER_NAMES = [  # inside a layer our paths are HF's: peft-style target suffixes match the same modules
    ("embeddings.", "embeddings."),
    ("layers.{i}.", "encoder.layer.{i}."),
    ("rel_embeddings.", "encoder.rel_embeddings."),
    ("rel_norm.", "encoder.LayerNorm."),
]

# ----------------------------------------------------------------------------------------------
# LLaMA-style decoder


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in float32 even under bf16 (as HF does), scale in the input dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(cfg, pos, dtype):
    # pos (B, T) -> cos, sin (B, T, hs). Rebuilt per forward: a few tiny ops, no buffer that a
    # model.to(bfloat16) could round or a meta-device construction could leave empty.
    hs = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hs, 2, device=pos.device).float() / hs))  # (hs/2,)
    if cfg.rope_llama3:  # LLaMA-3.1: slow down low frequencies by `factor`, blend in the middle band
        p = cfg.rope_llama3
        old, factor = p["original_max_position_embeddings"], p["factor"]
        lo, hi = p["low_freq_factor"], p["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / lo, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        mid = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        inv_freq = torch.where(mid, blended, scaled)
    freqs = pos[..., None].float() * inv_freq            # (B, T, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)               # (B, T, hs): HF's rotate-half layout
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    # x (B, nh, T, hs); pairs dimension d with d + hs/2
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat((-x2, x1), dim=-1) * sin[:, None]


class KVCache:
    # Preallocated keys/values for generate(): (B, nkv, T_max, hs) per layer, filled left to right.
    def __init__(self, n_layer, T_max):
        self.k, self.v, self.T_max, self.len = [None] * n_layer, [None] * n_layer, T_max, 0

    def update(self, i, k, v):
        B, nkv, T, hs = k.shape
        if self.k[i] is None:
            self.k[i] = k.new_zeros(B, nkv, self.T_max, hs)
            self.v[i] = v.new_zeros(B, nkv, self.T_max, hs)
        self.k[i][:, :, self.len:self.len + T] = k
        self.v[i][:, :, self.len:self.len + T] = v
        return self.k[i][:, :, :self.len + T], self.v[i][:, :, :self.len + T]


class LlamaAttention(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.nh, self.nkv, self.hs, self.layer_idx = cfg.n_head, cfg.n_kv_head, cfg.head_dim, layer_idx
        self.dropout = cfg.attention_dropout
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.attention_bias)

    def forward(self, x, cos, sin, mask, cache):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hs).transpose(1, 2)   # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.nkv, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.nkv, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)                      # (B, nkv, L+T, hs)
        # enable_gqa lets SDPA share each kv head across nh/nkv query heads without copying them
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=self.nkv != self.nh)  # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hs))


class LlamaMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.act = ACT[cfg.hidden_act]
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=cfg.mlp_bias)

    def forward(self, x):  # SwiGLU
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.ln_1 = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.attn = LlamaAttention(cfg, layer_idx)
        self.ln_2 = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.attn(self.ln_1(x), cos, sin, mask, cache)
        return x + self.mlp(self.ln_2(x))


def run_block(block, grad_checkpoint, *args):
    # --grad-checkpoint: activation checkpointing per transformer block. Only the block's input is kept and its
    # activations are recomputed in backward (non-reentrant: the same values, dropout's RNG replayed); only when
    # a gradient is being recorded, so the teacher and evaluation never pay the recompute.
    if grad_checkpoint and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
    return block(*args)


class Llama(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.grad_checkpoint = False
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(LlamaBlock(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        if not cfg.tie_embeddings:  # tied: logits use wte.weight directly, there is no lm_head module
            self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def hf_name(self, name):
        return _rename(name, LLAMA_NAMES)

    def output_weight(self):
        return self.wte.weight if self.config.tie_embeddings else self.lm_head.weight      # (V, C)

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False, cache=None, rows=None,
                logits=True):
        # input_ids (B, T); attention_mask (B, L+T) with 1 = token, 0 = padding (left or right);
        # L = tokens already in the cache. Returns logits (B, T, V) [, hidden states]. rows: a bool (B, T)
        # mask -> logits (M, V) at those positions only; training needs no logits where there is no target,
        # and skipping them saves the (B, T, V) tensor and a gathered copy of it. logits=False: the final
        # hidden states there instead, (M, C) (BA-LoRA's teacher makes its logits from them chunk by chunk).
        B, T = input_ids.shape
        L = cache.len if cache is not None else 0
        if attention_mask is not None and cache is None and bool(attention_mask.all()):
            attention_mask = None  # no padding: take SDPA's causal kernel (flash on GPU), as HF does
        if attention_mask is None and cache is not None:
            attention_mask = torch.ones(B, L + T, dtype=torch.long, device=input_ids.device)
        if attention_mask is None:
            pos, mask = torch.arange(T, device=input_ids.device).expand(B, T), None  # SDPA's causal fast path
        else:
            # positions count real tokens only, so a left-padded prompt is placed exactly as when alone
            pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, L:]      # (B, T)
            q_i = torch.arange(L, L + T, device=input_ids.device)[:, None]       # (T, 1)
            k_i = torch.arange(L + T, device=input_ids.device)[None, :]          # (1, L+T)
            mask = (k_i <= q_i) & attention_mask.bool()[:, None, None, :]       # (B, 1, T, L+T)
            mask = mask | (k_i == q_i)  # a pad query sees itself: no empty softmax row, no NaN
        x = self.wte(input_ids)                                                  # (B, T, C)
        cos, sin = rope_cos_sin(self.config, pos, x.dtype)
        hidden = [x]
        for block in self.layers:
            x = run_block(block, self.grad_checkpoint and cache is None, x, cos, sin, mask, cache)
            if output_hidden_states:
                hidden.append(x)
        x = self.norm(x)
        if cache is not None:
            cache.len += T
        h = x if rows is None else x[rows]                                       # (B, T, C) or (M, C)
        if not logits:
            return h
        logits = F.linear(h, self.output_weight())
        if output_hidden_states:  # HF's last entry is after the final norm
            return logits, tuple(hidden[:-1]) + (x,)
        return logits

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None,
                 eos_token_id=None, attention_mask=None, pad_token_id=None, generator=None, stop=None):
        # input_ids (B, T), left-padded with attention_mask for a batch of unequal prompts.
        # Returns (B, T + n) like HF: prompt, then new tokens; after eos a row continues with pad.
        # stop: callable((B, n) new tokens so far) -> (B,) bool, rows that are finished (e.g. stop strings).
        was_training = self.training
        self.eval()
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        eos = torch.tensor([] if eos is None else [eos] if isinstance(eos, int) else eos,
                           dtype=torch.long, device=input_ids.device)
        pad = _first(pad_token_id, self.config.pad_token_id, eos[0].item() if len(eos) else 0)
        B, T = input_ids.shape
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        cache = KVCache(self.config.n_layer, T + max_new_tokens)
        logits = self(input_ids, mask, cache=cache)[:, -1]                       # (B, V)
        out, done = input_ids, torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            nxt = sample(logits.float(), temperature, top_k, top_p, generator)   # (B,)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            done = done | torch.isin(nxt, eos)
            out = torch.cat([out, nxt[:, None]], dim=1)
            if stop is not None:
                done = done | stop(out[:, T:])
            mask = torch.cat([mask, torch.ones_like(nxt)[:, None]], dim=1)
            if step == max_new_tokens - 1 or done.all():
                break
            logits = self(nxt[:, None], mask, cache=cache)[:, -1]
        self.train(was_training)
        return out


def sample(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    # logits (B, V) -> token ids (B,). temperature 0 = greedy; then top-k, then nucleus, as HF orders them.
    if not temperature:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        srt, idx = torch.sort(logits, descending=True)
        cum = srt.softmax(-1).cumsum(-1)
        drop = cum - srt.softmax(-1) >= top_p  # drop a token once the ones above it already reach top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]

# ----------------------------------------------------------------------------------------------
# BERT / DeBERTa encoders. Module paths inside a layer mirror HF's (attention.self.query,
# attention.output.dense, intermediate.dense, output.dense) so adapter targets carry over.


class Embeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if not isinstance(cfg, DebertaConfig) or cfg.position_biased_input:
            self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.n_embd)
        if cfg.type_vocab_size > 0:
            self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.n_embd)
        self.LayerNorm = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, input_ids, token_type_ids):
        B, T = input_ids.shape
        x = self.word_embeddings(input_ids)                                     # (B, T, C)
        if hasattr(self, "token_type_embeddings"):
            tt = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
            x = x + self.token_type_embeddings(tt)
        if hasattr(self, "position_embeddings"):
            n = self.position_embeddings.num_embeddings
            if T > n:  # (else an IndexError deep inside nn.Embedding)
                raise ModelError(f"a sequence of {T} tokens is longer than the model's {n} positions "
                                 f"(config.json max_position_embeddings): use --max-len {n} or less")
            x = x + self.position_embeddings(torch.arange(T, device=input_ids.device))
        # (HF's DeBERTa also zeroes padded positions here; keys at padding are masked in every layer,
        # so that never reaches a real token and is left out)
        return self.dropout(self.LayerNorm(x))


class SelfAttention(nn.Module):  # BERT
    def __init__(self, cfg):
        super().__init__()
        self.nh, self.dropout = cfg.n_head, cfg.attention_dropout
        self.query = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.key = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.value = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x, key_mask, rel=None):
        B, T, C = x.shape
        q, k, v = (lin(x).view(B, T, self.nh, C // self.nh).transpose(1, 2)      # (B, nh, T, hs)
                   for lin in (self.query, self.key, self.value))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return y.transpose(1, 2).reshape(B, T, C)


class DisentangledSelfAttention(nn.Module):  # DeBERTa-v2/v3, paper: He et al. 2021, Eq. (4)
    def __init__(self, cfg):
        super().__init__()
        self.nh, self.dropout, self.cfg = cfg.n_head, cfg.attention_dropout, cfg
        self.query_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.key_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.value_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.pos_dropout = nn.Dropout(cfg.hidden_dropout)  # on the relative embeddings, per layer as in HF
        if cfg.relative_attention and not cfg.share_att_key:
            if "c2p" in cfg.pos_att_type:
                self.pos_key_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
            if "p2c" in cfg.pos_att_type:
                self.pos_query_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x, key_mask, rel):
        # rel = (r (2S, C) relative embeddings, idx (T, T) = clamp(δ(i, j) + S)), δ = bucketed i - j
        B, T, C = x.shape
        hs = C // self.nh
        q, k, v = (lin(x).view(B, T, self.nh, hs).transpose(1, 2)               # (B, nh, T, hs)
                   for lin in (self.query_proj, self.key_proj, self.value_proj))
        # each of content->content, c2p, p2c is divided by sqrt(hs * (1 + #position terms))
        # (HF counts the terms even when relative_attention is off)
        scale = 1.0 / math.sqrt(hs * (1 + len(self.cfg.pos_att_type)))
        bias = torch.zeros((), dtype=q.dtype, device=x.device)
        if self.cfg.relative_attention:
            r, idx = rel
            r = self.pos_dropout(r)                                               # (2S, C)
            S2 = r.shape[0]
            if "c2p" in self.cfg.pos_att_type:  # query content i attends to the position of j relative to i
                pk = (self.key_proj if self.cfg.share_att_key else self.pos_key_proj)(r)
                pk = pk.view(S2, self.nh, hs).transpose(0, 1)                      # (nh, 2S, hs)
                c2p = q @ pk.transpose(-1, -2)                                     # (B, nh, T, 2S)
                bias = bias + torch.gather(c2p, -1, idx.expand(B, self.nh, T, T))  # (B, nh, T, T)
            if "p2c" in self.cfg.pos_att_type:  # key content j is queried by the position of i relative to j
                pq = (self.query_proj if self.cfg.share_att_key else self.pos_query_proj)(r)
                pq = pq.view(S2, self.nh, hs).transpose(0, 1)                      # (nh, 2S, hs)
                p2c = k @ pq.transpose(-1, -2)                                     # (B, nh, T_j, 2S)
                # HF indexes row j with clamp(-δ(j, i) + S) = idx[i, j] (δ is odd), then transposes
                p2c = torch.gather(p2c, -1, idx.t().expand(B, self.nh, T, T))      # (B, nh, T_j, T_i)
                bias = bias + p2c.transpose(-1, -2)
            bias = bias * scale
        # masked keys get the dtype's minimum as HF does (not -inf: a fully padded row stays finite)
        bias = bias.to(q.dtype).masked_fill(~key_mask, torch.finfo(q.dtype).min)  # (B, nh|1, T|1, T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.expand(B, self.nh, T, T), scale=scale,
                                           dropout_p=self.dropout if self.training else 0.0)
        return y.transpose(1, 2).reshape(B, T, C)


class AddNorm(nn.Module):  # post-LN residual: LayerNorm(dense(x) + residual); HF's *SelfOutput / *Output
    def __init__(self, cfg, d_in):
        super().__init__()
        self.dense = nn.Linear(d_in, cfg.n_embd)
        self.LayerNorm = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x, residual):
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class EncoderAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        # attribute named `self` only so that the path reads attention.self.query as in HF
        self.self = (DisentangledSelfAttention if isinstance(cfg, DebertaConfig) else SelfAttention)(cfg)
        self.output = AddNorm(cfg, cfg.n_embd)

    def forward(self, x, key_mask, rel):
        return self.output(self.self(x, key_mask, rel), x)


class Intermediate(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.act = ACT[cfg.hidden_act]
        self.dense = nn.Linear(cfg.n_embd, cfg.intermediate_size)

    def forward(self, x):
        return self.act(self.dense(x))


class EncoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attention = EncoderAttention(cfg)
        self.intermediate = Intermediate(cfg)
        self.output = AddNorm(cfg, cfg.intermediate_size)

    def forward(self, x, key_mask, rel):
        x = self.attention(x, key_mask, rel)
        return self.output(self.intermediate(x), x)


def log_bucket_position(rel, buckets, max_position):
    # DeBERTa-v3: distances within ±buckets/2 kept, larger ones log-compressed into the remaining buckets.
    # Same float32 ops as HF so the ceil() lands identically.
    sign, mid = torch.sign(rel), buckets // 2
    abs_pos = torch.where((rel < mid) & (rel > -mid), torch.tensor(mid - 1).type_as(rel), torch.abs(rel))
    log_pos = torch.ceil(torch.log(abs_pos / mid) / torch.log(torch.tensor((max_position - 1) / mid))
                         * (mid - 1)) + mid
    return torch.where(abs_pos <= mid, rel.type_as(log_pos), log_pos * sign).long()


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_layer))
        self.grad_checkpoint = False
        self.relative = isinstance(cfg, DebertaConfig) and cfg.relative_attention
        if self.relative:
            self.rel_embeddings = nn.Embedding(2 * cfg.att_span, cfg.n_embd)
            if cfg.norm_rel_ebd:
                self.rel_norm = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)

    def hf_name(self, name):
        return _rename(name, ENCODER_NAMES)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        # input_ids (B, T) -> last hidden state (B, T, C); attention_mask 1 = token, 0 = padding
        B, T = input_ids.shape
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        x = self.embeddings(input_ids, token_type_ids)
        key_mask = mask.bool()[:, None, None, :]                                 # (B, 1, 1, T)
        rel = None
        if self.relative:
            cfg = self.config
            i = torch.arange(T, device=input_ids.device)
            delta = i[:, None] - i[None, :]                                      # (T, T): i - j
            if cfg.position_buckets > 0:
                delta = log_bucket_position(delta, cfg.position_buckets, cfg.max_relative_positions)
            idx = torch.clamp(delta + cfg.att_span, 0, 2 * cfg.att_span - 1)      # (T, T) rows of r
            r = self.rel_embeddings.weight                                       # (2S, C)
            rel = (self.rel_norm(r) if cfg.norm_rel_ebd else r, idx)
        for layer in self.layers:
            x = run_block(layer, self.grad_checkpoint, x, key_mask, rel)
        return x


class Pooler(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.dense = nn.Linear(cfg.n_embd, cfg.n_embd)


class ClassifierHead(nn.Module):
    # BERT: tanh(dense(h[:, 0])) -> dropout -> classifier. DeBERTa's ContextPooler: dropout ->
    # dense -> act (gelu) -> dropout -> classifier. Callable on encoder features (B, T, C) -> (B, n).
    def __init__(self, cfg):
        super().__init__()
        self.deberta = isinstance(cfg, DebertaConfig)
        self.act = ACT[cfg.pooler_act] if self.deberta else torch.tanh
        self.pooler = Pooler(cfg)
        self.pool_dropout = nn.Dropout(cfg.pooler_dropout if self.deberta else 0.0)
        self.dropout = nn.Dropout(cfg.classifier_dropout)
        self.classifier = nn.Linear(cfg.n_embd, cfg.num_labels)

    def forward(self, h):
        pooled = self.act(self.pooler.dense(self.pool_dropout(h[:, 0])))        # (B, C): first token
        return self.classifier(self.dropout(pooled))                             # (B, num_labels)


class EncoderClassifier(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.head = ClassifierHead(cfg)
        # BertForSequenceClassification keeps the pooler under "bert.", DeBERTa's at top level
        base = "deberta." if isinstance(cfg, DebertaConfig) else "bert."
        self.names = [("encoder." + a, base + b) for a, b in ENCODER_NAMES] + [
            ("head.pooler.", ("pooler." if base == "deberta." else "bert.pooler.")),
            ("head.classifier.", "classifier.")]

    def hf_name(self, name):
        return _rename(name, self.names)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        return self.head(self.encoder(input_ids, attention_mask, token_type_ids))  # (B, num_labels)

# ----------------------------------------------------------------------------------------------
# Loading (strict, memory-mapped), saving, tokenizer


ARCHS = {"llama": LlamaConfig, "bert": BertConfig, "deberta-v2": DebertaConfig}
SKIP = {  # tensors real checkpoints carry that we knowingly drop (matched on the un-prefixed name)
    "llama": [r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"],
    "bert": [r"embeddings\.(position_ids|token_type_ids)", r"cls\..*"],
    "deberta-v2": [r"embeddings\.position_ids", r"(cls|lm_predictions|mask_predictions)\..*"],
}


def _read_json(path):
    try:
        return read_json(path, ModelError)  # invalid JSON, a key twice or a non-object: a ModelError naming the file
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found (expected a Hugging Face model directory)") from None


HF_KEYS = {"n_layer": "num_hidden_layers", "n_head": "num_attention_heads", "n_kv_head": "num_key_value_heads",
           "n_embd": "hidden_size"}  # our config field -> the config.json key, for error messages


def read_config(path):
    # config.json -> the family's config dataclass, every field type-checked: a wrong type or a missing key
    # fails here, naming the file and the key, not deep inside a forward pass
    if not Path(path).is_dir():
        raise ModelError(f"{path}: not a model directory (config.json, model.safetensors, tokenizer.json)")
    file = Path(path) / "config.json"
    hf = _read_json(file)
    arch = hf.get("model_type")
    if arch not in ARCHS:
        raise ModelError(f"{file}: model_type {arch!r} is not supported (supported: {sorted(ARCHS)})")
    try:
        cfg = ARCHS[arch].from_hf(hf)
    except KeyError as e:
        raise ModelError(f"{file}: required key {e.args[0]!r} is missing") from None
    except (TypeError, AttributeError) as e:
        raise ModelError(f"{file}: a value has the wrong type ({e})") from None
    sizes = ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "head_dim", "intermediate_size")
    for f in fields(cfg):
        v, want = getattr(cfg, f.name), {int: int, float: (int, float), bool: bool, str: str}.get(f.type)
        if want is not None and (not isinstance(v, want) or (want is not bool and isinstance(v, bool))):
            raise ModelError(f"{file}: {HF_KEYS.get(f.name, f.name)} = {v!r} should be {f.type.__name__}")
        if f.name in sizes and v < 1:
            raise ModelError(f"{file}: {HF_KEYS.get(f.name, f.name)} = {v!r} must be >= 1")
    return arch, cfg


def _checkpoint_files(path):
    # {tensor name: file}, from model.safetensors or a sharded model.safetensors.index.json
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelError(f"{index}: no 'weight_map' object (tensor name -> shard file)")
        files = {}
        for k, f in weight_map.items():
            # only files inside the model directory are read, whatever the index says
            if not isinstance(f, str) or Path(f).name != f or f in ("", ".", ".."):
                raise ModelError(f"{index}: weight_map[{k!r}] = {f!r} is not a file name inside {path}")
            files[k] = path / f
        return files
    single = path / "model.safetensors"
    if not single.exists():
        hint = (" It has pytorch_model.bin; convert it once with transformers: AutoModel.from_pretrained(dir)"
                ".save_pretrained(dir) (writes safetensors)" if (path / "pytorch_model.bin").exists() else "")
        raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json "
                                f"(only safetensors checkpoints are read, never pickle).{hint}")
    with open_safetensors(single) as f:
        return {k: single for k in f.keys()}


def _dtype(d):
    if d is None or isinstance(d, torch.dtype):
        return d
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if d not in names:
        raise ModelError(f"dtype {d!r} is not one of {sorted(names)}")
    return names[d]


WEIGHT_WARN = 1e4  # |w| above this in a checkpoint is a warning naming the tensor: trained weights stay far below


def from_pretrained(path, num_labels=None, dtype=None):
    path, dtype = Path(path), _dtype(dtype)
    arch, cfg = read_config(path)
    if arch == "llama" and num_labels is not None:
        raise ModelError("num_labels: sequence classification is only built for the encoders")
    if arch != "llama":
        cfg.num_labels = num_labels
    with torch.device("meta"):  # shapes only; the checkpoint's tensors become the parameters
        model = Llama(cfg) if arch == "llama" else EncoderClassifier(cfg) if num_labels else Encoder(cfg)

    # Expected tensors keyed by HF name; encoder files come with "bert."/"deberta." or no prefix,
    # so compare encoder names with that prefix stripped.
    def canon(k):
        if arch != "llama":
            k = re.sub(r"^(bert|deberta)\.", "", k)
            k = re.sub(r"\.LayerNorm\.gamma$", ".LayerNorm.weight", k)  # names in old BERT files
            k = re.sub(r"\.LayerNorm\.beta$", ".LayerNorm.bias", k)
        return k
    params = dict(model.named_parameters())
    expected = {canon(model.hf_name(n)): n for n in params}
    skip = list(SKIP[arch])
    if arch == "llama" and cfg.tie_embeddings:
        skip.append(r"lm_head\.weight")   # a duplicate of the embedding when tied
    if arch == "deberta-v2" and not cfg.position_biased_input:
        skip.append(r"embeddings\.position_embeddings\.weight")  # unused by v3, HF ignores it too
    if arch != "llama" and not num_labels:
        skip.append(r"(pooler|classifier)\..*")  # a head; the bare encoder does not use it

    files = _checkpoint_files(path)
    found, skipped = {}, []
    for key in files:
        c = canon(key)
        if c in expected:
            found[expected[c]] = key
        elif any(re.fullmatch(p, c) for p in skip):
            skipped.append(key)
        else:
            raise ModelError(f"{files[key]}: unexpected tensor {key!r} (not part of this {arch} model)")
    missing = [n for n in params if n not in found]
    new_head = [n for n in missing if n.startswith("head.")]
    if len(new_head) != len(missing):
        n = next(n for n in missing if not n.startswith("head."))
        raise ModelError(f"{path}: missing tensor {model.hf_name(n)!r} (shape {tuple(params[n].shape)})")

    state = {}
    with ExitStack() as stack:
        handles = {f: stack.enter_context(open_safetensors(f)) for f in set(files.values())}
        for name, key in found.items():
            shape = tuple(handles[files[key]].get_slice(key).get_shape())
            if shape != tuple(params[name].shape):
                raise ModelError(f"{files[key]}: tensor {key!r} has shape {shape}, "
                                 f"expected {tuple(params[name].shape)}")
            try:
                t = handles[files[key]].get_tensor(key)
            except (SafetensorError, OSError, RuntimeError) as e:
                raise ModelError(f"{files[key]}: tensor {key!r} cannot be read ({e})") from None
            if not t.is_floating_point():  # an integer weight would fail deep inside a matmul, naming no file
                raise ModelError(f"{files[key]}: tensor {key!r} is {str(t.dtype).removeprefix('torch.')}, "
                                 f"expected a floating-point weight")
            if not bool(torch.isfinite(t).all()):  # a NaN would reach the SVD first
                raise ModelError(f"{files[key]}: tensor {key!r} holds non-finite values (NaN or inf)")
            big = float(t.abs().max()) if t.numel() else 0.0
            if big > WEIGHT_WARN:  # finite but far outside any trained model's range (a flipped exponent bit?)
                warnings.warn(f"{files[key]}: tensor {key!r} holds a value of magnitude {big:.3g} (> {WEIGHT_WARN:g}):"
                              f" a corrupted file?", stacklevel=2)
            state[name] = t.to(dtype) if dtype is not None else t
    head_dtype = dtype or next(iter(state.values())).dtype
    for name in new_head:  # HF's init for a fresh classification head: N(0, initializer_range), zero bias
        p = params[name]
        state[name] = (torch.zeros(p.shape, dtype=head_dtype) if name.endswith("bias") else
                       torch.randn(p.shape).mul_(cfg.initializer_range).to(head_dtype))
    model.load_state_dict(state, strict=True, assign=True)
    if skipped:
        print(f"model.py: skipped {len(skipped)} checkpoint tensors not used by this model: "
              f"{', '.join(skipped[:6])}{' ...' if len(skipped) > 6 else ''}")
    if new_head:
        print(f"model.py: initialised a new classification head "
              f"({', '.join(model.hf_name(n) for n in new_head)})")
    model.source_dir = path
    return model.eval()  # like HF: dropout off until the training loop calls .train()


TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "spm.model", "tokenizer.model",
                   "sentencepiece.bpe.model", "generation_config.json"]
HF_CLASS = {("llama", False): "LlamaForCausalLM", ("bert", False): "BertModel",
            ("bert", True): "BertForSequenceClassification", ("deberta-v2", False): "DebertaV2Model",
            ("deberta-v2", True): "DebertaV2ForSequenceClassification"}


def save_pretrained(model, path):
    # HF layout: model.safetensors with HF names, config.json, and the source's tokenizer files
    path = Path(path)
    with torch.device("meta"):  # a plain model of this config: anything else in the state is not HF's
        plain = set(type(model)(model.config).state_dict())
    extra = [n for n in model.state_dict() if n not in plain]
    if extra:
        raise ModelError(f"save_pretrained: {extra[0]!r} is not a parameter of the plain model "
                         "(adapters still attached? call balora.merge(model) first)")
    path.mkdir(parents=True, exist_ok=True)
    tensors = {model.hf_name(n): t.detach().contiguous() for n, t in model.state_dict().items()}
    cfg = model.config
    hf = dict(cfg.hf)
    arch = hf["model_type"]
    head = isinstance(model, EncoderClassifier)
    hf["architectures"] = [HF_CLASS[(arch, head)]]
    if head:
        hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)}
        hf["label2id"] = {f"LABEL_{i}": i for i in range(cfg.num_labels)}
        hf.pop("num_labels", None)
    dtype_key = "torch_dtype" if "torch_dtype" in hf else "dtype"
    hf[dtype_key] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    atomic_write(path / "model.safetensors", lambda f: save_file(tensors, f, metadata={"format": "pt"}))
    write_json(path / "config.json", hf)
    src = getattr(model, "source_dir", None)
    if src is not None and Path(src).resolve() != path.resolve():
        for name in TOKENIZER_FILES:
            if (Path(src) / name).exists():
                shutil.copyfile(Path(src) / name, path / name)


def load_tokenizer(path):
    from tokenizers import Tokenizer
    path = Path(path)
    file = path if path.is_file() else path / "tokenizer.json"
    if not file.exists():
        others = [n for n in ("spm.model", "tokenizer.model", "sentencepiece.bpe.model", "vocab.txt",
                              "vocab.json") if (path / n).exists()]
        hint = (f" It has {', '.join(others)}; write tokenizer.json once with transformers: python -c "
                f"\"from transformers import AutoTokenizer; "
                f"AutoTokenizer.from_pretrained('{path}').save_pretrained('{path}')\"" if others else "")
        raise FileNotFoundError(f"{file}: not found; only the tokenizers library's tokenizer.json "
                                f"is read.{hint}")
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception for a truncated or malformed file
        raise ModelError(f"{file}: not a readable tokenizer.json ({str(e).splitlines()[0][:200]})") from None
    tok.no_padding()      # padding is done per batch by the data code; some files fix it
    tok.no_truncation()   # (all-MiniLM-L6-v2 ships padding and truncation at 128)
    return tok
