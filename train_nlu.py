# train_nlu.py: BA-LoRA fine-tuning of a BERT / DeBERTa encoder for sentence classification or regression (paper
# Sec. 3.2 Eqs. 4-8, Sec. 4.1 GLUE, App. B.3): PiSSA (or LoRA) adapters, a head trained in full and shared with the
# teacher, task loss + λ1·consistency + λ2·diversity + λ3·SVD. `python train_nlu.py` runs the embedded job in
# minutes on a CPU; GLUE: `--model DIR --train-file F --val-file F --text-fields a,b`; several processes or GPUs:
# `torchrun --nproc_per_node N train_nlu.py` (docs/scale-out.md). train_nlg.py has the same steps: diff the two.

from plumbing import interrupts  # noqa: F401  first: a Ctrl-C during the imports is one line, exit 130
import argparse
import dataclasses
import itertools
import json
import math
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

import balora
import data
import model as modeling
from plumbing import assets, checkpoints, devices, errors, flags, parallel, progress, rundir

# -------------------------------------------------------------------------------------------------------------
# Defaults: the embedded job. BA-LoRA on all-MiniLM-L6-v2 (BERT, 6 layers, 22.7M parameters) for binary
# sentiment of 8 073 Rotten Tomatoes sentences rated by >= 20 people each (VADER's ground truth, data.py).
# Each is a flag's default (`--help`); the λ, T and k defaults are balora.BALoRAConfig.nlu(), the paper's.
METHOD = "balora"          # lora | pissa | balora: the init (lora / pissa), and whether the regularisers are on
PISSA_INIT = "pissa"       # the init of --method pissa and balora: PiSSA with an exact SVD
TARGETS = "query,key,value,attention.output.dense,intermediate.dense,output.dense"  # every linear of a layer
RANK = 8                   # r
ALPHA = None               # None: alpha = r (scale 1, PiSSA's convention)
LR = 5e-4                  # peak; linear warm-up, then linear decay (lr_at), as the paper's NLU runs
WARMUP_RATIO = 0.1
CLIP = 1.0                 # max global gradient norm
BATCH_SIZE = 32            # examples per optimizer step (split into --grad-accum micro-batches)
GRAD_ACCUM = 1
EPOCHS = 1
MAX_STEPS = 100            # cap on the steps of EPOCHS: 100 steps x 32 = 3 200 sentences, ~40 % of an epoch
MAX_LEN = 128
DTYPE = "auto"             # bf16 autocast where the device runs bf16 natively, else fp32 (devices.resolve_dtype);
                           # master weights, adapters, task loss and regularisers stay float32
SEED = 0
THREADS = 0                # torch CPU threads (0: torch's default)
SAVE_EVERY = 50            # optimizer steps between checkpoints (0: only at the end and at --stop-after)
STOP_AFTER = 0             # 0: run to the end
LOG_EVERY = 1              # print every step's line
EVAL_BATCH_SIZE = 128
TASK = "binary"            # built-in task when no --train-file is given: binary | three (with a ~5 % neutral class)
WEIGHT_DECAY = 0.01        # head matrices only; never adapters, biases
HEAD = ("head.pooler", "head.classifier")  # trained in full; saved with the adapter (peft modules_to_save)
# -------------------------------------------------------------------------------------------------------------

# What a --resume may change besides checkpoints.RESUME_MAY_CHANGE (where and how fast the run goes, when it saves):
# logging, evaluation batching, the fused or plain regularisers and NLU's teacher cache (the same values up to
# float rounding), and what NLG does beside and after training. The same set in both scripts (a test compares them).
RESUME_MAY_CHANGE = {"log_every", "eval_batch_size", "plain", "teacher_cache", "eval_every", "merge", "base_from",
                     "dry_run"}


