# experiments/bench.py: speed and memory of one LoRA / PiSSA / BA-LoRA training step (forward + backward + AdamW) on the
# default model (SmolLM2-135M-Instruct), one fixed batch of 4 x 256 real tokens (NYT editorial text), rank 64
# on all seven projections, 2 threads; fp32 and bf16 autocast; BA-LoRA's extra time split into the teacher
# forward and the regularisers (+ their backward); peak RSS per method in a fresh subprocess; PiSSA init time
# (exact SVD and randomized, niter 4); transformers + peft as the peer when installed. Paper Sec. 3.3 / 4.1.
# Run: `python experiments/bench.py` (about 15 min on 2 cores; --no-peer/--no-init/--no-mem to skip parts); --scaling (the
# regularisers against M and V), --model 1b (a 1B-shaped random LLaMA). Prints a table, writes bench.json.

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project, one level up

import balora
import data
import model as modellib
import train_nlg
from plumbing import assets, devices, parallel

BATCH, SEQ, RANK, THREADS, REPEATS, WARMUP = 4, 256, 64, 2, 5, 1
GRAD_CHECKPOINT = False  # --grad-checkpoint (with --seq 1024: the peak memory activation checkpointing saves)
STEP, TOTAL = 50, 100  # timed at mid-training: λ1 (cosine) > 0 and λ2, λ3 past the two-phase ramp, all terms on
METHODS = {"lora": "lora", "pissa": "pissa_niter_4", "balora": "pissa_niter_4"}  # method -> adapter init
TARGETS = train_nlg.TARGETS.split(",")


def amp(dtype):
    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()


def fixed_batch(model_dir):
    # 4 windows of 256 consecutive NYT tokens; every token is a target, so the regularisers see M = 4 x 255 rows
    if model_dir == "1b":  # random tokens for the random model
        ids = torch.randint(3, 32000, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    else:
        tok = modellib.load_tokenizer(model_dir)
        ids = data.text_windows(tok, "\n".join(data.nyt_sentences(assets.vader_dir())), SEQ)[:BATCH]
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def build(model_dir, method, rank):
    net = llama_1b() if model_dir == "1b" else modellib.from_pretrained(model_dir)
    torch.manual_seed(0)
    balora.inject(net, TARGETS, rank, rank, METHODS[method])
    net.train().grad_checkpoint = GRAD_CHECKPOINT
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-6)
    cfg = balora.BALoRAConfig.nlg(**({} if method == "balora" else dict(lambda1=0.0, lambda2=0.0, lambda3=0.0)))
    return net, opt, cfg


