"""Node failure drill on a real two-node Slurm cluster (tests/netns_slurm.py: slurmctld + one
slurmd per network/UTS namespace; tests/netns_nodes.py). A job ``sbatch -N 2
--ntasks-per-node=1 slurm/train.sbatch`` with periodic checkpoints (every 6 s) loses node2:

- ``kill``: every process of node2 at once (SIGKILL to all of the namespace's processes: its
  slurmd, slurmstepd and the rank), as a power loss would;
- ``linkdown``: node2's network cut (``ip link set hpn0 down`` inside it); its processes live on,
  unreachable;

each once mid-training and once mid-checkpoint (the test hook HPCDQN_TEST_CKPT_SLEEP holds each
checkpoint after the first ones for 4 s before its rename; the failure strikes while a ``.tmp``
file exists). Measured: seconds from the failure to the job leaving RUNNING, its state and the
line the job printed, then node2 comes back (slurmd restarted / link up), the job is requeued
(by Slurm itself on NODE_FAIL; ``scontrol requeue`` when the batch script ended it first as
FAILED), resumes from the last valid checkpoint and must end with every env step, every metric
row once and a checkpoint at the end. Writes benchmarks/results/netns_node_failure.json.

    python benchmarks/netns_node_failure.py [--only kill-train,...]
"""

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.netns_nodes import IFACE, NetnsNodes  # noqa: E402
from tests.netns_slurm import NetnsSlurmCluster  # noqa: E402
from tests.slurm_cluster import _which  # noqa: E402

TRAIN = ROOT / "slurm" / "train.sbatch"
TINY = ["dqn.learning_starts=500", "dqn.train_frequency=100", "dqn.gradient_steps=20",
        "network.hidden=[32, 32]", "dqn.buffer_size=5000", "log.progress=false",
        "log.tensorboard=false", "log.every=200", "parallel.check_every=10", "eval.episodes=0"]
TOTAL = 60000
SITE_MPI = {"OMPI_MCA_pml": "ob1", "OMPI_MCA_btl": "tcp,vader,self",
            "OMPI_MCA_btl_tcp_if_include": IFACE, "OMPI_MCA_mpi_yield_when_idle": "1"}
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}


