"""Two real network hosts on one machine (tests/netns_nodes.py): network + UTS namespaces node1 and
node2 on a veth pair, real mpirun across them over TCP, hpcdqn unchanged on top.

Placement rule under test: hpcdqn lays ranks out stage-fastest (``rank = dp_rank * pp + pp_rank``)
and never reorders them, so a replica's pipeline stages share a node exactly when the launcher
places ranks in blocks (``mpirun --map-by slot``/``core``, ``srun --distribution=block``) with a
multiple of ``pp`` ranks per node; then only the gradient allreduce crosses nodes. Cyclic
placement (``--map-by node``) puts the stages apart and the grid warns, once, naming the replicas.
"""

import json
import subprocess
import sys

import h5py
import pytest

from tests.mpi_util import TESTS, hpcdqn
from tests.netns_nodes import NetnsNodes, NetnsUnavailable, netns_nodes_fixture

pytestmark = pytest.mark.netns

MiB = 1 << 20
SHORT = ["total_steps=2000", "dqn.learning_starts=500", "dqn.train_frequency=100",
         "dqn.gradient_steps=20", "network.hidden=[32, 32]", "dqn.buffer_size=5000",
         "eval.episodes=10", "log.progress=false", "log.tensorboard=false"]


@pytest.fixture(scope="module")
def nodes():
    yield from netns_nodes_fixture()


def probe(nodes, map_by, nbytes=8 * MiB):
    before = nodes.iface_bytes("node1")
    r = nodes.run_mpi(4, [TESTS / "cluster" / "netns_probe.py", nbytes], map_by=map_by, timeout=120)
    after = nodes.iface_bytes("node1")
    rows = [json.loads(l[6:]) for l in r.stdout.splitlines() if l.startswith("PROBE ")]
    moved = {k: after[k] - before[k] for k in before}
    return {d["rank"]: d for d in rows}, r.stderr, moved


def test_nodes_have_own_hostnames_and_only_private_addresses(nodes):
    for i, node in enumerate(nodes.names, start=1):
        assert nodes.run_in(node, ["hostname"]).stdout.strip() == node
        addrs = nodes.run_in(node, ["ip", "-4", "-o", "addr", "show"]).stdout
        assert sorted(l.split()[3] for l in addrs.splitlines()) == ["10.77.0.%d/24" % i, "127.0.0.1/8"]
    r = nodes.run_in("node1", ["bash", "-c", "exec 3<>/dev/tcp/10.77.0.2/1 || true"], timeout=10)
    assert "refused" in r.stderr.lower()      # node2's address answers (a closed port) over veth


@pytest.mark.parametrize("map_by,node_of", [("slot", [0, 0, 1, 1]), ("node", [0, 1, 0, 1])])
def test_mpirun_across_nodes_tcp(nodes, map_by, node_of):
    """Ranks see their node's host name; node detection and local ranks follow the real hosts;
    the pipeline pair's 8 MiB exchange crosses the veth only when placement splits the pair."""
    rows, err, moved = probe(nodes, map_by)
    assert sorted(rows) == [0, 1, 2, 3]
    for rank, d in rows.items():
        assert d["processor"] == d["hostname"] == f"node{node_of[rank] + 1}"
        assert d["node_of"] == node_of and d["nodes"] == 2 and d["ranks_per_node"] == [2, 2]
        assert d["local_rank"] == node_of[:rank].count(node_of[rank])
        assert d["sendrecv_ok"] and d["allreduce"] == 6.0
    warns = [l for l in err.splitlines() if "span nodes" in l]
    if map_by == "slot":     # stages kept on one node: the exchange stays in shared memory
        assert warns == [] and moved["tx"] < 1 * MiB and moved["rx"] < 1 * MiB, moved
    else:                    # stages split: 2 x 8 MiB through node1's veth, each way
        assert len(warns) == 1 and "2 replica(s) (dp_rank 0, 1)" in warns[0], err[-2000:]
        assert moved["tx"] >= 16 * MiB and moved["rx"] >= 16 * MiB, moved


