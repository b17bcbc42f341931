# experiments/study.py: the evidence. Runs the grid of experiments that tests each claim of the BA-LoRA paper (Chang,
# Chang & Wu, ICLR 2026) at small scale, with several seeds per cell, and writes docs/evidence.md's tables from results/.
# The grid is data (CONDITIONS: condition x method x seed -> the exact train_nlu.py / train_nlg.py flags); a finished
# run (its results/*.json, which records the code it came from) is never redone, an interrupted one is restarted.
# Run: `python experiments/study.py run [--only COND] [--jobs N] [--dry-run]` | `budget COND` | `report` |
# `reproduce RUN... [--dry-run]`. Every results file is checked before use (check_result).

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent  # the project: the scripts run from there, so the stored relative flags (runs/study/...) hold
sys.path.insert(0, str(ROOT))
RESULTS, RUNS = HERE / "results", ROOT / "runs" / "study"

import balora  # noqa: E402  the one JSON reader and writer (a result appears whole or not at all: atomic_write)

# ---- the grid ----------------------------------------------------------------------------------------------------
# methods: the flags that make each one (lora+reg: LoRA init with BA-LoRA's regularisers, the ablation of PiSSA's init)
METHODS = {"lora": ["--method", "lora"], "pissa": ["--method", "pissa"], "balora": ["--method", "balora"],
           "lora+reg": ["--method", "balora", "--init", "lora"],
           # term ablation (Table 4): PiSSA plus one term at the paper's NLU weight
           "pissa+cr": ["--method", "pissa", "--lambda1", "0.15"], "pissa+dr": ["--method", "pissa", "--lambda2", "0.03"],
           "pissa+svd": ["--method", "pissa", "--lambda3", "0.03"],
           # swapped formulations (the ablation of the forms): NLU with the NLG forms, and MSE consistency
           "balora-nlg-forms": ["--method", "balora", "--diversity", "topk_entropy", "--svd", "randomized_frobenius"],
           "balora-mse": ["--method", "balora", "--consistency", "mse"]}
METHODS["balora-x0"] = METHODS["pissa"]  # λ sensitivity (Sec. 4.3.5): all three weights x 0 is PiSSA itself
for s in (0.3, 3, 10):  # ... and all three NLU weights scaled by s
    METHODS[f"balora-x{s}"] = ["--method", "balora", "--lambda1", f"{0.15 * s:g}", "--lambda2", f"{0.03 * s:g}",
                               "--lambda3", f"{0.03 * s:g}"]
METHODS["balora-nlu-forms"] = ["--method", "balora", "--diversity", "covariance", "--svd", "exact_ratio"]  # NLG
for s in (4, 10, 40):  # NLG: the consistency weight alone scaled from the paper's 0.025
    METHODS[f"balora-l1x{s}"] = ["--method", "balora", "--lambda1", f"{0.025 * s:g}"]
ALL = ["lora", "pissa", "balora", "lora+reg"]


@dataclass
class Condition:
    script: str                  # "nlu" | "nlg"
    flags: list                  # the condition's own flags (task, intervention, budget)
    methods: list
    seeds: int
    claim: str = ""
    budgets: list = field(default_factory=list)  # candidate budgets (flag lists), smallest first, for `budget`
    budget_of: str = ""          # use the budget chosen for that condition (the same task and intervention)
    budget_rule: tuple = ("validation", "mcc", 0.2, math.inf)  # PiSSA's (section, metric, low, high) to fit in


# The budgets below were chosen from PiSSA alone (`python study.py budget COND`, results/budget-COND.json): the
# smallest candidate at which PiSSA's validation MCC is clearly above 0 (>= 0.2), then used for every method.
IMBALANCE = ["--task", "three", "--imbalance", "100:1:10"]  # class order negative:neutral:positive, neutral rare
FP32 = ["--dtype", "fp32"]  # fp32 on every machine, so that seeds run on different CPUs stay comparable
DRIFT = ["--train-file", "runs/study/tweets.jsonl"] + FP32  # written by tweet_writing() below
RARE = FP32
TASKS = [["--imbalance", "10:1"], ["--imbalance", "20:1"], ["--imbalance", "50:1"], ["--task", "three"],
         ["--task", "three", "--imbalance", "100:1:10"]]  # binary: positive rare; three-class: neutral rare
TRAIN_SIZE = {"10:1": 4483, "20:1": 4279, "50:1": 4157, "three": 8485, "100:1:10": 4523}  # training sentences
_size = lambda t: TRAIN_SIZE[t[-1]]
RARE_CANDIDATES = ([t + ["--max-steps", "100"] for t in TASKS]  # 3 200 sentences each, then by epochs x size
                   + [t + ["--max-steps", "0", "--epochs", str(e)] for e in (1, 3) for t in sorted(TASKS, key=_size)])
