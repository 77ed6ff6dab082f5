"""Pipeline (dp x pp ranks) against one unpartitioned DataParallelLearner on world rank 0, on fixed data.

    mpirun -n W python pp_equivalence.py OUTDIR SUITE PP [K]

SUITE: ``mlp`` (every schedule, zero bubble included, x double x two micro-batch counts; the balanced default cuts
inside Linear layers here), ``arch`` (dueling MLP, CNN, dueling CNN with an explicit cut inside
the conv stack, an MLP cut only at layer boundaries, the MinAtar CNN with centred RMSprop) or ``dp`` (dp = W / PP replicas, each
taking its slice of the global batch; reference: one rank with the whole batch).

For every case world rank 0 writes ``CASE.npz``-like plain ``.npy`` files into OUTDIR:
``CASE_q0_pp/ref.npy`` (Q-values at init), ``CASE_q1_pp/ref.npy`` (after K updates),
``CASE_pp/ref.npy`` (online + target after K updates), ``CASE_init.npy`` (initial online params),
``CASE_td_pp/ref.npy`` (|TD| of the first update, replica 0's slice), ``CASE_gradnorm_ref.npy``
(the reference's pre-clip gradient norms: clipping is exercised when they exceed 0.1).
"""
import sys
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI

from hpcdqn.config import learner_config, load_config
from hpcdqn.learner import DataParallelLearner
from hpcdqn.parallel.grid import RankGrid
from hpcdqn.rl.networks import build_layers
from hpcdqn.learner import PipelineLearner
from hpcdqn.rl.replay import Batch

outdir, suite, pp = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
K = int(sys.argv[4]) if len(sys.argv) > 4 else 4
torch.set_num_threads(1)
world = MPI.COMM_WORLD
grid = RankGrid(world, pp)
root = world.Get_rank() == 0

cases = []   # (name, obs_shape, n_actions, hidden, dueling, cuts, schedule, double, M, global_B[, extra])
# (lr and eps larger than the paper's so that 4 clipped updates move the parameters measurably)
MINATAR = {"network.kind": "minatar", "dqn.optimizer": "rmsprop", "dqn.lr": 2.5e-3,
           "dqn.rmsprop_eps": 1e-4}
WHOLE = "whole"   # as cuts: balanced at layer boundaries only (network.split_layers=false)
if suite == "mlp":
    hidden = [32, 32] if pp == 2 else [32, 32, 32, 32]
    for sched in ("gpipe", "1f1b", "zbh1"):
        for double in (False, True):
            for M in ((1, 4) if pp == 2 else (2, 6)):
                cases.append((f"mlp_pp{pp}_{sched}_{'double' if double else 'single'}_M{M}",
                              (6,), 3, hidden, False, [], sched, double, M, 48))
elif suite == "arch":
    cases = [("dueling_mlp", (6,), 4, [32, 32], True, [], "1f1b", True, 4, 48),
             ("cnn", (4, 84, 84), 5, [32], False, [], "gpipe", True, 1, 8),
             ("dueling_cnn_cut3", (4, 84, 84), 5, [32], True, [3], "1f1b", False, 2, 8),
             ("mlp_whole_layers", (6,), 3, [32, 32], False, WHOLE, "1f1b", True, 4, 48),
             ("minatar_cnn", (4, 10, 10), 6, [128], False, [], "1f1b", False, 2, 32, MINATAR)]
elif suite == "dp":
    cases = [(f"dp{grid.dp}_pp{pp}_{s}", (6,), 3, [32, 32], False, [], s, True, 4, 48)
             for s in ("gpipe", "1f1b", "zbh1")]
    cases.append((f"dp{grid.dp}_pp{pp}_minatar", (4, 10, 10), 6, [128], False, [], "1f1b", False,
                  2, 32, MINATAR))
else:
    raise SystemExit(f"unknown suite {suite}")


