"""Weak scaling of data parallelism: same per-rank work at 1 and 2 ranks (or --ranks).

    python benchmarks/scaling.py [--ranks 1,2] [--steps-per-rank 20000] [--repeats 2] [KEY=VALUE ...]

Each point runs ``mpirun -n N hpcdqn train total_steps=N*S`` (default CartPole config, no eval,
one thread per rank, checkpoints off) and reads its JSON summary. Prints JSON: env-steps/s,
synchronized updates/s, samples/s (updates/s x dp x batch), the time split (median shares of the
wall time: compute, allreduce transfer, waiting for the slowest replica, pipeline bubble, other)
and the speedup over 1 rank (ideal = N), also to ``benchmarks/results/scaling.json``.
``hpcdqn scale`` is the full study (sweep, model, plots).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run(n, steps, overrides, out):
    from hpcdqn.cluster.scale import child_env

    env = child_env()
    cmd = ["mpirun", "-n", str(n), "--oversubscribe", "--bind-to", "core" if n <= os.cpu_count() else "none",
           sys.executable, "-m", "hpcdqn.cli", "train", f"total_steps={steps}", f"run_dir={out}",
           "eval.episodes=0", "log.progress=false", "log.tensorboard=false", "threads=1",
           "checkpoint=false", *overrides]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if r.returncode:
        raise SystemExit(r.stderr[-4000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--steps-per-rank", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    from hpcdqn.config import load_config

    batch = load_config(overrides=a.overrides)["dqn"]["batch_size"]
    tmp = tempfile.mkdtemp(prefix="hpcdqn-scaling-")
    points = []
    for n in [int(x) for x in a.ranks.split(",")]:
        reps = [run(n, n * a.steps_per_rank, a.overrides, f"{tmp}/n{n}_r{i}") for i in range(a.repeats)]
        med = {k: statistics.median(r[k] for r in reps) for k in ("sps", "ups")}
        split = {k: statistics.median(r["time_split"]["shares"][k] for r in reps)
                 for k in reps[0]["time_split"]["shares"]}
        points.append({"ranks": n, "dp": reps[0]["dp"], "env_steps": reps[0]["env_steps"],
                       "env_steps_per_s": med["sps"], "updates_per_s": med["ups"],
                       "samples_per_s": med["ups"] * reps[0]["dp"] * batch,
                       "allreduce_share": split["allreduce"], "time_split_shares": split,
                       "repeats": [{"sps": r["sps"], "ups": r["ups"]} for r in reps]})
    base = points[0]
    for p in points:
        p["speedup_env_steps"] = round(p["env_steps_per_s"] / base["env_steps_per_s"], 3)
        p["speedup_samples"] = round(p["samples_per_s"] / base["samples_per_s"], 3)
        p["efficiency"] = round(p["speedup_env_steps"] * base["ranks"] / p["ranks"], 3)
    out = {"benchmark": "scaling", "mode": "weak", "steps_per_rank": a.steps_per_rank,
           "cpus": os.cpu_count(), "overrides": a.overrides, "points": points}
    path = Path(__file__).resolve().parent / "results" / "scaling.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
