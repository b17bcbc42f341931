# train_nlu.py: BA-LoRA fine-tuning of a BERT / DeBERTa encoder for classification or regression
# (paper Sec. 3.2 Eqs. 4-8, Sec. 4.1 GLUE, App. B.3). One plain loop: PiSSA (or LoRA) adapters on the encoder,
# a fully trained head shared by student and teacher, task loss + λ1·consistency + λ2·diversity + λ3·SVD,
# bf16 autocast where the device runs it natively (else fp32), gradient accumulation, a teacher feature cache,
# resumable safetensors checkpoints, metrics.json.
# Run: `python train_nlu.py` (all-MiniLM-L6-v2 on human-rated movie-review sentiment, minutes on a CPU);
# `--method lora|pissa|balora`; GLUE: `--model DIR --train-file F --val-file F --text-fields a,b`. `--help` for all.
# Several processes or GPUs: `torchrun --nproc_per_node N train_nlu.py ...` (data parallel, docs/scale-out.md).

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import balora
import data
import model as modeling
from plumbing import assets, runtime

# -------------------------------------------------------------------------------------------------------------
# Defaults: the embedded job. BA-LoRA on all-MiniLM-L6-v2 (BERT, 6 layers, 22.7M parameters) for binary
# sentiment of 8 073 Rotten Tomatoes sentences rated by >= 20 people each (VADER's ground truth, data.py).
# Each is a flag's default (`--help`); the λ, T and k defaults are balora.BALoRAConfig.nlu(), the paper's.
METHOD = "balora"          # lora | pissa | balora: the init (lora / pissa), and whether the regularisers are on
TASK = "binary"            # built-in task when no --train-file is given: binary | three (with a ~5 % neutral class)
TARGETS = "query,key,value,attention.output.dense,intermediate.dense,output.dense"  # every linear of a layer
RANK = 8                   # r
ALPHA = None               # None: alpha = r (scale 1, PiSSA's convention)
LR = 5e-4                  # peak; linear warm-up, then linear decay (lr_at), as the paper's NLU runs
WARMUP_RATIO = 0.1
WEIGHT_DECAY = 0.01        # head matrices only; never adapters, biases
CLIP = 1.0                 # max global gradient norm
BATCH_SIZE = 32            # examples per optimizer step (split into --grad-accum micro-batches)
GRAD_ACCUM = 1
EPOCHS = 1
MAX_STEPS = 100            # cap on the steps of EPOCHS: 100 steps x 32 = 3 200 sentences, ~40 % of an epoch
MAX_LEN = 128
DTYPE = "auto"             # bf16 autocast where the device runs bf16 natively, else fp32 (runtime.resolve_dtype);
                           # master weights, adapters, task loss and regularisers stay float32
SEED = 0
SAVE_EVERY = 50            # optimizer steps between checkpoints (and at every epoch end)
EVAL_BATCH_SIZE = 128
HEAD = ("head.pooler", "head.classifier")  # trained in full; saved with the adapter (peft modules_to_save)
# -------------------------------------------------------------------------------------------------------------

