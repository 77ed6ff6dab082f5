"""PNG plots of a run's metrics (matplotlib, headless)."""

from __future__ import annotations

import csv
from pathlib import Path


def plot_learning_curve(run_dir: Path, out: Path | None = None) -> Path | None:
    run_dir = Path(run_dir)
    path = run_dir / "metrics.csv"
    if not path.exists():
        return None
    rows = list(csv.DictReader(open(path)))
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def col(name):
        out = []
        for r in rows:
            try:
                out.append(float(r[name]))
            except (KeyError, ValueError):
                out.append(float("nan"))
        return out

    x = col("env_steps")
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5))
    for ax, (name, label) in zip(axes.flat, [("episodic_return", "episodic return"),
                                             ("loss", "TD loss"), ("mean_q", "mean Q"),
                                             ("sps", "env steps / s")]):
        ax.plot(x, col(name), lw=1.5)
        ax.set_title(label)
        ax.set_xlabel("env steps")
        ax.grid(alpha=0.3)
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    out = Path(out) if out else run_dir / "learning_curve.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
