# tests/test_train_nlu.py: train_nlu.py on a tiny random BERT and tiny JSONL files: what one step changes, the
# teacher and its cache, gradient accumulation, resume, data options, every metric by hand, the real default job.

import json
import math
import random
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers  # the reference the hand-written models are checked against; test-only

import balora
import data
import model as M
import train_nlg
import train_nlu
from balora import PiSSALinear
from plumbing import checkpoints, errors

torch.set_num_threads(2)
from helpers import *  # noqa: F401,F403  the shared tiny models, files and runners


@pytest.mark.parametrize("method", ["lora", "pissa", "balora"])
def test_one_step_changes_only_adapters_and_head(encoders, files, tmp_path, method):
    args = train_nlu.parse_args(argv(encoders["dropout"], files, tmp_path, "--method", method))
    init, regularise = ("lora" if method == "lora" else "pissa"), method == "balora"
    torch.manual_seed(0)
    net = nlu_build(args, 2, init)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = train_nlu.make_optimizer(net, args)
    for g in opt.param_groups:  # AdamW without weight decay on the adapters
        names = {n for n, p in net.named_parameters() if any(p is q for q in g["params"])}
        assert g["weight_decay"] == 0.0 or not any(n.endswith(("lora_A", "lora_B")) for n in names)
    cfg = balora.BALoRAConfig.nlu(svd_k=1)
    net.train()
    b = data.micro_batches(batch_of(files, encoders["dropout"], 16), 1, data.collate_classification)
    log = nlu_step(net, b, cfg if regularise else None, 0, 10)
    assert ("consistency" in log and "svd" in log) == regularise
    opt.step()
    changed = {k for k, v in net.state_dict().items() if not torch.equal(v, before[k])}
    allowed = {k for k in before if k.endswith((".lora_A", ".lora_B")) or k.startswith("head.")}
    assert changed <= allowed, changed - allowed
    assert {"head.classifier.weight", "head.pooler.dense.weight"} <= changed
    # LoRA's B starts at 0, so its A has zero gradient on the first step; PiSSA moves both
    assert any(k.endswith(".lora_B") for k in changed)
    assert any(k.endswith(".lora_A") for k in changed) == (init != "lora")


@pytest.mark.parametrize("init", ["pissa", "lora"])
def test_teacher_is_pretrained_encoder_with_current_head(encoders, files, tmp_path, init):
    enc = encoders["dropout"]
    args = train_nlu.parse_args(argv(enc, files, tmp_path, "--lr", "5e-2"))
    torch.manual_seed(0)
    net = nlu_build(args, 2, init)
    torch.manual_seed(0)
    fresh = M.from_pretrained(enc, num_labels=2).eval()  # same seed: the same new head
    b = data.micro_batches(batch_of(files, enc, 16), 1, data.collate_classification)[0]
    net.train()
    torch.testing.assert_close(train_nlu.teacher_logits(net, b), train_nlu.logits_of(fresh, b), rtol=0, atol=1e-5)
    opt = train_nlu.make_optimizer(net, args)
    for step in range(3):
        opt.zero_grad()
        nlu_step(net, [b], balora.BALoRAConfig.nlu(svd_k=1), step, 3)
        opt.step()
    zt = train_nlu.teacher_logits(net, b)
    assert net.training and not zt.requires_grad  # train mode restored, no graph
    fresh.head.load_state_dict(net.head.state_dict())  # teacher = pretrained encoder + the *trained* head
    torch.testing.assert_close(zt, train_nlu.logits_of(fresh, b), rtol=0, atol=1e-5)
    net.eval()
    assert (train_nlu.logits_of(net, b) - zt).abs().max() > 1e-3  # the student did move


@pytest.mark.parametrize("method,extra", [("lora", {}), ("pissa", {}),
                                          ("balora", {"lambda2": 0.0, "lambda3": 0.0})])