# besides runtime.RESUME_MAY_CHANGE, what a --resume may change: logging, evaluation batching, the teacher cache
# (the same features up to float rounding)
RESUME_MAY_CHANGE = {"log_every", "eval_batch_size", "teacher_cache"}
def defaults():  # read at parse time, so that an edited constant above is the flag's default
    return dict(task="nlu", method=METHOD, init="lora for --method lora, else pissa", rank=RANK, alpha=ALPHA,
                targets=TARGETS, lr=LR, warmup_ratio=WARMUP_RATIO, clip=CLIP, batch_size=BATCH_SIZE,
                grad_accum=GRAD_ACCUM, max_len=MAX_LEN, epochs=EPOCHS, max_steps=MAX_STEPS, seed=SEED, dtype=DTYPE,
                save_every=SAVE_EVERY, eval_batch_size=EVAL_BATCH_SIZE)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="BA-LoRA / PiSSA / LoRA fine-tuning of an encoder for sentence "
                                "classification or regression; the defaults run the embedded movie-review job. "
                                "λ defaults: the paper's NLU 0.15/0.03/0.03, k 5, T 2 for balora, else 0.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _, g, o, r = runtime.shared_args(p, defaults())
    g.add_argument("--task", choices=("binary", "three"), default=TASK, help="built-in movie-review task")
    g.add_argument("--test-file", default=None, help="test file (optional; without it the final metrics are validation's)")
    g.add_argument("--text-fields", default="sentence", help="one column, or two for pairs: sentence1,sentence2")
    g.add_argument("--label-field", default="label")
    g.add_argument("--regression", action="store_true", help="float labels, one output, MSE loss (STS-B)")
    g.add_argument("--imbalance", default=None, help="subsample training classes to ratios, e.g. 100:10:1")
    g.add_argument("--label-noise", type=runtime.arg_range(float, 0, 1, high_open=True), default=0.0,
                   help="flip this fraction of training labels")
    o.add_argument("--weight-decay", type=runtime.arg_range(float, 0), default=WEIGHT_DECAY,
                   help="AdamW decay of the head's matrices (never the adapters)")
    r.add_argument("--log-every", type=runtime.arg_range(int, 1), default=1)
    r.add_argument("--no-teacher-cache", dest="teacher_cache", action="store_false",
                   help="run the teacher forward every step instead of caching its features after the first epoch")
    args = p.parse_args(argv)
    if args.regression and (args.imbalance or args.label_noise):
        p.error("--imbalance and --label-noise act on classes: they do not apply with --regression")
    if args.train_file and not args.val_file:
        p.error("--train-file needs --val-file")
    args = runtime.check_shared(p, args, "nlu")
    args.init = args.init or ("lora" if args.method == "lora" else "pissa")  # --method's init; --init overrides
    args.alpha = float(args.rank if args.alpha is None else args.alpha)
    return args


# -------------------------------------------------------------------------------------------------------------
# Data


def load_splits(args):
    # -> {"train", "validation", "test"}: data.TextData (test may be None)
    if args.train_file is None:
        splits = data.movie_reviews(assets.vader_dir(), args.task)
    else:
        fields = args.text_fields.split(",")
        train = data.read_table(args.train_file, fields, args.label_field, regression=args.regression)
        read = lambda path: None if path is None else data.read_table(
            path, fields, args.label_field, train.label_names, args.regression)
        splits = {"train": train, "validation": read(args.val_file), "test": read(args.test_file)}
        for name, d in splits.items():
            if d is not None:
                print(f"data: {name}: {len(d.labels)} [{data.describe_counts(d)}]")
    if args.imbalance:
        splits["train"] = data.subsample_imbalanced(splits["train"], args.imbalance, args.seed)
    if args.label_noise:
        splits["train"] = data.add_label_noise(splits["train"], args.label_noise, args.seed)
    return splits


def input_files(args):
    # what the run reads (the model directory, the data), fingerprinted into its checkpoint: a resume refuses a
    # changed one
    return [args.model, args.train_file or assets.vader_dir(), args.val_file, args.test_file]


def to_device(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


# -------------------------------------------------------------------------------------------------------------
# Model: adapters on the encoder, the head trained in full


def build_model(args, num_labels):
    path, init = args.model, args.init
    net = modeling.from_pretrained(path, num_labels=num_labels)  # float32 master weights; autocast does bf16
    for p in net.parameters():
        p.requires_grad_(False)
    # Only the encoder gets adapters: a bare suffix like "dense" would otherwise also catch the pooler.
    n = balora.inject(net.encoder, args.targets.split(","), args.rank, args.alpha, init)
    net.encoder.grad_checkpoint = args.grad_checkpoint
    for p in net.head.parameters():
        p.requires_grad_(True)
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    total = sum(p.numel() for p in net.parameters())
    print(f"model: {path}: {n} adapted linear layers (r={args.rank}, alpha={args.alpha}, init={init}); "
          f"trainable {trainable:,} of {total:,} parameters (adapters + head)")
    return net.to(args.device)


def logits_of(net, batch):
    return net(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])  # (B, num_labels)


def teacher_logits(net, batch, cache=None):
    # Z_P of Eq. 4: the *pretrained* encoder followed by the *current* head (pooler + classifier), without
    # gradient. The head is shared by student and teacher because a fresh classifier has no pretrained
    # counterpart, and the paper's DeBERTa-v3 head, pooler included, is newly initialised (App. B.3): sharing the
    # trained head is the paper's setting. all-MiniLM-L6-v2's pretrained pooler is trained and shared the same way.
    # balora.teacher switches every adapter back to its initial value (W itself), turns dropout off and
    # records no graph, so this costs one forward pass and no second copy of the model; with a cache
    # (TeacherCache) only the first visit of an example pays it.
    with balora.teacher(net):
        if cache is None:
            return net.head(net.encoder(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]))
        return net.head(cache.features(net, batch)[:, None, :])     # the head reads the first token only


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
            raise runtime.InputError(f"{where}: the teacher cache does not fit {self.n} training examples")
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