def defaults():  # read at parse time, so that an edited constant above is the flag's default
    return dict(task="nlu", method=METHOD, init=f"lora for --method lora, else {PISSA_INIT}", rank=RANK,
                alpha=ALPHA, targets=TARGETS, lr=LR, warmup_ratio=WARMUP_RATIO, clip=CLIP, batch_size=BATCH_SIZE,
                grad_accum=GRAD_ACCUM, epochs=EPOCHS, max_steps=MAX_STEPS, max_len=MAX_LEN, seed=SEED, dtype=DTYPE,
                threads=THREADS, save_every=SAVE_EVERY, stop_after=STOP_AFTER, log_every=LOG_EVERY,
                eval_batch_size=EVAL_BATCH_SIZE)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="BA-LoRA / PiSSA / LoRA fine-tuning of an encoder for sentence "
                                "classification or regression; the defaults run the embedded movie-review job. "
                                "λ defaults: the paper's NLU 0.15/0.03/0.03, k 5, T 2 for balora, else 0. "
                                "--train-file: JSONL / CSV / TSV; without --val-file, 10 % of it is held out.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d, R = defaults(), flags.arg_range
    m, g, o, r = flags.shared_args(p, d)
    # the shared flags flags.shared_args leaves to the scripts: the same lines in both
    m.add_argument("--plain", action="store_true", help="run each regulariser as its equation is written "
                   "(balora.py Part 2) instead of the fused fast path: the same values, slower")
    r.add_argument("--log-every", type=R(int, 1), default=d["log_every"], help="print every N-th step's line "
                   "(log.jsonl holds every step)")
    p.set_defaults(threads=d["threads"], stop_after=d["stop_after"])  # shared_args gives them no default of ours
    g.add_argument("--task", choices=("binary", "three"), default=TASK, help="built-in movie-review task")
    g.add_argument("--test-file", default=None, help="test file (optional; without it the final metrics are validation's)")
    g.add_argument("--text-fields", default="sentence", help="one column, or two for pairs: sentence1,sentence2")
    g.add_argument("--label-field", default="label")
    g.add_argument("--regression", action="store_true", help="float labels, one output, MSE loss (STS-B)")
    g.add_argument("--imbalance", default=None, help="subsample training classes to ratios, e.g. 100:10:1")
    g.add_argument("--label-noise", type=R(float, 0, 1, high_open=True), default=0.0,
                   help="flip this fraction of training labels")
    o.add_argument("--weight-decay", type=R(float, 0), default=WEIGHT_DECAY,
                   help="AdamW decay of the head's matrices (never the adapters)")
    r.add_argument("--no-teacher-cache", dest="teacher_cache", action="store_false",
                   help="run the teacher forward every step instead of caching its features on each example's first visit")
    args = p.parse_args(argv)
    if args.regression and (args.imbalance or args.label_noise):
        p.error("--imbalance and --label-noise act on classes: they do not apply with --regression")
    args = flags.check_shared(p, args, "nlu")
    args.init = args.init or ("lora" if args.method == "lora" else PISSA_INIT)  # --method's init; --init overrides
    args.alpha = float(args.rank if args.alpha is None else args.alpha)
    return args


def reg_config(args, num_labels):
    # the regularisers: the paper's NLU setting (Sec. 4.1) for balora, every λ 0 for lora and pissa; a flag given
    # on the command line always applies (`--method pissa --lambda1 0.1`)
    cfg = balora.BALoRAConfig.nlu(consistency="mse" if args.regression else "kl")
    if args.method != "balora":
        cfg = dataclasses.replace(cfg, lambda1=0.0, lambda2=0.0, lambda3=0.0)
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cfg) if getattr(args, f.name) is not None}
    cfg = dataclasses.replace(cfg, **given)
    if args.svd_k is None and num_labels - 1 < cfg.svd_k:
        # k = 5 of D <= 5 logit columns keeps every singular value: Eq. 7 would be the constant -1
        if cfg.lambda3 > 0:
            print(f"note: svd_k = {max(num_labels - 1, 1)} instead of the paper's {cfg.svd_k}: with {num_labels} "
                  f"logit columns k={cfg.svd_k} keeps every singular value and Eq. 7 is the constant -1")
        cfg.svd_k = max(num_labels - 1, 1)
    return cfg


# ---- data ------------------------------------------------------------------------------------------------------