def test_grad_accumulation_equals_one_big_batch(encoders, files, tmp_path, method, extra):
    # 14 examples as 4 micro-batches (4, 4, 4, 2) vs one batch: the same gradient. Dropout off, fp32. The
    # consistency term is a per-example mean, so it accumulates exactly; diversity and SVD are batch statistics
    # computed per micro-batch (documented), hence off here.
    enc = encoders["plain"]
    args = train_nlu.parse_args(argv(enc, files, tmp_path, "--method", method))
    init, regularise = ("lora" if method == "lora" else "pissa"), method == "balora"
    cfg = balora.BALoRAConfig.nlu(svd_k=1, **extra)
    examples = batch_of(files, enc, 14)
    grads = []
    for n_micro in (1, 4):
        torch.manual_seed(0)
        net = nlu_build(args, 2, init).train()
        bs = data.micro_batches(examples, n_micro, data.collate_classification)
        assert [len(b["labels"]) for b in bs] == ([14] if n_micro == 1 else [4, 4, 4, 2])
        log = nlu_step(net, bs, cfg if regularise else None, 0, 10)
        grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad})
        grads[-1]["_log"] = torch.tensor([log["task"], log.get("consistency", 0.0)])
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=0, atol=1e-5, msg=n)
    assert sum(g.abs().sum() for n, g in grads[0].items() if "lora_B" in n) > 0


def test_lr_schedule_warmup_never_zero_then_linear_decay():
    lrs = [train_nlu.lr_at(s, 10, 3, 1.0) for s in range(10)]
    assert lrs[0] == pytest.approx(1 / 3) and lrs[2] == lrs[3] == 1.0
    assert all(x > 0 for x in lrs) and lrs[-1] == pytest.approx(1 / 7)
    assert np.allclose(np.diff(lrs[3:]), -1 / 7)  # linear decay
    assert train_nlu.lr_at(0, 1, 1, 2e-4) == 2e-4  # a one-step run still moves


def test_end_to_end_then_saved_adapter_reproduces_test_metrics(encoders, files, tmp_path):
    enc = encoders["dropout"]
    m = train_nlu.main(argv(enc, files, tmp_path / "run", "--epochs", "2", "--lr", "5e-3"))
    assert m["steps"] == 10 and [v["epoch"] for v in m["validation"]] == [0, 1]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["test"] == m["test"]
    steps = [r for r in read_log(tmp_path / "run") if "step" in r and "event" not in r]
    assert [r["step"] for r in steps] == list(range(1, 11))
    assert {"task", "consistency", "diversity", "svd", "lambda1", "lr", "examples_per_s", "eta_s"} <= steps[0].keys()
    # only safetensors and JSON on disk
    files_written = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert all(p.suffix in (".json", ".jsonl", ".safetensors") for p in files_written), files_written
    # a fresh model + inject + load_adapter (adapters and head) gives exactly the reported test metrics
    args = train_nlu.parse_args(argv(enc, files, tmp_path / "x"))
    net = nlu_build(args, 2, "pissa")
    balora.load_adapter(net, tmp_path / "run" / "adapter")
    import data
    d = data.read_table(files["test"], ["sentence"], "label", ["neg", "pos"])
    ex, _ = data.encode_classification(M.load_tokenizer(enc), d, 128)
    d = SimpleNamespace(test=ex, label_names=["neg", "pos"], pad_id=0, minority=0)
    again = train_nlu.evaluate(net, d, args, "test")
    assert again == m["test"]


@pytest.mark.parametrize("init", ["lora", "pissa", "pissa_niter_2"])
def test_the_adapter_loads_in_peft_on_the_untouched_transformers_model(encoders, files, tmp_path, init):
    # OUT/adapter (adapters + head as modules_to_save) on transformers' BertForSequenceClassification gives the
    # trained model's logits, for every init (a randomized one is written as the rank-2r LoRA)
    from peft import PeftModel
    from transformers import BertForSequenceClassification
    enc, run = encoders["plain"], tmp_path / "run"
    train_nlu.main(argv(enc, files, run, "--init", init, "--epochs", "1", "--lr", "5e-3"))
    args = train_nlu.parse_args(argv(enc, files, tmp_path / "x"))
    torch.manual_seed(args.seed)  # as main() does: a randomized init's A0, B0 are the run's
    net = nlu_build(args, 2, init).eval()
    balora.load_adapter(net, run / "adapter")
    hf = PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(enc, num_labels=2), run / "adapter")
    b = data.collate_classification(batch_of(files, enc, 6), 0)
    with torch.no_grad():
        ours = train_nlu.logits_of(net, b)
        theirs = hf.eval()(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                           token_type_ids=b["token_type_ids"]).logits
    assert (ours - theirs).abs().max() <= 1e-4 * max(1.0, ours.abs().max().item())
    fresh = train_nlu.logits_of(nlu_build(args, 2, init).eval(), b)  # the check can fail: training moved them
    assert (ours - fresh).abs().max() > 1e-3