def metrics(run) -> list[dict]:
    with open(Path(run) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def wait(cond, timeout, what):
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def fail_node(nodes, cluster, how):
    if how == "kill":
        pids = nodes.pids("node2")
        subprocess.run(["kill", "-KILL", *map(str, pids)])
        return {"killed_pids": len(pids)}
    subprocess.run(["ip", "-n", f"{nodes.tag}-node2", "link", "set", IFACE, "down"], check=True)
    return {}


def revive_node(nodes, cluster, how):
    if how == "kill":     # node2 "reboots": its processes are gone; start its slurmd again
        for p in nodes.pids("node2"):
            subprocess.run(["kill", "-KILL", str(p)])
        cluster.procs["slurmd-node2"] = subprocess.Popen(
            nodes.exec_cmd("node2", [_which("slurmd"), "-D", "-N", "node2", "-f", cluster.conf]),
            env=cluster.env(), stdout=subprocess.DEVNULL,
            stderr=open(cluster.root / "slurmd-node2.restart.err", "w"), start_new_session=True)
    else:
        subprocess.run(["ip", "-n", f"{nodes.tag}-node2", "link", "set", IFACE, "up"], check=True)


def node_back(cluster, timeout=120):
    """Wait for both nodes to be usable again; resume node2 when Slurm keeps it DOWN."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        states = cluster.node_states()
        if all(s.rstrip("*") in ("idle", "mixed", "allocated", "completing") and not s.endswith("*")
               for s in states.values()):
            return
        if states.get("node2", "").startswith(("down", "drain")):
            cluster.run(["scontrol", "update", "NodeName=node2", "State=RESUME"])
        time.sleep(1)
    raise RuntimeError(f"node2 not back after {timeout}s: {cluster.node_states()}")


def drill(how: str, when: str, work: Path) -> dict:
    nodes = NetnsNodes.start()
    cluster = None
    try:
        cluster = NetnsSlurmCluster.start(nodes, root=work / "slurm")
        run = work / "run"
        env = cluster.env({"HPCDQN_VENV": sys.prefix, "HPCDQN_RUN_DIR": str(run), **SITE_MPI,
                           **({"HPCDQN_TEST_CKPT_SLEEP": "4@1"} if when == "checkpoint" else {})})
        r = cluster.run(["sbatch", "--parsable", "-N", "2", "--ntasks-per-node=1", "-J", "drill",
                         "--time=15", str(TRAIN), *TINY, f"total_steps={TOTAL}", "seed=7",
                         "checkpoint_minutes=0.1"], cwd=work, env=env)
        assert r.returncode == 0, r.stderr
        job = r.stdout.strip().split(";")[0]
        out_file = work / f"slurm-drill-{job}.out"
        ck = run / "checkpoints"
        wait(lambda: len(list(ck.glob("ckpt-*.h5"))) >= 2, 240, "two checkpoints")
        if when == "checkpoint":
            wait(lambda: any(ck.glob("*.tmp")), 60, "a checkpoint being written")
        else:
            wait(lambda: not any(ck.glob("*.tmp")), 60, "no checkpoint being written")
            time.sleep(1.0)
        latest_before = (ck / "latest").read_text().strip()
        tmp_at_failure = [p.name for p in ck.glob("*.tmp")]
        steps_at_failure = int(metrics(run)[-1]["env_steps"])
        t_fail = time.time()
        extra = fail_node(nodes, cluster, how)
        wait(lambda: cluster.job(job).get("JobState") in ENDED | {"PENDING", "REQUEUED",
                                                                   "REQUEUE_FED"}, 300, "job end")
        t_end = time.time() - t_fail
        info = cluster.job(job)
        state_after = info.get("JobState")
        reason = info.get("Reason")
        time.sleep(2)
        out = out_file.read_text(errors="replace") if out_file.exists() else ""
        lines = [l for l in out.splitlines() if "train.sbatch" in l or "error" in l.lower()][-6:]
        revive_node(nodes, cluster, how)
        node_back(cluster)
        requeued_by = "slurm"
        if cluster.job(job).get("JobState") in ENDED:
            cluster.run(["scontrol", "requeue", job])
            requeued_by = "scontrol requeue"
        wait(lambda: cluster.job(job).get("JobState") == "PENDING", 60, "job pending again")
        wait(lambda: "COMPLETING" not in cluster.run(["scontrol", "-o", "show", "node"]).stdout,
             90, "nodes done cleaning up")
        time.sleep(2)
        cluster.run(["scontrol", "update", f"JobId={job}", "StartTime=now"])
        wait(lambda: cluster.job(job).get("JobState") in ENDED, 600, "the resumed run's end")
        final = cluster.job(job)
        out = out_file.read_text(errors="replace")
        s = json.loads((run / "summary.json").read_text())
        steps = [int(m["env_steps"]) for m in metrics(run)]
        return {"failure": how, "when": when, "job": job, **extra,
                "env_steps_at_failure": steps_at_failure,
                "checkpoint_tmp_at_failure": tmp_at_failure, "latest_before_failure": latest_before,
                "seconds_failure_to_job_end": round(t_end, 1), "state_after_failure": state_after,
                "reason": reason, "job_lines_after_failure": lines, "requeued_by": requeued_by,
                "resumed_from": [l.strip() for l in out.splitlines() if "resumed exactly from" in l],
                "final_state": final.get("JobState"), "restarts": final.get("Restarts"),
                "final_env_steps": s["env_steps"],
                "metric_rows_each_once": steps == list(range(200, TOTAL + 1, 200)),
                "ok": (final.get("JobState") == "COMPLETED" and s["env_steps"] == TOTAL
                       and steps == list(range(200, TOTAL + 1, 200)))}
    finally:
        if cluster is not None:
            cluster.stop()
        nodes.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="kill-train,kill-checkpoint,linkdown-train,linkdown-checkpoint")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/netns_node_failure.json"))
    a = ap.parse_args()
    results = []
    for case in a.only.split(","):
        how, when = case.split("-")
        work = Path(tempfile.mkdtemp(prefix=f"drill-{case}-"))
        try:
            results.append(drill(how, when, work))
        except Exception as e:     # a drill that does not recover is a result too
            results.append({"failure": how, "when": when, "ok": False, "error": str(e)[-3000:],
                            "work_dir": str(work)})
        print(json.dumps(results[-1]), flush=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    Path(a.out).write_text(json.dumps({"drills": results, "total_steps": TOTAL, "commit": commit,
                                       "loadavg": open("/proc/loadavg").read().strip()},
                                      indent=1) + "\n")


if __name__ == "__main__":
    main()