def task_loss(z, labels):
    # cross-entropy over the classes, or MSE for a regression head (float labels); in float32 whatever the autocast
    z = z.float()
    return F.mse_loss(z[:, 0], labels) if labels.is_floating_point() else F.cross_entropy(z, labels)


def micro_batch_loss(net, teacher, batch, cfg, step, total_steps, amp, generator=None):
    # The method for one micro-batch, Eq. (8): L = L_task + λ1 L_cr + λ2 L_dr + λ3 L_svd on the batch's N×D logits.
    # teacher(batch) -> Z_P (the pretrained encoder + the shared head, teacher_logits). The batch statistics
    # (covariance, singular values) are over this micro-batch's rows. -> (task, Σ λ_i L_i, N, {term: value}), the
    # task loss a mean over the N examples (train_nlg's is a token sum: each keeps its loss's own reduction)
    with amp:
        z = logits_of(net, batch)                                   # (N, D)
        task = task_loss(z, batch["labels"])
        l1, l2, l3 = cfg.lambdas(step, total_steps)
        if l1 == l2 == l3 == 0:                                     # LoRA, PiSSA: the task loss alone
            return task, 0.0, len(z), {}
        z_teacher = teacher(batch) if l1 > 0 else None             # no teacher forward when λ1 is 0
        reg, terms = balora.regularizers(cfg, z, z_teacher, None, step, total_steps, generator)
    return task, reg, len(z), terms


def accumulate(net, teacher, micro_batches, cfg, step, total_steps, amp, seed=0, dist=runtime.Dist(), micro0=0):
    # Forward + backward of one optimizer step (the harness around micro_batch_loss); .grad then holds the
    # gradient of the step's loss. Each micro-batch's loss is weighted by its share of the step's examples, so the
    # summed gradients are those of the mean over the whole batch: --grad-accum changes memory, not the update
    # (the batch statistics, covariance and σ, are per micro-batch). Under torchrun `micro_batches` are this
    # rank's share (micro0: the index of its first in the step); DDP averages the ranks' gradients, so each loss
    # is also scaled by the world size. Returns the step's means {task, term: value} over all ranks' examples.
    n_total = int(runtime.all_sum({"n": sum(len(b["labels"]) for b in micro_batches)}, dist)["n"])
    sums = {}
    for j, batch in enumerate(micro_batches):
        torch.manual_seed(runtime.step_seed(seed, step, micro0 + j))  # dropout: the same masks on any layout
        with runtime.sync_gradients(net, last=j == len(micro_batches) - 1):
            task, reg, n, terms = micro_batch_loss(net, teacher, batch, cfg, step, total_steps, amp)
            w = n / n_total
            values = {"task": task.item(), **{k: v.item() for k, v in terms.items()}}
            bad = [f"{k} {v}" for k, v in values.items() if not math.isfinite(v)]
            if bad:
                raise runtime.NonFiniteLoss(f"step {step + 1}: non-finite {', '.join(bad)} (micro-batch {j})")
            ((task + reg) * (w * dist.world)).backward()
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + w * v
    return runtime.all_sum(sums, dist)


# -------------------------------------------------------------------------------------------------------------
# Optimiser and schedule


def make_optimizer(net, args):
    adapters = [p for n, p in net.named_parameters() if n.endswith(("lora_A", "lora_B"))]
    head = list(net.head.named_parameters())
    groups = [{"params": adapters, "weight_decay": 0.0},  # decay would pull the PiSSA adapters (the
                                                          # principal components of W) towards 0
              {"params": [p for n, p in head if p.ndim >= 2], "weight_decay": args.weight_decay},
              {"params": [p for n, p in head if p.ndim < 2], "weight_decay": 0.0}]
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert trainable == {id(p) for g in groups for p in g["params"]}, "trainable != adapters + head"
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8)


