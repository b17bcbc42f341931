# test_part_nlg.py: tests of train_nlg.py (issue 5) on a tiny random LLaMA written by transformers and read by
# model.py: loss and regulariser masks, the teacher, gradient accumulation, resume, merge, the GGUF q/k
# un-permute, GSM8K answer extraction; plus one `network` smoke test on the real converted default model.
# Run: `python -m pytest test_part_nlg.py -q` (add `-m "not network"` offline). To be merged into test_balora.py.

import json
import math
from contextlib import nullcontext

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

import balora
import data
import model as modellib
import train_nlg

torch.set_num_threads(2)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
WORDS = ("the movie was a great fun bad dull story with actors and plot that I loved hated film music scenes "
         "director brilliant boring long short warm cold funny sad ending every minute of it").split()


def tiny_records(n, seed=0):
    g = np.random.default_rng(seed)
    prompts = ["Write a positive movie review sentence.", "Write a negative movie review sentence."]
    return [{"instruction": prompts[i % 2],
             "output": " ".join(g.choice(WORDS, size=int(g.integers(3, 12)))).capitalize() + "."}
            for i in range(n)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # a 2-layer GQA LLaMA with tied embeddings (like SmolLM2) and a small byte-level BPE tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM
    root = tmp_path_factory.mktemp("tiny_nlg")
    mdir = root / "model"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [r["instruction"] + " " + r["output"] for r in tiny_records(200)] + ["user assistant\n"] * 5
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    assert [tok.token_to_id(s) for s in SPECIALS] == [0, 1, 2]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                      initializer_range=0.1, rope_theta=10000.0)
    LlamaForCausalLM(cfg).save_pretrained(mdir)
    tok.save(str(mdir / "tokenizer.json"))
    for name, recs in [("train.jsonl", tiny_records(24, 1)), ("val.jsonl", tiny_records(6, 2))]:
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in recs))
    (root / "drift.txt").write_text(" ".join(" ".join(r.values()) for r in tiny_records(40, 3)))
    return root


def cli(tiny, out, *extra):
    return ["--model", str(tiny / "model"), "--train-file", str(tiny / "train.jsonl"),
            "--val-file", str(tiny / "val.jsonl"), "--eval-text", str(tiny / "drift.txt"), "--template", "chatml",
            "--max-len", "40", "--rank", "4", "--alpha", "8", "--lr", "1e-2", "--batch-size", "2",
            "--grad-accum", "2", "--max-steps", "4", "--dtype", "fp32", "--val-examples", "4",
            "--drift-len", "16", "--drift-windows", "4", "--gen-prompts", "4", "--gen-tokens", "6",
            "--eval-batch-size", "3", "--out", str(out), *extra]


def batch_of(tiny, n=3, max_len=40):
    tok = modellib.load_tokenizer(tiny / "model")
    recs = [(r["instruction"], "", r["output"]) for r in tiny_records(n, 5)]
    ex, _ = data.encode_instructions(tok, recs, max_len, 2, "chatml")
    return ex, data.collate_lm(ex, pad_id=2)


def vocab(tiny):
    return modellib.load_tokenizer(tiny / "model").get_vocab_size()


def adapted(tiny, init="pissa"):
    net = modellib.from_pretrained(tiny / "model")
    torch.manual_seed(0)
    balora.inject(net, train_nlg.TARGETS.split(","), 4, 8, init)
    return net


class FixedLogits(nn.Module):
    # stands in for a causal LM: trainable student logits, other (fixed) logits when in eval mode (teacher)
    def __init__(self, B, T, V):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.z = nn.Parameter(torch.randn(B, T, V, generator=g))
        self.register_buffer("zt", torch.randn(B, T, V, generator=g))

    def forward(self, ids):
        return self.z if self.training else self.zt


ALL_ON = dict(focus_schedule="constant", lambda1_schedule="constant", svd_k=2, top_k=5)


# ---- masks ------------------------------------------------------------------------------------------------