CONDITIONS = {
    "main": Condition("nlu", [], ALL, 5, "BA-LoRA > PiSSA > LoRA (Table 2's ranking)"),
    "imbalance": Condition("nlu", IMBALANCE, ALL, 5, "minority recall BA-LoRA 61.7 >> PiSSA 26.4 >> LoRA 5.8 (Table 12, MNLI 100:10:1)",
                           budgets=[["--max-steps", "100"], ["--max-steps", "0", "--epochs", "1"],
                                    ["--max-steps", "0", "--epochs", "3"],
                                    ["--max-steps", "0", "--epochs", "3", "--lr", "1e-3"],
                                    ["--max-steps", "0", "--epochs", "6", "--lr", "1e-3"]]),
    "noise-0.2": Condition("nlu", ["--label-noise", "0.2"], ["lora", "pissa", "balora"], 5,
                           "BA-LoRA - PiSSA grows with label noise (Sec. 4, App. D)"),
    "noise-0.4": Condition("nlu", ["--label-noise", "0.4"], ["lora", "pissa", "balora"], 5,
                           "BA-LoRA - PiSSA grows with label noise (Sec. 4, App. D)"),
    "terms": Condition("nlu", [], ["pissa", "pissa+cr", "pissa+dr", "pissa+svd", "balora"], 5,
                       "each term alone beats PiSSA (Table 4)"),
    "terms-imbalance": Condition("nlu", IMBALANCE, ["pissa", "pissa+cr", "pissa+dr", "pissa+svd", "balora"], 5,
                                 "each term alone beats PiSSA (Table 4)", budget_of="imbalance"),
    "forms": Condition("nlu", [], ["balora", "balora-nlg-forms", "balora-mse"], 5,
                       "each task's own forms are better (the ablation that swaps the NLU and NLG forms)"),
    "lambda": Condition("nlu", IMBALANCE, ["balora-x0", "balora-x0.3", "balora", "balora-x3", "balora-x10"], 5,
                        "sensitivity to the weights (Sec. 4.3.5)", budget_of="imbalance"),
    # Knowledge drift (Table 13) needs a setting in which plain fine-tuning *raises* the perplexity of general text
    # (the default movie-review task lowers it): tweets, far from the NYT editorials the drift is measured on.
    "drift": Condition("nlg", DRIFT, ALL, 5,
                       "BA-LoRA drifts least at equal task quality: drift PPL base 5.42, BA-LoRA 5.68, "
                       "PiSSA 7.12 (Table 13, LLaMA-2-7B)",
                       budgets=[["--max-steps", "40"], ["--max-steps", "40", "--lr", "1e-3"],
                                ["--max-steps", "120", "--lr", "1e-3"], ["--max-steps", "120", "--lr", "3e-3"]],
                       budget_rule=("test", "drift_ppl_ratio", 1.05, math.inf)),
    "drift-forms": Condition("nlg", DRIFT, ["balora", "balora-nlu-forms"], 5,
                             "each task's own forms are better (the ablation that swaps the NLU and NLG forms)", budget_of="drift"),
    "drift-lambda": Condition("nlg", DRIFT, ["pissa", "balora", "balora-l1x4", "balora-l1x10", "balora-l1x40"], 5,
                              "sensitivity to the consistency weight (Sec. 4.3.5)", budget_of="drift"),
    # Table 12 made testable: a condition in which PiSSA (seed 0, validation) recalls some but not all of the rare
    # class, searched over task x imbalance x budget, cheapest first (training examples seen), then every method there
    "rare-search": Condition("nlu", RARE, ["pissa"], 0, budgets=RARE_CANDIDATES,  # a search only: no grid runs
                             budget_rule=("validation", "minority_recall", 0.10, 0.60)),
    "rare": Condition("nlu", RARE, ["lora", "pissa", "balora", "lora+reg", "pissa+cr", "pissa+dr", "pissa+svd"], 5,
                      "minority recall BA-LoRA 61.7 >> PiSSA 26.4 >> LoRA 5.8 (Table 12, MNLI 100:10:1)",
                      budget_of="rare-search"),
    # stretch (App. D.6's noisy-pretraining argument, controlled): the same encoder with Gaussian noise in its
    # weights before fine-tuning; the trend table compares BA-LoRA's gain over PiSSA with the clean `main`
    **{f"wnoise-{s:g}": Condition("nlu", ["--model", f"runs/study/minilm-noise-{s:g}"], ["pissa", "balora"], 5,
                                  "noisier pretraining, larger BA-LoRA gain (App. D.6)") for s in (0.25, 0.5)},
}


def noisy_encoder(sigma, out=None, src=None):
    # all-MiniLM-L6-v2 (or src) with N(0, (sigma * std(W))^2) noise added to every weight matrix of its
    # transformer layers (fixed generator: the same copy on every machine); all other tensors and files are the
    # original's.
    import torch
    from safetensors.torch import load_file, save_file
    from plumbing import assets
    out = out or ROOT / "runs" / "study" / f"minilm-noise-{sigma:g}"
    if (out / "model.safetensors").exists():
        return out
    src = Path(src or assets.minilm_dir())
    tensors, gen = load_file(str(src / "model.safetensors")), torch.Generator().manual_seed(0)
    for name in sorted(tensors):
        w = tensors[name]
        if name.startswith("encoder.layer.") and name.endswith(".weight") and w.ndim == 2:
            tensors[name] = w + sigma * w.float().std() * torch.randn(w.shape, generator=gen).to(w.dtype)
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copyfile(f, out / f.name)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def tweet_writing(path=ROOT / "runs" / "study" / "tweets.jsonl"):
    # The drift condition's training file: VADER's 4 200 human-rated tweets as sentiment-conditioned writing
    # ("Write a positive tweet." -> the tweet), |rating| >= 0.5 as in the movie-review task; written once.
    import data
    from plumbing import assets
    if path.exists():
        return path
    rows = data.read_ground_truth(assets.vader_dir() / "tweets_GroundTruth.txt")
    recs = [{"instruction": f"Write a {'positive' if score > 0 else 'negative'} tweet.", "output": text}
            for _, score, text in rows if abs(score) >= data.NEUTRAL_BAND]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    return path


@dataclass
class Run:
    condition: str
    method: str
    seed: int
    script: str
    flags: list

    @property
    def name(self):
        return f"{self.condition}__{self.method}__{self.seed}"