def lr_at(step, total, warmup, peak):
    # step: 0-based update index. Warm-up peak·(step+1)/warmup, so the very first update already has lr > 0
    # (peak·step/warmup would waste it), reaching peak at step warmup-1; then linear decay to peak/(total-warmup)
    # at the last update. A pure function of step: resuming needs no scheduler object.
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (total - step) / max(total - warmup, 1)


# -------------------------------------------------------------------------------------------------------------
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


@torch.no_grad()
def evaluate(net, examples, args, info):
    # Sorted by length so each batch pads little; the order does not change any metric.
    was_training = net.training
    net.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    zs, loss = [], 0.0
    for i in range(0, len(order), args.eval_batch_size):
        b = to_device(data.collate_classification([examples[j] for j in order[i:i + args.eval_batch_size]],
                                                  info["pad_id"]), args.device)
        with runtime.autocast(args.device, args.dtype):
            z = logits_of(net, b).float()
        loss += task_loss(z, b["labels"]).item() * len(z)
        zs.append(z.cpu())
    net.train(was_training)
    z = torch.cat(zs)[torch.argsort(torch.tensor(order))].numpy()      # back to the data order
    y = [e["label"] for e in examples]
    m = regression_metrics(z, y) if args.regression else \
        classification_metrics(z, y, info["label_names"], info["minority"])
    return {"loss": loss / len(examples), **m}


def summary(m):
    if "pearson" in m:
        return f"pearson {m['pearson']:.4f} spearman {m['spearman']:.4f} mse {m['mse']:.4f}"
    f = lambda x: "n/a" if x is None else f"{x:.4f}"
    return (f"acc {f(m['accuracy'])} macro-F1 {f(m['macro_f1'])} MCC {f(m['mcc'])} "
            f"minority({m['minority_class']}) recall {f(m['minority_recall'])} silhouette {f(m['silhouette_cosine'])}")


# -------------------------------------------------------------------------------------------------------------
# The run


def prepare_data(args):
    # -> (tokenised splits, label info, training class counts); every data error before the model is loaded
    splits = load_splits(args)
    model_dir = args.model
    arch, mcfg = modeling.read_config(model_dir)
    if arch == "llama":
        raise runtime.InputError(f"{model_dir}: a {arch} decoder; train_nlu.py fine-tunes BERT / DeBERTa encoders "
                                  f"(train_nlg.py takes decoders)")
    tok = modeling.load_tokenizer(model_dir)
    if tok.get_vocab_size() > mcfg.vocab_size:
        raise runtime.InputError(f"{model_dir}: tokenizer.json has {tok.get_vocab_size()} tokens, the model's "
                                  f"embedding table {mcfg.vocab_size}: they do not belong together")
    encoded = {s: (data.encode_classification(tok, d, args.max_len)[0] if d is not None else None)
               for s, d in splits.items()}
    for i, e in enumerate(encoded["train"]):
        e["idx"] = i  # the teacher cache's key
    names = splits["train"].label_names
    num_labels = 1 if args.regression else len(names)
    counts = None if args.regression else data.class_counts(splits["train"].labels, num_labels)
    info = {"label_names": names, "num_labels": num_labels, "pad_id": 0,  # any valid id: padded keys are masked
            "minority": None if args.regression else int(np.argmin(counts)), "counts": counts}
    return encoded, info


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


def resume_state(args, out, net, opt, cache, inputs):
    # the state to continue from; every setting must equal the checkpoint's but those a resume may change, and
    # every input file its fingerprint
    state = runtime.checkpoint_state(out, "train_nlu.py", args, RESUME_MAY_CHANGE, inputs)
    for key in ("epoch", "batch", "validation", "train_seconds", "examples"):
        if key not in state:
            raise runtime.InputError(f"{out / runtime.CHECKPOINT}: not a train_nlu.py checkpoint (no {key!r})")
    extra = runtime.load_checkpoint(out, net, opt, state["step"])
    if cache is not None:
        cache.load(extra, args.device, out / runtime.CHECKPOINT)
    state["args"] = dict(vars(args))
    print(f"resume: {out / runtime.CHECKPOINT} at step {state['step']} (epoch {state['epoch']}, batch {state['batch']})")
    return state


