"""Pipeline benchmark on equal cores: pp=1 with 2 threads, dp=2 with 1 thread each and pp=2 with
1 thread each (every side uses 2 cores), on two networks; writes benchmarks/results/pipeline.json.

    python benchmarks/pipeline.py [--quick] [--out benchmarks/results/pipeline.json]

Networks (obs dim 512, 18 actions, double DQN, 1f1b schedule, stage-only construction as
``hpcdqn train`` builds them):

- ``512 -> 4096 x 4 -> 18`` (52.5M parameters, 1.05 GB of training state), batch 512;
- ``512 -> 8192 x 4 -> 18`` (205.6M parameters, 4.11 GB of training state: online, target,
  gradients, Adam's two moments), batch 64 (an update of batch 512 would take ~10 s here).

Same global batch on every side (dp=2: half the batch per replica), same update math. Per row:
updates/s (from the median of ``--updates`` timed updates, each between barriers, after
``--warmup``), its ratio to pp=1, per-rank peak RSS (VmHWM) and peak above the process baseline.
For pp=2, the bubble three ways:

- ``measured``: from the outside, per stage. After the timed pipelined updates each stage runs
  the same forwards and backwards (all micro-batches, random inputs of the right shapes) and its
  Adam step alone, with no messages: ``fb`` and ``opt`` seconds per update (the fastest
  repeat). Then
  ``bubble = 1 - fb / (wall - opt)`` (the stage's idle share of the forward/backward part of an
  update: waiting for the other stage, and the transfers) and ``idle = 1 - (fb + opt) / wall``
  (of the whole update). ``bubble_accounted``: the learner's own time accounting
  (``PipelineLearner.timings()['bubble_s']``: time blocked on the other stage inside updates,
  what ``hpcdqn train`` reports as ``bubble_share``) over the timed updates' wall time;
- ``simulated``: ``hpcdqn.parallel.pipeline.bubble_simulated`` (this implementation's op order,
  unit-cost forwards passed on one by one, backward = 2 forwards, free messages), each stage's
  idle share of its *own* window (first op to last): for stage 0 that window is the whole
  update, as for ``measured``; the last stage's window starts late, so its simulated value is
  lower than what ``measured`` (over the whole update) can show;
- ``textbook``: ``(P-1)/(M+P-1)``.

Timings on a shared machine are noisy: re-run on a quiet one before quoting them.
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
NETS = {"4096": {"hidden": [4096] * 4, "batch": 512, "micro": [2, 4, 8]},
        "8192": {"hidden": [8192] * 4, "batch": 64, "micro": [4]}}
OBS, ACTIONS = 512, 18


# -- one configuration, on its ranks ------------------------------------------------------------
def _setup(a):
    import numpy as np
    import torch
    from mpi4py import MPI

    from hpcdqn.config import load_config
    from hpcdqn.learner import build_learner
    from hpcdqn.learner.budget import process_baseline
    from hpcdqn.parallel.grid import RankGrid
    from hpcdqn.parallel.memory import keep_freed_memory, release_freed_memory
    from hpcdqn.rl.networks import meta_layers
    from hpcdqn.rl.replay import Batch

    torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)
    keep_freed_memory()          # as ``hpcdqn train`` does, on every side
    comm = MPI.COMM_WORLD
    pp = 2 if a.layout == "pp2" else 1
    grid = RankGrid(comm, pp)
    rows = a.batch // grid.dp                      # the same global batch on every side
    cfg = load_config(overrides={"pp": pp, "micro_batches": a.micro, "schedule": "1f1b",
                                 "dqn.batch_size": rows, "network.hidden": a.hidden,
                                 "threads": a.threads})
    base = process_baseline()
    layers = meta_layers((OBS,), ACTIONS, a.hidden)
    learner = build_learner(grid, layers, cfg, "cpu", seed=1)
    release_freed_memory()       # as ``hpcdqn train`` does once the learner is built
    batch = None
    if grid.is_first_stage:
        rng = np.random.default_rng(grid.dp_rank)
        batch = Batch(rng.standard_normal((rows, OBS)).astype(np.float32),
                      rng.integers(0, ACTIONS, rows), rng.standard_normal(rows).astype(np.float32),
                      rng.standard_normal((rows, OBS)).astype(np.float32),
                      np.full(rows, 0.99, np.float32), np.ones(rows, np.float32), np.arange(rows))
    return comm, grid, layers, learner, batch, rows, base


def _pure_stage(learner, layers, grid, rows: int, micro: int, updates: int) -> tuple[float, float]:
    """Seconds per update of this stage's forwards/backwards and of its Adam step, alone (no
    messages): the same shapes and ops as the pipelined update; the fastest of ``updates``."""
    import torch

    from hpcdqn.learner.budget import stage_widths
    from hpcdqn.parallel.partition import stage_modules
    from hpcdqn.parallel.pipeline import micro_splits
    from hpcdqn.rl.optim import adam_step

    shape = (OBS,)
    for s in range(grid.pp_rank + 1):
        in_shape = shape
        _, shape = stage_widths(stage_modules(layers, *learner.stages[s]), in_shape)
    gen = torch.Generator().manual_seed(5)
    x_all = torch.randn((rows, *in_shape), generator=gen)
    g_all = torch.randn((rows, *shape), generator=gen)
    fb, opt = [], []
    for _ in range(updates):
        t0 = time.perf_counter()
        learner.online.zero_grad_()
        for lo, hi in micro_splits(rows, micro):
            x = x_all[lo:hi].clone().requires_grad_(not grid.is_first_stage)
            y = learner.online(x)
            with torch.no_grad():
                learner.target(x_all[lo:hi])
                learner.online(x_all[lo:hi])          # double DQN's online forward on s'
            y.backward(g_all[lo:hi])
        t1 = time.perf_counter()
        float(torch.linalg.vector_norm(learner.online.flat.grad))    # the clip's norm
        adam_step(learner.opt)
        t2 = time.perf_counter()
        fb.append(t1 - t0)
        opt.append(t2 - t1)
    return min(fb), min(opt)        # (the least disturbed repeat: a shared machine only adds)


def worker(a) -> None:
    import numpy as np

    from hpcdqn.learner.budget import peak_rss

    comm, grid, layers, learner, batch, rows, base = _setup(a)
    for _ in range(a.warmup):
        learner.update(batch)
    if grid.pp > 1:
        learner.reset_timings()      # the learner's own time accounting counts the timed updates
    walls = []
    for _ in range(a.updates):
        comm.Barrier()
        t0 = time.perf_counter()
        learner.update(batch)
        comm.Barrier()
        walls.append(time.perf_counter() - t0)
    wall = float(np.median(walls))
    fb = opt = accounted = 0.0
    if grid.pp > 1:
        accounted = learner.timings()["bubble_s"] / max(sum(walls), 1e-12)
        comm.Barrier()
        fb, opt = _pure_stage(learner, layers, grid, rows, a.micro, a.updates)
    mine = np.array([fb, opt, base, peak_rss(), learner.online.numel, accounted], dtype=np.float64)
    allv = np.empty((comm.Get_size(), mine.size)) if comm.Get_rank() == 0 else None
    comm.Gather(mine, allv, root=0)
    if comm.Get_rank() == 0:
        ranks = [{"rank": i, "parameters": int(v[4]), "baseline_rss": int(v[2]),
                  "peak_rss": int(v[3]), "above_baseline": int(v[3] - v[2]),
                  **({"fb_s": round(v[0], 4), "opt_s": round(v[1], 4),
                      "bubble_accounted": round(v[5], 4)} if grid.pp > 1 else {})}
                 for i, v in enumerate(allv)]
        print(json.dumps({"wall_s_per_update": wall, "ranks": ranks}), flush=True)
    grid.free()


# -- the driver ---------------------------------------------------------------------------------
def launch(n: int, args: list[str], timeout: int) -> dict:
    from hpcdqn.cluster.scale import child_env

    exe = shutil.which("mpirun") or shutil.which("mpiexec")
    cmd = [exe, "-n", str(n), "--bind-to", "none", sys.executable, __file__, "--worker", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=timeout)
    if r.returncode:
        raise SystemExit(f"{cmd} failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def bubbles(res: dict, micro: int) -> dict:
    from hpcdqn.parallel.pipeline import bubble_simulated, bubble_theory

    wall = res["wall_s_per_update"]
    measured = [round(1 - r["fb_s"] / max(wall - r["opt_s"], 1e-12), 4) for r in res["ranks"]]
    idle = [round(1 - (r["fb_s"] + r["opt_s"]) / wall, 4) for r in res["ranks"]]
    return {"measured": measured, "idle_whole_update": idle,
            "simulated": [round(b, 4) for b in bubble_simulated(2, micro, "1f1b", forwards=3)],
            "textbook": round(bubble_theory(2, micro), 4),
            "bubble_accounted": [r["bubble_accounted"] for r in res["ranks"]]}


def run_net(key: str, a) -> dict:
    net = NETS[key]
    common = ["--hidden", ",".join(map(str, net["hidden"])), "--batch", str(net["batch"]),
              "--updates", str(a.updates), "--warmup", str(a.warmup)]
    layouts = [("pp1", 1, 2, 1), ("dp2", 2, 1, 1)] + [("pp2", 2, 1, m) for m in net["micro"]]
    rows, base_ups = [], None
    for layout, n, threads, micro in layouts:
        res = launch(n, ["--layout", layout, "--threads", str(threads), "--micro", str(micro),
                         *common], a.timeout)
        ups = 1.0 / res["wall_s_per_update"]
        base_ups = base_ups or ups
        row = {"layout": layout, "ranks": n, "threads_per_rank": threads, "cores": n * threads,
               "micro_batches": micro if layout == "pp2" else None,
               "updates_per_s": round(ups, 4), "vs_pp1": round(ups / base_ups, 3),
               "peak_rss_per_rank_mib": [r["peak_rss"] >> 20 for r in res["ranks"]],
               "above_baseline_per_rank_mib": [r["above_baseline"] >> 20 for r in res["ranks"]],
               "parameters_per_rank": [r["parameters"] for r in res["ranks"]]}
        if layout == "pp2":
            row["bubble"] = bubbles(res, micro)
            row["stage_seconds"] = [{"fb": r["fb_s"], "opt": r["opt_s"]} for r in res["ranks"]]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    params = rows[0]["parameters_per_rank"][0]
    return {"network": f"{OBS} -> {net['hidden'][0]} x {len(net['hidden'])} -> {ACTIONS}",
            "parameters": params, "training_state_bytes": 20 * params,
            "global_batch": net["batch"], "rows": rows, "verdict": verdict(rows)}


def verdict(rows: list[dict]) -> str:
    pp1, dp2 = rows[0], rows[1]
    pp2 = max((r for r in rows if r["layout"] == "pp2"), key=lambda r: r["updates_per_s"])
    mem = max(pp2["above_baseline_per_rank_mib"]) / max(1, max(pp1["above_baseline_per_rank_mib"]))
    return (f"speed: best pp=2 (M={pp2['micro_batches']}) runs {pp2['vs_pp1']:.2f}x pp=1 on 2 "
            f"threads and {pp2['updates_per_s'] / dp2['updates_per_s']:.2f}x dp=2: "
            f"{'pp loses' if pp2['vs_pp1'] < 1 or pp2['updates_per_s'] < dp2['updates_per_s'] else 'pp does not lose'}"
            f" on speed on 2 cores (bubble, transfers, 1-thread GEMMs). memory: each pp=2 rank "
            f"holds {mem:.2f}x of pp=1's peak above baseline, dp=2 holds "
            f"{max(dp2['above_baseline_per_rank_mib']) / max(1, max(pp1['above_baseline_per_rank_mib'])):.2f}x "
            "on every rank: pp's point is memory")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--layout", default="pp1", choices=["pp1", "dp2", "pp2"])
    ap.add_argument("--hidden", default="4096,4096,4096,4096")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--updates", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--nets", default="4096,8192", help="which of the networks (4096, 8192)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pipeline.json"))
    a = ap.parse_args()
    if a.worker:
        a.hidden = [int(x) for x in a.hidden.split(",")]
        worker(a)
        return
    t = time.time()
    nets = [run_net(k, a) for k in a.nets.split(",")]
    out = {"cores": 2, "cpus_seen": os.cpu_count(), "schedule": "1f1b", "double_dqn": True,
           "updates_measured": a.updates, "warmup_updates": a.warmup,
           "sides": "pp1: 1 rank x 2 threads; dp2: 2 ranks x 1 thread (half the batch each); "
                    "pp2: 2 ranks x 1 thread", "networks": nets, "wall_s": round(time.time() - t, 1)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
