"""The cost model's between-node terms fitted on measured points: the OSU-style Allreduce sweep
(``hpcdqn.cluster.costmodel.bench_main``, unchanged) on two "nodes" made of network + UTS
namespaces joined by a veth pair (tests/netns_nodes.py), and on one of them alone.

Layouts (ranks p, ranks per node q, nodes N), every one launched by mpirun inside node1 with the
host file of the two nodes, TCP between the nodes, shared memory inside one:

    1node_p2  (2, 2, 1)   fit        1node_p4  (4, 4, 1)   fit
    2node_p2  (2, 1, 2)   fit        2node_p4  (4, 2, 2)   held out (never in the fit)

Repeats interleave the layouts (``--repeats``, default 3); per size the median over repeats of
each repeat's median is fitted (``fit_model``: non-negative least squares on relative error) and
the held-out layout is predicted. Writes benchmarks/results/netns_costmodel.json (every repeat's
points, the fit, the held-out errors, commit, load average).

What this predicts and what not: veth is a software link inside one kernel. Its latency and
bandwidth are memory copies on the same 2 cores the ranks compute on, not a NIC, a switch or
RDMA; the fitted ``alpha_net``/``beta_net`` are veth's, and say nothing about the numbers of a
real cluster network. What carries over is the *procedure* and the model's *shape* (does one
between-node latency + bandwidth term, fitted on 2 ranks over 2 nodes, predict 4 ranks over 2
nodes?), with Open MPI's real TCP path, real node detection and real process placement.

    python benchmarks/netns_costmodel.py [--repeats 3] [--max-bytes 16777216]
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from hpcdqn.cluster.costmodel import MODEL_TEXT, fit_model, relative_errors, spread, sweep_sizes  # noqa: E402
from tests.netns_nodes import NetnsNodes  # noqa: E402

LAYOUTS = {"1node_p2": (2, 2), "1node_p4": (4, 4), "2node_p2": (2, 1), "2node_p4": (4, 2)}
HELD_OUT = "2node_p4"
CAVEAT = ("veth is not a cluster network: a software link inside one kernel, its transfers are "
          "memory copies on the same 2 cores the ranks use. The fitted between-node terms are "
          "veth's and do not predict a real interconnect's latency or bandwidth; what is tested "
          "is the model's shape (one between-node latency + bandwidth term fitted on 2 ranks "
          "over 2 nodes predicting 4 ranks over 2 nodes) on Open MPI's real TCP path.")


def run_layout(nodes, name, sizes, out: Path) -> dict:
    p, q = LAYOUTS[name]
    nodes.run_mpi(p, ["-m", "hpcdqn.cluster.scale", "bench", ",".join(map(str, sizes)), out],
                  slots=q, map_by="slot", timeout=600)
    d = json.loads(out.read_text())
    assert d["ranks"] == p and d["ranks_per_node"] == q, (name, d["ranks"], d["ranks_per_node"])
    return d


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-bytes", type=int, default=16 << 20)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/netns_costmodel.json"))
    a = ap.parse_args()
    sizes = sweep_sizes(None, a.max_bytes)
    tmp = Path(tempfile.mkdtemp(prefix="netns-sweep-"))
    load = [open("/proc/loadavg").read().strip()]
    reps = {k: [] for k in LAYOUTS}
    nodes = NetnsNodes.start()
    try:
        for rep in range(a.repeats):
            for name in LAYOUTS:                          # interleaved
                reps[name].append(run_layout(nodes, name, sizes, tmp / f"{name}_{rep}.json"))
            load.append(open("/proc/loadavg").read().strip())
    finally:
        nodes.stop()
    points = {}
    for name, runs in reps.items():
        p, q = LAYOUTS[name]
        points[name] = []
        for i, n in enumerate(sizes):
            meds = [r["points"][i]["median_s"] for r in runs]
            s = spread(meds)
            points[name].append({"ranks": p, "ranks_per_node": q, "nodes": runs[0]["nodes"],
                                 "n_bytes": runs[0]["points"][i]["n_bytes"],
                                 "median_s": s["median"], "p25_s": s["p25"], "p75_s": s["p75"],
                                 "repeat_medians_s": meds})
    fit_pts = [x for k, v in points.items() if k != HELD_OUT for x in v]
    coef = fit_model(fit_pts)
    errs = relative_errors(points[HELD_OUT], coef)
    onenode = fit_model([x for k, v in points.items() if k.startswith("1node") for x in v])
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    out = {"model": MODEL_TEXT, "layouts": {k: {"ranks": p, "ranks_per_node": q}
                                           for k, (p, q) in LAYOUTS.items()},
           "fitted_on": [k for k in LAYOUTS if k != HELD_OUT], "held_out": HELD_OUT,
           "coef": coef, "coef_one_node_only": onenode,
           "held_out_median_abs_rel_err": spread([abs(e["rel_err"]) for e in errs])["median"],
           "held_out_errors": [{"n_bytes": e["n_bytes"], "measured_s": e["median_s"],
                                "model_s": e["model_s"], "rel_err": e["rel_err"]} for e in errs],
           "fit_errors": [{"layout": f"p{e['ranks']}_q{e['ranks_per_node']}", "n_bytes": e["n_bytes"],
                           "rel_err": e["rel_err"]} for e in relative_errors(fit_pts, coef)],
           "points": points, "repeats": a.repeats, "caveat": CAVEAT, "commit": commit,
           "loadavg": load}
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: coef[k] for k in ("t0", "alpha", "beta", "alpha_net", "beta_net")}))
    print(f"held out {HELD_OUT}: median |rel err| {out['held_out_median_abs_rel_err']:.3f}")
    for e in out["held_out_errors"]:
        print(f"  {e['n_bytes']:>10} B  measured {e['measured_s'] * 1e6:10.1f} us  "
              f"model {e['model_s'] * 1e6:10.1f} us  err {e['rel_err']:+.2f}")


if __name__ == "__main__":
    main()
