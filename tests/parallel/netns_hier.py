"""Under mpirun (across namespaces or on one node): the gradient sync (``GradSync``) of the same
per-rank gradients with the flat and the hierarchical allreduce, several buckets; rank 0 prints
``HIER {...}``: the node layout the hierarchy found, the largest |flat - hierarchical|
relative to the largest |gradient|, whether they are bitwise equal, whether every rank holds the
same bits (both algorithms), and what ``choose_algorithm('auto', ...)`` picks for this gradient.

    python tests/parallel/netns_hier.py
"""
import json

import numpy as np
import torch
from mpi4py import MPI
from torch import nn

from hpcdqn.parallel.allreduce import GradSync, choose_algorithm
from hpcdqn.parallel.flat import FlatModule


def synced(module, comm, algorithm, grads):
    module.flat.grad.copy_(grads)
    sync = GradSync(module, comm, bucket_mb=0.02, algorithm=algorithm)
    sync()
    out = module.flat.grad.clone()
    same = np.array([out.numpy().tobytes() == comm.bcast(out.numpy().tobytes(), root=0)])
    comm.Allreduce(MPI.IN_PLACE, same, op=MPI.LAND)
    return out, bool(same[0]), len(sync.buckets), sync.hier


def main():
    w = MPI.COMM_WORLD
    torch.manual_seed(0)
    m = FlatModule([nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4)])
    g = torch.from_numpy(np.random.default_rng(100 + w.Get_rank())
                         .standard_normal(m.numel).astype(np.float32) * 10 ** (w.Get_rank() % 3))
    flat, flat_same, buckets, _ = synced(m, w, "flat", g)
    hier, hier_same, _, h = synced(m, w, "hierarchical", g)
    choice = choose_algorithm("auto", w, 4 * m.numel, buckets)
    if w.Get_rank() == 0:
        d = (flat - hier).abs().max().item() / flat.abs().max().item()
        print("HIER " + json.dumps({
            "ranks": w.Get_size(), "nodes": h.nodes, "ranks_per_node": h.ranks_per_node,
            "buckets": buckets, "max_rel_diff": d, "bitwise": bool(torch.equal(flat, hier)),
            "flat_same_on_all_ranks": flat_same, "hier_same_on_all_ranks": hier_same,
            "auto": choice}), flush=True)


if __name__ == "__main__":
    main()
