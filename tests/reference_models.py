# tests/reference_models.py: tiny random transformers checkpoints (LLaMA with GQA and tied embeddings, DeBERTa-v2,
# BERT with and without prefix) written once per session, and the parity helpers. test_balora.py proves model.py
# equal to transformers on them; tests/conftest.py registers the `ckpt` fixture for the harness's tests.

import json

import pytest
import torch
import transformers  # the reference; test-only

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