def step_fn(net, opt, cfg, batch, dtype, after_forward=None):
    teacher = lambda b, rows: train_nlg.teacher_logits(net, b, rows, amp(dtype))

    def step():  # exactly train_nlg.py's optimizer step
        if after_forward is None:
            train_nlg.accumulate(net, teacher, [batch], cfg, STEP, TOTAL, amp(dtype))
        else:  # the same step with after_forward() between its forward and its backward: accumulate's one
            # micro-batch (its generator, its loss), through train_nlg's public micro_batch_loss
            gen = torch.Generator(batch["input_ids"].device).manual_seed(parallel.step_seed(0, STEP, 0))
            task, reg, n, _ = train_nlg.micro_batch_loss(net, teacher, batch, cfg, STEP, TOTAL, amp(dtype), gen)
            after_forward()
            ((task + n * reg) / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def balora_parts(net, cfg, batch, dtype):
    # the two things BA-LoRA adds to a PiSSA step, timed alone: the teacher forward (with its LM head, as if it
    # made its M×V logits at once; in training the KL makes them chunk by chunk from the teacher's hidden states,
    # the same matmul), and the regularisers' forward + backward down to the logits (the model backward is
    # shared with the task loss)
    ids = batch["input_ids"]
    rows = train_nlg.targets(batch["labels"]) != data.IGNORE_INDEX  # as train_nlg.micro_batch_loss
    with torch.no_grad(), amp(dtype):
        z = net(ids, rows=rows).float()
    with balora.teacher(net), amp(dtype):
        zt = net(ids, rows=rows).float()
    z.requires_grad_(True)
    gen = torch.Generator().manual_seed(0)

    def teacher():
        with balora.teacher(net), amp(dtype):
            net(ids, rows=rows)

    def regs():
        z.grad = None
        total, _ = balora.regularizers(cfg, z, zt, None, STEP, TOTAL, gen)
        total.backward()
    return teacher, regs


class Passes:
    # Counts the passes over M×V memory that the ops inside make: every tensor an op reads or writes that lives in
    # a storage of M·V elements or more (logits, teacher logits, gradient buffer) adds its elements, except when one
    # of the last few ops touched the same block of <= 16 MB (still in cache); a scatter adds the entries it names.
    # The sum over M·V is the passes. An estimate of memory traffic, not a hardware count.
    def __init__(self, M, V, window=6):
        from torch.utils._python_dispatch import TorchDispatchMode
        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if func.is_view or func.__name__.startswith(("detach", "empty")):  # no memory touched
                    return out
                flat = [*args, *(kwargs or {}).values(), *(out if isinstance(out, (tuple, list)) else [out])]
                if func.__name__.startswith("scatter"):  # it touches only the entries its index names
                    counter.elements += args[2].numel()
                    return out
                for t in flat:
                    if torch.is_tensor(t) and t.untyped_storage().nbytes() >= M * V * t.element_size():
                        key = (t.untyped_storage().data_ptr(), t.data_ptr(), t.numel())
                        # a block of <= 16 MB that one of the last ops touched is still in cache
                        if key not in counter.recent or t.numel() * t.element_size() > 16 << 20:
                            counter.elements += t.numel()
                        counter.recent = (counter.recent + [key])[-window:]
                return out
        self.mode, self.elements, self.recent, self.MV = Mode(), 0, [], M * V

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)

    @property
    def passes(self):
        return self.elements / self.MV


def term_split(net, batch, dtype, repeats):
    # --profile: each regulariser alone (forward + backward), fused (the fast path, balora.fused_terms) and as
    # written (regularizers(plain=True)), on this batch's real logits: the KL with the teacher's logits made from
    # its hidden states inside the sweep (as in training, so its time includes the teacher's output layer), the
    # top-K entropy, the range finder (streamed / textbook), the SVD term; seconds (median) and passes over M×V
    # (Passes). The energy ratio for a given Q, which no public function computes alone, is derived: the fused SVD
    # term less its range finder.
    ids = batch["input_ids"]
    rows = train_nlg.targets(batch["labels"]) != data.IGNORE_INDEX
    with torch.no_grad(), amp(dtype):
        z0 = net(ids, rows=rows).float()
    teacher = train_nlg.teacher_logits(net, batch, rows, amp(dtype))
    M, V = z0.shape
    base = balora.BALoRAConfig.nlg(lambda1_schedule="constant", focus_schedule="constant")
    only = lambda i: dataclasses.replace(base, **{f"lambda{j}": (base.lambda1, base.lambda2, base.lambda3)[j - 1]
                                                   * (j == i) for j in (1, 2, 3)})
    q = base.svd_k + balora.OVERSAMPLE  # svd_nlg's q

    z = z0.clone().requires_grad_(True)

    def fused(cfg):  # the fast path itself (balora.fused_terms), at any V: Σ λ_i L_i as regularizers sums it
        lambdas = cfg.lambdas(0, 1)

        def run():
            z.grad = None
            terms = balora.fused_terms(cfg, z, teacher, None, lambdas, torch.Generator().manual_seed(0))
            total = torch.zeros(())
            for name, lam in zip(("consistency", "diversity", "svd"), lambdas):
                if name in terms:
                    total = total + lam * terms[name]
            total.backward()
        return run

    def plain(cfg):  # every term as written (Part 2)
        def run():
            z.grad = None
            gen = torch.Generator().manual_seed(0)
            balora.regularizers(cfg, z, teacher, None, 0, 1, gen, plain=True)[0].backward()
        return run

    def finder(fn):
        return lambda: fn(z0, q, balora.POWER_ITERATIONS, torch.Generator().manual_seed(0))
    parts = {"KL (incl. teacher output layer)": (fused(only(1)), plain(only(1))),
             "top-K entropy": (fused(only(2)), plain(only(2))),
             "range finder": (finder(balora.range_finder_streamed), finder(balora.range_finder)),
             "SVD term (range finder + energy ratio)": (fused(only(3)), plain(only(3))),
             "all three": (fused(base), plain(base))}
    out = {}
    for name, fns in parts.items():
        for form, fn in zip(("fused", "plain"), fns):
            s = timed({name: fn}, repeats, 1)[0][name]
            with Passes(M, V) as p:
                fn()
            out[f"{name}, {form}"] = {"s": s, "passes": p.passes}
            print(f"bench: {dtype} {name}, {form}: {s * 1e3:.0f} ms, {p.passes:.1f} passes over M×V (M={M}, V={V})",
                  flush=True)
    svd, rf = out["SVD term (range finder + energy ratio), fused"], out["range finder, fused"]
    energy = {"s": svd["s"] - rf["s"], "passes": svd["passes"] - rf["passes"],
              "derived": "SVD term, fused - range finder, fused"}
    print(f"bench: {dtype} energy ratio (given Q), fused: {energy['s'] * 1e3:.0f} ms, {energy['passes']:.1f} passes "
          f"over M×V (derived: the fused SVD term less its range finder)", flush=True)
    order = list(out)  # the energy ratio listed after the range finder, as the SVD term adds it to it
    order.insert(order.index("range finder, plain") + 1, "energy ratio (given Q), fused")
    out["energy ratio (given Q), fused"] = energy
    return {k: out[k] for k in order}


