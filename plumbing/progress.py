# plumbing/progress.py: what a training script prints while it trains: the one line per optimizer step (the same
# in both scripts) and times as h:mm:ss. Both training scripts import it; it imports nothing from the project.


def step_line(step, total, terms, lambdas, lr, grad_norm, examples, tokens, seconds, elapsed, eta):
    # the one line per optimizer step, the same in both scripts: task loss, each regulariser, λ, lr, gradient
    # norm, throughput, time
    regs = " ".join(f"{k} {terms[k]:+.4f}" for k in ("consistency", "diversity", "svd") if k in terms)
    return (f"step {step}/{total} | task {terms['task']:.4f} | {regs or 'no regularisers'} | "
            f"λ {'/'.join(f'{x:.3g}' for x in lambdas)} | lr {lr:.2e} | |g| {grad_norm:.3f} | "
            f"{examples / seconds:.1f} ex/s, {tokens / seconds:.0f} tok/s | {fmt_time(elapsed)} elapsed, "
            f"ETA {fmt_time(eta)}")


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"