def train(net, opt, cfg, encoded, info, args, state, total, warmup, log, cache, dist=runtime.Dist()):
    # the epochs from the state's position on; validation and a checkpoint at each epoch end (rank 0 alone
    # evaluates and writes under torchrun). Returns the training seconds, or None when --stop-after stopped it.
    out, train_set = Path(args.out), encoded["train"]
    student = runtime.data_parallel(net, dist)  # the training forward; `net` itself for the rest
    teacher = lambda batch: teacher_logits(net, batch, cache)  # the unwrapped model: no gradient, no DDP
    amp = runtime.autocast(args.device, args.dtype)
    collate = lambda e: to_device({**data.collate_classification(e, info["pad_id"]),
                                   "idx": torch.tensor([x["idx"] for x in e])}, args.device)
    net.train()
    step = state["step"]
    t_start, step_at_start, seconds_before = time.time(), step, state["train_seconds"]
    last_saved = step if args.resume else -1

    def checkpoint(epoch, batch):
        nonlocal last_saved
        state.update(step=step, epoch=epoch, batch=batch, train_seconds=seconds_before + time.time() - t_start)
        if dist.main:
            runtime.save_checkpoint(out, net, opt, state, cache.tensors() if cache else None)
        last_saved = step

    try:
        for epoch in range(state["epoch"], args.epochs):
            if step >= total:
                break
            skip = state["batch"] if epoch == state["epoch"] else 0
            for i, examples in enumerate(data.batches(train_set, args.batch_size, list, seed=args.seed, epoch=epoch)):
                if i < skip:
                    continue
                if step >= total:
                    break
                t0 = time.time()
                micro = data.micro_batches(data.shard(examples, dist.rank, dist.world), args.grad_accum, collate)
                lr = lr_at(step, total, warmup, args.lr)
                for g in opt.param_groups:
                    g["lr"] = lr
                opt.zero_grad(set_to_none=True)
                try:
                    terms = accumulate(student, teacher, micro, cfg, step, total, amp, args.seed, dist,
                                       dist.rank * args.grad_accum)
                    norm = torch.nn.utils.clip_grad_norm_(
                        [p for g in opt.param_groups for p in g["params"]], args.clip if args.clip > 0 else math.inf)
                    if not torch.isfinite(norm):
                        raise runtime.NonFiniteLoss(f"step {step + 1}: the gradient norm is non-finite ({norm.item()})")
                except runtime.NonFiniteLoss as e:
                    kept = f"the last checkpoint (step {last_saved})" if last_saved >= 0 else "no checkpoint yet"
                    msg = f"{e}; stopping without applying it. Kept: {out / 'log.jsonl'} and {kept} in {out}"
                    log({"event": "non-finite", "step": step + 1, "message": msg})
                    raise runtime.NonFiniteLoss(msg) from None
                opt.step()
                lambdas = cfg.lambdas(step, total)
                step += 1
                state["examples"] += len(examples)
                tokens = int(runtime.all_sum({"n": sum(int(b["attention_mask"].sum()) for b in micro)}, dist)["n"])
                dt, elapsed = time.time() - t0, time.time() - t_start
                eta = elapsed / (step - step_at_start) * (total - step)
                log({"step": step, "epoch": epoch, "lr": lr, "grad_norm": norm.item(), **terms,
                     **{f"lambda{i + 1}": x for i, x in enumerate(lambdas)}, "examples_per_s": len(examples) / dt,
                     "tokens_per_s": tokens / dt, "elapsed_s": seconds_before + elapsed, "eta_s": eta})
                if step % args.log_every == 0 or step == total:
                    print(runtime.step_line(step, total, terms, lambdas, lr, norm.item(), len(examples), tokens, dt,
                                            seconds_before + elapsed, eta), flush=True)
                if args.stop_after and step == args.stop_after and step < total:
                    checkpoint(epoch, i + 1)
                    print(f"stop: --stop-after {args.stop_after} reached; continue with --resume --out {out}")
                    return None
                if args.save_every and step % args.save_every == 0 and step < total:
                    checkpoint(epoch, i + 1)
            # epoch end (or budget reached): validation, then a checkpoint that starts the next epoch
            if dist.main:
                m = evaluate(net, encoded["validation"], args, info)
                state["validation"].append({"epoch": epoch, "step": step, **m})
                log({"event": "validation", "epoch": epoch, "step": step, **m})
                print(f"validation (epoch {epoch}, step {step}): {summary(m)}", flush=True)
            checkpoint(epoch + 1, 0)
    except KeyboardInterrupt:  # Ctrl-C: one line naming the step and the checkpoint a --resume continues from
        raise runtime.Interrupted(step, out) from None
    return state["train_seconds"] if step == step_at_start else seconds_before + time.time() - t_start


