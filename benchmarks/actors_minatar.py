"""Learning on an image task per env step: MinAtar Breakout with actor ranks (1 learner + 1 actor,
``mpirun -n 2 ... actors=1``) against sync data parallelism (``mpirun -n 2``, dp=2), the same
replay ratio (8 sampled transitions per env step: batch 32 per 4 env steps), the same number of
env steps, the same seeds.

The config is the one the MinAtar CI learning test uses (tests/rl/test_minatar.py:
configs/minatar_breakout.toml with dqn.train_frequency=4, dqn.exploration_steps=20000,
dqn.learning_starts=2000; faster than the paper's protocol of one update per frame), a short
window of ``--steps`` env steps. Seeds 21 and 22 were chosen before any run (not the test's
seed 1, not the tuning seeds 12-14); seeds 23 and 24 were added after those two had run (time
allowed), into a second results file; every seed run is reported. Each run under
``flock /tmp/hpcdqn-cpu.lock`` (one thread per rank, seeded: the returns do not depend on load).

Recorded per run: the training return curve per env step (metrics.csv: mean return of the
episodes that ended in each log window), the mean training return of the final 100 episodes
and a greedy evaluation of 30 episodes at the end.

    python benchmarks/actors_minatar.py [--seeds 21,22] [--steps 80000] [--out FILE] [--figure PNG]
"""

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "minatar_breakout.toml")
CI = ["dqn.train_frequency=4", "dqn.exploration_steps=20000", "dqn.learning_starts=2000",
      "eval.episodes=30", "checkpoint_every=0", "log.every=5000", "log.progress=false",
      "log.tensorboard=false"]
SIDES = {"actors_1_1": ["actors=1"], "sync_dp2": []}


def final_return(rows: list[dict], at_least: int = 100) -> float | None:
    """Mean training return over the newest metrics rows holding >= ``at_least`` episodes."""
    prev = [0] + [int(r["episodes"]) for r in rows[:-1]]
    total = n = 0.0
    for r, p in zip(reversed(rows), reversed(prev)):
        k = int(r["episodes"]) - p
        if k > 0 and r["episodic_return"] not in ("", "nan"):
            total += float(r["episodic_return"]) * k
            n += k
        if n >= at_least:
            return total / n
    return None


def run(side: str, seed: int, steps: int, run_dir: Path) -> dict:
    cmd = ["flock", "/tmp/hpcdqn-cpu.lock", "mpirun", "-n", "2", "--bind-to", "none",
           sys.executable, "-m", "hpcdqn.cli", "train", "--config", CONFIG, *CI, *SIDES[side],
           f"seed={seed}", f"total_steps={steps}", f"run_dir={run_dir}", "overwrite=true"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMPI_ALLOW_RUN_AS_ROOT": "1",
           "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMPI_MCA_rmaps_base_oversubscribe": "1"}
    load0 = Path("/proc/loadavg").read_text().strip()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    if r.returncode:
        raise RuntimeError(f"{side} seed {seed}: exit {r.returncode}\n{r.stderr[-3000:]}")
    s = json.loads(r.stdout.strip().splitlines()[-1])
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    curve = [[int(x["env_steps"]), int(x["episodes"]),
              None if x["episodic_return"] in ("", "nan") else round(float(x["episodic_return"]), 4)]
             for x in rows]
    return {"side": side, "seed": seed, "env_steps": s["env_steps"], "updates": s["updates"],
            "replay_ratio": s["schedule"]["replay_ratio"], "wall_s": s["wall_s"],
            "final100_train_return": final_return(rows), "eval_return_mean": s["eval_return_mean"],
            "eval_return_std": s["eval_return_std"], "eval_episodes": s["eval_episodes"],
            "curve_env_steps_episodes_return": curve,
            "loadavg_before_after": [load0, Path("/proc/loadavg").read_text().strip()]}


def figure(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.6))
    styles = ["-", "--", ":", "-."]
    for r in res["runs"]:
        pts = [(x, y) for x, _, y in r["curve_env_steps_episodes_return"] if y is not None]
        ax.plot(*zip(*pts), color="C0" if r["side"] == "actors_1_1" else "C1",
                ls=styles[res["seeds"].index(r["seed"]) % 4], label=f"{r['side']} seed {r['seed']}")
    ax.set_xlabel("env steps")
    ax.set_ylabel("training return (episodes per log window)")
    ax.set_title("MinAtar Breakout: 1 learner + 1 actor vs sync dp=2, replay ratio 8")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="21,22")
    ap.add_argument("--steps", type=int, default=80000)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/actors_minatar.json"))
    ap.add_argument("--figure", default="")
    ap.add_argument("--plot-only", default="", help="comma-separated results files: one figure of all their runs")
    a = ap.parse_args()
    if a.plot_only:
        parts = [json.loads(Path(f).read_text()) for f in a.plot_only.split(",")]
        figure({"seeds": [x for p in parts for x in p["seeds"]],
                "runs": [r for p in parts for r in p["runs"]]}, a.figure)
        return
    seeds = [int(x) for x in a.seeds.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="hpcdqn-actors-minatar-"))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    res = {"benchmark": "actors_minatar", "commit": commit, "config": "configs/minatar_breakout.toml",
           "overrides": CI, "steps": a.steps, "seeds": seeds, "runs": []}
    for seed in seeds:                       # interleaved: both sides per seed
        for side in SIDES:
            res["runs"].append(run(side, seed, a.steps, tmp / f"{side}_{seed}"))
            x = res["runs"][-1]
            print(side, seed, x["final100_train_return"], x["eval_return_mean"], x["wall_s"], flush=True)
            res["summary"] = {
                side: {k: {"values": [r[k] for r in res["runs"] if r["side"] == side],
                           "mean": statistics.mean([r[k] for r in res["runs"] if r["side"] == side
                                                    and r[k] is not None] or [float("nan")])}
                       for k in ("final100_train_return", "eval_return_mean")}
                for side in SIDES if any(r["side"] == side for r in res["runs"])}
            Path(a.out).write_text(json.dumps(res, indent=1) + "\n")    # after every run
    if a.figure:
        figure(res, a.figure)


if __name__ == "__main__":
    main()