def scaling(threads, repeats):
    # the regularisers' forward + backward on random logits against M (target tokens) and V (vocabulary), with
    # the teacher given as logits (no LM head in the time): how the cost grows, and its constant
    cfg, out = balora.BALoRAConfig.nlg(focus_schedule="constant"), {}
    for M, V in [(256, 49152), (1024, 49152), (2048, 49152), (4096, 49152), (1024, 32000), (1024, 128256)]:
        g = torch.Generator().manual_seed(0)
        z0 = torch.randn(M, V, generator=g) * 3
        zt = z0 + torch.randn(M, V, generator=g)

        def run():
            z = z0.clone().requires_grad_(True)
            balora.regularizers(cfg, z, zt, None, STEP, TOTAL, torch.Generator().manual_seed(0))[0].backward()
        run()
        t = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            t.append(time.perf_counter() - t0)
        out[f"{M}x{V}"] = min(t)
        print(f"bench: regularisers M={M} V={V}: {min(t):.3f} s ({min(t) / (M * V) * 1e9:.2f} ns per logit)", flush=True)
    return out


def llama_1b():
    # a 1B-shaped random LLaMA (TinyLlama's shape: hidden 2048, 22 layers, 32 heads / 4 KV, FFN 5632, V 32 000),
    # no weights needed: the BA-LoRA / PiSSA step ratio where the paper's users live
    cfg = modellib.LlamaConfig(vocab_size=32000, n_layer=22, n_head=32, n_kv_head=4, n_embd=2048, head_dim=64,
                               intermediate_size=5632, eos_token_id=2)
    torch.manual_seed(0)
    net = modellib.Llama(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.02)
    return net

def timed(fns, repeats, warmup):
    # round-robin over the functions, so that load on a shared machine hits them alike; median per function
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}, {k: min(v) for k, v in times.items()}, times


# ---- the peer: transformers + peft on the same batch ---------------------------------------------------------

def peft_model(model_dir, rank, init):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM
    base = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    t = time.perf_counter()
    pm = get_peft_model(base, LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, lora_dropout=0.0,
                                         init_lora_weights=init))
    return pm, time.perf_counter() - t