def test_prompt_and_padding_positions_get_no_loss_and_no_regulariser(tiny):
    ex, batch = batch_of(tiny, 3)
    assert len({len(e["input_ids"]) for e in ex}) > 1  # padding present
    B, T = batch["input_ids"].shape
    counted = batch["labels"][:, 1:] != data.IGNORE_INDEX          # position t predicts token t+1
    for part in ("task", "regularisers"):
        stub = FixedLogits(B, T, vocab(tiny)).train()
        cfg = None if part == "task" else balora.BALoRAConfig.nlg(**ALL_ON)
        task, reg, M, log = train_nlg.micro_batch_loss(stub, batch, cfg, 0, 10, nullcontext())
        (task if part == "task" else reg).backward()
        g = stub.z.grad.abs().sum(-1)                                 # (B, T)
        assert M == int(counted.sum()) == sum(sum(l != -100 for l in e["labels"]) for e in ex)
        assert torch.all(g[:, :-1][~counted] == 0) and torch.all(g[:, -1] == 0), part
        assert torch.all(g[:, :-1][counted] > 0), part
        if part == "regularisers":
            assert set(log) >= {"consistency", "diversity", "svd"}


def test_regulariser_rows_are_exactly_the_task_loss_rows(tiny, monkeypatch):
    ex, batch = batch_of(tiny, 3)
    B, T = batch["input_ids"].shape
    stub = FixedLogits(B, T, vocab(tiny)).train()
    seen = {}
    real = balora.regularizers

    def spy(cfg, z, zt, mask, *a, **k):
        seen.update(z=z.detach().clone(), zt=zt.clone(), mask=mask)
        return real(cfg, z, zt, mask, *a, **k)
    monkeypatch.setattr(balora, "regularizers", spy)
    task, _, M, _ = train_nlg.micro_batch_loss(stub, batch, balora.BALoRAConfig.nlg(**ALL_ON), 0, 10, nullcontext())
    # the rows are the positions t whose target token t+1 is a response token or the EOS, in (b, t) order:
    # the first is the last prompt position (the official code's unshifted mask would start one later)
    rows, targets = [], []
    for b, e in enumerate(ex):
        n_prompt = e["labels"].count(-100)
        for t in range(n_prompt - 1, len(e["input_ids"]) - 1):
            rows.append(stub.z[b, t].detach())
            targets.append(e["input_ids"][t + 1])
    assert seen["mask"] is None and torch.equal(seen["z"], torch.stack(rows)) and M == len(rows)
    assert torch.equal(seen["zt"], torch.stack([stub.zt[b, t] for b, e in enumerate(ex)
                                                for t in range(e["labels"].count(-100) - 1, len(e["input_ids"]) - 1)]))
    assert torch.allclose(task, F.cross_entropy(torch.stack(rows), torch.tensor(targets), reduction="sum"))


# ---- teacher, gradient accumulation ------------------------------------------------------------------------

@pytest.mark.parametrize("init", ["pissa", "lora"])
def test_teacher_logits_equal_the_untrained_model(tiny, monkeypatch, init):
    _, batch = batch_of(tiny, 3)
    net = adapted(tiny, init).train()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=5e-2)
    for step in range(3):  # move the adapters well away from their init
        train_nlg.accumulate(net, [batch], None, step, 3, nullcontext())
        opt.step()
        opt.zero_grad()
    seen = {}
    real = balora.regularizers
    monkeypatch.setattr(balora, "regularizers",
                        lambda cfg, z, zt, *a, **k: (seen.update(z=z, zt=zt), real(cfg, z, zt, *a, **k))[1])
    train_nlg.micro_batch_loss(net, batch, balora.BALoRAConfig.nlg(**ALL_ON), 0, 10, nullcontext())
    base = modellib.from_pretrained(tiny / "model")
    with torch.no_grad():
        z_base = train_nlg.select(base(batch["input_ids"]), batch["labels"])[0]
    assert net.training  # the teacher context restored train mode
    assert (seen["z"] - z_base).abs().max() > 1e-2       # the student has moved
    assert torch.allclose(seen["zt"], z_base, atol=1e-5)  # the teacher has not