def grid(only=None, budgets=None):
    # every run of the grid, with its exact flags; a condition with candidate budgets uses the chosen one
    runs = []
    for cond, c in CONDITIONS.items():
        if only and cond not in only:
            continue
        source = c.budget_of or cond
        budget = (budgets or {}).get(source, [])
        if (c.budgets or c.budget_of) and not budget:
            print(f"study: {cond} waits for its budget: run `python study.py budget {source}` first", flush=True)
            continue
        for seed in range(c.seeds):  # seed-major, so that paired comparisons exist as soon as one seed is done
            for m in c.methods:
                runs.append(Run(cond, m, seed, c.script, c.flags + budget + METHODS[m] + ["--seed", str(seed)]))
    return runs


def chosen_budgets(results=RESULTS):
    out = {}
    for f in Path(results).glob("budget-*.json"):
        rec = read_result(f)  # (budget-COND.json, or one of its candidate runs: no "chosen")
        if rec.get("chosen") is not None:
            out[rec["condition"]] = rec["chosen"]
    return out


# ---- running -----------------------------------------------------------------------------------------------------

class StudyError(ValueError):
    # a user error (an unknown condition or run name, an unreadable results file): one line, exit status 1
    pass


def read_result(path, check=True):
    # one results / metrics JSON file (balora.read_json); a truncated or edited one is named, with what to do;
    # a results file (check) must also have the shape check_result asks for
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"{path}: no such results file")
    rec = balora.read_json(path, lambda why: StudyError(f"{path}: not a valid results file (truncated or edited? "
                                                        f"{why.removeprefix(f'{path}: ')}); delete it to re-run"))
    return check_result(path, rec) if check else rec


_strings = lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)
KINDS = {"a string": lambda v: isinstance(v, str), "an integer": lambda v: type(v) is int,  # (a bool is no int)
         "an object": lambda v: isinstance(v, dict), "a list of strings": _strings,
         "a list of objects": lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v),
         "null or a list of strings": lambda v: v is None or _strings(v)}


def check_result(path, rec):
    # A results file is used only when well-formed: an edited key, or a NaN from a diverged run, would otherwise
    # flip a verdict silently or fail far from the file. The first flaw is named: the file and the key.
    # A run (NAME = condition__method__seed) holds what compact() writes; budget-COND.json what choose_budget does.
    path = Path(path)

    def fail(key, what):
        raise StudyError(f"{path}: {key} {what} (edited, or from a failed run?); fix it, or delete the file to re-run")

    def get(key, kind, d=rec, where=""):
        if key not in d:
            fail(where + key, "is missing")
        if not KINDS[kind](d[key]):
            fail(where + key, f"is {d[key]!r}, not {kind}")
        return d[key]

    def metrics(key, d):  # finite numbers, null (not measured) or objects of them (recall per class)
        for k, v in d.items():
            if isinstance(v, dict):
                metrics(f"{key}.{k}", v)
            elif v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                fail(f"{key}.{k}", f"is {v!r}, not a finite number")

    if "__" not in path.stem:  # budget-COND.json: the candidates tried, in order, and the one chosen (or null)
        cond = path.stem.removeprefix("budget-")
        if get("condition", "a string") != cond:
            fail("condition", f"is {rec['condition']!r}, not the file name's {cond!r}")
        get("rule", "a string")
        get("chosen", "null or a list of strings")
        for i, t in enumerate(get("tried", "a list of objects")):
            get("budget", "a list of strings", t, f"tried[{i}].")
            metrics(f"tried[{i}]", {k: v for k, v in t.items() if k != "budget"})
        return rec
    for key, kind in (("condition", "a string"), ("method", "a string"), ("seed", "an integer"),
                      ("script", "a string"), ("flags", "a list of strings")):
        get(key, kind)
    if rec["script"] not in ("nlu", "nlg"):
        fail("script", f"is {rec['script']!r}, not 'nlu' or 'nlg'")
    for key in ("test", "validation" if rec["script"] == "nlu" else "base"):  # NLG: the base model's numbers
        metrics(key, get(key, "an object"))
    name = f"{rec['condition']}__{rec['method']}__{rec['seed']}"
    if path.stem != name:
        fail("condition, method, seed", f"make {name!r}, not the file name {path.stem!r}")
    return rec


def command(run, out, extra=()):
    script = "train_nlu.py" if run.script == "nlu" else "train_nlg.py"
    return [sys.executable, str(ROOT / script), *run.flags, *extra, "--threads", "1", "--out", str(out)]


def code_version():
    # the commit the runs come from, and whether the code differed from it (results/ and runs/ do not count)
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    # tracked files only: an untracked virtual environment or scratch file is not a change of the code
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!experiments/results", ":!runs")
    # the newest commit that changed the code: `run --commit`'s result commits change HEAD, not the code, so the
    # runs of one invocation still count as the same code (and copy each other's results)
    commit = git("log", "-1", "--format=%H", "--", ".", ":!experiments/results", ":!runs")
    return {"commit": commit or None, "clean": not dirty}


def compact(run, metrics, wall_s):
    # what a run contributes to results/: flags, code, machine, final metrics, wall time (no adapters, no logs)
    rec = {"condition": run.condition, "method": run.method, "seed": run.seed, "script": run.script,
           "flags": run.flags, "code": code_version(), "machine": metrics.get("machine"), "steps": metrics.get("steps"),
           "train_seconds": metrics.get("train_seconds", metrics.get("train_s")), "wall_s": round(wall_s, 1)}
    if run.script == "nlg":  # the tuned model's task, drift and diversity numbers (and the base model's)
        keep = ("val_ppl", "drift_ppl", "distinct_1", "distinct_2", "gsm8k_acc")
        pick = lambda m: {k: m[k] for k in keep if k in m}
        return {**rec, "test": {**pick(metrics["tuned"]), "drift_ppl_ratio": metrics["drift_ppl_ratio"]},
                "base": pick(metrics["base"])}
    keep = ("accuracy", "macro_f1", "mcc", "minority_recall", "silhouette_cosine", "recall", "n")
    test, val = metrics.get("test") or metrics["validation"][-1], metrics["validation"][-1]
    return {**rec, "test": {k: test[k] for k in keep if k in test}, "validation": {k: val[k] for k in keep if k in val}}


