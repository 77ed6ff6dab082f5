"""Learning with actor ranks: CartPole-v1 (configs/cartpole.toml, not tuned for this) with
1 learner + 1 actor and 1 learner + 3 actors (``actors=N``, asynchronous mode), seeds chosen
before any run, every seed reported: the final greedy evaluation (the config's 100 episodes).

    python benchmarks/actors_cartpole.py [--seeds 1-5] [--layouts 1,3] [--out FILE]

One run at a time (``mpirun -n 1+N``, oversubscribed where the cores are fewer), each under
``flock /tmp/hpcdqn-cpu.lock`` (timed runs on a shared machine take turns); writes
``benchmarks/results/actors_cartpole.json`` with the commit, the load average before and after
each run and every seed's figures.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commit() -> str:
    r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "hpcdqn"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return r.stdout.strip() + ("+dirty" if dirty else "")


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def run(actors: int, seed: int, out: Path, overrides: list[str]) -> dict:
    cmd = ["flock", "/tmp/hpcdqn-cpu.lock", "mpirun", "-n", str(1 + actors), "--oversubscribe", "--bind-to", "none",
           sys.executable, "-m", "hpcdqn.cli", "train", "--config", str(ROOT / "configs/cartpole.toml"),
           f"actors={actors}", f"seed={seed}", f"run_dir={out / f'a{actors}_s{seed}'}",
           "log.progress=false", "log.tensorboard=false", *overrides]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMPI_ALLOW_RUN_AS_ROOT": "1",
           "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    before, t = loadavg(), time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    row = {"actors": actors, "learners": 1, "seed": seed, "loadavg_before": before,
           "loadavg_after": loadavg(), "job_s": round(time.perf_counter() - t, 1)}
    if r.returncode:
        return {**row, "error": r.stderr[-2000:], "returncode": r.returncode}
    s = json.loads(r.stdout.strip().splitlines()[-1])
    ranks = s["ranks"]
    return {**row, "eval_return_mean": s["eval_return_mean"], "eval_return_std": s["eval_return_std"],
            "eval_episodes": s["eval_episodes"], "env_steps": s["env_steps"], "updates": s["updates"],
            "wall_s": s["wall_s"], "sps": s["sps"],
            "replay_ratio_achieved": s["replay_ratio_achieved"],
            "replay_ratio_configured": s["replay_ratio_configured"],
            "ranks": ranks}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="1-5")
    ap.add_argument("--layouts", default="1,3", help="actor counts (one learner each)")
    ap.add_argument("--threshold", type=float, default=475.0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/actors_cartpole.json"))
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    lo, hi = (int(x) for x in (a.seeds.split("-") * 2)[:2])
    seeds, layouts = list(range(lo, hi + 1)), [int(x) for x in a.layouts.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="hpcdqn-actors-"))
    rows = []
    for actors in layouts:
        for seed in seeds:
            rows.append(run(actors, seed, tmp, a.overrides))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "ranks"}), flush=True)
    summary = {f"1 learner + {n} actor{'s' * (n > 1)}": {
        "returns": [r.get("eval_return_mean") for r in rows if r["actors"] == n],
        "reached": sum(r.get("eval_return_mean", -1) >= a.threshold for r in rows if r["actors"] == n),
        "of": len(seeds)} for n in layouts}
    res = {"benchmark": "actors_cartpole", "config": "configs/cartpole.toml", "overrides": a.overrides,
           "mode": "asynchronous (actor.lockstep=false), defaults of [actor]",
           "seeds": seeds, "seeds_chosen_before_runs": True, "threshold": a.threshold,
           "commit": commit(), "cpus": os.cpu_count(), "summary": summary, "runs": rows}
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
