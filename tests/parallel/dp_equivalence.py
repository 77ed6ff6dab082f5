"""K updates on fixed data: each of N ranks takes its slice of a global batch (per-rank batch B)
while gradients are allreduced; run with COMM_SELF and batch N*B this is the 1-rank reference.

    python dp_equivalence.py OUT.npy COMM(world|dup|split|self) [double] [overlap] [K]
"""
import sys

import numpy as np
import torch
from mpi4py import MPI

from hpcdqn.config import learner_config, load_config
from hpcdqn.learner import DataParallelLearner
from hpcdqn.rl.networks import build_layers
from hpcdqn.rl.replay import Batch

out, which = sys.argv[1], sys.argv[2]
double = "double" in sys.argv[3:]
overlap = "overlap" in sys.argv[3:]
K = int(sys.argv[-1]) if sys.argv[-1].isdigit() else 20
torch.set_num_threads(1)
world = MPI.COMM_WORLD
comm = {"world": world, "dup": world.Dup(), "self": MPI.COMM_SELF,
        "split": world.Split(color=0, key=world.Get_size() - world.Get_rank())}[which]
n, r = comm.Get_size(), comm.Get_rank()
GLOBAL_B = 64
cfg = load_config(overrides=[f"dqn.double={str(double).lower()}",
                             f"parallel.overlap={str(overlap).lower()}", "parallel.bucket_mb=0.05",
                             "network.hidden=[64, 64]", "dqn.lr=1e-3"])
# every rank builds with a different torch seed: the broadcast must make them identical
torch.manual_seed(1234 + r)
layers = build_layers((4,), 3, [64, 64])
if r == 0:
    torch.manual_seed(7)
    layers = build_layers((4,), 3, [64, 64])
learner = DataParallelLearner(layers, learner_config(cfg), comm)
rng = np.random.default_rng(0)               # identical data on every rank
for k in range(K):
    obs = rng.standard_normal((GLOBAL_B, 4)).astype(np.float32)
    nxt = rng.standard_normal((GLOBAL_B, 4)).astype(np.float32)
    act = rng.integers(0, 3, GLOBAL_B)
    ret = rng.standard_normal(GLOBAL_B).astype(np.float32)
    disc = np.where(rng.random(GLOBAL_B) < 0.1, 0.0, 0.99).astype(np.float32)
    b = GLOBAL_B // n
    s = slice(r * b, (r + 1) * b)
    learner.update(Batch(obs[s], act[s], ret[s], nxt[s], disc[s], np.ones(b, np.float32),
                         np.arange(b)))
    if learner.updates % 5 == 0:
        learner.sync_target()        # (train.py syncs every dqn.target_update_every env steps)
    learner.check_consistency()
if r == 0:
    np.save(out, np.concatenate([learner.online.numpy_data(), learner.target.numpy_data()]))
