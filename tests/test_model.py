# tests/test_model.py: model.py's files: loading (strict, errors naming the file and tensor), sharded checkpoints,
# save_pretrained, tokenizers, dtype and autocast, activation checkpointing. Parity with transformers: test_balora.py.

import json
import shutil
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import balora
import data
import model as M
import train_nlg
import train_nlu

torch.set_num_threads(2)
from helpers import *  # noqa: F401,F403  the shared tiny models, files and runners
from reference_models import TOL, _batch  # the parity helpers


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
    with pytest.raises(M.ModelError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        M.from_pretrained(d)
    d = _copy(src, tmp_path / "extra",
              edit=lambda sd: sd.update({"model.layers.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(M.ModelError, match=r"model\.layers\.0\.extra\.weight"):
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


def test_model_directory_errors_name_the_file_and_key(ckpt, tmp_path):
    src = ckpt["llama_gqa"][0]
    cases = [
        (dict(cfg=lambda c: c.update(hidden_size="48")), r"config\.json: hidden_size = '48' should be int"),
        (dict(cfg=lambda c: c.pop("hidden_size")), r"config\.json: required key 'hidden_size' is missing"),
        (dict(edit=lambda sd: sd["model.layers.0.mlp.up_proj.weight"].__setitem__((0, 0), float("nan"))),
         r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.up_proj\.weight' holds non-finite"),
    ]
    for i, (kw, message) in enumerate(cases):
        with pytest.raises(M.ModelError, match=message):
            M.from_pretrained(_copy(src, tmp_path / f"c{i}", **kw))
    d = _copy(src, tmp_path / "list")
    (d / "config.json").write_text("[1, 2]")
    with pytest.raises(M.ModelError, match=r"config\.json: expected a JSON object, got a list"):
        M.from_pretrained(d)
    d = _copy(src, tmp_path / "trunc")
    raw = (d / "model.safetensors").read_bytes()
    for content in (raw[:len(raw) // 2], b""):
        (d / "model.safetensors").write_bytes(content)
        with pytest.raises(M.ModelError, match=r"trunc/model\.safetensors"):
            M.from_pretrained(d)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(M.ModelError, match=r"tok/tokenizer\.json: not a readable"):
        M.load_tokenizer(tmp_path / "tok")


def test_sharded_index_may_only_name_files_inside_the_model_directory(ckpt, tmp_path):
    d = _copy(ckpt["llama_gqa"][0], tmp_path / "m")
    names = list(load_file(d / "model.safetensors"))
    (tmp_path / "outside.safetensors").write_bytes((d / "model.safetensors").read_bytes())
    for weight_map, message in (({n: "../outside.safetensors" for n in names}, r"not a file name inside"),
                                (None, r"no 'weight_map'")):
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}} | (
            {"weight_map": weight_map} if weight_map else {})))
        with pytest.raises(M.ModelError, match=message):
            M.from_pretrained(d)


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
        log = nlg_step(net, [batch], cfg, 0, 10)
        grads[ckpt] = (log["task"], [p.grad.clone() for p in net.parameters() if p.requires_grad])
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


def test_a_sequence_longer_than_the_positions_is_one_error_naming_the_limit(ckpt):
    # learned absolute positions (BERT) end at max_position_embeddings: one ModelError saying so, no IndexError
    net = M.from_pretrained(ckpt["bert_cls"][0], num_labels=2)
    n = net.encoder.embeddings.position_embeddings.num_embeddings
    net(torch.ones(1, n, dtype=torch.long))  # exactly n positions run
    with pytest.raises(M.ModelError, match=f"{n + 1} tokens is longer than the model's {n} positions"):
        net(torch.ones(1, n + 1, dtype=torch.long))