def load_data(args):
    # everything the run reads, checked before the model is loaded -> d: the tokenised splits (test may be None),
    # the label names, the training class counts and the minority class
    tok, _ = tokenizer(args.model)
    splits = read_splits(args)
    encoded = {s: None if x is None else data.encode_classification(tok, x, args.max_len)[0] for s, x in splits.items()}
    for i, e in enumerate(encoded["train"]):
        e["idx"] = i  # the teacher cache's key
    names = splits["train"].label_names
    num_labels = 1 if args.regression else len(names)
    counts = None if args.regression else data.class_counts(splits["train"].labels, num_labels)
    return SimpleNamespace(train=encoded["train"], val=encoded["validation"], test=encoded["test"],
                           label_names=names, num_labels=num_labels, counts=counts,
                           minority=None if args.regression else int(np.argmin(counts)),
                           pad_id=0)  # any valid id: padded keys are masked


def read_splits(args):
    # -> {"train", "validation", "test"}: data.TextData (test may be None). Without --val-file, validation is held
    # out of --train-file (as in train_nlg.py): 10 % of it, as the built-in task's split
    if args.train_file is None:
        splits = data.movie_reviews(assets.vader_dir(), args.task)
    else:
        fields = args.text_fields.split(",")
        train = data.read_table(args.train_file, fields, args.label_field, regression=args.regression)
        read = lambda path: None if path is None else data.read_table(
            path, fields, args.label_field, train.label_names, args.regression)
        val = read(args.val_file)
        if val is None:
            val, train = hold_out(train, round(0.1 * len(train.labels)))
        splits = {"train": train, "validation": val, "test": read(args.test_file)}
        for name, d in splits.items():
            if d is not None:
                print(f"data: {name}: {len(d.labels)} [{data.describe_counts(d)}]")
    if args.imbalance:
        splits["train"] = data.subsample_imbalanced(splits["train"], args.imbalance, args.seed)
    if args.label_noise:
        splits["train"] = data.add_label_noise(splits["train"], args.label_noise, args.seed)
    return splits


def tokenizer(model_dir):
    # the model's tokenizer and config, checked before any weight is read: an encoder, and no token id beyond its
    # embedding table
    arch, cfg = modeling.read_config(model_dir)
    if arch == "llama":
        raise errors.InputError(f"{model_dir}: a {arch} decoder; train_nlu.py fine-tunes BERT / DeBERTa encoders "
                                  f"(train_nlg.py takes decoders)")
    tok = modeling.load_tokenizer(model_dir)
    if tok.get_vocab_size() > cfg.vocab_size:
        raise errors.InputError(f"{model_dir}: tokenizer.json has {tok.get_vocab_size()} tokens, the model's "
                                  f"embedding table {cfg.vocab_size}: they do not belong together")
    return tok, cfg


def input_files(args):
    # what the run reads (the model directory, the data), fingerprinted into its checkpoint: a resume refuses a
    # changed one
    return [args.model, args.train_file or assets.vader_dir(), args.val_file, args.test_file]


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
    return assets.minilm_dir()  # all-MiniLM-L6-v2, fetched once


def build_model(args, num_labels):
    # the pretrained encoder with adapters on its linears, and a new head trained in full
    torch.manual_seed(args.seed)  # the head's init and LoRA's: a resumed run rebuilds the same, then loads
    net = modeling.from_pretrained(args.model, num_labels=num_labels)  # float32 master weights; autocast does bf16
    for p in net.parameters():
        p.requires_grad_(False)
    # Only the encoder gets adapters: a bare suffix like "dense" would otherwise also catch the pooler.
    n = balora.inject(net.encoder, args.targets.split(","), args.rank, args.alpha, args.init)
    net.encoder.grad_checkpoint = args.grad_checkpoint
    for p in net.head.parameters():
        p.requires_grad_(True)
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    total = sum(p.numel() for p in net.parameters())
    print(f"model: {args.model}: {n} adapted linear layers (r={args.rank}, alpha={args.alpha}, init={args.init}); "
          f"trainable {trainable:,} of {total:,} parameters (adapters + head)")
    return net.to(args.device)


def logits_of(net, batch):
    return net(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])  # (B, num_labels)


