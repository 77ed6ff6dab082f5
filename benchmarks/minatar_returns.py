"""MinAtar returns at the end of training (the paper's protocol, ``configs/minatar_<game>.toml``)
over seeds, with learning curves against the published DQN level.

    python benchmarks/minatar_returns.py [--games breakout,asterix,space_invaders] [--seeds 1,2,3]
        [--frames 5000000] [--ranks 1] [--chunk 500000] [--lock FILE] [--runs runs/minatar]
        [--collect-only] [--out benchmarks/results/minatar_returns.json]
        [--figure docs/minatar_returns.png] [KEY=VALUE ...]

Each (game, seed) trains in ``RUNS/<game>_s<seed>`` in chunks of ``--chunk`` frames: the first
chunk with ``stop_after``, each later one with ``hpcdqn train --resume`` (exact: a resumed run
ends bit for bit as an uninterrupted one), each chunk optionally under ``flock FILE`` so that no
locked job holds the machine for long. A run already finished is only collected; an interrupted
one continues from its newest checkpoint. ``--ranks P`` runs each under ``mpirun -n P``.

Reported per run: the mean training return of the final 100 episodes (the paper's measure; the
newest metrics rows holding >= 100 episodes), the final greedy evaluation (100 episodes), the
training wall-clock (``wall_s`` of the last chunk: the run's clock carries over on resume);
per game: mean, min and max over seeds, against the published DQN level (MinAtar paper,
read from its figures: Breakout ~10, Asterix ~17, Space Invaders ~44; the bars: 9.5, 15, 40).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = {"breakout": 10.0, "asterix": 17.0, "space_invaders": 44.0}
BAR = {"breakout": 9.5, "asterix": 15.0, "space_invaders": 40.0}


def final_episodes_return(rows: list[dict], at_least: int = 100) -> float | None:
    """Mean training return over the newest metrics rows holding >= ``at_least`` episodes."""
    total = n = 0.0
    prev = [0] + [int(r["episodes"]) for r in rows[:-1]]
    for r, before in zip(reversed(rows), reversed(prev)):
        k = int(r["episodes"]) - before
        if k > 0:
            total, n = total + k * float(r["episodic_return"]), n + k
        if n >= at_least:
            break
    return total / n if n else None


def run_chunks(game: str, seed: int, a, extra: list[str]) -> Path:
    run = Path(a.runs) / f"{game}_s{seed}"
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", PYTHONPATH=str(ROOT))
    launch = ["mpirun", "-n", str(a.ranks)] if a.ranks > 1 else []
    base = [*launch, sys.executable, "-m", "hpcdqn.cli", "train"]
    while not (run / "summary.json").exists() or \
            json.loads((run / "summary.json").read_text()).get("env_steps", 0) < a.frames:
        done = 0
        if (run / "checkpoints" / "latest").exists():
            done = int((run / "checkpoints" / "latest").read_text().strip()[5:17])
        stop = min(a.frames, done + a.chunk)
        stop_arg = [f"stop_after={stop}"] if stop < a.frames else ["stop_after=0"]
        if done:
            cmd = [*base, "--resume", str(run), *stop_arg]
        else:
            cmd = [*base, "--config", str(ROOT / "configs" / f"minatar_{game}.toml"),
                   f"seed={seed}", f"total_steps={a.frames}", f"run_dir={run}", "threads=1",
                   "log.progress=false", "overwrite=true", *stop_arg, *extra]
        if a.lock:
            cmd = ["flock", a.lock, *cmd]
        print(" ".join(cmd), file=sys.stderr, flush=True)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"{game} seed {seed}: {r.stderr[-3000:]}")
        if stop >= a.frames:
            break
    return run


def collect(game: str, seed: int, run: Path) -> dict:
    s = json.loads((run / "summary.json").read_text())
    with open(run / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {"game": game, "seed": seed, "env_steps": s["env_steps"], "wall_s": s["wall_s"],
            "dp": s.get("dp"), "pp": s.get("pp"),
            "final_100_training_return": final_episodes_return(rows),
            "eval_return_mean": s.get("eval_return_mean"), "eval_episodes": s.get("eval_episodes"),
            "curve": [[int(r["env_steps"]), float(r["episodic_return"])] for r in rows]}


def figure(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    games = sorted({r["game"] for r in results})
    fig, axes = plt.subplots(1, len(games), figsize=(4.2 * len(games), 3.4), squeeze=False)
    for ax, g in zip(axes[0], games):
        runs = [r for r in results if r["game"] == g]
        xs = [c[0] for c in runs[0]["curve"]]
        ys = np.array([[c[1] for c in r["curve"][:len(xs)]] for r in runs if len(r["curve"]) >= len(xs)])
        ax.plot(xs, ys.mean(0), label=f"hpcdqn, mean of {len(ys)} seeds")
        ax.fill_between(xs, ys.min(0), ys.max(0), alpha=0.25, label="min-max over seeds")
        if g in PUBLISHED:
            ax.axhline(PUBLISHED[g], color="k", ls="--", lw=1, label="MinAtar paper DQN")
        ax.set_title(g)
        ax.set_xlabel("frames")
        ax.set_ylabel("training episode return")
        ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--games", default="breakout,asterix,space_invaders")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--frames", type=int, default=5_000_000)
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=500_000, help="frames per (locked) chunk")
    ap.add_argument("--lock", help="run each chunk under `flock LOCK`")
    ap.add_argument("--runs", default=str(ROOT / "runs" / "minatar"))
    ap.add_argument("--collect-only", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "minatar_returns.json"))
    ap.add_argument("--figure", default=str(ROOT / "docs" / "minatar_returns.png"))
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    a = ap.parse_args()
    results = []
    for game in a.games.split(","):
        for seed in (int(s) for s in a.seeds.split(",")):
            run = Path(a.runs) / f"{game}_s{seed}" if a.collect_only else \
                run_chunks(game, seed, a, a.overrides)
            results.append(collect(game, seed, run))
    per_game = {}
    for g in sorted({r["game"] for r in results}):
        v = [r["final_100_training_return"] for r in results if r["game"] == g]
        per_game[g] = {"mean": sum(v) / len(v), "min": min(v), "max": max(v), "seeds": len(v),
                       "published": PUBLISHED.get(g), "bar": BAR.get(g),
                       "meets_bar": (sum(v) / len(v) >= BAR[g]) if g in BAR else None}
    out = {"benchmark": "minatar_returns", "frames": a.frames, "ranks": a.ranks,
           "overrides": a.overrides, "loadavg": Path("/proc/loadavg").read_text().split()[:3],
           "per_game": per_game, "runs": results}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    figure(results, a.figure)
    print(json.dumps(per_game))


if __name__ == "__main__":
    main()
