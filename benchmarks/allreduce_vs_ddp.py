"""Gradient sync of one data-parallel DQN update: MPI Allreduce over one flat buffer (hpcdqn's
GradSync) vs PyTorch DDP (gloo), with the SAME compute path on both sides; hpcdqn's own fast
update as a third column.

    python benchmarks/allreduce_vs_ddp.py [--rounds 5] [--procs 2] [--models cartpole,large]

Equal resources: ``--procs`` ranks (2) under one ``mpirun``, one rank per core (``--bind-to core``
when the ranks fit the cores), one torch thread per rank; all three sides live in the same
processes and run interleaved (``--rounds`` rounds, the side order rotating each round), so
load from other jobs falls on every side alike.

Columns (the update: target forward without grad, online forward, Huber TD loss, backward,
gradient averaging over the ranks, global-norm clip at 10, Adam):
- ``mpi_autograd``: an ``nn.Sequential`` of the network whose parameters and gradients are views
  into one flat buffer (``FlatModule``); autograd backward; ``GradSync`` (in-place
  ``MPI_Allreduce`` per <= 25 MiB bucket, a timed barrier before it); ``torch.optim.Adam``
  (``foreach=False``) and ``clip_grad_norm_``;
- ``ddp_gloo``: the same ``nn.Sequential`` wrapped in ``DistributedDataParallel`` (gloo, default
  25 MiB buckets, reductions overlapped with backward, as DDP users run it); the same autograd
  backward, ``torch.optim.Adam`` (``foreach=False``) and ``clip_grad_norm_``. Only the sync
  differs from ``mpi_autograd``;
- ``hpcdqn_fast``: ``DataParallelLearner.update`` as ``hpcdqn train`` runs it (hand-written MLP
  backward, fused flat Adam, the same GradSync).

Measured, per update, every iteration after a barrier and taken at the slowest rank:
``step_ms`` (the whole update), ``step_nosync_ms`` (the same update without the gradient sync:
``DDP.no_sync()``, or GradSync skipped), ``exposed_sync_ms`` = median(step) - median(nosync)
(the sync's cost to the update, overlap included), ``sync_in_step_ms`` (GradSync's own timers:
transfer, and waiting at its barrier), and ``raw_allreduce_ms``: one flat float32 buffer of the
gradient's size reduced by ``MPI_Allreduce`` and by gloo's ``all_reduce`` (each after a barrier):
the two transports alone. Medians with 25th/75th percentiles; ratios of medians. JSON to
``benchmarks/results/allreduce_vs_ddp.json`` (and stdout).
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

MODELS = {"cartpole": {"obs": 4, "hidden": [256, 256], "actions": 2, "batch": 64},
          "large": {"obs": 512, "hidden": [4096] * 4, "actions": 18, "batch": 64}}
SIDES = ("mpi_autograd", "ddp_gloo", "hpcdqn_fast")
OUT = Path(__file__).resolve().parent / "results" / "allreduce_vs_ddp.json"


def spread(values) -> dict:
    import numpy as np

    q = np.percentile(np.asarray(values, dtype=np.float64), [25, 50, 75])
    return {"median": round(float(q[1]), 4), "p25": round(float(q[0]), 4),
            "p75": round(float(q[2]), 4), "n": len(values)}


def _data(spec, rank):
    import numpy as np

    rng = np.random.default_rng(100 + rank)
    B, D = spec["batch"], spec["obs"]
    return (rng.standard_normal((B, D)).astype(np.float32), rng.integers(0, spec["actions"], B),
            rng.standard_normal(B).astype(np.float32), rng.standard_normal((B, D)).astype(np.float32),
            np.full(B, 0.99, np.float32))


class NoSync:
    """Stands in for a GradSync to time the update without the sync."""
    seconds = wait_seconds = 0.0

    def __call__(self):
        pass


def build_sides(spec, layers, cfg, comm, data):
    """{side: (step(sync: bool), gradsync or None)} on the same network and batch."""
    import copy

    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    from hpcdqn.learner import DataParallelLearner
    from hpcdqn.parallel.allreduce import GradSync
    from hpcdqn.parallel.flat import FlatModule
    from hpcdqn.rl.replay import Batch

    obs, act, ret, nxt, disc = data
    t_obs, t_act, t_ret = torch.as_tensor(obs), torch.as_tensor(act), torch.as_tensor(ret)
    t_nxt, t_disc = torch.as_tensor(nxt), torch.as_tensor(disc)
    target = torch.nn.Sequential(*copy.deepcopy(layers))
    lr, clip = cfg["dqn"]["lr"], cfg["dqn"]["max_grad_norm"]

    def autograd_step(net, params, opt, before_step):
        with torch.no_grad():
            y = t_ret + t_disc * target(t_nxt).max(1).values
        q = net(t_obs).gather(1, t_act.unsqueeze(1)).squeeze(1)
        loss = F.huber_loss(q, y)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        before_step()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()

    flat = FlatModule(copy.deepcopy(layers))
    gsync = GradSync(flat, comm, cfg["parallel"]["bucket_mb"])
    opt_m = torch.optim.Adam(flat.params, lr=lr, foreach=False)

    def mpi_step(sync):
        autograd_step(flat.net, flat.params, opt_m, gsync if sync else NoSync())

    ddp = DDP(torch.nn.Sequential(*copy.deepcopy(layers)))
    opt_d = torch.optim.Adam(ddp.parameters(), lr=lr, foreach=False)

    def ddp_step(sync):
        if sync:
            autograd_step(ddp, list(ddp.parameters()), opt_d, lambda: None)
        else:
            with ddp.no_sync():
                autograd_step(ddp, list(ddp.parameters()), opt_d, lambda: None)

    learner = DataParallelLearner(copy.deepcopy(layers), learner_config(cfg), comm)
    batch = Batch(obs, act, ret, nxt, disc, np.ones(len(act), np.float32), np.arange(len(act)))
    real_sync = learner.sync

    def fast_step(sync):
        learner.sync = real_sync if sync else NoSync()
        learner.update(batch)
        learner.sync = real_sync

    return {"mpi_autograd": (mpi_step, gsync), "ddp_gloo": (ddp_step, None),
            "hpcdqn_fast": (fast_step, real_sync)}, learner.plan.describe()


def timed(comm, fn, iters):
    """Per-iteration seconds (each after a barrier), the slowest rank's."""
    import numpy as np
    from mpi4py import MPI

    dt = np.empty(iters)
    for i in range(iters):
        comm.Barrier()
        t = time.perf_counter()
        fn()
        dt[i] = time.perf_counter() - t
    out = np.empty_like(dt)
    comm.Allreduce(dt, out, op=MPI.MAX)
    return out.tolist()