def teacher_logits(net, batch, amp=nullcontext(), cache=None):
    # Z_P of Eq. 4: the *pretrained* encoder followed by the *current* head (pooler + classifier), without
    # gradient. The head is shared by student and teacher because a fresh classifier has no pretrained
    # counterpart, and the paper's DeBERTa-v3 head, pooler included, is newly initialised (App. B.3): sharing the
    # trained head is the paper's setting. all-MiniLM-L6-v2's pretrained pooler is trained and shared the same way.
    # balora.teacher switches every adapter back to its initial value (W itself), turns dropout off and
    # records no graph, so this costs one forward pass and no second copy of the model; with a cache
    # (TeacherCache) only the first visit of an example pays it.
    with balora.teacher(net), amp:
        if cache is None:
            return net.head(net.encoder(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]))
        return net.head(cache.features(net, batch)[:, None, :])     # the head reads the first token only


# ---- the loss: the task loss and the regularisers on the same N×D logits ------------------------------------

def task_loss(z, labels):
    # cross-entropy over the classes, or MSE for a regression head (float labels); in float32 whatever the autocast
    z = z.float()
    return F.mse_loss(z[:, 0], labels) if labels.is_floating_point() else F.cross_entropy(z, labels)


def micro_batch_loss(net, teacher, batch, cfg, step, total_steps, amp, generator=None, plain=False):
    # The method for one micro-batch, Eq. (8): L = L_task + λ1 L_cr + λ2 L_dr + λ3 L_svd on the batch's N×D logits.
    # teacher(batch) -> Z_P (the pretrained encoder + the shared head, teacher_logits). The batch statistics
    # (covariance, singular values) are over this micro-batch's rows. -> (task, Σ λ_i L_i, N, {term: value}), the
    # task loss a mean over the N examples (train_nlg's is a token sum: each keeps its loss's own reduction)
    with amp:  # the forward under autocast; the losses run in float32 in any case
        z = logits_of(net, batch)                                   # (N, D)
    task = task_loss(z, batch["labels"])
    l1, l2, l3 = cfg.lambdas(step, total_steps)
    if l1 == l2 == l3 == 0:                                   # LoRA, PiSSA: the task loss alone
        return task, 0.0, len(z), {}
    z_teacher = teacher(batch) if l1 > 0 else None            # no teacher forward when λ1 is 0
    reg, terms = balora.regularizers(cfg, z, z_teacher, None, step, total_steps, generator, plain=plain)
    return task, reg, len(z), terms


def accumulate(net, teacher, micro_batches, cfg, step, total_steps, amp, seed=0, dist=parallel.Dist(), micro0=0,
               plain=False):
    # Forward + backward of one optimizer step (the harness around micro_batch_loss); .grad then holds the
    # gradient of the step's loss. Each micro-batch's loss is weighted by its share of the step's examples, so the
    # summed gradients are those of the mean over the whole batch: --grad-accum changes memory, not the update
    # (the batch statistics, covariance and σ, are per micro-batch). Under torchrun `micro_batches` are this
    # rank's share (micro0: the index of its first in the step); DDP averages the ranks' gradients, so each loss
    # is also scaled by the world size. Returns the step's means {task, term: value} over all ranks' examples.
    n_total = int(parallel.all_sum({"n": sum(len(b["labels"]) for b in micro_batches)}, dist)["n"])
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
            values = {"task": task.item(), **{k: v.item() for k, v in terms.items()}}
            bad = [f"{k} {v}" for k, v in values.items() if not math.isfinite(v)]
            if bad:
                raise errors.NonFiniteLoss(f"step {step + 1}: non-finite {', '.join(bad)} (micro-batch {j})")
            ((task + reg) * (w * dist.world)).backward()             # the step's example mean
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + w * v
    return parallel.all_sum(sums, dist)


# ---- optimiser and schedule ------------------------------------------------------------------------------------

