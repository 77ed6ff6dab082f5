import pytest
from mpi4py import MPI

from hpcdqn.parallel.allreduce import GradSync
from hpcdqn.parallel.flat import FlatModule
from hpcdqn.parallel.grid import LayoutError, RankGrid
from hpcdqn.rl.networks import build_layers


@pytest.mark.parametrize("comm", [MPI.COMM_SELF, MPI.COMM_WORLD, "dup"])
def test_grid_on_any_communicator(comm):
    comm = MPI.COMM_WORLD.Dup() if comm == "dup" else comm
    g = RankGrid(comm, pp=1)
    assert (g.world, g.dp, g.pp, g.dp_rank, g.pp_rank) == (1, 1, 1, 0, 0)
    assert g.is_first_stage and g.is_last_stage and g.is_root
    assert g.dp_comm.Get_size() == 1 and g.pp_comm.Get_size() == 1
    with pytest.raises(LayoutError, match="not divisible by pp=2"):
        RankGrid(comm, pp=2)


def test_buckets_are_contiguous_capped_and_cover_everything():
    net = FlatModule(build_layers((8,), 3, [64, 64, 64]))
    cap_mb = 5_000 * 4 / 2**20           # about 5k floats per bucket (9091 in all)
    sync = GradSync(net, MPI.COMM_SELF, bucket_mb=cap_mb)
    b = sorted(sync.buckets)
    assert b[0][0] == 0 and b[-1][1] == net.numel
    assert all(x[1] == y[0] for x, y in zip(b, b[1:]))           # contiguous, no gaps
    biggest_param = max(n for _, n in net.slices)
    assert all(e - s <= max(5_000, biggest_param) for s, e in b)
    assert len(b) > 1
    # one bucket when the cap is large
    assert GradSync(net, MPI.COMM_SELF, bucket_mb=25).buckets == [(0, net.numel)]


def test_flat_module_params_are_views():
    import torch

    net = FlatModule(build_layers((4,), 2, [16]))
    with torch.no_grad():
        net.flat.data.fill_(0.5)
    assert all(float(p.detach().mean()) == 0.5 for p in net.net.parameters())
    out = net(torch.ones(3, 4)).sum()
    out.backward()
    assert float(net.flat.grad.abs().sum()) > 0
    grads = torch.cat([p.grad.reshape(-1) for p in net.net.parameters()])
    assert torch.equal(grads, net.flat.grad)


def test_hierarchical_allreduce_on_one_node():
    """mpirun -n 4 on this one node: the hierarchical path (Reduce to the node leader, Bcast)
    gives every rank the same bits and the flat sum within 1e-6 of the largest entry; ``auto``
    (and an explicit hierarchical request) is flat on one node, so one-node runs are unchanged."""
    import json

    from hpcdqn.parallel.allreduce import choose_algorithm
    from tests.mpi_util import TESTS, run_mpi

    r = run_mpi(4, [TESTS / "parallel" / "netns_hier.py"], timeout=120)
    d = json.loads(next(l[5:] for l in r.stdout.splitlines() if l.startswith("HIER ")))
    assert d["nodes"] == 1 and d["ranks_per_node"] == 4 and d["buckets"] > 1, d
    assert d["flat_same_on_all_ranks"] and d["hier_same_on_all_ranks"], d
    assert d["max_rel_diff"] <= 1e-6, d
    assert d["auto"]["algorithm"] == "flat" and d["auto"]["reason"] == "one node", d
    assert choose_algorithm("hierarchical", MPI.COMM_WORLD, 4096)["algorithm"] == "flat"