def make_data(rng, obs_shape, n_actions, B):
    if len(obs_shape) == 3 and obs_shape[1] == 10:    # MinAtar grids: {0, 1}
        obs = rng.integers(0, 2, (B, *obs_shape)).astype(np.uint8)
        nxt = rng.integers(0, 2, (B, *obs_shape)).astype(np.uint8)
    elif len(obs_shape) == 3:
        obs = rng.integers(0, 256, (B, *obs_shape)).astype(np.uint8)
        nxt = rng.integers(0, 256, (B, *obs_shape)).astype(np.uint8)
    else:
        obs = rng.standard_normal((B, *obs_shape)).astype(np.float32)
        nxt = rng.standard_normal((B, *obs_shape)).astype(np.float32)
    act = rng.integers(0, n_actions, B)
    ret = rng.standard_normal(B).astype(np.float32)
    disc = np.where(rng.random(B) < 0.1, 0.0, 0.99).astype(np.float32)
    w = rng.uniform(0.2, 1.0, B).astype(np.float32)
    return obs, act, ret, nxt, disc, w


for name, obs_shape, n_actions, hidden, dueling, cuts, sched, double, M, GB, *extra in cases:
    kind = (extra[0] if extra else {}).get("network.kind", "auto")
    cfg = load_config(overrides={
        "pp": pp, "micro_batches": M, "schedule": sched, "dqn.double": double,
        "dqn.batch_size": GB // grid.dp, "dqn.max_grad_norm": 0.1,
        "dqn.lr": 1e-3, "network.hidden": hidden, "network.dueling": dueling,
        "network.cuts": [] if cuts == WHOLE else cuts, "network.split_layers": cuts != WHOLE,
        "parallel.bucket_mb": 0.01, "replay.prioritized": True,    # (so |TD| is returned)
        **(extra[0] if extra else {})})
    # replicas other than 0 start from other weights: the per-stage broadcast must fix that
    layers = build_layers(obs_shape, n_actions, hidden, dueling, seed=7 if grid.dp_rank == 0 else 8,
                          kind=kind)
    learner = PipelineLearner(layers, learner_config(cfg), grid)
    if root:
        print(name, learner.stage_contents, learner.plan.describe(), flush=True)
        (outdir / f"{name}_plan.txt").write_text(learner.plan.describe())
    ref = None
    if root:
        ref = DataParallelLearner(build_layers(obs_shape, n_actions, hidden, dueling, seed=7, kind=kind),
                                  learner_config(cfg), MPI.COMM_SELF)
        np.save(outdir / f"{name}_init.npy", ref.online.numpy_data().copy())
        norms = []
        ref_norm = ref.grad_norm
        ref.grad_norm = lambda: norms.append(float(ref_norm())) or torch.tensor(norms[-1])
    rng = np.random.default_rng(0)
    probe = make_data(np.random.default_rng(1), obs_shape, n_actions, 16)[0]
    q0 = learner.q_values(probe if grid.is_first_stage else None)
    if root:
        np.save(outdir / f"{name}_q0_pp.npy", q0)
        np.save(outdir / f"{name}_q0_ref.npy", ref.q_values(probe))
    b = GB // grid.dp
    for k in range(K):
        obs, act, ret, nxt, disc, w = make_data(rng, obs_shape, n_actions, GB)
        s = slice(grid.dp_rank * b, (grid.dp_rank + 1) * b)
        batch = Batch(obs[s], act[s], ret[s], nxt[s], disc[s], w[s], np.arange(b)) \
            if grid.is_first_stage else None
        out = learner.update(batch)
        learner.check_consistency()
        if root:
            r = ref.update(Batch(obs, act, ret, nxt, disc, w, np.arange(GB)))
            if k == 0:
                np.save(outdir / f"{name}_td_pp.npy", out["td_abs"])
                np.save(outdir / f"{name}_td_ref.npy", r["td_abs"][:b])
        if (k + 1) % 2 == 0:       # target syncs (train.py: every target_update_every env steps)
            learner.sync_target()
            if root:
                ref.sync_target()
    q1 = learner.q_values(probe if grid.is_first_stage else None)
    online, target = learner.gather_online(), learner.gather_target()
    assert learner.updates == K
    if root:
        np.save(outdir / f"{name}_q1_pp.npy", q1)
        np.save(outdir / f"{name}_q1_ref.npy", ref.q_values(probe))
        np.save(outdir / f"{name}_pp.npy", np.concatenate([online, target]))
        np.save(outdir / f"{name}_ref.npy", np.concatenate([ref.online.numpy_data(),
                                                          ref.target.numpy_data()]))
        np.save(outdir / f"{name}_gradnorm_ref.npy", np.array(norms))   # clipping active if > 0.5
    world.Barrier()
if root:
    (outdir / f"{suite}_pp{pp}_cases.txt").write_text("\n".join(c[0] for c in cases) + "\n")
grid.free()