def test_resume_equals_uninterrupted(encoders, files, tmp_path):
    # balora with dropout on: the teacher, the regularisers, the optimizer moments, the RNG and the data
    # order must all come back. Interrupted twice: mid-epoch 0 and mid-epoch 1 (after epoch 0's validation).
    enc = encoders["dropout"]
    common = ("--epochs", "2", "--lr", "5e-3", "--save-every", "2")
    full = train_nlu.main(argv(enc, files, tmp_path / "a", *common))
    assert train_nlu.main(argv(enc, files, tmp_path / "b", *common, "--stop-after", "3")) is None
    assert not (tmp_path / "b" / "metrics.json").exists()
    assert ckpt_step(tmp_path / "b") == 3
    assert train_nlu.main(argv(enc, files, tmp_path / "b", *common, "--resume", "--stop-after", "7")) is None
    resumed = train_nlu.main(argv(enc, files, tmp_path / "b", *common, "--resume"))
    assert resumed["test"] == full["test"] and resumed["validation"] == full["validation"]
    a, b = adapter_tensors(tmp_path / "a"), adapter_tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in read_log(tmp_path / "b") if "event" not in r] == list(range(1, 11))
    # the same --out without --resume is refused; a resume with other settings names them
    with pytest.raises(errors.InputError, match="--resume"):
        train_nlu.main(argv(enc, files, tmp_path / "b", *common))
    with pytest.raises(errors.InputError, match="--lr 0.005"):
        train_nlu.main(argv(enc, files, tmp_path / "b", "--epochs", "2", "--lr", "1e-3", "--resume"))


def test_nonfinite_term_stops_with_step_and_name_and_keeps_files(encoders, files, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = balora.diversity_nlu

    def poisoned(z):
        calls["n"] += 1
        return real(z) * (math.nan if calls["n"] == 3 else 1.0)

    monkeypatch.setattr(balora, "diversity_nlu", poisoned)
    out = tmp_path / "run"
    with pytest.raises(errors.NonFiniteLoss, match=r"step 3: non-finite diversity nan"):
        train_nlu.main(argv(encoders["dropout"], files, out, "--save-every", "1"))
    log = read_log(out)
    assert [r["step"] for r in log if "event" not in r] == [1, 2]
    assert log[-1]["event"] == "non-finite" and log[-1]["step"] == 3
    assert ckpt_step(out) == 2 and not (out / "metrics.json").exists()


def test_imbalance_and_label_noise_give_the_requested_counts(encoders, tmp_path, capsys):
    rng = random.Random(1)
    rows = [{"sentence": s, "label": "negative"} for s in sentences(30, NEG, rng)] + \
           [{"sentence": s, "label": "neutral"} for s in sentences(12, OTHER, rng)] + \
           [{"sentence": s, "label": "positive"} for s in sentences(30, POS, rng)]
    rng.shuffle(rows)
    f = {"train": write_jsonl(tmp_path / "tr.jsonl", rows), "validation": write_jsonl(tmp_path / "va.jsonl", rows[:9]),
         "test": write_jsonl(tmp_path / "te.jsonl", rows[9:18])}
    m = train_nlu.main(argv(encoders["plain"], f, tmp_path / "imb", "--imbalance", "10:2:5", "--max-steps", "1"))
    # N_major = min(30·10/10, 12·10/2, 30·10/5) = 30 -> 30 : 6 : 15
    assert m["train_class_counts"] == {"negative": 30, "neutral": 6, "positive": 15}
    assert m["test"]["minority_class"] == "neutral"
    capsys.readouterr()
    m = train_nlu.main(argv(encoders["plain"], f, tmp_path / "noise", "--imbalance", "10:2:5",
                            "--label-noise", "0.2", "--max-steps", "1"))
    assert "flipped 10 of 51" in capsys.readouterr().out  # floor(0.2·51 + 0.5) = 10
    counts = m["train_class_counts"]
    assert sum(counts.values()) == 51 and counts != {"negative": 30, "neutral": 6, "positive": 15}


def test_malformed_input_errors_name_the_file_and_line(encoders, files, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"sentence": "a good film", "label": "pos"}\n{"sentence": "bad", "label": "neg"}\n'
                   '{"sentence": "broken", "label": \n')
    f = dict(files, train=bad)
    with pytest.raises(ValueError, match=rf"{bad}:3"):
        train_nlu.main(argv(encoders["plain"], f, tmp_path / "o1"))
    unknown = write_jsonl(tmp_path / "val.jsonl", [{"sentence": "good", "label": "pos"},
                                                   {"sentence": "meh", "label": "mixed"}])
    with pytest.raises(ValueError, match=rf"{unknown}:2: unknown label 'mixed'"):
        train_nlu.main(argv(encoders["plain"], dict(files, validation=unknown), tmp_path / "o2"))
    missing = write_jsonl(tmp_path / "nolabel.jsonl", [{"sentence": "good"}])
    with pytest.raises(ValueError, match=rf"{missing}:1: column 'label' missing"):
        train_nlu.main(argv(encoders["plain"], dict(files, train=missing), tmp_path / "o3"))