def run_grid(runs, jobs=1, results=RESULTS, workdir=RUNS, extra=(), dry_run=False, commit=False):
    # Runs what is missing, `jobs` one-thread processes side by side; finished runs (results/NAME.json) are
    # skipped, an interrupted one (a run directory without metrics.json) is started again from scratch.
    results, workdir = Path(results), Path(workdir)
    reuse_identical(runs, results, dry_run)
    todo = [r for r in runs if not (results / f"{r.name}.json").exists()]
    print(f"study: {len(runs)} runs in the grid, {len(runs) - len(todo)} done, {len(todo)} to run", flush=True)
    if dry_run:
        for r in todo:
            print(" ".join(command(r, workdir / r.name, extra)))
        return []
    results.mkdir(parents=True, exist_ok=True)
    running, done, failed = [], [], []
    while todo or running:
        while todo and len(running) < jobs:
            r = todo.pop(0)
            if reuse_identical([r], results):  # (its twin may have finished in this very invocation)
                continue
            out = workdir / r.name
            shutil.rmtree(out, ignore_errors=True)  # an interrupted run restarts from scratch
            out.mkdir(parents=True)
            log = open(out / "stdout.log", "w")
            running.append((r, subprocess.Popen(command(r, out, extra), stdout=log, stderr=subprocess.STDOUT,
                                                cwd=ROOT), time.time(), log))
        time.sleep(0.2)
        for item in [x for x in running if x[1].poll() is not None]:
            r, proc, t0, log = item
            running.remove(item)
            log.close()
            out = workdir / r.name
            if proc.returncode != 0 or not (out / "metrics.json").exists():
                print(f"study: {r.name} FAILED (exit {proc.returncode}); see {out / 'stdout.log'}", flush=True)
                failed.append(r.name)
                continue
            rec = compact(r, read_result(out / "metrics.json", check=False), time.time() - t0)
            balora.write_json(results / f"{r.name}.json", rec)
            done.append(rec)
            scores = ", ".join(f"{k} {v:.4g}" for k, v in rec["test"].items() if isinstance(v, float))
            print(f"study: {r.name} done in {rec['wall_s']:.0f} s: test {scores}", flush=True)
            if commit:
                subprocess.run(["git", "add", str(results / f"{r.name}.json")], cwd=ROOT)
                subprocess.run(["git", "commit", "-q", "-m", f"results: {r.name}"], cwd=ROOT)
    if failed:
        raise SystemExit(f"study: {len(failed)} run(s) failed: {', '.join(failed)}")
    return done


def reuse_identical(runs, results, dry_run=False):
    # A run whose exact flags already ran in another condition (PiSSA and BA-LoRA recur in the ablations) gives the
    # same metrics on the same machine (the runs are deterministic), so its result is copied, naming its source.
    done, reused, now = {}, [], code_version()
    for f in sorted(Path(results).glob("*__*__*.json")):
        rec = read_result(f)
        if rec.get("code") == now and now["clean"]:  # a result of other (or unknown) code is never copied
            done.setdefault((rec["script"], tuple(rec["flags"])), (f.stem, rec))
    for r in runs:
        src = done.get((r.script, tuple(r.flags)))
        if src and not (results / f"{r.name}.json").exists():
            print(f"study: {r.name} has the flags of {src[0]}: {'would reuse' if dry_run else 'reused'}", flush=True)
            if not dry_run:
                rec = {**src[1], "condition": r.condition, "method": r.method, "same_as": src[1].get("same_as", src[0])}
                balora.write_json(results / f"{r.name}.json", rec)
            reused.append(r)
    return reused


def choose_budget(cond, results=RESULTS, workdir=RUNS, extra=(), jobs=1):
    # PiSSA alone, seed 0, candidate budgets cheapest first: the first whose value lies in the condition's range wins
    # (NLU: validation MCC >= 0.2; drift: drift-perplexity ratio >= 1.05; rare: minority recall in [0.10, 0.60]).
    # `jobs` candidates run side by side; they are still judged in order, so the choice does not depend on jobs.
    c, tried = CONDITIONS[cond], []
    section, metric, low, high = c.budget_rule
    fits = lambda v: v is not None and low <= v <= high
    runs = [Run(f"budget-{cond}", f"pissa-{i}", 0, c.script, c.flags + budget + METHODS["pissa"] + ["--seed", "0"])
            for i, budget in enumerate(c.budgets)]
    for start in range(0, len(runs), jobs):
        run_grid(runs[start:start + jobs], jobs, results, workdir, extra)  # (skipped when their results are there)
        for r, budget in zip(runs[start:start + jobs], c.budgets[start:start + jobs]):
            if not (Path(results) / f"{r.name}.json").exists():
                raise SystemExit(f"study: the budget run {r.name} failed; see {Path(workdir) / r.name / 'stdout.log'}")
            rec = read_result(Path(results) / f"{r.name}.json")
            value = rec[section].get(metric)
            tried.append({"budget": budget, f"{section}_{metric}": value, **({
                "validation_minority_recall": rec["validation"].get("minority_recall"),
                "validation_mcc": rec["validation"].get("mcc"), "steps": rec["steps"]} if c.script == "nlu"
                else {"test": rec["test"]})})
            print(f"study: budget {cond} {budget}: PiSSA {section} {metric} {fmt(value)}", flush=True)
            if fits(value):
                break
        if tried and fits(tried[-1][f"{section}_{metric}"]):
            break
    chosen = tried[-1]["budget"] if tried and fits(tried[-1][f"{section}_{metric}"]) else None
    rule = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
    out = {"condition": cond, "rule": f"cheapest candidate with PiSSA {section} {metric} {rule} (seed 0)",
           "tried": tried, "chosen": chosen}
    balora.write_json(Path(results) / f"budget-{cond}.json", out)
    if chosen is None:
        print(f"study: no candidate of {cond} fits the rule ({out['rule']})", flush=True)
    return out


