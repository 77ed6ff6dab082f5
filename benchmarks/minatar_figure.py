"""Learning curves of MinAtar runs from a results file (``curve``: [env_steps, episodes,
mean training return of the episodes since the previous row] per run) into a PNG.

    python benchmarks/minatar_figure.py [--results benchmarks/results/minatar_ci_tuning.json]
                                        [--out docs/minatar_breakout_short.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "minatar_ci_tuning.json"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "minatar_breakout_short.png"))
    ap.add_argument("--random", type=float, default=0.5, help="a uniform random policy's return")
    a = ap.parse_args()
    res = json.loads(Path(a.results).read_text())
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for run in res["runs"]:
        xs = [c[0] for c in run["curve"]]
        ys = [c[2] for c in run["curve"]]
        ax.plot(xs, ys, marker=".", label=f"seed {run['seed']} (greedy eval at end "
                                           f"{run['eval_return_mean_30_greedy']:.1f})")
    ax.axhline(a.random, color="grey", ls="--", lw=1, label="uniform random (~0.5)")
    ax.set_xlabel("frames (env steps)")
    ax.set_ylabel("mean training episode return per log row")
    ax.set_title("MinAtar Breakout, update every 4 frames (CI variant)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=110)
    print(a.out)


if __name__ == "__main__":
    main()
