"""One data-parallel DQN update: hpcdqn (flat-buffer MPI Allreduce) vs PyTorch DDP (gloo).

    python benchmarks/allreduce_vs_ddp.py [--iters 30] [--procs 2]

Both sides run the same update on the same model and per-process batch, with 2 processes and
one thread each, one after the other in the same run: target forward (no grad), online forward,
Huber TD loss, backward, gradient averaging across processes, global-norm clip, Adam step.
- hpcdqn: ``DataParallelLearner.update`` (gradients live in one flat buffer; one in-place Allreduce
  per 25 MiB bucket over MPI; Adam on the flat parameter).
- hpcdqn_overlap: the same with ``parallel.overlap=true`` (an ``Iallreduce`` per bucket started
  from autograd hooks during backward).
- DDP: ``DistributedDataParallel`` on the gloo backend (default buckets, 25 MiB), ``torch.optim.Adam``.
Models: the CartPole Q-network (4 -> 256 x 2 -> 2, batch 64) and a large one
(512 -> 4096 x 4 -> 18, batch 64). Prints JSON with ms/update for each and the ratio
(DDP time / hpcdqn time: > 1 means hpcdqn is faster).
"""

import argparse
import json
import socket
import subprocess
import sys
import time

MODELS = {"cartpole": {"obs": 4, "hidden": [256, 256], "actions": 2, "batch": 64},
          "large": {"obs": 512, "hidden": [4096] * 4, "actions": 18, "batch": 64}}


def _data(spec, rank):
    import numpy as np

    rng = np.random.default_rng(100 + rank)
    B, D = spec["batch"], spec["obs"]
    return (rng.standard_normal((B, D)).astype(np.float32), rng.integers(0, spec["actions"], B),
            rng.standard_normal(B).astype(np.float32), rng.standard_normal((B, D)).astype(np.float32),
            np.full(B, 0.99, np.float32))


def worker(side, model, iters, port):
    import numpy as np
    import torch

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    from mpi4py import MPI

    from hpcdqn.config import load_config
    from hpcdqn.rl.networks import build_layers
    from hpcdqn.rl.replay import Batch

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    spec = MODELS[model]
    cfg = load_config(overrides=["dqn.double=false", "dqn.target_update_every=1000000",
                                 f"parallel.overlap={'true' if side == 'hpcdqn_overlap' else 'false'}"])
    layers = build_layers((spec["obs"],), spec["actions"], spec["hidden"], seed=0)
    obs, act, ret, nxt, disc = _data(spec, rank)
    warm = 3
    if side.startswith("hpcdqn"):
        from hpcdqn.learner import DataParallelLearner

        learner = DataParallelLearner(layers, cfg, comm)
        batch = Batch(obs, act, ret, nxt, disc, np.ones(len(act), np.float32), np.arange(len(act)))

        def step():
            learner.update(batch)
    else:
        import copy

        import torch.distributed as dist
        import torch.nn.functional as F
        from torch.nn.parallel import DistributedDataParallel as DDP

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=size)
        net = torch.nn.Sequential(*layers)
        target = copy.deepcopy(net)
        ddp = DDP(net)
        opt = torch.optim.Adam(ddp.parameters(), lr=cfg["dqn"]["lr"])
        t_obs, t_act, t_ret = torch.as_tensor(obs), torch.as_tensor(act), torch.as_tensor(ret)
        t_nxt, t_disc = torch.as_tensor(nxt), torch.as_tensor(disc)

        def step():
            with torch.no_grad():
                y = t_ret + t_disc * target(t_nxt).max(1).values
            q = ddp(t_obs).gather(1, t_act.unsqueeze(1)).squeeze(1)
            loss = F.huber_loss(q, y)
            opt.zero_grad(set_to_none=False)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(ddp.parameters(), 10.0)
            opt.step()
    for _ in range(warm):
        step()
    comm.Barrier()
    t = time.perf_counter()
    for _ in range(iters):
        step()
    comm.Barrier()
    ms = (time.perf_counter() - t) / iters * 1e3
    n_params = sum(p.numel() for layer in layers for p in layer.parameters())
    if rank == 0:
        print(json.dumps({"side": side, "model": model, "ms_per_update": ms, "params": n_params}),
              flush=True)
    if side == "ddp":
        import torch.distributed as dist

        dist.destroy_process_group()   # gloo's threads must stop before the interpreter does


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--models", default="cartpole,large")
    ap.add_argument("--worker", choices=["hpcdqn", "hpcdqn_overlap", "ddp"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, a.model, a.iters, a.port)
        return
    from hpcdqn.cluster.scale import child_env

    env = child_env()
    results = {}
    for model in a.models.split(","):
        iters = a.iters if model == "cartpole" else max(5, a.iters // 3)
        res = {}
        for side in ("hpcdqn", "hpcdqn_overlap", "ddp"):
            cmd = ["mpirun", "-n", str(a.procs), "--oversubscribe", "--bind-to", "none",
                   sys.executable, __file__, "--worker", side, "--model", model,
                   "--iters", str(iters), "--port", str(free_port())]
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
            if r.returncode:
                raise SystemExit(r.stderr[-4000:])
            res[side] = json.loads(r.stdout.strip().splitlines()[-1])
        results[model] = {"params": res["hpcdqn"]["params"], "batch_per_process": MODELS[model]["batch"],
                          "hpcdqn_ms": round(res["hpcdqn"]["ms_per_update"], 3),
                          "hpcdqn_overlap_ms": round(res["hpcdqn_overlap"]["ms_per_update"], 3),
                          "ddp_gloo_ms": round(res["ddp"]["ms_per_update"], 3),
                          "ratio_ddp_over_hpcdqn": round(res["ddp"]["ms_per_update"]
                                                         / res["hpcdqn"]["ms_per_update"], 3)}
    print(json.dumps({"benchmark": "allreduce_vs_ddp", "processes": a.procs, "threads": 1,
                      "results": results}))


if __name__ == "__main__":
    main()