def reproduce(name, results=RESULTS, workdir=RUNS, extra=(), dry_run=False):
    # A result re-runs from its stored flags alone, into a scratch directory; on the same machine every final
    # metric must come out equal (NLU: test and validation; NLG: tuned and base). Returns whether they did.
    # dry_run: print the command only.
    rec = read_result(Path(results) / f"{name}.json")
    flags = rec["flags"]
    if "--dtype" not in flags and (rec.get("machine") or {}).get("dtype"):
        flags = flags + ["--dtype", rec["machine"]["dtype"]]  # `auto` re-runs in the dtype it chose then
    r = Run(rec["condition"], rec["method"], rec["seed"], rec["script"], flags)
    scratch = Path(workdir) / "reproduce"
    if dry_run:
        print(" ".join(command(r, scratch / r.name, extra)))
        return True
    shutil.rmtree(scratch / "results", ignore_errors=True)
    again = (run_grid([r], 1, scratch / "results", scratch, extra) or [None])[0]
    if again is None:
        return False  # (run_grid said why)
    keys = ("test", "validation", "base")
    diff = {k: (rec.get(k), again.get(k)) for k in keys if rec.get(k) != again.get(k)}
    same = ("same machine" if rec.get("machine") == again["machine"]
            else f"machine {rec.get('machine')} -> {again['machine']}")
    code = rec.get("code") or {}
    code = ("same code" if code == again["code"] else f"recorded from {code.get('commit') or 'unknown code'}"
            f"{'' if code.get('clean', True) else ' (dirty)'}, now {again['code']['commit']}"
            f"{'' if again['code']['clean'] else ' (dirty)'}")
    rel = max([abs(b[m] - a[m]) / max(abs(a[m]), 1e-12) for a, b in diff.values() if a and b
               for m in a if isinstance(a[m], float) and isinstance(b.get(m), float)], default=0.0)
    print(f"study: {name} re-run from its flags ({same}; {code}): "
          + ("every metric equal" if not diff else f"DIFFERS (largest relative difference {rel:.2g}) {diff}"))
    return not diff


# ---- statistics and the report (numpy only) ----------------------------------------------------------------------

T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086]  # Student t 0.975 quantiles, df = 1..20


def paired(a, b):
    # mean difference a - b over seeds, with its 95 % t-interval (None with fewer than 2 pairs)
    d = np.asarray(a, float) - np.asarray(b, float)
    if len(d) < 2:
        return float(d.mean()) if len(d) else None, None, None
    half = T975[min(len(d) - 1, len(T975)) - 1] * d.std(ddof=1) / math.sqrt(len(d))
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def t_pvalue(d):
    # two-sided p of the paired t-test (H0: mean difference 0); the t density integrated numerically (numpy only)
    d = np.asarray(d, float)
    n = len(d)
    if n < 2:
        return None
    sd = d.std(ddof=1)
    if sd == 0:
        return 1.0 if d.mean() == 0 else 0.0
    t, df = abs(d.mean()) / (sd / math.sqrt(n)), n - 1
    x = np.linspace(0.0, min(t, 1e3), 20001)
    pdf = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2)) * (1 + x * x / df) ** (-(df + 1) / 2)
    return float(max(0.0, 1.0 - 2.0 * np.trapezoid(pdf, x)))


def verdict(lo, hi, direction=+1):
    if lo is None:
        return "n/a"
    if direction * lo > 0 and direction * hi > 0:
        return "holds"
    if direction * hi < 0 and direction * lo < 0:
        return "contradicted"
    return "inconclusive"


def load_results(results=RESULTS):
    recs = [read_result(f) for f in sorted(Path(results).glob("*__*__*.json"))]
    table = {}
    for r in recs:
        table.setdefault(r["condition"], {}).setdefault(r["method"], {})[r["seed"]] = r
    return table


def fmt(x, digits=3):
    return "–" if x is None else f"{x:.{digits}f}"


def mean_std(v):
    return f"{fmt(np.mean(v) if len(v) else None)} ± {fmt(np.std(v, ddof=1) if len(v) > 1 else None)}"


def cells_of(table, cond):
    # {method: {seed: result}} of one condition, in the grid's method order (then any other method)
    cells = table.get(cond, {})
    order = CONDITIONS[cond].methods if cond in CONDITIONS else []
    return {m: cells[m] for m in [*order, *sorted(set(cells) - set(order))] if m in cells}


def claim(name, a, b, need, direction, metric):
    # one claim "a beats b" from per-seed values (paired by seed); status: a verdict, pending, untestable, or
    # (set later by report) the same paired data as an earlier claim
    mean, lo, hi = paired(a, b)
    c = {"name": name, "mean": mean, "lo": lo, "hi": hi, "n": len(a), "p": t_pvalue(np.subtract(a, b)) if a else None,
         "direction": direction, "key": (metric, tuple(a), tuple(b)), "status": verdict(lo, hi, direction)}
    if len(a) < need:
        c["status"] = f"pending ({len(a)} of {need} seeds)"
    elif metric == "minority_recall" and a and not any(a) and not any(b):
        c["status"] = "untestable (every run recalls 0 of the rare class)"
    return c