def test_fixture_cleans_up_after_a_failing_job():
    """A job that fails (one rank raises) leaves nothing once the fixture stops: no namespaces,
    no links, no bind mounts, no processes."""
    try:
        n = NetnsNodes.start(tag="hqclean")
    except NetnsUnavailable as e:
        pytest.skip(f"no network namespaces: {e}")
    try:
        r = n.run_mpi(4, ["-c", "import sys; from mpi4py import MPI; "
                               "sys.exit(3 if MPI.COMM_WORLD.Get_rank() == 3 else 0)"],
                      timeout=60, check=False)
        assert r.returncode != 0
        holder = subprocess.Popen(n.exec_cmd("node2", ["sleep", "600"]))   # a process left inside
    finally:
        n.stop()
    assert holder.wait(timeout=10) != 0
    assert "hqclean" not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                           text=True).stdout
    assert "hqclean" not in subprocess.run(["ip", "link"], capture_output=True, text=True).stdout
    assert "hqclean" not in open("/proc/self/mountinfo").read()


def test_train_across_nodes_checkpoints_on_shared_fs(nodes, tmp_path):
    """dp=2 x pp=2 across the nodes (stages kept on one node): every rank of both nodes writes
    its part of the checkpoint to the shared file system; the result is bitwise the one-node run."""
    args = ["train", "pp=2", "micro_batches=2", *SHORT]
    two = tmp_path / "two"
    r = nodes.run_mpi(4, ["-m", "hpcdqn.cli", *args, f"run_dir={two}"], timeout=300)
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["env_steps"] == 2000 and s["dp"] == 2 and s["pp"] == 2
    ck = two / "checkpoints"
    with h5py.File(ck / (ck / "latest").read_text().strip(), "r") as f:   # both replicas' shards:
        assert list(f["replay/filled"][...]) == [1000, 1000]   # replica 1 lives on node2 only
    plan = json.loads((two / "summary.json").read_text())["execution_plan"]   # rank 0's stage:
    assert plan["allreduce"] == "flat", plan         # its 2 replicas, one per node: auto -> flat
    assert plan["allreduce_choice"]["nodes"] == 2 and plan["allreduce_choice"]["reason"] == \
        "one rank per node", plan
    one = tmp_path / "one"
    hpcdqn(4, [*args, f"run_dir={one}"], timeout=300)
    c = subprocess.run([sys.executable, TESTS / "cluster" / "compare_runs.py", two, one], capture_output=True,
                       text=True)
    assert c.returncode == 0 and "BITWISE-EQUAL" in c.stdout, c.stdout + c.stderr


HIER_TOLERANCE = 1e-6   # max |flat - hierarchical| / max |gradient|: 4 float32 terms summed in
                        # another order differ by a few ulps of the largest partial sum


@pytest.mark.parametrize("ranks,slots", [(4, 2), (2, 1)])
def test_hierarchical_allreduce_matches_flat_across_nodes(nodes, ranks, slots):
    """The gradient sync across the two nodes, flat and hierarchical, on the same gradients:
    every rank ends with the same bits either way; the two agree within HIER_TOLERANCE with two
    ranks per node (another sum order) and bitwise with one per node (the same sum). ``auto``
    picks hierarchical for 2 nodes x 2 ranks (the cost model's prediction, printed), flat for
    one rank per node."""
    r = nodes.run_mpi(ranks, [TESTS / "parallel" / "netns_hier.py"], slots=slots, timeout=120)
    d = json.loads(next(l[5:] for l in r.stdout.splitlines() if l.startswith("HIER ")))
    print(d)
    assert d["nodes"] == 2 and d["ranks_per_node"] == slots and d["buckets"] > 1, d
    assert d["flat_same_on_all_ranks"] and d["hier_same_on_all_ranks"], d
    assert d["max_rel_diff"] <= HIER_TOLERANCE, d
    auto = d["auto"]
    if slots == 1:
        assert d["bitwise"] and auto["algorithm"] == "flat", d
    else:
        assert auto["algorithm"] == "hierarchical", auto
        assert auto["predicted_hierarchical_s"] < auto["predicted_flat_s"], auto