def peft_step_fn(pm, batch, dtype):
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-6)
    pm.train()

    def step():
        with amp(dtype):
            loss = pm(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


# ---- peak memory: one fresh process per method ---------------------------------------------------------------

def child(method, dtype, model_dir, rank):
    # load, inject, two optimizer steps; report the process's peak resident set size, and for our methods the
    # resident set at the end of each step's forward (where a step's memory stands before its backward)
    batch, after_forward = fixed_batch(model_dir), []
    if method == "peft-pissa":
        pm, _ = peft_model(model_dir, rank, "pissa_niter_4")
        step = peft_step_fn(pm, batch, dtype)
    else:  # the resident set that train_nlg's forward leaves, taken before the backward
        step = step_fn(*build(model_dir, method, rank), batch, dtype,
                       after_forward=lambda: after_forward.append(rss_self_mb("VmRSS")))
    for _ in range(2):
        step()
    print(json.dumps({"peak_rss_mb": rss_self_mb(), "rss_after_forward_mb": after_forward}))


def rss_self_mb(field="VmHWM"):
    # VmHWM: this process's own peak RSS (VmRSS: the current one). (ru_maxrss is no good here: Linux carries
    # the parent's value over fork + exec, so every child would report the benchmark process's peak.)
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith(field + ":")) / 1024
    except (OSError, StopIteration):  # no /proc: the peak alone, from getrusage
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if field == "VmHWM" else float("nan")