def make_optimizer(net, args):
    # AdamW; no weight decay on the adapters: it would pull the PiSSA adapters (the principal components of W)
    # towards 0. The head's matrices decay (--weight-decay), its biases and norms do not.
    adapters = [p for n, p in net.named_parameters() if n.endswith(("lora_A", "lora_B"))]
    head = list(net.head.named_parameters())
    groups = [{"params": adapters, "weight_decay": 0.0},
              {"params": [p for n, p in head if p.ndim >= 2], "weight_decay": args.weight_decay},
              {"params": [p for n, p in head if p.ndim < 2], "weight_decay": 0.0}]
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert trainable == {id(p) for g in groups for p in g["params"]}, "trainable != adapters + head"
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8)


def schedule(args, n_train):
    # -> (optimizer steps, warm-up steps): --epochs over n_train examples, capped by --max-steps; the warm-up is
    # ceil(--warmup-ratio x steps), the product rounded first (0.1 x 30 is 3.0000000000000004 in floating point)
    total = min(args.epochs * math.ceil(n_train / args.batch_size), args.max_steps or math.inf)
    return total, math.ceil(round(args.warmup_ratio * total, 9))


def lr_at(step, total, warmup, peak):
    # step: 0-based update index. Warm-up peak·(step+1)/warmup, so the very first update already has lr > 0
    # (peak·step/warmup would waste it), reaching peak at step warmup-1; then linear decay to peak/(total-warmup)
    # at the last update (the paper's NLU schedule). A pure function of step: resuming needs no scheduler object.
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (total - step) / max(total - warmup, 1)


# ---- evaluation ------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(net, d, args, split="val"):
    # the loss and every metric on d's split "val" or "test". Sorted by length so each batch pads little; the order
    # does not change any metric.
    examples = getattr(d, split)
    was_training = net.training
    net.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    zs, loss = [], 0.0
    for i in range(0, len(order), args.eval_batch_size):
        b = to_device(data.collate_classification([examples[j] for j in order[i:i + args.eval_batch_size]],
                                                  d.pad_id), args.device)
        with devices.autocast(args.device, args.dtype):
            z = logits_of(net, b).float()
        loss += task_loss(z, b["labels"]).item() * len(z)
        zs.append(z.cpu())
    net.train(was_training)
    z = torch.cat(zs)[torch.argsort(torch.tensor(order))].numpy()      # back to the data order
    y = [e["label"] for e in examples]
    m = regression_metrics(z, y) if args.regression else classification_metrics(z, y, d.label_names, d.minority)
    return {"loss": loss / len(examples), **m}


def summary(m):
    if "pearson" in m:
        return f"pearson {m['pearson']:.4f} spearman {m['spearman']:.4f} mse {m['mse']:.4f}"
    f = lambda x: "n/a" if x is None else f"{x:.4f}"
    return (f"acc {f(m['accuracy'])} macro-F1 {f(m['macro_f1'])} MCC {f(m['mcc'])} "
            f"minority({m['minority_class']}) recall {f(m['minority_recall'])} silhouette {f(m['silhouette_cosine'])}")


# ---- the run ---------------------------------------------------------------------------------------------------

def resume_state(args, net, opt, inputs, cache=None):
    # the checkpoint's state, its weights, optimizer moments and RNG loaded into net and opt (and its features
    # into the teacher cache); every setting must equal the checkpoint's but those a resume may change, and every
    # input file its fingerprint
    out = Path(args.out)
    state = checkpoints.checkpoint_state(out, "train_nlu.py", args, RESUME_MAY_CHANGE, inputs)
    kinds = {"validation": list, "train_seconds": float, "examples": int, "tokens": int}
    bad = next((k for k, kind in kinds.items() if not isinstance(state.get(k), kind)), None)
    if bad:
        raise errors.InputError(f"{out / checkpoints.CHECKPOINT}: not a train_nlu.py checkpoint (no {bad!r})")
    extra = checkpoints.load_checkpoint(out, net, opt, state["step"])
    if cache is not None:
        cache.load(extra, args.device, out / checkpoints.CHECKPOINT)
    state["args"] = dict(vars(args))
    print(f"resume: {out / checkpoints.CHECKPOINT} at step {state['step']}")
    return state


