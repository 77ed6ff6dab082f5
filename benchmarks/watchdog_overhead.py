"""The cost of the stall watchdog's gates: (1) microseconds per gate on 2 ranks, against an
``MPI_Barrier`` on the same communicator; (2) updates/s of the default CartPole run at dp=2 with
the watchdog on (``watchdog.deadline_s=0``, the default: a gate before every gradient sync,
checkpoint and eval) against off (``watchdog.deadline_s=-1``: no gates), interleaved pairs.

    python benchmarks/watchdog_overhead.py [--pairs 3] [--gates 5000]

JSON (every run, medians, min/max, the median paired ratio, the commit and the load average
before each run) to ``benchmarks/results/watchdog_overhead.json`` and stdout."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
OUT = HERE / "benchmarks" / "results" / "watchdog_overhead.json"

MICRO = r"""
import json, sys, time
from mpi4py import MPI
from hpcdqn.parallel import watchdog
comm = MPI.COMM_WORLD
n = int(sys.argv[1])
dog = watchdog.Watchdog(comm, {"default": 60.0})
out = {}
for rep in range(3):
    for name in ("gate", "barrier"):
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(n):
            if name == "gate":
                dog.gate("gradient sync")
                dog.done()
            else:
                comm.Barrier()
        dt = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
        out.setdefault(name, []).append(round(dt / n * 1e6, 2))
dog.stop()
if comm.Get_rank() == 0:
    print(json.dumps(out))
"""


def micro(gates: int) -> dict:
    from hpcdqn.cluster.scale import child_env, launch_cmd

    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(MICRO)
    env = {**child_env(), "PYTHONPATH": str(HERE)}
    r = subprocess.run(launch_cmd(2, "mpirun") + [sys.executable, f.name, str(gates)], cwd=HERE,
                       env=env, capture_output=True, text=True, timeout=600)
    os.unlink(f.name)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    us = json.loads(r.stdout.strip().splitlines()[-1])
    return {"us_per_gate": us["gate"], "us_per_barrier": us["barrier"],
            "median_us_per_gate": statistics.median(us["gate"]),
            "median_us_per_barrier": statistics.median(us["barrier"])}


def train(deadline: str, run_dir: str) -> dict:
    from hpcdqn.cluster.scale import child_env, launch_cmd

    load = os.getloadavg()[0]
    env = {**child_env(), "PYTHONPATH": str(HERE)}
    cmd = launch_cmd(2, "mpirun") + [sys.executable, "-m", "hpcdqn.cli", "train",
                                     f"run_dir={run_dir}", "log.progress=false",
                                     "log.tensorboard=false", "eval.episodes=0",
                                     "checkpoint=false", "threads=1",
                                     f"watchdog.deadline_s={deadline}"]
    r = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=900)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    s = json.loads((Path(run_dir) / "summary.json").read_text())
    return {"ups": s["ups"], "sps": s["sps"], "loadavg_1m_before": round(load, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--gates", type=int, default=5000)
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()
    commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    load0 = os.getloadavg()
    m = micro(a.gates)
    print("micro", m, file=sys.stderr, flush=True)
    tmp = tempfile.mkdtemp(prefix="hpcdqn-wd-")
    runs = {"off": [], "on": []}
    for i in range(a.pairs):
        order = (("off", "-1"), ("on", "0")) if i % 2 == 0 else (("on", "0"), ("off", "-1"))
        for side, deadline in order:
            runs[side].append(train(deadline, f"{tmp}/{side}{i}"))
            print(side, i, runs[side][-1], file=sys.stderr, flush=True)
    ups = {k: [r["ups"] for r in v] for k, v in runs.items()}
    paired = [on["ups"] / off["ups"] for on, off in zip(runs["on"], runs["off"])]
    out = {"benchmark": "watchdog_overhead", "commit": commit, "cores": os.cpu_count(),
           "loadavg_before_micro": [round(x, 2) for x in load0], "micro_2_ranks": m,
           "run": "default CartPole config, dp=2, 1 thread per rank, checkpoints off",
           "median_updates_per_s": {k: statistics.median(v) for k, v in ups.items()},
           "min_max_updates_per_s": {k: [min(v), max(v)] for k, v in ups.items()},
           "paired_ratios_on_over_off": [round(x, 4) for x in paired],
           "median_paired_ratio": round(statistics.median(paired), 4), "runs": runs}
    Path(a.out).parent.mkdir(exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}))


if __name__ == "__main__":
    main()