def claims_of(table, cond, metric, pairs, lower=False):
    cells = cells_of(table, cond)
    need = CONDITIONS[cond].seeds if cond in CONDITIONS else 0
    out = []
    for better, worse in pairs:
        common = sorted(set(cells.get(better, {})) & set(cells.get(worse, {})))
        ok = [(cells[better][s]["test"].get(metric), cells[worse][s]["test"].get(metric)) for s in common]
        ok = [(x, y) for x, y in ok if x is not None and y is not None]
        out.append(claim(f"{better} {'<' if lower else '>'} {worse}", [x for x, _ in ok], [y for _, y in ok], need,
                         -1 if lower else +1, metric))
    return out


def trend_claim(table, conds, metric, a, b):
    # the gain a - b per condition (by seed), and the claim "the gain at the strongest level > without it"
    gains = {}
    for c in conds:
        cells = table.get(c, {})
        common = sorted(set(cells.get(a, {})) & set(cells.get(b, {})))
        gains[c] = {s: cells[a][s]["test"][metric] - cells[b][s]["test"][metric] for s in common}
    common = sorted(set(gains[conds[0]]) & set(gains[conds[-1]]))
    need = max(CONDITIONS[c].seeds for c in conds if c in CONDITIONS)
    return gains, claim(f"gain at {conds[-1]} > gain at {conds[0]}", [gains[conds[-1]][s] for s in common],
                        [gains[conds[0]][s] for s in common], need, +1, f"gain:{metric}")


def holm(claims, alpha=0.05):
    # Holm's step-down over the claims with a verdict (one family): the i-th smallest p against alpha / (m - i)
    tested = sorted([c for c in claims if c["status"] in ("holds", "contradicted", "inconclusive")],
                    key=lambda c: c["p"])
    for i, c in enumerate(tested):
        if c["p"] > alpha / (len(tested) - i):
            for rest in tested[i:]:
                rest["holm"] = "inconclusive"
            break
        c["holm"] = "holds" if c["direction"] * c["mean"] > 0 else "contradicted"
    return len(tested)


def claim_lines(claims):
    lines = ["| claim | paired difference (95 % CI) | n | p | verdict | Holm |", "|---|---|---|---|---|---|"]
    for c in claims:
        v = c["status"] if c["status"].startswith(("pending", "untestable", "same as")) else f"**{c['status']}**"
        lines.append(f"| {c['name']} | {fmt(c['mean'], 4)} ({fmt(c['lo'], 4)}, {fmt(c['hi'], 4)}) | {c['n']} | "
                     f"{fmt(c['p'], 3)} | {v} | {c.get('holm', '–')} |")
    return lines


def method_lines(table, cond, metric):
    lines = ["| method | mean ± std | n |", "|---|---|---|"]
    for m, seeds in cells_of(table, cond).items():
        v = [s["test"].get(metric) for s in seeds.values() if s["test"].get(metric) is not None]
        lines.append(f"| {m} | {mean_std(v)} | {len(v)} |")
    return lines


# (conditions from none to the strongest, metric, a, b, title): the gain a - b should grow along them
TRENDS = [(["main", "noise-0.2", "noise-0.4"], "accuracy", "balora", "pissa",
           "Label noise: BA-LoRA's gain over PiSSA against the noise rate (Sec. 4, App. D: it grows)"),
          (["main", "wnoise-0.25", "wnoise-0.5"], "accuracy", "balora", "pissa",
           "Stretch, noisy pretraining: BA-LoRA's gain over PiSSA against weight noise (App. D.6: it grows)")]

TERMS = [("pissa+cr", "pissa"), ("pissa+dr", "pissa"), ("pissa+svd", "pissa"), ("balora", "pissa")]
LAMBDAS = [(m, "balora-x0") for m in ("balora-x0.3", "balora", "balora-x3", "balora-x10")]
REPORT = [  # (condition, metric, claimed pairs better > worse, title[, lower is better])
    ("main", "accuracy", [("balora", "pissa"), ("pissa", "lora"), ("lora+reg", "lora")], "Main NLU ranking"),
    ("rare", "minority_recall", [("balora", "pissa"), ("pissa", "lora"), ("lora+reg", "lora")],
     "Table 12 here: the rare class, minority recall"),
    ("rare", "silhouette_cosine", [("balora", "pissa")], "Table 12 here: cosine silhouette of the logits by true class"),
    ("rare", "macro_f1", [("balora", "pissa"), ("pissa", "lora")], "Table 12 here: macro-F1"),
    ("rare", "mcc", [("balora", "pissa"), ("pissa", "lora")], "Table 12 here: MCC"),
    ("rare", "minority_recall", TERMS, "Table 12 here, each term alone: minority recall"),
    ("imbalance", "minority_recall", [("balora", "pissa"), ("pissa", "lora"), ("lora+reg", "lora")],
     "Imbalance 100:1:10, minority (neutral) recall"),
    ("imbalance", "macro_f1", [("balora", "pissa"), ("pissa", "lora")], "Imbalance 100:1:10, macro-F1"),
    ("noise-0.2", "accuracy", [("balora", "pissa"), ("pissa", "lora")], "Label noise 0.2, clean test accuracy"),
    ("noise-0.4", "accuracy", [("balora", "pissa"), ("pissa", "lora")], "Label noise 0.4, clean test accuracy"),
    ("terms", "accuracy", TERMS, "Term ablation, binary"),
    ("terms-imbalance", "minority_recall", TERMS, "Term ablation, imbalance 100:1:10: minority recall"),
    ("terms-imbalance", "macro_f1", TERMS, "Term ablation, imbalance 100:1:10: macro-F1"),
    ("forms", "accuracy", [("balora", "balora-nlg-forms"), ("balora", "balora-mse")], "NLU forms against swaps"),
    ("lambda", "minority_recall", LAMBDAS, "λ sensitivity on the imbalance condition: minority recall"),
    ("lambda", "macro_f1", LAMBDAS, "λ sensitivity on the imbalance condition: macro-F1"),
    ("drift", "drift_ppl_ratio", [("balora", "pissa"), ("balora", "lora"), ("lora+reg", "lora")],
     "Knowledge drift: drift-perplexity ratio tuned / base", True),
    ("drift", "val_ppl", [("balora", "pissa")], "Knowledge drift: task (validation) perplexity", True),
    ("drift", "distinct_2", [("balora", "pissa"), ("balora", "lora")], "Knowledge drift: distinct-2 of samples"),
    ("drift-forms", "drift_ppl_ratio", [("balora", "balora-nlu-forms")], "NLG forms against the NLU forms, drift", True),
    ("drift-lambda", "drift_ppl_ratio", [(m, "pissa") for m in ("balora", "balora-l1x4", "balora-l1x10", "balora-l1x40")],
     "λ1 sensitivity in the drift condition: drift ratio", True),
    ("drift-lambda", "val_ppl", [(m, "pissa") for m in ("balora", "balora-l1x4", "balora-l1x10", "balora-l1x40")],
     "λ1 sensitivity in the drift condition: its cost in task perplexity", True),
]