def train(net, opt, cfg, d, args, state, total, warmup, log, dist=parallel.Dist(), cache=None):
    # The optimizer steps from the state's on, NLU's validation at each epoch end and at the last step, and the
    # checkpoints (rank 0 alone evaluates and writes under torchrun). Returns the training seconds, or None when
    # --stop-after stopped it.
    out, start = Path(args.out), state["step"]
    student = parallel.data_parallel(net, dist)  # the training forward; `net` itself for the rest
    amp = devices.autocast(args.device, args.dtype)
    teacher = lambda batch: teacher_logits(net, batch, amp, cache)  # the unwrapped model: no gradient, no DDP
    collate = lambda e: to_device({**data.collate_classification(e, d.pad_id),
                                   "idx": torch.tensor([x["idx"] for x in e])}, args.device)
    batches = step_batches(d.train, args, collate, dist, start)
    trainable = [p for g in opt.param_groups for p in g["params"]]
    per_epoch = math.ceil(len(d.train) / args.batch_size)
    t_start, seconds_before = time.time(), state["train_seconds"]
    last_saved = start if args.resume else -1  # the step of the newest checkpoint in --out

    def checkpoint(step):
        nonlocal last_saved
        state.update(step=step, train_seconds=seconds_before + time.time() - t_start)
        if dist.main:
            checkpoints.save_checkpoint(out, net, opt, state, cache.tensors() if cache else None)
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
            log(rec)
            if (done % per_epoch == 0 or done == total) and dist.main:  # NLU: validation at each epoch end
                m = evaluate(net, d, args, "val")
                state["validation"].append({"epoch": epoch, "step": done, **m})
                log({"event": "validation", "epoch": epoch, "step": done, **m})
                print(f"validation (epoch {epoch}, step {done}): {summary(m)}", flush=True)
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


def finish(net, d, args, run, state, log):
    # the test metrics (or the last validation's), the adapter + head, metrics.json; a non-finite evaluation fails
    out = Path(args.out)
    errors.check_finite_metrics(state["validation"][-1], "validation")
    if d.test is not None:
        test = evaluate(net, d, args, "test")
        print(f"test: {summary(test)}", flush=True)
        log({"event": "test", "step": state["step"], **test})
        errors.check_finite_metrics(test, "test")
    else:  # GLUE-style: no labelled test set, the last validation (at the final weights) is the result
        test = None
        print("test: no --test-file; the final metrics are the last validation's")
    form = balora.save_adapter(net, out / "adapter", modules_to_save=HEAD)  # see balora.save_adapter for the form
    seconds = state["train_seconds"]
    metrics = {**run, "steps": state["step"], "examples_seen": state["examples"], "train_seconds": seconds,
               "examples_per_s": state["examples"] / max(seconds, 1e-9),
               "train_class_counts": None if d.counts is None else dict(zip(d.label_names, d.counts)),
               "validation": state["validation"], "test": test, "args": state["args"]}
    balora.write_json(out / "metrics.json", metrics)
    print(f"done: {state['step']} steps, {progress.fmt_time(seconds)} training; adapter ({form} form) + head in "
          f"{out / 'adapter'} (PeftModel.from_pretrained(base, {str(out / 'adapter')!r})), metrics in "
          f"{out / 'metrics.json'}")
    return metrics