def test_classification_metrics_by_hand():
    y = [0, 0, 0, 1, 1, 2]
    pred = [0, 0, 1, 1, 2, 2]
    z = np.eye(3)[pred] * 3.0 + 0.1  # logits whose argmax is `pred`
    m = train_nlu.classification_metrics(z, y, ["a", "b", "c"], minority=2)
    # confusion rows (true) [2 1 0] [0 1 1] [0 0 1]; precision 1, 1/2, 1/2; recall 2/3, 1/2, 1
    assert m["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["recall"] == pytest.approx({"a": 2 / 3, "b": 1 / 2, "c": 1.0})
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    # R_K = (c·s − t·p) / sqrt((s² − p·p)(s² − t·t)) with s=6, c=4, t=(3,2,1), p=(2,2,2)
    assert m["mcc"] == pytest.approx(12 / math.sqrt(24 * 22))
    assert m["minority_class"] == "c" and m["minority_recall"] == 1.0
    # binary: TP=1 FN=1 TN=2 FP=0 -> (1·2 − 0·1) / sqrt(1·2·2·3)
    c = train_nlu.confusion(np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0]), 2)
    assert train_nlu.mcc(c) == pytest.approx(2 / math.sqrt(12))
    assert train_nlu.mcc(train_nlu.confusion(np.array([0, 1]), np.array([0, 0]), 2)) == 0.0  # undefined -> 0
    # a class that is neither true nor predicted is left out of macro-F1; one never predicted counts as 0
    assert train_nlu.macro_f1(np.array([[1, 0, 0], [1, 0, 0], [0, 0, 0]])) == pytest.approx((2 / 3 + 0) / 2)


def test_regression_metrics_by_hand():
    assert train_nlu.pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert list(train_nlu.ranks([3, 1, 2, 2])) == [4, 1, 2.5, 2.5]
    # ranks (1, 2.5, 2.5, 4) vs (1, 2, 3, 4): 4.5 / sqrt(4.5 · 5)
    assert train_nlu.spearman([1, 2, 2, 3], [10, 20, 30, 40]) == pytest.approx(4.5 / math.sqrt(22.5))
    m = train_nlu.regression_metrics(np.array([[1.0], [2.0], [4.0]]), [1.0, 3.0, 3.0])
    assert m["mse"] == pytest.approx(2 / 3) and m["spearman"] == pytest.approx(train_nlu.pearson([1, 2, 3], [1, 2.5, 2.5]))


def test_silhouette_cosine_by_hand_and_against_the_naive_loop():
    r = 1 / math.sqrt(2)
    z = [[1, 0], [1, 1], [0, 1], [-1, 0]]
    y = [0, 0, 1, 1]
    # cosine distances: d12 = d23 = 1 − r, d13 = d34 = 1, d14 = 2, d24 = 1 + r
    s = [(1.5 - (1 - r)) / 1.5, (1.0 - (1 - r)) / 1.0, ((1 + (1 - r)) / 2 - 1) / 1, ((2 + 1 + r) / 2 - 1) / ((3 + r) / 2)]
    assert train_nlu.silhouette_cosine(z, y) == pytest.approx(sum(s) / 4)
    assert train_nlu.silhouette_cosine(z, [0, 0, 0, 0]) is None

    def naive(z, y):
        z, out = np.asarray(z, float), []
        d = lambda i, j: 0.0 if i == j else 1 - z[i] @ z[j] / (np.linalg.norm(z[i]) * np.linalg.norm(z[j]))
        for i in range(len(y)):
            same = [d(i, j) for j in range(len(y)) if y[j] == y[i] and j != i]
            if not same:
                out.append(0.0)
                continue
            a = np.mean(same)
            b = min(np.mean([d(i, j) for j in range(len(y)) if y[j] == k]) for k in set(y) if k != y[i])
            out.append((b - a) / max(a, b))
        return np.mean(out)

    g = np.random.default_rng(0)
    z = g.normal(size=(13, 3))
    y = [0] * 5 + [1] * 7 + [2]  # class 2 has one member: s = 0 for it
    assert train_nlu.silhouette_cosine(z, y, chunk=4) == pytest.approx(naive(z, y), abs=1e-12)


