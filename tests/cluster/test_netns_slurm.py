"""``sbatch -N 2 slurm/train.sbatch`` on a real two-node Slurm cluster (tests/netns_slurm.py:
slurmctld + one slurmd per network/UTS namespace, srun --mpi=pmix across the veth): trains,
checkpoints, is warned with USR1, checkpoints, requeues itself, resumes on both nodes and finishes
with every metric row exactly once."""

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.netns_slurm import netns_slurm_fixture

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ROOT / "slurm" / "train.sbatch"
TINY = ["dqn.learning_starts=500", "dqn.train_frequency=100", "dqn.gradient_steps=20",
        "network.hidden=[32, 32]", "dqn.buffer_size=5000", "log.progress=false",
        "log.tensorboard=false", "log.every=200", "parallel.check_every=10"]
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
         "DEADLINE"}

cluster = pytest.fixture(scope="module")(netns_slurm_fixture)


# what a site's MPI module would set: TCP between nodes over the node network, shared memory
# inside one (no UCX, which could find the one machine's shared memory under both "nodes")
SITE_MPI = {"OMPI_MCA_pml": "ob1", "OMPI_MCA_btl": "tcp,vader,self",
            "OMPI_MCA_btl_tcp_if_include": "hpn0", "OMPI_MCA_mpi_yield_when_idle": "1"}


def sbatch(cluster, cwd, *args, env=None) -> str:
    e = cluster.env({"HPCDQN_VENV": str(Path(sys.prefix)), **SITE_MPI, **(env or {})})
    r = cluster.run(["sbatch", "--parsable", *map(str, args)], cwd=cwd, env=e)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def output(cwd, name, job) -> str:
    p = Path(cwd) / f"slurm-{name}-{job}.out"
    return p.read_text(errors="replace") if p.exists() else "(no output file)"


def metrics(run) -> list[dict]:
    with open(Path(run) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def wait_idle_then_release(cluster, job, timeout=120):
    """A requeued job is held ~2 min (BeginTime); once both nodes cleaned up the old instance,
    release it (as tests/cluster/test_slurm.py does for one node)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        node = cluster.run(["scontrol", "-o", "show", "node"]).stdout
        steps = subprocess.run(["pgrep", "-f", rf"slurmstepd: \[{job}\."], capture_output=True)
        if node.count("CPUAlloc=0 ") == 2 and "COMPLETING" not in node and steps.returncode != 0 \
                and cluster.job(job).get("JobState") == "PENDING":
            break
        time.sleep(0.5)
    time.sleep(2)
    cluster.run(["scontrol", "update", f"JobId={job}", "StartTime=now"])


@pytest.mark.timeout(480)
def test_sbatch_two_nodes_usr1_requeue_resume_no_duplicate_rows(cluster, tmp_path):
    name, total = "n2-requeue", 12000
    args = [*TINY, f"total_steps={total}", "seed=4", "eval.episodes=0"]
    job = sbatch(cluster, tmp_path, "-N", "2", "--ntasks-per-node=1", "-J", name, "--time=10",
                 TRAIN, *args)
    run = tmp_path / "runs" / f"{name}_{job}"
    deadline = time.time() + 150
    while not ((run / "metrics.csv").exists() and any(int(r["updates"]) for r in metrics(run))):
        assert time.time() < deadline, output(tmp_path, name, job) + cluster.logs()
        info = cluster.job(job)
        assert info.get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), \
            f"{info}\n{output(tmp_path, name, job)}\n{cluster.logs()}"
        time.sleep(0.2)
    info = cluster.job(job)
    assert info["NodeList"] == "node[1-2]" and info["NumNodes"] == "2", info
    layout = json.loads((run / "layout.json").read_text())
    assert layout["nodes"] == 2 and layout["ranks_per_node"] == [1, 1], layout
    assert cluster.run(["scancel", "--signal=USR1", "--batch", job]).returncode == 0
    deadline = time.time() + 120
    while int(cluster.job(job).get("Restarts", 0)) < 1:
        assert time.time() < deadline, output(tmp_path, name, job) + cluster.logs()
        time.sleep(0.5)
    first = output(tmp_path, name, job)
    # status 3 from srun, or (srun killed the slower rank once the first had exited 3) the
    # batch script's reading of summary.json: every rank wrote the checkpoint
    assert "got SIGUSR1" in first and "requeueing job" in first, first
    assert "exited with status 3" in first or "treated as 3" in first, first
    stopped_at = int(metrics(run)[-1]["env_steps"])
    assert 0 < stopped_at < total
    wait_idle_then_release(cluster, job)
    deadline = time.time() + 240
    while (info := cluster.job(job)).get("JobState") not in ENDED:
        assert time.time() < deadline, output(tmp_path, name, job) + cluster.logs()
        time.sleep(0.5)
    out = output(tmp_path, name, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}\n{out}"
    assert out.count("fresh start") == 1 and "resuming from" in out, out
    assert "hpcdqn: resumed exactly from" in out, out
    steps = [int(r["env_steps"]) for r in metrics(run)]
    assert steps == list(range(200, total + 1, 200)), steps          # every row exactly once
    s = json.loads((run / "summary.json").read_text())
    assert s["env_steps"] == total and "stopped_by_signal" not in s, s
    assert json.loads((run / "layout.json").read_text())["nodes"] == 2