def test_gradient_accumulation_equals_one_big_batch(tiny):
    _, big = batch_of(tiny, 4)
    ex, _ = batch_of(tiny, 4)
    halves = [data.collate_lm(ex[:1], 2), data.collate_lm(ex[1:], 2)]  # unequal token counts and padding
    # every term except the SVD one is a token mean (that one is a per-micro-batch spectrum; see accumulate)
    for cfg in [None, balora.BALoRAConfig.nlg(**ALL_ON, lambda3=0.0)]:
        grads = []
        for groups in ([big], halves):
            net = adapted(tiny).train()
            log = train_nlg.accumulate(net, groups, cfg, 0, 10, nullcontext())
            grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.requires_grad]))
        assert grads[0].abs().max() > 0
        assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7), (grads[0] - grads[1]).abs().max()


def test_non_finite_loss_stops_naming_step_and_term(tiny, monkeypatch):
    _, batch = batch_of(tiny, 2)
    net = adapted(tiny).train()
    monkeypatch.setattr(balora, "regularizers", lambda cfg, z, *a, **k: (
        z.sum() * float("nan"), {"lambda1": 0.1, "consistency": 0.5, "diversity": float("nan")}))
    with pytest.raises(FloatingPointError, match=r"step 7 .*diversity=nan"):
        train_nlg.accumulate(net, [batch], balora.BALoRAConfig.nlg(), 7, 10, nullcontext())


# ---- the script end to end -----------------------------------------------------------------------------------

def test_lr_schedule_warms_up_then_cosine_decays():
    lrs = [train_nlg.lr_at(s, 100, 1.0, 0.03) for s in range(100)]
    assert lrs[:3] == pytest.approx([1 / 3, 2 / 3, 1.0]) and lrs[3] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(lrs[3:], lrs[4:])) and lrs[-1] < 1e-3
    assert lrs[3 + 97 // 2] == pytest.approx(0.5, abs=0.02)


def test_distinct_n_counts_unique_ngrams_over_all_responses():
    texts = ["the cat the cat", "The dog"]
    assert train_nlg.distinct_n(texts, 1) == 3 / 6                 # the, cat, dog of 6 words
    assert train_nlg.distinct_n(texts, 2) == 3 / 4                 # (the cat) x2, (cat the), (the dog)
    assert train_nlg.distinct_n(["one"], 2) == 0.0


def test_resume_equals_uninterrupted(tiny, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train_nlg.main(cli(tiny, a))
    assert train_nlg.main(cli(tiny, b, "--stop-at", "2")) is None
    assert not (b / "adapter").exists() and (b / "checkpoint.safetensors").exists()
    with pytest.raises(ValueError, match="--lr"):
        train_nlg.main(cli(tiny, b, "--lr", "1e-3", "--resume", str(b)))
    mb = train_nlg.main(cli(tiny, b, "--resume", str(b / "checkpoint.safetensors")))
    ta, tb = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (a, b))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    la, lb = ([json.loads(l) for l in open(d / "log.jsonl")] for d in (a, b))
    assert [r["loss"] for r in la] == [r["loss"] for r in lb] and len(la) == 4
    assert "lambda2" in la[-1] and la[-1]["lambda2"] > 0  # all three terms took part
    ma = json.loads((a / "metrics.json").read_text())
    assert ma["tuned"]["val_ppl"] == mb["tuned"]["val_ppl"] and ma["base"] == mb["base"]


@pytest.mark.parametrize("method", ["lora", "pissa", "balora"])
def test_end_to_end_outputs_and_merge(tiny, tmp_path, method):
    out = tmp_path / method
    m = train_nlg.main(cli(tiny, out, "--method", method, "--merge", "--eval-every", "2"))
    for tag in ("base", "tuned"):
        assert all(math.isfinite(m[tag][k]) for k in ("val_ppl", "drift_ppl", "distinct_1", "distinct_2"))
    assert m["tuned"]["val_ppl"] < m["base"]["val_ppl"]  # it learned the task
    assert m["drift_ppl_ratio"] == pytest.approx(m["tuned"]["drift_ppl"] / m["base"]["drift_ppl"])
    assert json.loads((out / "metrics.json").read_text())["tuned"] == m["tuned"]
    log = [json.loads(l) for l in open(out / "log.jsonl")]
    assert len(log) == 4 and "val_ppl" in log[1] and all(r["tokens_per_s"] > 0 for r in log)
    assert (method == "balora") == ("consistency" in log[0])
    assert (out / "adapter_lora").exists() == (method != "lora")
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["init_lora_weights"] == (True if method == "lora" else train_nlg.PISSA_INIT)
    # the adapter applied by peft to the untouched transformers model (the rank-2r conversion for PiSSA) and
    # the merged checkpoint read by model.py compute the same function
    from peft import PeftModel
    from transformers import LlamaForCausalLM
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny / "model"),
                                           out / ("adapter" if method == "lora" else "adapter_lora")).eval()
    merged = modellib.from_pretrained(out / "merged")
    base = modellib.from_pretrained(tiny / "model")
    ids = torch.randint(3, 300, (2, 12))
    with torch.no_grad():
        assert (merged(ids) - base(ids)).abs().max() > 1e-3
        assert torch.allclose(peft_model(ids).logits, merged(ids), atol=1e-4)