def compute(table):
    # what the results cost: the runs actually made (budget searches included, copies not), their wall time
    made = [r for cells in table.values() for seeds in cells.values() for r in seeds.values() if "same_as" not in r]
    copies = sum(len(seeds) for cells in table.values() for seeds in cells.values()) - len(made)
    cpus = sorted({f"{r['machine']['cpu']} ({r['machine']['cpu_capability']}, {r['machine']['dtype']})" for r in made})
    return (f"**Compute:** {len(made)} runs made ({copies} more copied from a run with the same flags), "
            f"{sum(r['wall_s'] for r in made) / 3600:.1f} h of one-thread wall time in all, "
            f"on {'; '.join(cpus)}.\n")


def search_table(results, cond):
    # a budget / condition search: every candidate PiSSA tried (seed 0, validation), and the choice
    f = Path(results) / f"budget-{cond}.json"
    if not f.exists():
        return ""
    rec = read_result(f)
    lines = [f"**Search `{cond}`** (PiSSA alone, seed 0; rule: {rec['rule']}; `python experiments/study.py budget "
             f"{cond}`)", "", "| candidate | steps | validation minority recall | validation MCC |", "|---|---|---|---|"]
    for t in rec["tried"]:
        lines.append(f"| `{' '.join(t['budget'])}` | {t.get('steps', '–')} | {fmt(t.get('validation_minority_recall'))} | "
                     f"{fmt(t.get('validation_mcc'))} |")
    chosen = rec["chosen"]
    lines += ["", f"Chosen: `{' '.join(chosen)}`." if chosen else "No candidate fits the rule."]
    return "\n".join(lines) + "\n"


def report(results=RESULTS, doc=None):
    table = load_results(results)
    sections, every = [], []
    for cond, metric, pairs, title, *lower in REPORT:
        if cond in table:
            claims = claims_of(table, cond, metric, pairs, bool(lower and lower[0]))
            sections.append((f"**{title}** (`{cond}`, test {metric}; paper: {CONDITIONS[cond].claim})",
                             method_lines(table, cond, metric), claims))
            every += claims
    for conds, metric, a, b, title in TRENDS:
        if any(c in table for c in conds[1:]):
            gains, c = trend_claim(table, conds, metric, a, b)
            # each method's mean ± std beside the gain: what the intervention costs
            rows = [f"| condition | {b} | {a} | {a} − {b} (95 % CI) | n |", "|---|---|---|---|---|"]
            for cond, g in gains.items():
                mean, lo, hi = paired(list(g.values()), [0.0] * len(g))
                ms = [mean_std([table[cond][m][s]["test"][metric] for s in g]) for m in (b, a)]
                rows.append(f"| {cond} | {' | '.join(ms)} | {fmt(mean, 4)} ({fmt(lo, 4)}, {fmt(hi, 4)}) | {len(g)} |")
            sections.append((f"**{title}** (test {metric})", rows, [c]))
            every.append(c)
    seen = {}
    for c in every:  # a claim on the very same paired data as an earlier one is one finding, reported once
        if c["status"] not in ("holds", "contradicted", "inconclusive"):
            continue
        if c["key"] in seen:
            c["status"] = f"same as {seen[c['key']]}"
        else:
            seen[c["key"]] = c["name"]
    m = holm(every)
    head = [compute(table), f"**{m} claims tested** (each distinct paired comparison with every seed in, not "
            f"untestable): the verdict column reads each 95 % interval alone; the Holm column keeps the chance of any "
            f"false finding among all {m} at 5 %. Regenerate: `python experiments/study.py report`.\n",
            search_table(results, "rare-search")]
    parts = head + ["\n".join([t, ""] + ml + [""] + claim_lines(cl)) + "\n" for t, ml, cl in sections]
    text = "\n".join(p for p in parts if p)
    print(text)
    if doc:  # the evidence document's tables are exactly this text, between two markers (a test checks they agree)
        page = Path(doc).read_text(encoding="utf-8")
        head, rest = page.split(REPORT_BEGIN + "\n", 1)
        Path(doc).write_text(head + REPORT_BEGIN + "\n" + text + rest[rest.index(REPORT_END):], encoding="utf-8")
    return text


