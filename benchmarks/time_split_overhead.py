"""The cost of the time split (a timed barrier before every gradient allreduce, timers around
updates): updates/s of the default CartPole run at dp=2, this tree against a checkout without it.

    git worktree add /tmp/before dc4f9f6        # the commit before the time split
    python benchmarks/time_split_overhead.py --before /tmp/before [--pairs 8]

Runs ``mpirun -n 2 --bind-to core hpcdqn train`` (default config, one thread per rank, no eval,
checkpoints off) from each tree in interleaved pairs (before, after, before, after, ...), so
load from other jobs falls on both alike. JSON (updates/s and env steps/s of every run, medians,
the median paired ratio) to ``benchmarks/results/time_split_overhead.json`` and stdout.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
OUT = HERE / "benchmarks" / "results" / "time_split_overhead.json"


def run(root: Path, run_dir: str) -> dict:
    from hpcdqn.cluster.scale import child_env, launch_cmd

    load = os.getloadavg()[0]          # > 0.5 before a run: something else is running
    env = {**child_env(), "PYTHONPATH": str(root)}
    cmd = launch_cmd(2, "mpirun") + [sys.executable, "-m", "hpcdqn.cli", "train",
                                     f"run_dir={run_dir}", "log.progress=false",
                                     "log.tensorboard=false", "eval.episodes=0",
                                     "checkpoint=false", "threads=1"]
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    s = json.loads((Path(run_dir) / "summary.json").read_text())
    return {"ups": s["ups"], "sps": s["sps"], "loadavg_1m_before": round(load, 2),
            "time_split": s.get("time_split", {}).get("shares")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", required=True, help="a checkout of the tree to compare against")
    ap.add_argument("--pairs", type=int, default=8)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="hpcdqn-overhead-")
    runs = {"before": [], "after": []}
    for i in range(a.pairs):
        for side, root in (("before", Path(a.before).resolve()), ("after", HERE)):
            runs[side].append(run(root, f"{tmp}/{side}{i}"))
            print(side, i, runs[side][-1]["ups"], file=sys.stderr, flush=True)
    med = {k: statistics.median(r["ups"] for r in v) for k, v in runs.items()}
    paired = [b["ups"] / a_["ups"] for a_, b in zip(runs["before"], runs["after"])]
    out = {"benchmark": "time_split_overhead", "run": "default CartPole config, dp=2, 1 thread per rank",
           "cores": os.cpu_count(), "loadavg_1m": os.getloadavg()[0], "before": str(a.before),
           "median_updates_per_s": med, "ratio_after_over_before": round(med["after"] / med["before"], 4),
           "median_paired_ratio": round(statistics.median(paired), 4), "runs": runs}
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(out, indent=2))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
