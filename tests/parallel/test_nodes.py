"""Node awareness: shared-memory node detection, local ranks, the span warning, device choice."""

import json

import pytest

from hpcdqn.parallel.grid import LayoutError, choose_device, span_warning, spanning_replicas
from tests.mpi_util import TESTS, run_mpi


def test_spanning_replicas_block_vs_cyclic():
    # 2 nodes x 4 ranks, pp=2: block keeps each replica on one node, cyclic splits every one
    block = [0, 0, 0, 0, 1, 1, 1, 1]
    cyclic = [0, 1, 0, 1, 0, 1, 0, 1]
    assert spanning_replicas(block, 2) == [] and span_warning(block, 2) is None
    assert spanning_replicas(cyclic, 2) == [0, 1, 2, 3]
    assert "span nodes" in span_warning(cyclic, 2) and "dp_rank 0, 1, 2, 3" in span_warning(cyclic, 2)
    # pp=1: a replica is one rank and never spans; pp=4 with 3 ranks per node straddles
    assert spanning_replicas(cyclic, 1) == []
    assert spanning_replicas([0, 0, 0, 1, 1, 1, 2, 2], 4) == [0, 1]
    with pytest.raises(LayoutError, match="pp=3"):
        spanning_replicas(block, 3)


def test_choose_device():
    assert choose_device("cpu", 3, 4) == "cpu"
    assert choose_device("auto", 3, 0) == "cpu"
    assert [choose_device("cuda", r, 4) for r in range(6)] == [
        "cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0", "cuda:1"]
    assert choose_device("auto", 5, 2) == "cuda:1"
    # --gpus-per-task=1 / one-entry CUDA_VISIBLE_DEVICES: every rank's single device is cuda:0
    assert [choose_device("cuda", r, 1) for r in range(3)] == ["cuda:0"] * 3
    assert choose_device("cuda:2", 0, 4) == "cuda:2"
    with pytest.raises(ValueError, match="no CUDA device"):
        choose_device("cuda", 0, 0)
    with pytest.raises(ValueError, match="use cpu"):
        choose_device("tpu", 0, 1)


def grids(n, pp):
    r = run_mpi(n, [TESTS / "parallel" / "grid_nodes.py", pp], timeout=120)
    rows = [json.loads(line[5:]) for line in r.stdout.splitlines() if line.startswith("GRID ")]
    return {(d["case"], d["rank"]): d for d in rows}, r.stderr


@pytest.mark.parametrize("n,pp", [(2, 1), (4, 2)])
def test_nodes_under_mpirun(n, pp):
    g, err = grids(n, pp)
    for rank in range(n):           # one real node here: everyone on node 0, local rank = rank
        w = g[("world", rank)]
        assert (w["nodes"], w["ranks_per_node"], w["local_rank"]) == (1, [n], rank)
        assert w["layout"]["nodes"] == 1 and w["layout"]["ranks_per_node"] == [n]
        s = g[(f"sub{rank % 2}", rank // 2)]         # sub-communicator ranks, not world ranks
        assert (s["nodes"], s["ranks_per_node"], s["local_rank"]) == (1, [n // 2], rank // 2)
        b, c = g[("block", rank)], g[("cyclic", rank)]
        assert b["node_of"] == [r * 2 // n for r in range(n)] and b["nodes"] == 2
        assert b["local_rank"] == rank % (n // 2) and b["ranks_per_node"] == [n // 2] * 2
        assert c["node_of"] == [r % 2 for r in range(n)] and c["local_rank"] == rank // 2
    warns = [line for line in err.splitlines() if "span nodes" in line]
    if pp == 1:
        assert warns == []
    else:                           # cyclic only, once (rank 0 prints it)
        assert len(warns) == 1 and "2 replica(s) (dp_rank 0, 1)" in warns[0]
