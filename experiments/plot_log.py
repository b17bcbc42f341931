# experiments/plot_log.py: a picture of what the terms do. Turns a run's log.jsonl (train_nlu.py or train_nlg.py)
# into one figure: the task loss and each regulariser (consistency, diversity, SVD) per optimizer step, each in
# its own panel (their scales differ by orders of magnitude), with the λ in force. matplotlib is needed here only.
# Run: `python experiments/plot_log.py RUN_DIR [--out FIGURE.png]` (default: RUN_DIR/terms.png).

import argparse
import json
import sys
from pathlib import Path

TERMS = ("task", "consistency", "diversity", "svd")
LAMBDA = {"consistency": "lambda1", "diversity": "lambda2", "svd": "lambda3"}


def read_steps(log):
    # the per-step records of log.jsonl (event records such as start, validation and test are skipped)
    log, rows = Path(log), []
    if not log.parent.is_dir():
        raise SystemExit(f"plot_log.py: error: {log.parent}: not a run directory")
    if not log.is_file():
        raise SystemExit(f"plot_log.py: error: {log}: not found (is {log.parent} the --out of a run?)")
    for n, line in enumerate(log.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"plot_log.py: error: {log}:{n}: not a JSON record ({e})")
        if isinstance(rec, dict) and "event" not in rec and "step" in rec:
            rows.append(rec)
    if not rows:
        raise SystemExit(f"plot_log.py: error: {log}: no step records")
    return rows


def figure_path(out, fig=None):
    # the figure's path, checked before anything is drawn: an existing directory, and a format matplotlib writes
    # (by the extension; none: PNG)
    out = Path(out)
    if not out.parent.is_dir():
        raise SystemExit(f"plot_log.py: error: --out {out}: the directory {out.parent} does not exist")
    if out.is_dir():
        raise SystemExit(f"plot_log.py: error: --out {out}: a directory; name the figure file")
    if fig is None:
        from matplotlib.figure import Figure
        fig = Figure()
    known = fig.canvas.get_supported_filetypes()
    if out.suffix and out.suffix[1:].lower() not in known:
        raise SystemExit(f"plot_log.py: error: --out {out}: unknown figure format {out.suffix!r} (one of "
                         f"{', '.join('.' + k for k in sorted(known))})")
    return out


def plot(run_dir, out=None, title=None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if out is not None:
        figure_path(out)  # before the log is read and the figure drawn
    rows = read_steps(Path(run_dir) / "log.jsonl")
    terms = [t for t in TERMS if any(t in r for r in rows)]
    fig, axes = plt.subplots(1, len(terms), figsize=(3.4 * len(terms), 2.9), squeeze=False)
    for ax, term in zip(axes[0], terms):
        steps = [r["step"] for r in rows if term in r]
        ax.plot(steps, [r[term] for r in rows if term in r], lw=1.2)
        lam = LAMBDA.get(term)
        label = f"{term} (λ {rows[-1][lam]:.3g} at the end)" if lam and lam in rows[-1] else term
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(title or str(run_dir), fontsize=9, y=1.04)
    out = figure_path(out or Path(run_dir) / "terms.png", fig)
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="plot a run's task loss and regularisers per step from its log.jsonl")
    p.add_argument("run_dir")
    p.add_argument("--out", help="figure file (default: RUN_DIR/terms.png)")
    p.add_argument("--title")
    args = p.parse_args(argv)
    try:
        print(f"plot_log: wrote {plot(args.run_dir, args.out, args.title)}")
    except OSError as e:  # e.g. a figure path that cannot be written: one line (SystemExit: exit status 1)
        raise SystemExit(f"plot_log.py: error: {e}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
