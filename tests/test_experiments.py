# tests/test_experiments.py: experiments/: the evidence study (runner, resume, report, statistics), the bench,
# the log plot.

import json
import math
import re
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import balora
import model as M
import train_nlu

torch.set_num_threads(2)
from helpers import *  # noqa: F401,F403  the shared tiny models, files and runners


def test_bench_times_every_method_and_the_balora_parts(tiny_llama, tmp_path):
    from experiments import bench
    res = bench.main(["--model", str(tiny_llama / "model"), "--rank", "4", "--repeats", "1", "--warmup", "0",
                      "--dtypes", "fp32", "--no-peer", "--no-init", "--no-mem", "--out", str(tmp_path / "b.json")])
    assert set(res["steps_s"]["fp32"]) == {"lora", "pissa", "balora", "teacher_forward", "regularisers"}
    assert all(v > 0 for v in res["steps_s"]["fp32"].values())
    assert json.loads((tmp_path / "b.json").read_text())["steps_s"] == res["steps_s"]


def test_bench_memory_child_reports_the_peak_and_the_resident_set_after_each_forward(tiny_llama, capsys):
    from experiments import bench
    bench.main(["--child", "balora", "--model", str(tiny_llama / "model"), "--rank", "4", "--dtypes", "fp32"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(res["rss_after_forward_mb"]) == 2  # one per step
    assert 0 < max(res["rss_after_forward_mb"]) <= res["peak_rss_mb"]


def test_bench_profile_splits_the_terms_and_counts_their_passes(tiny_llama, tmp_path):
    from experiments import bench
    res = bench.main(["--model", str(tiny_llama / "model"), "--rank", "4", "--repeats", "1", "--warmup", "0",
                      "--dtypes", "fp32", "--no-peer", "--no-init", "--no-mem", "--profile", "--out",
                      str(tmp_path / "b.json")])
    split = res["split"]["fp32"]
    assert {"KL (incl. teacher output layer), fused", "top-K entropy, plain", "range finder, fused",
            "range finder, plain", "energy ratio (given Q), fused", "all three, fused", "all three, plain"} <= set(split)
    assert split["all three, fused"]["passes"] < split["all three, plain"]["passes"]
    assert all(v["s"] > 0 for v in split.values() if "derived" not in v)  # measured; the energy ratio is derived:
    energy, svd = split["energy ratio (given Q), fused"], split["SVD term (range finder + energy ratio), fused"]
    assert energy["passes"] == svd["passes"] - split["range finder, fused"]["passes"] > 0
    # with M×V beyond the counter's 16 MB cache (here 23 MB; the default NLG shape is 200 MB) the streamed range
    # finder reads Z niter + 1 = 3 times, the textbook one 2·niter + 1 = 5 times
    z = torch.randn(360, 16384)
    for finder, passes in ((balora.range_finder_streamed, 3), (balora.range_finder, 5)):
        with bench.Passes(*z.shape) as p:
            finder(z, 15, 2, torch.Generator().manual_seed(0))
        assert p.passes == passes, (finder.__name__, p.passes)


@slow
def test_study_runner_runs_resumes_and_reports(encoders, files, tmp_path, monkeypatch, capsys):
    from experiments import study
    code = {"commit": "a" * 40, "clean": True}
    monkeypatch.setattr(study, "code_version", lambda: code)  # the runs below come from one (clean) commit
    extra = ["--model", str(encoders["plain"]), "--train-file", str(files["train"]), "--val-file", str(files["validation"]),
             "--test-file", str(files["test"]), "--max-steps", "1", "--batch-size", "8", "--rank", "2", "--targets",
             NLU_TARGETS, "--dtype", "fp32", "--save-every", "0"]
    runs = [study.Run("tiny", m, 0, "nlu", study.METHODS[m] + ["--seed", "0"]) for m in ("pissa", "balora")]
    res, work = tmp_path / "results", tmp_path / "runs"
    done = study.run_grid(runs, jobs=2, results=res, workdir=work, extra=extra)
    assert sorted(r["method"] for r in done) == ["balora", "pissa"]
    rec = json.loads((res / "tiny__balora__0.json").read_text())
    assert rec["flags"][:2] == ["--method", "balora"] and rec["machine"]["threads"] == 1 and 0 <= rec["test"]["accuracy"] <= 1
    assert rec["code"] == code  # every result names the code it came from
    # the stored flags reproduce the run: same metrics on the same machine; a changed metric is caught
    real, reruns = study.run_grid, []
    monkeypatch.setattr(study, "run_grid", lambda *a, **k: reruns.append(real(*a, **k)) or reruns[-1])
    assert study.reproduce("tiny__balora__0", res, tmp_path / "again", extra)
    (res / "tiny__balora__0.json").write_text(json.dumps({**rec, "test": {**rec["test"], "mcc": 0.99}}))
    monkeypatch.setattr(study, "run_grid", lambda *a, **k: reruns[0])  # the same re-run, compared again
    assert not study.reproduce("tiny__balora__0", res, tmp_path / "again", extra)
    monkeypatch.setattr(study, "run_grid", real)
    (res / "tiny__balora__0.json").write_text(json.dumps(rec))
    # resume: finished runs are skipped; an interrupted one (no result) restarts
    (res / "tiny__pissa__0.json").unlink()
    (work / "tiny__pissa__0" / "metrics.json").unlink()
    done = study.run_grid(runs, jobs=1, results=res, workdir=work, extra=extra)
    assert [r["method"] for r in done] == ["pissa"]
    assert study.run_grid(runs, jobs=1, results=res, workdir=work, extra=extra) == []
    # a run of another condition with the same flags is not run again: its result is copied and names its source
    twin = study.Run("tiny2", "pissa", 0, "nlu", runs[0].flags)
    assert study.run_grid([twin], jobs=1, results=res, workdir=work, extra=extra) == []
    rec = json.loads((res / "tiny2__pissa__0.json").read_text())
    assert rec["same_as"] == "tiny__pissa__0" and rec["condition"] == "tiny2" and not (work / "tiny2__pissa__0").exists()
    assert rec["test"] == json.loads((res / "tiny__pissa__0.json").read_text())["test"]
    # ... but only from the same code: after a commit the twin runs again
    code = {"commit": "b" * 40, "clean": True}
    twin3 = study.Run("tiny3", "pissa", 0, "nlu", runs[0].flags)
    capsys.readouterr()
    assert study.run_grid([twin3], jobs=1, results=res, workdir=work, extra=extra, dry_run=True) == []
    said = capsys.readouterr().out
    assert "would reuse" not in said and str(work / "tiny3__pissa__0") in said, said  # to run, not copied
    # a failed run makes `run` fail (exit status not 0), naming it
    bad = study.Run("tiny4", "pissa", 0, "nlu", runs[0].flags + ["--lr", "-1"])
    with pytest.raises(SystemExit, match="1 run\\(s\\) failed: tiny4__pissa__0"):
        study.run_grid([bad], jobs=1, results=res, workdir=work, extra=extra)


def put_result(results, cond, m, seed, test, script="nlu", **more):
    # a results file as study.compact writes it, with the given test metrics (also as validation / base)
    rec = {"condition": cond, "method": m, "seed": seed, "script": script, "flags": ["--seed", str(seed)],
           "machine": {"cpu": "Some CPU", "cpu_capability": "AVX2", "dtype": "fp32"}, "wall_s": 100.0,
           "test": test, "validation" if script == "nlu" else "base": test, **more}
    (results / f"{cond}__{m}__{seed}.json").write_text(json.dumps(rec))
    return rec


def test_study_report_statistics_from_fixture_results(tmp_path, monkeypatch):
    from experiments import study
    for cond in ("main", "noise-0.2", "noise-0.4", "drift"):
        monkeypatch.setattr(study.CONDITIONS[cond], "seeds", 3)  # the fixtures below have 3 seeds
    put = lambda *a, **kw: put_result(tmp_path, *a, **kw)
    acc = {"lora": [0.70, 0.72, 0.71], "pissa": [0.75, 0.76, 0.74], "balora": [0.76, 0.75, 0.745],
           "lora+reg": [0.71, 0.73, 0.71]}
    for m, vals in acc.items():
        for seed, a in enumerate(vals):
            put("main", m, seed, {"accuracy": a})
    put("terms", "pissa", 0, {"accuracy": acc["pissa"][0]}, same_as="main__pissa__0")  # a copy costs nothing
    text = study.report(tmp_path)
    assert text.startswith("**Compute:** 12 runs made (1 more copied from a run with the same flags), 0.3 h of "
                           "one-thread wall time in all, on Some CPU (AVX2, fp32).")
    d = np.array(acc["pissa"]) - np.array(acc["lora"])
    half = 4.303 * d.std(ddof=1) / math.sqrt(3)
    row = f"| pissa > lora | {d.mean():.4f} ({d.mean() - half:.4f}, {d.mean() + half:.4f}) | 3 | "
    assert row in text and "| **holds** |" in text.split(row)[1].splitlines()[0]
    assert "| balora > pissa |" in text and "**inconclusive** |" in text.split("| balora > pissa |")[1].splitlines()[0]
    assert "| pissa | 0.750 ± 0.010 | 3 |" in text
    assert study.verdict(-0.3, -0.1) == "contradicted" and study.verdict(-0.1, 0.2) == "inconclusive"
    assert study.report(tmp_path) == text  # deterministic: the README tables regenerate byte for byte
    monkeypatch.setattr(study.CONDITIONS["main"], "seeds", 4)  # a grid of 4 seeds: 3 pairs are not a verdict yet
    assert "| pending (3 of 4 seeds) |" in study.report(tmp_path).split("| pissa > lora |")[1].splitlines()[0]
    monkeypatch.setattr(study.CONDITIONS["main"], "seeds", 3)
    # a lower-is-better claim (drift): BA-LoRA's ratio below PiSSA's on every seed holds, not "contradicted"
    for m, vals in {"pissa": [1.20, 1.25, 1.22], "balora": [1.10, 1.12, 1.13]}.items():
        for seed, r in enumerate(vals):
            put("drift", m, seed, {"drift_ppl_ratio": r, "val_ppl": 9.0}, script="nlg")
    line = study.report(tmp_path).split("| balora < pissa | -0.1067")[1].splitlines()[0]
    assert "| 3 |" in line and "| **holds** |" in line, line
    # the noise trend: BA-LoRA's gain over PiSSA, 0.005 / 0.015 / 0.03 at noise 0 / 0.2 / 0.4 (+- 0.005 by seed)
    for cond, gain in (("noise-0.2", 0.015), ("noise-0.4", 0.03)):
        for seed, jitter in enumerate((0.0, 0.005, -0.005)):
            for m, a in (("pissa", 0.70), ("balora", 0.70 + gain + jitter)):
                put(cond, m, seed, {"accuracy": a})
    text = study.report(tmp_path)
    base = np.array(acc["balora"]) - np.array(acc["pissa"])  # the main condition's gains: 0.01, -0.01, 0.005
    d = 0.03 + np.array([0.0, 0.005, -0.005]) - base
    half = 4.303 * d.std(ddof=1) / math.sqrt(3)
    assert "| noise-0.4 | 0.700 ± 0.000 | 0.730 ± 0.005 | 0.0300 (" in text  # each method's accuracy beside the gain
    assert f"| gain at noise-0.4 > gain at main | {d.mean():.4f} ({d.mean() - half:.4f}, {d.mean() + half:.4f}) | 3 |" in text


def test_study_p_values_holm_and_claims_on_the_same_data():
    from experiments import study
    # df = 2 has a closed form: p = 1 - t / sqrt(2 + t^2); d = 1, 2, 3 gives t = 2 / (1 / sqrt 3)
    t = 2 * math.sqrt(3)
    assert study.t_pvalue([1.0, 2.0, 3.0]) == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-6)
    assert study.t_pvalue([0.5, 0.5]) == 0.0 and study.t_pvalue([0.0, 0.0]) == 1.0
    mk = lambda p, mean=1.0: {"status": "holds" if mean > 0 else "contradicted", "p": p, "mean": mean, "direction": 1}
    cs = [mk(0.01), mk(0.02), mk(0.04, -1.0)]
    assert study.holm(cs) == 3 and [c["holm"] for c in cs] == ["holds", "holds", "contradicted"]
    cs = [mk(0.01), mk(0.04), mk(0.03), {"status": "untestable (every run recalls 0 of the rare class)", "p": 1.0}]
    assert study.holm(cs) == 3 and [c.get("holm") for c in cs] == ["holds", "inconclusive", "inconclusive", None]


def test_study_report_says_same_as_untestable_and_how_many_claims(tmp_path):
    from experiments import study
    put = lambda *a: put_result(tmp_path, *a)
    for seed in range(5):
        for m, f1 in (("pissa", 0.5 + seed / 100), ("balora", 0.4 + seed / 90), ("lora", 0.3), ("lora+reg", 0.3)):
            put("imbalance", m, seed, {"minority_recall": 0.0, "macro_f1": f1})
        put("lambda", "balora-x0", seed, {"minority_recall": 0.0, "macro_f1": 0.5 + seed / 100})  # = imbalance pissa
        put("lambda", "balora", seed, {"minority_recall": 0.0, "macro_f1": 0.4 + seed / 90})      # = imbalance balora
    text = study.report(tmp_path)
    line = lambda title, claim: text.split(title)[1].split(f"| {claim} |")[1].splitlines()[0]
    assert "untestable (every run recalls 0" in line("Imbalance 100:1:10, minority (neutral) recall", "balora > pissa")
    assert "same as balora > pissa" in line("on the imbalance condition: macro-F1", "balora > balora-x0")
    assert "**contradicted**" in line("Imbalance 100:1:10, macro-F1", "balora > pissa")
    n = int(text.split("**")[3].split()[0])  # "**N claims tested**"
    assert n == 2  # imbalance macro-F1 balora > pissa and pissa > lora; the rest untestable, the same data or n/a


def test_study_noisy_encoder_adds_noise_to_the_layer_matrices_only(encoders, tmp_path):
    from experiments import study
    out = study.noisy_encoder(0.5, tmp_path / "noisy", encoders["plain"])
    a, b = load_file(str(encoders["plain"] / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert changed and all(k.startswith("encoder.layer.") and a[k].ndim == 2 for k in changed)
    assert all(not (k.startswith("encoder.layer.") and k.endswith(".weight") and a[k].ndim == 2) for k in a if k not in changed)
    k = changed[0]
    assert abs(float((b[k] - a[k]).std() / a[k].std()) - 0.5) < 0.1  # noise std = sigma x the matrix's std
    M.from_pretrained(out, num_labels=2)  # still a loadable model directory (config, tokenizer copied)
    assert study.noisy_encoder(0.5, tmp_path / "noisy", encoders["plain"]) == out  # written once


def test_study_figures_are_written_when_matplotlib_is_installed(tmp_path, monkeypatch):
    from experiments import study
    recs = {"imbalance": {"minority_recall": 0.1, "macro_f1": 0.5}, "drift": {"val_ppl": 70.0, "drift_ppl_ratio": 1.1}}
    for cond, test in recs.items():
        for m in ("pissa", "balora"):
            put_result(tmp_path, cond, m, 0, test, script="nlg" if cond == "drift" else "nlu")
    table = study.load_results(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed: no figure, no error
    assert study.figures(table, tmp_path) == []
    monkeypatch.undo()
    pytest.importorskip("matplotlib")
    written = study.figures(table, tmp_path)
    assert [f.name for f in written] == ["imbalance.png", "drift.png"]
    assert all(f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in written)


def test_study_refuses_a_broken_results_file_naming_it_and_the_key(tmp_path):
    from experiments import study
    good = json.loads((study.RESULTS / "main__pissa__0.json").read_text())
    test = good["test"]
    cases = [  # (file name, record, the key named); a NaN accuracy once flipped a verdict to "contradicted"
        ("main__pissa__0", {**good, "test": {**test, "accuracy": math.nan}}, "test.accuracy is nan"),
        ("main__pissa__0", {**good, "test": {**test, "recall": {"negative": math.inf}}}, "test.recall.negative is inf"),
        ("main__pissa__0", {}, "condition is missing"),
        ("main__pissa__0", {k: v for k, v in good.items() if k != "test"}, "test is missing"),
        ("main__pissa__0", {**good, "test": {**test, "mcc": "0.65"}}, "test.mcc is '0.65', not a finite number"),
        ("main__pissa__0", {**good, "validation": {**test, "accuracy": True}}, "validation.accuracy is True"),
        ("main__pissa__0", {**good, "seed": "0"}, "seed is '0', not an integer"),
        ("main__pissa__0", {**good, "flags": ["--seed", 0]}, "flags is ['--seed', 0], not a list of strings"),
        ("main__pissa__0", {**good, "script": "nlg"}, "base is missing"),  # NLG: the base model's numbers
        ("main__pissa__1", good, "condition, method, seed make 'main__pissa__0', not the file name 'main__pissa__1'"),
        ("budget-main", {"condition": "main", "rule": "r", "tried": [{"budget": ["--lr", 1]}], "chosen": None},
         "tried[0].budget is"),
        ("budget-main", {"condition": "drift", "rule": "r", "tried": [], "chosen": None}, "condition is 'drift'"),
        ("budget-main", {"condition": "main", "rule": "r", "tried": [], "chosen": "--lr 1e-3"}, "chosen is"),
    ]
    for name, rec, what in cases:
        for f in tmp_path.iterdir():
            f.unlink()
        f = tmp_path / f"{name}.json"
        f.write_text(json.dumps(rec))
        with pytest.raises(study.StudyError, match=re.escape(f"{f}: {what}")):
            study.load_results(tmp_path) if "__" in name else study.chosen_budgets(tmp_path)
    f.write_text(json.dumps({"condition": "main", "rule": "r", "tried": [], "chosen": None}))
    put_result(tmp_path, "rare", "pissa", 0, {"accuracy": 0.5, "silhouette_cosine": None, "n": 10})  # null: not measured
    assert study.chosen_budgets(tmp_path) == {} and study.load_results(tmp_path)["rare"]["pissa"][0]["test"]["n"] == 10


def test_study_reproduce_checks_every_name_before_running_any(tmp_path, monkeypatch, capsys):
    from experiments import study
    (tmp_path / "main__pissa__0.json").write_text((study.RESULTS / "main__pissa__0.json").read_text())
    monkeypatch.setattr(study, "RESULTS", tmp_path)
    monkeypatch.setattr(study, "RUNS", tmp_path / "runs")
    for f in ("run_grid", "tweet_writing", "noisy_encoder"):  # nothing may run, nothing be written
        monkeypatch.setattr(study, f, lambda *a, **kw: pytest.fail("ran before every name was checked"))
    with pytest.raises(study.StudyError, match="reproduce: name the run"):
        study.main(["reproduce"])
    with pytest.raises(study.StudyError, match=re.escape(f"{tmp_path / 'main__pisa__0.json'}: no such results file")):
        study.main(["reproduce", "main__pissa__0", "main__pisa__0"])  # the typo is the second name
    put_result(tmp_path, "main", "lora", 0, {"accuracy": math.nan})
    with pytest.raises(study.StudyError, match="main__lora__0.json: test.accuracy is nan"):
        study.main(["reproduce", "main__pissa__0", "main__lora__0"])
    # --dry-run prints the command and runs nothing
    capsys.readouterr()
    assert study.main(["reproduce", "--dry-run", "main__pissa__0"]) is True
    out = capsys.readouterr().out
    assert "train_nlu.py --method pissa --seed 0 --dtype fp32 --threads 1 --out " in out, out
    assert out.strip().endswith(str(tmp_path / "runs" / "reproduce" / "main__pissa__0"))
    assert sorted(f.name for f in tmp_path.iterdir()) == ["main__lora__0.json", "main__pissa__0.json"]


def test_evidence_tables_are_the_report_of_the_committed_results():
    from experiments import study
    doc = study.EVIDENCE.read_text(encoding="utf-8")
    tables = doc.split(study.REPORT_BEGIN + "\n")[1].split(study.REPORT_END)[0]
    assert tables == study.report(), "docs/evidence.md out of date: run `python experiments/study.py report`"


def test_plot_log_draws_every_term_of_a_run(encoders, files, tmp_path):
    pytest.importorskip("matplotlib")
    from experiments import plot_log
    train_nlu.main(argv(encoders["plain"], files, tmp_path / "r", "--max-steps", "3", "--method", "balora"))
    rows = plot_log.read_steps(tmp_path / "r" / "log.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and {"task", "consistency", "diversity", "svd"} <= set(rows[0])
    out = plot_log.plot(tmp_path / "r")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@slow
def test_entry_points_outside_the_scripts_say_one_line_for_a_user_error(tmp_path):
    import subprocess
    (tmp_path / "x.gguf").write_text("not a gguf")
    (tmp_path / "empty").mkdir()
    # one process per entry point (each one's other messages are tested in-process)
    cases = [(["experiments/plot_log.py", tmp_path / "empty"], "plot_log.py: error: ", "log.jsonl: not found"),
             (["experiments/study.py", "reproduce", "no-such-run"], "study.py: error: ",
              "no-such-run.json: no such results file"),
             (["-m", "plumbing.gguf_to_hf", tmp_path / "x.gguf", tmp_path / "o"], "gguf_to_hf.py: error: ",
              "x.gguf: not a readable GGUF file")]
    for args, prefix, what in cases:
        proc = subprocess.run([sys.executable, *map(str, args)], cwd=HERE, capture_output=True, text=True, timeout=300)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1, (args, proc.stderr)
        assert lines[0].startswith(prefix) and what in lines[0], (args, lines[0])


def test_a_truncated_results_file_among_many_is_named_in_report_and_in_reproduce(tmp_path):
    from experiments import study
    results = tmp_path / "results"
    results.mkdir()
    for f in sorted(study.RESULTS.glob("main__*.json"))[:3]:
        (results / f.name).write_text(f.read_text())
    bad = sorted(results.iterdir())[1]
    bad.write_text(bad.read_text()[:50])
    with pytest.raises(study.StudyError, match=re.escape(f"{bad}: not a valid results file (truncated or edited?")):
        study.load_results(results)
    with pytest.raises(study.StudyError, match=re.escape(f"{bad}: not a valid results file")):
        study.reproduce(bad.stem, results=results, workdir=tmp_path / "runs")


@slow
def test_study_counts_only_tracked_changes_as_dirty(tmp_path, monkeypatch):
    import subprocess
    from experiments import study
    repo = tmp_path / "repo"
    repo.mkdir()
    git = lambda *a: subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *a], cwd=repo, check=True,
                                    capture_output=True)
    git("init", "-q")
    (repo / "code.py").write_text("x = 1\n")
    git("add", "code.py")
    git("commit", "-q", "-m", "c")
    monkeypatch.setattr(study, "ROOT", repo)
    (repo / ".venv").mkdir()
    (repo / ".venv" / "lib.py").write_text("")  # an untracked virtual environment: still clean
    assert study.code_version()["clean"] is True
    (repo / "code.py").write_text("x = 2\n")  # a tracked file changed: dirty
    assert study.code_version()["clean"] is False


@slow
def test_study_code_version_ignores_result_commits(tmp_path, monkeypatch):
    # `run --commit` commits each result: that changes HEAD but not the code, so the results of one invocation
    # keep one code version (and copy each other's); a commit to the code is a new version
    from experiments import study
    git = lambda *a: subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *a], cwd=tmp_path,
                                    check=True, capture_output=True, text=True).stdout.strip()
    git("init", "-q")
    (tmp_path / "train.py").write_text("x = 1\n")
    git("add", "-A")
    git("commit", "-qm", "code")
    monkeypatch.setattr(study, "ROOT", tmp_path)
    first = study.code_version()
    (tmp_path / "experiments" / "results").mkdir(parents=True)
    (tmp_path / "experiments" / "results" / "a__b__0.json").write_text("{}\n")
    git("add", "-A")
    git("commit", "-qm", "results: a__b__0")
    assert study.code_version() == first == {"commit": git("rev-parse", "HEAD~1"), "clean": True}
    (tmp_path / "train.py").write_text("x = 2\n")
    assert study.code_version() == {**first, "clean": False}
    git("commit", "-qam", "code 2")
    assert study.code_version() == {"commit": git("rev-parse", "HEAD"), "clean": True}


def test_plot_log_refuses_a_missing_figure_directory_and_an_unknown_format_in_one_line(encoders, files, tmp_path):
    # before: a FileNotFoundError / matplotlib ValueError after the plot was drawn; now checked before the log is read
    pytest.importorskip("matplotlib")
    from experiments import plot_log
    train_nlu.main(argv(encoders["plain"], files, tmp_path / "r", "--max-steps", "2", "--method", "balora"))
    for out, what in ((tmp_path / "no" / "dir" / "t.png", f"the directory {tmp_path / 'no' / 'dir'} does not exist"),
                      (tmp_path / "t.xyz", "unknown figure format '.xyz' (one of "),
                      (tmp_path / "r", "a directory; name the figure file")):
        with pytest.raises(SystemExit) as e:
            plot_log.main([str(tmp_path / "r"), "--out", str(out)])
        assert str(e.value).startswith(f"plot_log.py: error: --out {out}: {what}"), str(e.value)
        assert "\n" not in str(e.value)
    assert not list(tmp_path.glob("t.*"))
    assert plot_log.plot(tmp_path / "r", tmp_path / "t.svg").read_bytes().lstrip().startswith(b"<?xml")


def test_entry_points_name_the_missing_input_in_process(tmp_path):
    # the other one-line errors of the entry points (the subprocess test above runs one per entry point)
    from experiments import plot_log, study
    from plumbing import gguf_to_hf
    with pytest.raises(SystemExit, match="plot_log.py: error: .*none: not a run directory"):
        plot_log.main([str(tmp_path / "none")])
    with pytest.raises(study.StudyError, match="unknown condition 'no-such'"):
        study.main(["budget", "no-such"])
    with pytest.raises(SystemExit, match="gguf_to_hf.py: error: GGUF file not found: .*no.gguf"):
        gguf_to_hf.main([str(tmp_path / "no.gguf"), str(tmp_path / "o")])
