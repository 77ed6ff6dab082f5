"""Pipeline benchmark: updates/s of pp=1 vs pp=2, bubble fraction, parameter bytes per rank.

    python benchmarks/pipeline.py [--micro 1,2,4,8,16] [--schedule 1f1b] [--updates 3] [--warmup 1]

Network 512 -> 4096 x 4 -> 18 (obs dim 512, 18 actions, ``network.hidden=[4096]*4``), batch 512,
double DQN, one torch thread per rank. The default balanced partition cuts inside the third
Linear layer by output rows (26.2M parameters per stage); ``--layer-boundaries`` measures the best
cut at layer boundaries instead (18.9M vs 33.6M parameters, which caps pp=2 at 1.56x). For each configuration the driver launches
``mpirun -n PP python benchmarks/pipeline.py --worker ...`` and prints one JSON object:

- ``pp1``: the unpartitioned ``DataParallelLearner`` (micro-batching does not apply to it);
- ``pp2[M]``: ``PipelineLearner`` with ``M`` micro-batches: updates/s, speedup over pp=1, and per
  stage the measured bubble = time blocked in Recv during the forward/backward schedule / that
  schedule's wall time (``bubble_step`` divides all waiting by the whole update instead), next to
  the textbook theory ``(P-1)/(M+P-1)`` for equal stages (``bubble_theory``) and to
  ``bubble_sim``: the same quantity for this implementation's exact op order by event simulation
  (``hpcdqn.parallel.pipeline.bubble_simulated``: unit-cost forwards passed on one by one, backward = 2
  forwards). Each micro-batch runs three forwards (online on obs, target and online on next_obs),
  and each is sent on as soon as it is done, so stages overlap more than the textbook's one fused
  forward and the bubble is *below* ``(P-1)/(M+P-1)`` for small M;
  ``max_abs_bubble_minus_sim`` / ``max_abs_bubble_minus_theory`` give the largest per-stage gaps;
- parameter bytes (online + target + Adam moments) per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(a) -> None:
    import numpy as np
    import torch
    from mpi4py import MPI

    from hpcdqn.config import load_config
    from hpcdqn.parallel.grid import RankGrid
    from hpcdqn.parallel.memory import keep_freed_memory
    from hpcdqn.rl.networks import build_layers
    from hpcdqn.parallel.pipeline import bubble_simulated, bubble_theory
    from hpcdqn.rl.replay import Batch
    from hpcdqn.learner import build_learner

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    keep_freed_memory()          # as ``hpcdqn train`` does (hpcdqn/memory.py), for pp=1 and pp=2
    comm = MPI.COMM_WORLD
    grid = RankGrid(comm, a.pp)
    B, obs_dim, n_actions, hidden = a.batch, 512, 18, [4096] * 4
    cfg = load_config(overrides={"pp": a.pp, "micro_batches": a.micro, "schedule": a.schedule,
                                 "dqn.batch_size": B, "network.hidden": hidden,
                                 "network.split_layers": not a.layer_boundaries})
    layers = build_layers((obs_dim,), n_actions, hidden, seed=1)
    learner = build_learner(grid, layers, cfg, "cpu")
    del layers
    batch = None
    if grid.is_first_stage:
        rng = np.random.default_rng(0)
        batch = Batch(rng.standard_normal((B, obs_dim)).astype(np.float32),
                      rng.integers(0, n_actions, B),
                      rng.standard_normal(B).astype(np.float32),
                      rng.standard_normal((B, obs_dim)).astype(np.float32),
                      np.full(B, 0.99, np.float32), np.ones(B, np.float32), np.arange(B))
    for _ in range(a.warmup):
        learner.update(batch)
    if a.pp > 1:
        learner.reset_timings()
    comm.Barrier()
    t0 = time.perf_counter()
    for _ in range(a.updates):
        learner.update(batch)
    comm.Barrier()
    wall = time.perf_counter() - t0
    if a.pp > 1:
        t = learner.timings()
        mine = np.array([t["schedule_wait_s"] / max(t["schedule_s"], 1e-12),
                         t["wait_s"] / max(t["update_s"], 1e-12), t["schedule_s"] / a.updates,
                         t["update_s"] / a.updates, learner.parameter_bytes()], dtype=np.float64)
    else:
        mine = np.array([0.0, 0.0, wall / a.updates, wall / a.updates, learner.parameter_bytes()])
    allv = np.empty((comm.Get_size(), mine.size)) if comm.Get_rank() == 0 else None
    comm.Gather(mine, allv, root=0)
    if comm.Get_rank() == 0:
        sim = bubble_simulated(a.pp, a.micro, a.schedule, forwards=3 if cfg["dqn"]["double"] else 2) \
            if a.pp > 1 else [0.0]
        stages = [{"stage": i, "holds": learner.stage_contents[i] if a.pp > 1 else "the whole network",
                   "bubble_sim": round(sim[i], 4),
                   "parameters": int(v[4]) // 16,
                   "bubble": round(float(v[0]), 4), "bubble_step": round(float(v[1]), 4),
                   "schedule_s_per_update": round(float(v[2]), 4),
                   "update_s_per_update": round(float(v[3]), 4),
                   "parameter_bytes": int(v[4])} for i, v in enumerate(allv)]
        print(json.dumps({"pp": a.pp, "micro_batches": a.micro if a.pp > 1 else None,
                          "schedule": a.schedule if a.pp > 1 else None,
                          "updates_per_s": round(a.updates / wall, 4),
                          "bubble_theory": round(bubble_theory(a.pp, a.micro), 4) if a.pp > 1 else 0.0,
                          "stages": stages}), flush=True)
    grid.free()


def launch(n: int, args: list[str], timeout: int) -> dict:
    from hpcdqn.cluster.scale import child_env

    env = child_env()
    exe = shutil.which("mpirun") or shutil.which("mpiexec")
    cmd = [exe, "-n", str(n), "--bind-to", "none", sys.executable, __file__, "--worker", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if r.returncode:
        raise SystemExit(f"{cmd} failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--micro", default="1,2,4,8,16")
    ap.add_argument("--schedule", default="1f1b", choices=["gpipe", "1f1b"])
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--updates", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--layer-boundaries", action="store_true",
                    help="cut only at layer boundaries (network.split_layers=false)")
    a = ap.parse_args()
    if a.worker:
        a.micro = int(a.micro)
        worker(a)
        return
    common = ["--schedule", a.schedule, "--batch", str(a.batch), "--updates", str(a.updates),
              "--warmup", str(a.warmup)]
    if a.layer_boundaries:
        common.append("--layer-boundaries")
    t = time.time()
    base = launch(1, ["--pp", "1", "--micro", "1", *common], a.timeout)
    rows = []
    for m in [int(x) for x in a.micro.split(",")]:
        r = launch(2, ["--pp", "2", "--micro", str(m), *common], a.timeout)
        r["speedup_vs_pp1"] = round(r["updates_per_s"] / base["updates_per_s"], 3)
        r["bubble_measured_max_stage"] = max(s["bubble"] for s in r["stages"])
        r["bubble_measured_mean"] = round(sum(s["bubble"] for s in r["stages"]) / len(r["stages"]), 4)
        r["max_abs_bubble_minus_sim"] = round(max(abs(s["bubble"] - s["bubble_sim"]) for s in r["stages"]), 4)
        r["max_abs_bubble_minus_theory"] = round(max(abs(s["bubble"] - r["bubble_theory"])
                                                     for s in r["stages"]), 4)
        rows.append(r)
    best = max(rows, key=lambda r: r["updates_per_s"])
    print(json.dumps({
        "network": "512 -> 4096 x 4 -> 18", "batch": a.batch, "threads_per_rank": 1,
        "split_layers": not a.layer_boundaries,
        "updates_measured": a.updates, "cpus": os.cpu_count(), "pp1": base, "pp2": rows,
        "best": {"micro_batches": best["micro_batches"], "speedup_vs_pp1": best["speedup_vs_pp1"]},
        "target_speedup_ge_1_5": best["speedup_vs_pp1"] >= 1.5,
        "target_bubble_within_0_1_of_sim": all(r["max_abs_bubble_minus_sim"] <= 0.1 for r in rows),
        "parameter_bytes_per_rank": {"pp1": base["stages"][0]["parameter_bytes"],
                                     "pp2": [s["parameter_bytes"] for s in rows[0]["stages"]]},
        "wall_s": round(time.time() - t, 1)}, indent=1))


if __name__ == "__main__":
    main()
