"""How far actors may run ahead of their learner (``actor.max_ahead``): 64 iterations (this
branch's first default) vs one training phase (``0``, the default now), 1 learner + 1 actor on
CartPole-v1 (configs/cartpole.toml, 20,000 env steps, no evaluation, seed 99: not one of the
learning seeds), interleaved repeats, each run under ``flock /tmp/hpcdqn-cpu.lock``. Records
the learner's wall time, env steps/s and the shares of wall time the learner waited for data
and the actor waited for the learner; median and spread per setting.

    python benchmarks/actors_band.py [--repeats 3] [--out FILE]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"max_ahead=64": ["actor.max_ahead=64"], "max_ahead=0 (one phase)": ["actor.max_ahead=0"]}


def run(extra: list[str], out: Path) -> dict:
    cmd = ["flock", "/tmp/hpcdqn-cpu.lock", "mpirun", "-n", "2", "--oversubscribe", "--bind-to",
           "none", sys.executable, "-m", "hpcdqn.cli", "train", "--config",
           str(ROOT / "configs/cartpole.toml"), "actors=1", "seed=99", "total_steps=20000",
           "eval.episodes=0", f"run_dir={out}", "overwrite=true", "log.progress=false",
           "log.tensorboard=false", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMPI_ALLOW_RUN_AS_ROOT": "1",
           "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    load = Path("/proc/loadavg").read_text().split()[:3]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=True)
    s = json.loads(r.stdout.strip().splitlines()[-1])
    learner, actor = s["ranks"][0], s["ranks"][1]
    return {"wall_s": s["wall_s"], "sps": s["sps"], "loadavg": load,
            "learner_wait_data_share": round(learner["wait_data_s"] / s["wall_s"], 4),
            "actor_wait_share": round(actor["wait_s"] / actor["wall_s"], 4)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/actors_band.json"))
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="hpcdqn-actors-band-"))
    runs = {k: [] for k in SETTINGS}
    for i in range(a.repeats):                   # interleaved: one of each per round
        for name, extra in SETTINGS.items():
            runs[name].append(run(extra, tmp / f"r{i}"))
            print(name, json.dumps(runs[name][-1]), flush=True)
    stats = {name: {k: {"median": statistics.median(x[k] for x in rs),
                        "min": min(x[k] for x in rs), "max": max(x[k] for x in rs)}
                    for k in ("wall_s", "sps", "learner_wait_data_share", "actor_wait_share")}
             for name, rs in runs.items()}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    res = {"benchmark": "actors_band", "commit": commit, "cpus": os.cpu_count(),
           "repeats": a.repeats, "stats": stats, "runs": runs}
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