def main(argv=None):
    args = parse_args(argv)
    dist = devices.setup(args, default_model_dir)  # threads, device, torchrun, dtype, args.model
    out = rundir.run_dir(args, dist, "nlu")
    inputs = checkpoints.fingerprints(input_files(args))
    d = load_data(args)  # every data error before the model is loaded
    cfg = reg_config(args, d.num_labels)
    total, warmup = schedule(args, len(d.train))
    parallel.check_world(len(d.train), args.batch_size, args.grad_accum, dist.world, total)
    run = {"method": args.method, "init": args.init, "config": dataclasses.asdict(cfg), "total_steps": total,
           "machine": devices.machine(args.device, args.dtype)}
    processes = f" in each of {dist.world} processes" if dist.world > 1 else ""
    print(f"train: {args.method} (init {args.init}; λ1/λ2/λ3 {cfg.lambda1}/{cfg.lambda2}/{cfg.lambda3}, "
          f"k={cfg.svd_k}, T={cfg.temperature}, {cfg.consistency}/{cfg.diversity}/{cfg.svd}); {len(d.train)} "
          f"examples, {total} steps of {args.batch_size} ({args.grad_accum} micro-batches{processes}), "
          f"{math.ceil(len(d.train) / args.batch_size)} steps/epoch, warm-up {warmup}, lr {args.lr}, {args.dtype} "
          f"on {args.device}, out {out}; {run['machine']}", flush=True)
    net = build_model(args, d.num_labels)
    opt = make_optimizer(net, args)
    cache = TeacherCache(len(d.train)) if cfg.lambda1 > 0 and args.teacher_cache else None
    state = {"script": "train_nlu.py", "step": 0, "args": dict(vars(args)), "inputs": inputs, "train_seconds": 0.0,
             "examples": 0, "tokens": 0, "validation": []}
    if args.resume:
        state = resume_state(args, net, opt, inputs, cache)
    log_file = rundir.open_log(out, state["step"], args.resume, dist.main)
    try:
        def log(record):  # rank 0's log.jsonl
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

        if log_file.new:  # a new run, or a resume whose log.jsonl was deleted: the log starts with its start record
            log({"event": "start", **run, "warmup": warmup, "args": state["args"]})
        if train(net, opt, cfg, d, args, state, total, warmup, log, dist, cache) is None or not dist.main:
            return None
        return finish(net, d, args, run, state, log)
    finally:
        log_file.close()
        rundir.unlock_run_dir(out)


# ---- NLU's own pieces ------------------------------------------------------------------------------------------

def hold_out(d, n):
    # -> (n examples of d for validation, the rest): a sample fixed by the examples' content (data.balanced_sample),
    # not by the file's order or the seed
    if not 0 < n < len(d.labels):
        raise errors.InputError(f"{d.source}: {len(d.labels)} examples, too few to hold out 10 % for validation "
                                  f"(pass --val-file)")
    held, rest = data.balanced_sample(list(zip(d.texts, d.labels)), n, key=lambda r: 0)
    part = lambda rows, name: data.TextData([t for t, _ in rows], [y for _, y in rows], d.label_names,
                                            f"{d.source} [{name}]")
    return part(held, "validation, held out"), part(rest, "train")


class TeacherCache:
    # The teacher's encoder output for an example never changes (pretrained weights, eval mode, no dropout):
    # only the shared head does. So the first-token features of each training example are kept on its first
    # visit (N x C floats: 12 MB for the default) and the teacher forward disappears from the second epoch on.
    # Exact up to float rounding: the same function of the same tokens (the batch around them, and so its
    # padding, differs between epochs). Saved in the checkpoint, so that a resumed run reads the very features
    # an uninterrupted one would have (refilled from other batches they differ in the last bits).
    def __init__(self, n):
        self.n, self.feats, self.have = n, None, torch.zeros(n, dtype=torch.bool)

    def tensors(self):
        return {} if self.feats is None else {"teacher_feats": self.feats, "teacher_have": self.have}

    def load(self, tensors, device, where):
        if not tensors:
            return
        feats, have = tensors.get("teacher_feats"), tensors.get("teacher_have")
        if feats is None or have is None or feats.shape[0] != self.n or have.shape != (self.n,) \
                or have.dtype != torch.bool:
            raise errors.InputError(f"{where}: the teacher cache does not fit {self.n} training examples")
        self.feats, self.have = feats.float().to(device), have.clone()

    def features(self, net, b):
        idx = b["idx"].cpu()
        new = ~self.have[idx]
        if new.any():
            rows = new.to(b["idx"].device)
            h = net.encoder(b["input_ids"][rows], b["attention_mask"][rows], b["token_type_ids"][rows])[:, 0]
            if self.feats is None:
                self.feats = torch.zeros(self.n, h.shape[-1], dtype=torch.float32, device=h.device)
            self.feats[idx[new].to(h.device)] = h.float()
            self.have[idx[new]] = True
        return self.feats[b["idx"]]


# Metrics, plain numpy / torch

def confusion(y_true, y_pred, k):
    c = np.zeros((k, k), dtype=np.int64)
    np.add.at(c, (y_true, y_pred), 1)
    return c  # c[true, predicted]