def peak_rss(method, dtype, model_dir, rank, threads):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", method, "--dtypes", dtype, "--model", model_dir,
           "--rank", str(rank), "--threads", str(threads), "--seq", str(SEQ)] + \
        (["--grad-checkpoint"] if GRAD_CHECKPOINT else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory subprocess for {method}/{dtype} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def main(argv=None):
    global SEQ, GRAD_CHECKPOINT  # the fixed batch's length and checkpointing, as flags (also for the children)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", help="HF model directory (default: the converted SmolLM2-135M-Instruct), or '1b' for "
                   "a 1B-shaped random LLaMA (implies --no-peer --no-init --no-mem)")
    p.add_argument("--scaling", action="store_true", help="only time the regularisers against M and V (random logits)")
    p.add_argument("--seq", type=int, default=SEQ, help="tokens per sequence of the fixed batch of 4")
    p.add_argument("--grad-checkpoint", action="store_true", help="activation checkpointing per block")
    p.add_argument("--rank", type=int, default=RANK)
    p.add_argument("--threads", type=int, default=THREADS)
    p.add_argument("--repeats", type=int, default=REPEATS)
    p.add_argument("--warmup", type=int, default=WARMUP)
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16, auto (plumbing/devices.resolve_dtype); "
                   "each is timed and marked native or not on this machine")
    p.add_argument("--no-peer", action="store_true", help="skip transformers + peft")
    p.add_argument("--no-init", action="store_true", help="skip the PiSSA init timings")
    p.add_argument("--no-mem", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--profile", action="store_true", help="time each regulariser alone, fused and as written, with "
                   "its passes over M×V, and print a torch.profiler table of the regularisers")
    p.add_argument("--out", default="bench.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    SEQ, GRAD_CHECKPOINT = args.seq, args.grad_checkpoint
    torch.set_num_threads(args.threads)
    if args.scaling:
        res = {"machine": devices.machine("cpu", "fp32", args.threads), "scaling_s": scaling(args.threads, args.repeats)}
        balora.write_json(args.out, res)
        return res
    model_dir = "1b" if args.model == "1b" else str(args.model or train_nlg.default_model_dir())
    if model_dir == "1b":
        args.no_peer = args.no_init = args.no_mem = True
    dtypes = list(dict.fromkeys(devices.resolve_dtype(d, "cpu")[0] for d in args.dtypes.split(",")))
    if args.child:
        return child(args.child, dtypes[0], model_dir, args.rank)
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
        peer = not args.no_peer
    except ImportError:
        peer = False
    res = {}
    if not args.no_mem:  # first, before this process loads any model
        res["peak_rss_mb"] = {dt: {m: peak_rss(m, dt, model_dir, args.rank, args.threads)
                                   for m in ["lora", "pissa", "balora"] + (["peft-pissa"] if peer else [])}
                              for dt in dtypes}
    batch = fixed_batch(model_dir)
    native = {"fp32": True, "bf16": devices.cpu_bf16_native()[0]}
    res |= {"batch": [BATCH, SEQ], "rank": args.rank, "repeats": args.repeats, "grad_checkpoint": GRAD_CHECKPOINT,
           "machine": devices.machine("cpu", ",".join(dtypes), args.threads),
           "dtype_native": {dt: native[dt] for dt in dtypes}, "steps_s": {}, "min_s": {}, "all_s": {},
           "loadavg_start": os.getloadavg()}  # a shared machine: the ratios come from interleaved rounds

    nets = {m: build(model_dir, m, args.rank) for m in ("lora", "pissa")}
    nets["balora"] = (nets["pissa"][0], torch.optim.AdamW([p for p in nets["pissa"][0].parameters()
                                                           if p.requires_grad], lr=1e-6), balora.BALoRAConfig.nlg())
    pm = peft_model(model_dir, args.rank, "pissa_niter_4")[0] if peer else None
    for dt in dtypes:
        fns = {m: step_fn(*nets[m], batch, dt) for m in ("lora", "pissa", "balora")}
        fns["teacher_forward"], fns["regularisers"] = balora_parts(nets["balora"][0], nets["balora"][2], batch, dt)
        if peer:
            fns["peft_pissa"] = peft_step_fn(pm, batch, dt)
        print(f"bench: timing {dt} ({args.warmup} warm-up + {args.repeats} rounds of {list(fns)})", flush=True)
        res["steps_s"][dt], res["min_s"][dt], res["all_s"][dt] = timed(fns, args.repeats, args.warmup)
        print(f"bench: {dt} medians: " + ", ".join(f"{k} {v:.2f} s" for k, v in res["steps_s"][dt].items()), flush=True)
        if args.profile:
            res.setdefault("split", {})[dt] = term_split(nets["balora"][0], batch, dt, args.repeats)
            from torch.profiler import profile
            with profile() as prof:
                fns["regularisers"]()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    del nets, pm, fns

    if not args.no_init:  # 210 layers at rank 64, one fresh model each
        res["init_s"] = {}
        for init in ("pissa", "pissa_niter_4"):
            net = modellib.from_pretrained(model_dir)
            t = time.perf_counter()
            res["layers"] = balora.inject(net, TARGETS, args.rank, args.rank, init)
            res["init_s"][init] = time.perf_counter() - t
            if peer:
                res["init_s"]["peft_" + init] = peft_model(model_dir, args.rank, init)[1]
            print(f"bench: init {init}: " + ", ".join(f"{k} {v:.1f} s" for k, v in res["init_s"].items()
                                                     if k.endswith(init)), flush=True)
    res["loadavg_end"] = os.getloadavg()
    report(res)
    balora.write_json(args.out, res)
    print(f"bench: wrote {args.out}")
    return res


def report(res):
    rows = ["lora", "pissa", "balora", "teacher_forward", "regularisers", "peft_pissa"]
    dtypes = list(res["steps_s"])
    m = res["machine"]
    print(f"\nbench: {m['cpu']} ({m['cpu_capability']}), {m['threads']} threads, torch {m['torch']}; "
          + ", ".join(f"{dt} {'native' if res['dtype_native'][dt] else 'NOT native (emulated, slow)'}" for dt in dtypes))
    head = "| step | " + " | ".join(f"{dt} median s | x pissa | {dt} min s | x pissa" for dt in dtypes)
    mem = "peak_rss_mb" in res
    head += " | " + " | ".join(f"peak RSS {dt} MB | x pissa" for dt in dtypes) if mem else ""
    print("\n" + head + " |\n" + "|---" * (1 + 4 * len(dtypes) + (2 * len(dtypes) if mem else 0)) + "|")
    for r in rows:
        if r not in res["steps_s"][dtypes[0]]:
            continue
        cells = []
        for dt in dtypes:
            for s in (res["steps_s"][dt], res["min_s"][dt]):
                cells += [f"{s[r]:.2f}", f"{s[r] / s['pissa']:.2f}"]
        if mem:
            for dt in dtypes:
                m = res["peak_rss_mb"][dt]
                key = r.replace("_", "-")
                cells += [f"{m[key]:.0f}", f"{m[key] / m['pissa']:.2f}"] if key in m else ["", ""]
        print(f"| {r} | " + " | ".join(cells) + " |")
    if "init_s" in res:
        print(f"\n| PiSSA init, {res['layers']} layers, r = {res['rank']} | ours s | peft s |\n|---|---|---|")
        for init in ("pissa", "pissa_niter_4"):
            peer = res["init_s"].get("peft_" + init)
            print(f"| {init} | {res['init_s'][init]:.1f} | {'' if peer is None else f'{peer:.1f}'} |")


if __name__ == "__main__":
    main()