@slow
def test_real_assets_default_job_runs_end_to_end(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(HERE / "train_nlu.py"), "--max-steps", "3", "--out", str(out)],
                          capture_output=True, text=True, cwd=HERE, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "balora" and m["steps"] == 3 and m["test"]["n"] == 1006
    assert m["train_class_counts"] == {"negative": 4076, "positive": 3997}
    assert 0.0 <= m["test"]["accuracy"] <= 1.0 and m["validation"][0]["n"] == 993
    assert "step 3/3 | task" in proc.stdout and "consistency" in proc.stdout
    cfg = json.loads((out / "adapter" / balora.CONFIG_FILE).read_text())
    assert cfg["init_lora_weights"] == "pissa" and cfg["modules_to_save"] == ["bert.pooler", "classifier"]


def test_regression_runs_with_mse_consistency(encoders, tmp_path):
    # STS-B style: one output, MSE task loss, consistency switched to logit MSE (KL of one class is 0)
    rng = random.Random(2)
    rows = [{"sentence": s, "score": 4.0 + rng.random()} for s in sentences(12, POS, rng)] + \
           [{"sentence": s, "score": 1.0 - rng.random()} for s in sentences(12, NEG, rng)]
    rng.shuffle(rows)
    f = {k: write_jsonl(tmp_path / f"{k}.jsonl", rows) for k in ("train", "validation", "test")}
    balora._warned.clear()  # each constant-term warning fires once per process
    with pytest.warns(UserWarning, match="D=1"):
        m = train_nlu.main(argv(encoders["plain"], f, tmp_path / "reg", "--regression", "--label-field", "score",
                                "--epochs", "2", "--lr", "2e-2"))
    assert m["config"]["consistency"] == "mse" and m["train_class_counts"] is None
    assert set(m["test"]) == {"n", "loss", "pearson", "spearman", "mse"} and m["test"]["n"] == 24
    args = train_nlu.parse_args(argv(encoders["plain"], f, tmp_path / "x", "--regression"))
    torch.manual_seed(args.seed)
    fresh = nlu_build(args, 1, "pissa")
    ex, _ = data.encode_classification(M.load_tokenizer(encoders["plain"]),
                                       data.read_table(f["test"], ["sentence"], "score", regression=True), 32)
    before = train_nlu.evaluate(fresh, SimpleNamespace(test=ex, label_names=None, pad_id=0, minority=None), args, "test")
    assert m["test"]["mse"] < 0.8 * before["mse"] and math.isfinite(m["test"]["pearson"])


def test_regression_with_class_interventions_is_an_argparse_error(capsys):
    for extra in (["--label-noise", "0.1"], ["--imbalance", "1:2"]):
        with pytest.raises(SystemExit):
            train_nlu.parse_args(["--regression", *extra])
        assert "do not apply with --regression" in capsys.readouterr().err
    for script in (train_nlu, train_nlg):
        with pytest.raises(SystemExit):
            script.parse_args(["--lambda1", "-0.1"])
        assert "--lambda1" in capsys.readouterr().err


def test_nlu_checkpoint_is_not_written_with_non_finite_weights(encoders, files, tmp_path):
    args = train_nlu.parse_args(argv(encoders["plain"], files, tmp_path / "x"))
    net = nlu_build(args, 2, "pissa")
    opt = train_nlu.make_optimizer(net, args)
    with torch.no_grad():
        next(p for p in net.parameters() if p.requires_grad).fill_(float("nan"))
    (tmp_path / "x").mkdir()
    with pytest.raises(FloatingPointError, match="not written"):
        checkpoints.save_checkpoint(tmp_path / "x", net, opt, {"step": 3})
    assert not list((tmp_path / "x").iterdir())


