"""A functional run with many actor ranks: 1 learner + N actors (default 15; oversubscribed on
a small machine) on CartPole-v1 (configs/cartpole.toml, shortened), asynchronous mode. Records
whether it completes, each actor's env steps per second of its wall time and how that time
split (env, inference, send, wait), and the learner's split (receive/insert, wait for data,
sample, update): ingestion overhead = receive/insert share of the learner's wall time. A
functional figure on shared cores, not a speed claim.

    python benchmarks/actors_wide.py [--actors 15] [--total-steps 30000] [--out FILE]
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--actors", type=int, default=15)
    ap.add_argument("--total-steps", type=int, default=30000)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/actors_wide.json"))
    a = ap.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="hpcdqn-actors-wide-"))
    cmd = ["flock", "/tmp/hpcdqn-cpu.lock", "mpirun", "-n", str(1 + a.actors), "--oversubscribe",
           "--bind-to", "none", sys.executable, "-m", "hpcdqn.cli", "train", "--config",
           str(ROOT / "configs/cartpole.toml"), f"actors={a.actors}", f"total_steps={a.total_steps}",
           f"run_dir={run_dir}", "eval.episodes=10", "log.progress=false", "log.tensorboard=false"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMPI_ALLOW_RUN_AS_ROOT": "1",
           "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    before, t = Path("/proc/loadavg").read_text().split()[:3], time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    res = {"benchmark": "actors_wide", "command": " ".join(cmd[2:]), "returncode": r.returncode,
           "job_s": round(time.perf_counter() - t, 1), "cpus": os.cpu_count(),
           "loadavg_before": before, "loadavg_after": Path("/proc/loadavg").read_text().split()[:3],
           "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                    text=True).stdout.strip()}
    if r.returncode:
        res["error"] = r.stderr[-3000:]
    else:
        s = json.loads(r.stdout.strip().splitlines()[-1])
        learner = next(x for x in s["ranks"] if x["role"] == "learner")
        actors = [x for x in s["ranks"] if x["role"] == "actor"]
        wall = s["wall_s"]
        res.update({
            "env_steps": s["env_steps"], "updates": s["updates"], "wall_s": wall, "sps": s["sps"],
            "eval_return_mean": s["eval_return_mean"],
            "per_actor_env_steps_per_s": [round(x["env_steps"] / x["wall_s"], 1) for x in actors],
            "actor_shares": {k: round(sum(x[k] for x in actors) / sum(x["wall_s"] for x in actors), 4)
                             for k in ("env_s", "inference_s", "send_s", "wait_s")},
            "learner_shares": {k: round(learner[k] / wall, 4) for k in
                               ("receive_insert_s", "wait_data_s", "sample_s", "update_s")},
            "ranks": s["ranks"]})
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "ranks"}))


if __name__ == "__main__":
    main()