def test_base_from_reuses_the_base_evaluation_only_with_equal_settings(tiny, tmp_path):
    a = train_nlg.main(cli(tiny, tmp_path / "a", "--max-steps", "1"))
    b = train_nlg.main(cli(tiny, tmp_path / "b", "--max-steps", "1", "--method", "lora",
                           "--base-from", str(tmp_path / "a" / "metrics.json")))
    assert b["base"] == a["base"] and not (tmp_path / "b" / "samples_base.jsonl").exists()
    with pytest.raises(ValueError, match="--drift-len 16"):
        train_nlg.main(cli(tiny, tmp_path / "c", "--drift-len", "8", "--base-from", str(tmp_path / "a" / "metrics.json")))


def test_gsm8k_eval_reads_file_and_scores(tiny, tmp_path):
    f = tmp_path / "gsm.jsonl"
    f.write_text(json.dumps({"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}) + "\n")
    m = train_nlg.main(cli(tiny, tmp_path / "o", "--max-steps", "1", "--eval-gsm8k", str(f), "--gsm8k-tokens", "4"))
    assert m["base"]["gsm8k_acc"] in (0.0, 1.0) and m["eval_sizes"]["gsm8k_problems"] == 1
    rec = json.loads((tmp_path / "o" / "gsm8k_tuned.jsonl").read_text())
    assert rec["ref"] == 5.0 and rec["correct"] == (rec["pred"] == 5.0)
    (tmp_path / "bad.jsonl").write_text('{"question": "q", "answer": "no final answer"}\n')
    with pytest.raises(ValueError, match="#### n"):
        train_nlg.read_gsm8k(str(tmp_path / "bad.jsonl"))


# ---- GGUF conversion and GSM8K answers ---------------------------------------------------------------------

def llama_cpp_permute(w, n_head):
    # convert_hf_to_gguf.py, LlamaModel.permute: HF rotate-half rows -> ggml interleaved-RoPE rows
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_interleaved(x, pos, theta=10000.0):  # ggml's: pairs (2j, 2j+1)
    hs = x.shape[-1]
    ang = pos[:, None] * theta ** (-np.arange(0, hs, 2) / hs)                # (T, hs/2)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * np.cos(ang) - b * np.sin(ang), a * np.sin(ang) + b * np.cos(ang)
    return out


def rope_half(x, pos, theta=10000.0):  # HF's: pairs (j, j + hs/2)
    hs = x.shape[-1]
    ang = pos[:, None] * theta ** (-np.arange(0, hs, 2) / hs)
    a, b = x[..., :hs // 2], x[..., hs // 2:]
    return np.concatenate([a * np.cos(ang) - b * np.sin(ang), a * np.sin(ang) + b * np.cos(ang)], -1)


@pytest.mark.parametrize("n_head", [9, 3])  # SmolLM2's q and k heads
def test_gguf_unpermute_inverts_llama_cpp_permutation(n_head):
    rng = np.random.default_rng(0)
    hs, C, T = 8, 12, 5
    w = rng.standard_normal((n_head * hs, C)).astype(np.float32)
    p = llama_cpp_permute(w, n_head)
    assert not np.array_equal(p, w) and np.array_equal(data.unpermute_qk(p, n_head), w)
    # and it is the right permutation: interleaved RoPE on the GGUF rows = rotate-half RoPE on the HF rows,
    # so q·k attention scores agree
    x, pos = rng.standard_normal((T, C)), np.arange(T, dtype=np.float64)
    q_hf = (x @ w.T).reshape(T, n_head, hs).transpose(1, 0, 2)
    q_gg = (x @ p.T).reshape(T, n_head, hs).transpose(1, 0, 2)
    s_hf = np.einsum("hsd,htd->hst", rope_half(q_hf, pos), rope_half(q_hf, pos))
    s_gg = np.einsum("hsd,htd->hst", rope_interleaved(q_gg, pos), rope_interleaved(q_gg, pos))
    assert np.allclose(s_hf, s_gg, atol=1e-8)


@pytest.mark.parametrize("text, expected", [
    ("Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 clips altogether.\n#### 72", 72.0),
    ("Let's think step by step. 5 apples cost 5 * $2 = $10. The answer is: 10", 10.0),
    ("The total is $1,250.50, so the answer is 1250.5.", 1250.5),
    ("The answer is 18. Next, 3 more questions follow: 4, 5", 18.0),
    ("She has 3 - 8 = -5 dollars left.\n#### -5", -5.0),
    ("He needs 12 more. #### 12 and then 7", 12.0),
    ("I cannot solve this problem.", None),
])
def test_gsm8k_answer_extraction_on_real_looking_outputs(text, expected):
    assert data.extract_gsm8k_answer(text) == expected


def test_gsm8k_reference_takes_the_number_after_hashes():
    assert data.gsm8k_reference("3 * 4 = <<3*4=12>>12 cookies.\n#### 1,200") == 1200.0


# ---- the real default model ----------------------------------------------------------------------------------

def test_bench_times_every_method_and_the_balora_parts(tiny, tmp_path):
    import bench
    res = bench.main(["--model", str(tiny / "model"), "--rank", "4", "--repeats", "1", "--warmup", "0",
                      "--dtypes", "fp32", "--no-peer", "--no-init", "--no-mem", "--out", str(tmp_path / "b.json")])
    assert set(res["steps_s"]["fp32"]) == {"lora", "pissa", "balora", "teacher_forward", "regularisers"}
    assert all(v > 0 for v in res["steps_s"]["fp32"].values())
    assert json.loads((tmp_path / "b.json").read_text())["steps_s"] == res["steps_s"]


@pytest.mark.network
def test_smoke_default_model_end_to_end(tmp_path):
    m = train_nlg.main(["--max-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--rank", "4",
                        "--init", "pissa_niter_2", "--val-examples", "8", "--drift-windows", "2",
                        "--gen-prompts", "2", "--gen-tokens", "8", "--eval-gsm8k", "default", "--gsm8k-limit", "1",
                        "--gsm8k-tokens", "8", "--out", str(tmp_path)])
    # the converted SmolLM2 reads general English (NYT editorials, 64-token windows: ~100; model.py and
    # transformers agree to the digit) and answers a chat question; a wrong q/k un-permute breaks both
    assert 20 < m["base"]["drift_ppl"] < 300, m["base"]
    args = train_nlg.parse_args(["--threads", "2"])
    net = modellib.from_pretrained(train_nlg.default_model_dir())
    tok = modellib.load_tokenizer(train_nlg.default_model_dir())
    answer = train_nlg.generate(net, tok, [data.format_prompt("What is the capital of France?", "", "chatml")],
                                args, 12, eos_id=2, pad_id=2)[0]
    assert "Paris" in answer, answer
    assert math.isfinite(m["tuned"]["val_ppl"]) and m["tuned"]["val_ppl"] < 1e3
    assert 0.8 < m["drift_ppl_ratio"] < 1.2
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert m["eval_sizes"]["gsm8k_problems"] == 1 and m["train_examples"] > 8000