def finish(net, encoded, info, args, run, state, train_seconds, log):
    # test metrics (or the last validation's), the adapter + head, metrics.json; a non-finite evaluation fails
    out = Path(args.out)
    runtime.check_finite_metrics(state["validation"][-1], "validation")
    if encoded["test"] is not None:
        test = evaluate(net, encoded["test"], args, info)
        print(f"test: {summary(test)}", flush=True)
        log({"event": "test", "step": state["step"], **test})
        runtime.check_finite_metrics(test, "test")
    else:  # GLUE-style: no labelled test set, the last validation (at the final weights) is the result
        test = None
        print("test: no --test-file; the final metrics are the last validation's")
    form = balora.save_adapter(net, out / "adapter", modules_to_save=HEAD)  # see balora.save_adapter for the form
    counts = info["counts"]
    metrics = {**run, "steps": state["step"], "examples_seen": state["examples"], "train_seconds": train_seconds,
               "examples_per_s": state["examples"] / max(train_seconds, 1e-9),
               "train_class_counts": None if counts is None else dict(zip(info["label_names"], counts)),
               "validation": state["validation"], "test": test, "args": state["args"]}
    runtime.write_json(out / "metrics.json", metrics)
    print(f"done: {state['step']} steps, {runtime.fmt_time(train_seconds)} training; adapter ({form} form) + head in "
          f"{out / 'adapter'} (PeftModel.from_pretrained(base, {str(out / 'adapter')!r})), metrics in "
          f"{out / 'metrics.json'}")
    return metrics


def main(argv=None):
    args = parse_args(argv)
    dist = runtime.setup(args, assets.minilm_dir)  # threads, device, torchrun, dtype, args.model
    out = runtime.run_dir(args, dist, "nlu")
    inputs = runtime.fingerprints(input_files(args))
    encoded, info = prepare_data(args)
    cfg = reg_config(args, info["num_labels"])
    torch.manual_seed(args.seed)  # head init and LoRA init; a resumed run rebuilds the same, then loads
    net = build_model(args, info["num_labels"])
    opt = make_optimizer(net, args)
    steps_per_epoch = math.ceil(len(encoded["train"]) / args.batch_size)
    total = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)
    warmup = max(1, round(args.warmup_ratio * total))
    runtime.check_world(len(encoded["train"]), args.batch_size, args.grad_accum, dist.world, total)
    config = dict(vars(args))
    run = {"method": args.method, "init": args.init, "config": dataclasses.asdict(cfg),
           "total_steps": total, "machine": runtime.machine(args.device, args.dtype)}
    cache = TeacherCache(len(encoded["train"])) if cfg.lambda1 > 0 and args.teacher_cache else None
    state = {"script": "train_nlu.py", "step": 0, "epoch": 0, "batch": 0, "validation": [], "args": config,
             "train_seconds": 0.0, "examples": 0, "inputs": inputs}
    if args.resume:
        state = resume_state(args, out, net, opt, cache, inputs)
    log_file = runtime.open_log(out, state["step"], args.resume, dist.main)
    try:
        def log(record):  # rank 0's log.jsonl
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

        desc = (f"{args.method} (init {args.init}; λ1/λ2/λ3 {cfg.lambda1}/{cfg.lambda2}/{cfg.lambda3}, k={cfg.svd_k}, "
                f"T={cfg.temperature}, {cfg.consistency}/{cfg.diversity}/{cfg.svd})")
        print(f"train: {desc}; {len(encoded['train'])} examples, {total} steps of {args.batch_size} "
              f"({args.grad_accum} micro-batches{f' in each of {dist.world} processes' if dist.world > 1 else ''}), "
              f"{steps_per_epoch} steps/epoch, warm-up {warmup}, "
              f"lr {args.lr}, {args.dtype} on {args.device}, out {out}; {run['machine']}")
        if not args.resume:
            log({"event": "start", "method": desc, "warmup": warmup, **run, "args": config})
        train_seconds = train(net, opt, cfg, encoded, info, args, state, total, warmup, log, cache, dist)
        if train_seconds is None or not dist.main:
            return None
        return finish(net, encoded, info, args, run, state, train_seconds, log)
    finally:
        log_file.close()
        runtime.unlock_run_dir(out)


if __name__ == "__main__":
    runtime.cli(main, __file__)