def raw_allreduce(comm, n_floats, iters):
    """One flat float32 buffer of ``n_floats``: MPI_Allreduce vs gloo all_reduce (ms lists)."""
    import numpy as np
    import torch
    import torch.distributed as dist
    from mpi4py import MPI

    buf = np.ones(n_floats, dtype=np.float32)
    tb = torch.ones(n_floats)
    mpi = timed(comm, lambda: comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM), iters)

    def gloo():
        dist.all_reduce(tb)
    gl = timed(comm, gloo, iters)
    return [1e3 * x for x in mpi], [1e3 * x for x in gl]


def worker(model, rounds, iters, port):
    import torch

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    import torch.distributed as dist
    from mpi4py import MPI

    from hpcdqn.config import learner_config, load_config
    from hpcdqn.rl.networks import build_layers

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=size)
    spec = MODELS[model]
    cfg = load_config(overrides=["dqn.double=false", "dqn.target_update_every=1000000",
                                 "parallel.overlap=false"])
    layers = build_layers((spec["obs"],), spec["actions"], spec["hidden"], seed=0)
    n_params = sum(p.numel() for layer in layers for p in layer.parameters())
    sides, plan = build_sides(spec, layers, cfg, comm, _data(spec, rank))
    del layers
    for side in SIDES:                                   # warm-up
        for sync in (True, False):
            for _ in range(2):
                sides[side][0](sync)
    res = {s: {"step": [], "nosync": [], "transfer": [], "wait": []} for s in SIDES}
    for r in range(rounds):
        order = SIDES[r % 3:] + SIDES[:r % 3]            # rotate: no side always goes first
        for side in order:
            step, gs = sides[side]
            t0, w0 = (gs.seconds, gs.wait_seconds) if gs is not None else (0.0, 0.0)
            res[side]["step"] += [1e3 * x for x in timed(comm, lambda: step(True), iters)]
            if gs is not None:
                res[side]["transfer"].append(1e3 * (gs.seconds - t0) / iters)
                res[side]["wait"].append(1e3 * (gs.wait_seconds - w0) / iters)
            res[side]["nosync"] += [1e3 * x for x in timed(comm, lambda: step(False), iters)]
    raw_mpi, raw_gloo = raw_allreduce(comm, n_params, max(10, iters * rounds // 2))
    if rank == 0:
        print(json.dumps({"model": model, "params": n_params, "res": res, "plan": plan,
                          "raw_mpi": raw_mpi, "raw_gloo": raw_gloo}), flush=True)
    dist.barrier()
    dist.destroy_process_group()   # gloo's threads must stop before the interpreter does
    comm.Barrier()
    sys.stdout.flush()
    MPI.Finalize()
    os._exit(0)     # a gloo thread still holding a tensor aborts the interpreter's own shutdown


def summarize(model, w) -> dict:
    """The table of one model from a worker's raw timings."""
    res = w["res"]
    step = {s: spread(res[s]["step"]) for s in SIDES}
    nosync = {s: spread(res[s]["nosync"]) for s in SIDES}
    exposed = {s: round(step[s]["median"] - nosync[s]["median"], 4) for s in SIDES}
    in_step = {s: {"transfer": spread(res[s]["transfer"]), "wait": spread(res[s]["wait"])}
               for s in SIDES if res[s]["transfer"]}
    raw = {"mpi": spread(w["raw_mpi"]), "gloo": spread(w["raw_gloo"])}

    def ratio(a, b):
        return round(a / b, 3) if b > 0 else None

    return {"params": w["params"], "grad_bytes": 4 * w["params"],
            "batch_per_process": MODELS[model]["batch"], "hpcdqn_fast_plan": w["plan"],
            "step_ms": step, "step_nosync_ms": nosync, "exposed_sync_ms": exposed,
            "sync_in_step_ms": in_step, "raw_allreduce_ms": raw,
            "ratios": {
                "step_ddp_over_mpi_autograd": ratio(step["ddp_gloo"]["median"],
                                                    step["mpi_autograd"]["median"]),
                "exposed_sync_ddp_over_mpi_autograd": ratio(exposed["ddp_gloo"],
                                                            exposed["mpi_autograd"]),
                "raw_allreduce_gloo_over_mpi": ratio(raw["gloo"]["median"], raw["mpi"]["median"]),
                "step_mpi_autograd_over_hpcdqn_fast": ratio(step["mpi_autograd"]["median"],
                                                            step["hpcdqn_fast"]["median"]),
                "step_ddp_over_hpcdqn_fast": ratio(step["ddp_gloo"]["median"],
                                                   step["hpcdqn_fast"]["median"])}}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--models", default="cartpole,large")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--iters", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.model, a.rounds, a.iters, a.port)
        return
    from hpcdqn.cluster.scale import child_env, launch_cmd, oversubscribed

    env = {**child_env(), "OMP_NUM_THREADS": "1"}
    results = {}
    for model in a.models.split(","):
        iters = 40 if model == "cartpole" else 3
        cmd = launch_cmd(a.procs, "mpirun") + [sys.executable, __file__, "--worker", "--model",
                                               model, "--rounds", str(a.rounds), "--iters",
                                               str(iters), "--port", str(free_port())]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
        if r.returncode:
            raise SystemExit(r.stderr[-4000:])
        results[model] = summarize(model, json.loads(r.stdout.strip().splitlines()[-1]))
        print(f"{model}: {json.dumps(results[model]['ratios'])}", file=sys.stderr, flush=True)
    out = {"benchmark": "allreduce_vs_ddp", "processes": a.procs, "threads_per_process": 1,
           "launch": " ".join(launch_cmd(a.procs, "mpirun")[1:]),
           "oversubscribed": oversubscribed(a.procs, "mpirun"), "cores": os.cpu_count(),
           "host": socket.gethostname(), "loadavg_1m": os.getloadavg()[0],
           "rounds": a.rounds, "results": results}
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(out, indent=2))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