def macro_f1(c):
    # over the classes that occur in labels or predictions (as sklearn), F1 = 0 where precision+recall = 0
    tp, n_true, n_pred = np.diag(c), c.sum(1), c.sum(0)
    present = (n_true + n_pred) > 0
    f1 = np.where(n_true + n_pred > 0, 2 * tp / np.maximum(n_true + n_pred, 1), 0.0)
    return float(f1[present].mean())


def mcc(c):
    # Matthews correlation for K classes (Gorodkin's R_K; binary MCC when K = 2); 0 when undefined
    s, correct = c.sum(), np.trace(c)
    t, p = c.sum(1).astype(np.float64), c.sum(0).astype(np.float64)
    den = math.sqrt((s * s - p @ p) * (s * s - t @ t))
    return float((correct * s - t @ p) / den) if den > 0 else 0.0


def ranks(v):
    # 1-based ranks, ties get their average rank
    v = np.asarray(v, dtype=np.float64)
    order = np.argsort(v, kind="stable")
    r = np.empty(len(v))
    sv = v[order]
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and sv[j + 1] == sv[i]:
            j += 1
        r[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return r


def pearson(a, b):
    a, b = np.asarray(a, np.float64) - np.mean(a), np.asarray(b, np.float64) - np.mean(b)
    den = math.sqrt((a @ a) * (b @ b))
    return float(a @ b / den) if den > 0 else 0.0


def spearman(a, b):
    return pearson(ranks(a), ranks(b))


def silhouette_cosine(z, y, chunk=2048):
    # Mean silhouette of the rows of z (logits) clustered by true class, with cosine distance 1 - cos:
    # s_i = (b_i - a_i) / max(a_i, b_i), a_i = mean distance to the other members of i's class, b_i = the
    # smallest mean distance to another class; s_i = 0 for a class of one (as sklearn). Paper Table 12.
    z = F.normalize(torch.as_tensor(z, dtype=torch.float64), dim=1)   # zero rows stay 0: distance 1
    y = torch.as_tensor(y)
    classes = torch.unique(y)
    if len(classes) < 2:
        return None
    onehot = (y[:, None] == classes[None, :]).double()                 # (N, K)
    N = len(y)
    sums = torch.cat([(1 - z[i:i + chunk] @ z.T).clamp(0, 2) @ onehot  # (N, K): Σ distance to each class
                      for i in range(0, N, chunk)])
    own = onehot.argmax(1)
    rows = torch.arange(N)
    sums[rows, own] -= (1 - (z * z).sum(1)).clamp(0, 2)               # d(i, i) is 0 by definition
    counts = onehot.sum(0)
    n_own = counts[own]
    a = sums[rows, own] / (n_own - 1).clamp(min=1)
    mean_other = sums / counts
    mean_other[rows, own] = math.inf
    b = mean_other.min(1).values
    s = torch.where((n_own > 1) & (torch.maximum(a, b) > 0), (b - a) / torch.maximum(a, b).clamp(min=1e-300),
                    torch.zeros_like(a))
    return float(s.mean())


def classification_metrics(z, y, label_names, minority):
    z, y = np.asarray(z, np.float64), np.asarray(y)
    pred = z.argmax(1)
    c = confusion(y, pred, len(label_names))
    recall = {name: (float(c[k, k] / c[k].sum()) if c[k].sum() else None) for k, name in enumerate(label_names)}
    return {"n": int(len(y)), "accuracy": float((pred == y).mean()), "macro_f1": macro_f1(c), "mcc": mcc(c),
            "recall": recall, "minority_class": label_names[minority],
            "minority_recall": recall[label_names[minority]], "silhouette_cosine": silhouette_cosine(z, y),
            "confusion": c.tolist()}


def regression_metrics(z, y):
    p, y = np.asarray(z, np.float64)[:, 0], np.asarray(y, np.float64)
    return {"n": int(len(y)), "pearson": pearson(p, y), "spearman": spearman(p, y), "mse": float(((p - y) ** 2).mean())}


if __name__ == "__main__":
    errors.cli(main, __file__)
