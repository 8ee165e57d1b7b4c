"""Plot an RPO run (arXiv 2605.08354, §3.3): its training and evaluation curves from metrics.jsonl, as one PNG.

    python -m tools.plot RUN_DIR              # writes RUN_DIR/metrics.png (train.py also does, at the end of a run,
                                              # when matplotlib is installed)
    python -m tools.plot RUN_DIR --out x.png

Panels (a curve is drawn when the run logged it):
    win rate          eval_win_rate with its Wilson 95% band (eval_win_rate_lo .. _hi), the training judge's
                      eval_train_judge_win_rate (an independent eval judge), judge_check_accuracy (drift alarm)
    reward            reward_mean of the kept candidates
    ties and failures tie_rate, judge_failure_rate, eval_tie_rate, eval_failure_rate
    KL                kl (to the reference), approx_kl (to the rollout policy, M x E > 1)
    judge wait        time_judge_wait, time_rollout, time_update (seconds per window)
The curves' names are the legend entries and are written into the PNG's text chunk "curves", so a script (and the
test) can tell what a picture shows without reading pixels.

matplotlib is optional (pip install matplotlib); it is imported only here.

Run: the commands above; `python -m pytest tests/test_plot.py` checks it.

Deliberate deviations (ours; the paper and the official code plot nothing)
    1. One PNG of stacked panels sharing the step axis, not a dashboard: it is written where the metrics are and
       travels with the run folder.
"""
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import cli


@dataclass(frozen=True)
class Panel:
    title: str
    curves: tuple          # metric names, each a line when present
    band: tuple = ()       # (curve, low, high): a shaded interval around that curve


PANELS = (
    Panel("win rate (eval, Wilson 95%)", ("eval_win_rate", "eval_train_judge_win_rate", "judge_check_accuracy"),
          ("eval_win_rate", "eval_win_rate_lo", "eval_win_rate_hi")),
    Panel("reward", ("reward_mean",)),
    Panel("ties and failures", ("tie_rate", "judge_failure_rate", "eval_tie_rate", "eval_failure_rate")),
    Panel("KL", ("kl", "approx_kl")),
    Panel("judge wait (s per window)", ("time_judge_wait", "time_rollout", "time_update")),
)


def read_metrics(path):
    """The records of a metrics.jsonl (the provenance line and blank lines left out); ValueError naming the line."""
    records = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not a JSON line ({e.msg})") from None
        if "provenance" not in record:
            records.append(record)
    return records


def series(records, name):
    """(steps, values) of one metric over the records that carry a number for it."""
    points = [(r["step"], r[name]) for r in records if isinstance(r.get(name), (int, float))]
    return [s for s, _ in points], [v for _, v in points]


def plot_run(run_dir, out=None):
    """Draw every panel with a curve into one PNG (default RUN_DIR/metrics.png). Returns (path, {panel title:
    [curve names drawn]})."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from None
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    drawn = {p.title: [c for c in p.curves if series(records, c)[0]] for p in PANELS}
    panels = [p for p in PANELS if drawn[p.title]]
    if not panels:
        raise ValueError(f"{run_dir / 'metrics.jsonl'}: no metric to plot yet")
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.4 * len(panels)), sharex=True, squeeze=False)
    for ax, panel in zip(axes[:, 0], panels):
        for name in drawn[panel.title]:
            steps, values = series(records, name)
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=name)
        if panel.band and panel.band[0] in drawn[panel.title]:
            band = [r for r in records if all(isinstance(r.get(k), (int, float)) for k in panel.band)]
            ax.fill_between([r["step"] for r in band], [r[panel.band[1]] for r in band],
                            [r[panel.band[2]] for r in band], alpha=0.25, label=f"{panel.band[0]} 95% band")
        ax.set_title(panel.title, fontsize=10)
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step (rollout windows)")
    fig.suptitle(f"{run_dir.name}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # room for the run name above the panels
    path = Path(out) if out else run_dir / "metrics.png"
    curves = [name for p in panels for name in drawn[p.title]]
    fig.savefig(path, dpi=100, metadata={"curves": ",".join(curves), "Title": f"RPO run {run_dir.name}"})
    plt.close(fig)
    return path, {p.title: drawn[p.title] for p in panels}


def main(argv=None):
    parser = cli._Parser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a train.py output_dir (it holds metrics.jsonl)")
    parser.add_argument("--out", default=None, help="the PNG to write; default RUN_DIR/metrics.png")
    try:
        args = parser.parse_args(argv)
        path, drawn = plot_run(args.run_dir, args.out)
    except (cli.ConfigError, ValueError, ImportError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{path}: " + "; ".join(f"{title}: {', '.join(names)}" for title, names in drawn.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