def test_nlu_teacher_cache_gives_the_same_losses_and_skips_the_teacher_forward_after_epoch_one(
        encoders, files, tmp_path, monkeypatch):
    calls = {"teacher_rows": []}
    real = M.Encoder.forward

    def counting(self, ids, *a, **k):
        if any(m.teacher_mode for m in self.modules() if isinstance(m, PiSSALinear)):
            calls["teacher_rows"].append(len(ids))
        return real(self, ids, *a, **k)
    monkeypatch.setattr(M.Encoder, "forward", counting)
    common = ("--epochs", "3", "--method", "balora", "--lambda1", "0.5", "--batch-size", "16")
    logs = {}
    for tag, extra in (("cache", ()), ("plain", ("--no-teacher-cache",))):
        calls["teacher_rows"] = []
        train_nlu.main(argv(encoders["dropout"], files, tmp_path / tag, *common, *extra))
        logs[tag] = [json.loads(l) for l in open(tmp_path / tag / "log.jsonl")]
        logs[tag + "_rows"] = sum(calls["teacher_rows"])
    steps = lambda tag: [r for r in logs[tag] if "consistency" in r]
    assert len(steps("cache")) == len(steps("plain")) == 9
    for a, b in zip(steps("cache"), steps("plain")):
        for k in ("task", "consistency", "diversity", "svd", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), (a["step"], k)
    assert logs["cache_rows"] == 40 and logs["plain_rows"] == 3 * 40  # each example's teacher forward once


def test_resumed_nlu_run_with_the_teacher_cache_is_bit_identical(encoders, files, tmp_path):
    common = ("--epochs", "3", "--lr", "5e-3", "--save-every", "0", "--method", "balora")
    full = train_nlu.main(argv(encoders["dropout"], files, tmp_path / "a", *common))
    # stopped mid-epoch 1, after the cache was filled in epoch 0 from other batches than the resumed run's
    assert train_nlu.main(argv(encoders["dropout"], files, tmp_path / "b", *common, "--stop-after", "7")) is None
    resumed = train_nlu.main(argv(encoders["dropout"], files, tmp_path / "b", *common, "--resume"))
    assert resumed["test"] == full["test"] and resumed["validation"] == full["validation"]
    la = [UNTIMED(r) for r in step_records(tmp_path / "a")]
    lb = [UNTIMED(r) for r in step_records(tmp_path / "b")]
    assert la == lb


def test_without_a_val_file_ten_percent_of_the_training_file_is_held_out(encoders, files, tmp_path):
    # the same rule as train_nlg.py: no --val-file, validation is held out of --train-file; which examples depends
    # on their content only, not on the file's order
    flags = lambda f, out, *x: drop_flag(argv(encoders["plain"], f, out, *x), "--val-file")
    split = train_nlu.read_splits(train_nlu.parse_args(flags(files, tmp_path / "x")))
    assert len(split["validation"].labels) == 4 and len(split["train"].labels) == 36  # 10 % of 40
    assert sorted(split["validation"].texts + split["train"].texts) == \
        sorted(train_nlu.read_splits(train_nlu.parse_args(argv(encoders["plain"], files, tmp_path / "y")))["train"].texts)
    reversed_file = tmp_path / "reversed.jsonl"
    reversed_file.write_text("".join(reversed(files["train"].read_text().splitlines(keepends=True))))
    again = train_nlu.read_splits(train_nlu.parse_args(flags(dict(files, train=reversed_file), tmp_path / "z")))
    assert sorted(again["validation"].texts) == sorted(split["validation"].texts)
    m = train_nlu.main(flags(files, tmp_path / "run", "--max-steps", "1"))
    assert m["validation"][0]["n"] == 4 and sum(m["train_class_counts"].values()) == 36


def test_plain_regularisers_give_the_fused_paths_losses(encoders, files, tmp_path, capsys):
    # --plain runs each term as its equation is written (balora.py Part 2): the same losses step by step
    common = ("--method", "balora", "--max-steps", "3")
    train_nlu.main(argv(encoders["dropout"], files, tmp_path / "fused", *common))
    capsys.readouterr()
    train_nlu.main(argv(encoders["dropout"], files, tmp_path / "plain", *common, "--plain", "--log-every", "2"))
    printed = [line.split(" |")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert printed == ["step 2/3", "step 3/3"]  # --log-every 2: every second line and the last; the log has all
    fused, plain = step_records(tmp_path / "fused"), step_records(tmp_path / "plain")
    assert [r["step"] for r in plain] == [1, 2, 3]
    for a, b in zip(fused, plain):
        for k in ("task", "consistency", "diversity", "svd"):
            assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (a["step"], k, a[k], b[k])
