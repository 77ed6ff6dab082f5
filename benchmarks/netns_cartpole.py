"""The default CartPole job at dp=2 x pp=2 on two nodes (network + UTS namespaces on a veth pair,
tests/netns_nodes.py) and on one node, hpcdqn unchanged:

- ``two_nodes_kept``: block placement (``--map-by slot``): each replica's two stages on one node,
  only the gradient allreduce crosses the veth;
- ``two_nodes_split``: cyclic placement (``--map-by node``): every replica's stages on different
  nodes, activations cross the veth every micro-batch (hpcdqn warns);
- ``one_node``: plain ``mpirun -n 4`` on the machine itself.

Seed 1 (the config's default, fixed before any run). Each run must reach a final greedy eval
(100 episodes) >= 475; the three runs' model.h5 and newest checkpoints must be bitwise equal
(tests/cluster/compare_runs.py); the checkpoint's replay shards of both replicas (written by the
ranks of both nodes under block placement) must be filled. Writes
benchmarks/results/netns_cartpole.json. Needs root.

    python benchmarks/netns_cartpole.py [--steps 50000] [--out benchmarks/results/netns_cartpole.json]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.mpi_util import TESTS, hpcdqn  # noqa: E402
from tests.netns_nodes import NetnsNodes  # noqa: E402


def summary(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def replay_filled(run: Path) -> list:
    ck = run / "checkpoints"
    with h5py.File(ck / (ck / "latest").read_text().strip(), "r") as f:
        return [int(x) for x in f["replay/filled"][...]]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=50000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/netns_cartpole.json"))
    a = ap.parse_args()
    args = ["train", "pp=2", f"seed={a.seed}", f"total_steps={a.steps}", "log.progress=false",
            "log.tensorboard=false"]
    tmp = Path(tempfile.mkdtemp(prefix="netns-cartpole-"))
    runs = {}
    nodes = NetnsNodes.start()
    try:
        for name, map_by in (("two_nodes_kept", "slot"), ("two_nodes_split", "node")):
            t = time.time()
            r = nodes.run_mpi(4, ["-m", "hpcdqn.cli", *args, f"run_dir={tmp / name}"],
                              map_by=map_by, timeout=1500)
            runs[name] = {"placement": f"mpirun --map-by {map_by} over node1,node2",
                          "launch_s": round(time.time() - t, 1), "summary": summary(r.stdout),
                          "span_warning": any("span nodes" in l for l in r.stderr.splitlines())}
    finally:
        nodes.stop()
    t = time.time()
    r = hpcdqn(4, [*args, f"run_dir={tmp / 'one_node'}"], timeout=1500)
    runs["one_node"] = {"placement": "mpirun -n 4 on the machine", "launch_s": round(time.time() - t, 1),
                        "summary": summary(r.stdout), "span_warning": False}
    for name in runs:
        runs[name]["replay_filled_per_replica"] = replay_filled(tmp / name)
        runs[name]["eval_return_mean"] = runs[name]["summary"]["eval_return_mean"]
    cmp = {}
    for other in ("two_nodes_kept", "two_nodes_split"):
        c = subprocess.run([sys.executable, str(TESTS / "cluster" / "compare_runs.py"), str(tmp / other),
                            str(tmp / "one_node")], capture_output=True, text=True)
        cmp[f"{other}_vs_one_node"] = c.stdout.strip()
    ok = (all(r["eval_return_mean"] >= 475 for r in runs.values())
          and all(v.startswith("BITWISE-EQUAL") for v in cmp.values())
          and all(min(r["replay_filled_per_replica"]) > 0 for r in runs.values()))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    out = {"what": "default CartPole job, dp=2 x pp=2, seed fixed before the run; two nodes = "
                   "network + UTS namespaces on a veth pair on one 2-core machine",
           "command": " ".join(args), "runs": runs, "bitwise": cmp, "all_ok": ok,
           "commit": commit, "loadavg": open("/proc/loadavg").read().strip()}
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: (v["eval_return_mean"], v["summary"].get("wall_s")) for k, v in runs.items()}))
    print(json.dumps(cmp, indent=1))
    print("ALL-OK" if ok else "NOT-OK")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