def budget_title(results, cond):
    # a figure's budget, as the search chose it (never written by hand)
    f = Path(results) / f"budget-{cond}.json"
    chosen = read_result(f).get("chosen") if f.exists() else None
    return " ".join(chosen) if chosen else "budget not chosen"


def figures(table, out=RESULTS):
    # experiments/results/{rare,imbalance}.png (per-seed points of each method) and drift.png (drift ratio against
    # task perplexity: "less drift at equal task quality" is a point lower at the same x), when matplotlib is
    # installed: a study-only extra, never needed by the scripts
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("study: no figures: matplotlib is not installed (pip install matplotlib)")
        return []
    written, color = [], lambda m: f"C{ALL.index(m)}" if m in ALL else "k"  # one colour per method everywhere
    panels = {"rare": (("minority_recall", "macro_f1", "silhouette_cosine"), budget_title(out, "rare-search")),
              "imbalance": (("minority_recall", "macro_f1"), "100:1:10, " + budget_title(out, "imbalance"))}
    for cond, (metrics, budget) in panels.items():
        if cond not in table:
            continue
        cells = cells_of(table, cond)
        fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.4))
        for ax, metric in zip(axes, metrics):
            for i, (m, seeds) in enumerate(cells.items()):
                v = [r["test"][metric] for r in seeds.values()]
                ax.bar(i, np.mean(v), color=color(m), alpha=0.4)
                ax.scatter([i] * len(v), v, color=color(m), s=14, zorder=3)
            ax.set_xticks(range(len(cells)), list(cells), rotation=30, fontsize=8)
            ax.set_title(f"test {metric.replace('_', ' ')}", fontsize=10)
        fig.suptitle(f"{cond}: {budget} (one point per seed)", fontsize=10)
        written.append(out / f"{cond}.png")
        fig.savefig(written[-1], dpi=110, bbox_inches="tight")
        plt.close(fig)
    if "drift" in table:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for m, seeds in cells_of(table, "drift").items():
            ax.scatter([r["test"]["val_ppl"] for r in seeds.values()],
                       [r["test"]["drift_ppl_ratio"] for r in seeds.values()], color=color(m), label=m, s=22)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("task perplexity (validation tweets)")
        ax.set_ylabel("drift perplexity ratio, tuned / base (NYT)")
        ax.legend(fontsize=8)
        ax.set_title(f"knowledge drift: tweets, {budget_title(out, 'drift')}", fontsize=10)
        written.append(out / "drift.png")
        fig.savefig(written[-1], dpi=110, bbox_inches="tight")
        plt.close(fig)
    for f in written:
        print(f"study: wrote {f}")
    return written


REPORT_BEGIN, REPORT_END = "<!-- study.py report: begin -->", "<!-- study.py report: end -->"
EVIDENCE = ROOT / "docs" / "evidence.md"


def main(argv=None):
    p = argparse.ArgumentParser(description="the BA-LoRA evidence study: run the grid, choose budgets, report")
    p.add_argument("action", choices=["run", "budget", "report", "reproduce"])
    p.add_argument("conditions", nargs="*", help="budget: the condition(s) to choose a budget for; reproduce: run names")
    p.add_argument("--only", help="comma-separated conditions to run")
    p.add_argument("--jobs", type=int, default=1, help="one-thread runs side by side")
    p.add_argument("--dry-run", action="store_true", help="print the commands of the missing runs (run, reproduce)")
    p.add_argument("--commit", action="store_true", help="git commit each result as it arrives")
    p.add_argument("--no-doc", action="store_true", help="report: print only, do not rewrite docs/evidence.md")
    args = p.parse_intermixed_args(argv)  # (`reproduce --dry-run NAME`: names after an option too)
    named = (args.conditions if args.action == "budget" else []) + (args.only.split(",") if args.only else [])
    unknown = [c for c in named if c not in CONDITIONS]
    if unknown:
        raise StudyError(f"unknown condition {unknown[0]!r}; the conditions are {', '.join(CONDITIONS)}")
    if args.action == "report":
        figures(load_results())
        return report(doc=None if args.no_doc else EVIDENCE)
    if args.action == "reproduce":  # every name is checked before the first (minutes-long) re-run
        if not args.conditions:
            raise StudyError("reproduce: name the run(s) to re-run, e.g. `reproduce main__pissa__0` "
                             "(a file experiments/results/NAME.json)")
        for n in args.conditions:
            read_result(RESULTS / f"{n}.json")
    if not args.dry_run:  # (a dry run prints the commands and writes nothing)
        tweet_writing()  # the drift condition's training file (runs/study/tweets.jsonl), once
        for cond in [c for c in CONDITIONS if c.startswith("wnoise-") and (not args.only or c in args.only)]:
            noisy_encoder(float(cond.split("-")[1]))  # the stretch's noisy encoders, once
    if args.action == "reproduce":
        if not all([reproduce(n, RESULTS, RUNS, dry_run=args.dry_run) for n in args.conditions]):
            raise SystemExit(1)
        return True
    if args.action == "budget":
        return [choose_budget(c, jobs=args.jobs) for c in args.conditions]
    only = args.only.split(",") if args.only else None
    return run_grid(grid(only, chosen_budgets()), args.jobs, dry_run=args.dry_run, commit=args.commit)


if __name__ == "__main__":
    try:
        main()
    except (StudyError, OSError) as e:  # one line, no traceback
        sys.exit(f"study.py: error: {e}")
    except KeyboardInterrupt:
        print("study.py: interrupted; finished results are kept, `study.py run` continues with the rest",
              file=sys.stderr)
        sys.exit(130)
