# Tests for model.py: parity with transformers on tiny random checkpoints written by transformers
# itself (decoder logits + every hidden state, DeBERTa-v3/v2 and BERT hidden states + classifier
# logits), cached generation, strict loading errors, save_pretrained -> transformers, and the
# balora.inject / merge round trip. Run: python -m pytest -x -q test_part_model.py

import json
import shutil

import pytest
import torch
import torch.nn as nn
import transformers  # the reference; a test-only dependency, never skipped
from safetensors.torch import load_file, save_file

import balora
import model as M

torch.set_num_threads(2)
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
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        M.from_pretrained(d)
    d = _copy(src, tmp_path / "extra",
              edit=lambda sd: sd.update({"model.layers.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(KeyError, match=r"model\.layers\.0\.extra\.weight"):
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

TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
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
        targets = [t for t in TARGETS[name.split("_")[0]]
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
