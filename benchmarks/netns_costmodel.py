"""The cost model's between-node terms fitted on measured points: the OSU-style Allreduce sweep
(``hpcdqn.cluster.costmodel.bench_main``, unchanged) on two "nodes" made of network + UTS
namespaces joined by a veth pair (tests/netns_nodes.py), and on one of them alone.

Layouts (ranks p, ranks per node q, nodes N), every one launched by mpirun inside node1 with the
host file of the two nodes, TCP between the nodes, shared memory inside one:

    1node_p2  (2, 2, 1)   fit        1node_p4  (4, 4, 1)   fit
    2node_p2  (2, 1, 2)   fit        2node_p4  (4, 2, 2)   held out (never in the fit)
    2node_p4_hier (4, 2, 2), the hierarchical allreduce (``HierarchicalAllreduce``: reduce in the
              node, allreduce among the 2 leaders, bcast in the node): held out

The flat points (Open MPI's MPI_Allreduce) are fitted with the flat model
(``costmodel.features_flat``: on several nodes every round may cross the network); both
algorithms at 2 nodes x 2 ranks are then predicted from those coefficients
(``costmodel.t_algorithm``) and compared with the measurement, per size, together with the
choice ``parallel.allreduce = auto`` would make there and which one was measured faster. The
earlier model (``costmodel.features``: hierarchical terms for the flat MPI_Allreduce) is fitted
too, for comparison (``legacy_*``).

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
from hpcdqn.cluster.costmodel import (ALGO_TEXT, MODEL_TEXT, choose_allreduce, features_flat,  # noqa: E402
                                      fit_model, relative_errors, spread, sweep_sizes, t_algorithm)
from tests.netns_nodes import NetnsNodes  # noqa: E402

LAYOUTS = {"1node_p2": (2, 2), "1node_p4": (4, 4), "2node_p2": (2, 1), "2node_p4": (4, 2),
           "2node_p4_hier": (4, 2)}
HELD_OUT = "2node_p4"
HELD_OUT_HIER = "2node_p4_hier"
NOT_FITTED = (HELD_OUT, HELD_OUT_HIER)
CAVEAT = ("veth is not a cluster network: a software link inside one kernel, its transfers are "
          "memory copies on the same 2 cores the ranks use. The fitted between-node terms are "
          "veth's and do not predict a real interconnect's latency or bandwidth; what is tested "
          "is the model's shape (one between-node latency + bandwidth term fitted on 2 ranks "
          "over 2 nodes predicting 4 ranks over 2 nodes) on Open MPI's real TCP path.")


def run_layout(nodes, name, sizes, out: Path) -> dict:
    p, q = LAYOUTS[name]
    algo = "hierarchical" if name.endswith("_hier") else "flat"
    nodes.run_mpi(p, ["-m", "hpcdqn.cluster.scale", "bench", ",".join(map(str, sizes)), out, algo],
                  slots=q, map_by="slot", timeout=600)
    d = json.loads(out.read_text())
    assert d["ranks"] == p and d["ranks_per_node"] == q and d["algorithm"] == algo, (name, d)
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
    write(a.out, analyse(points, a.repeats, load))


def compare_algorithms(flat: list[dict], hier: list[dict], coef: dict) -> list[dict]:
    """Per size at the held-out 2 nodes x 2 ranks: measured and predicted, both algorithms, the
    choice ``auto`` makes and the faster measured."""
    rows = []
    for f, h in zip(flat, hier):
        p, q, n = f["ranks"], f["ranks_per_node"], f["n_bytes"]
        pf, ph = t_algorithm("flat", p, n, coef, q), t_algorithm("hierarchical", p, n, coef, q)
        rows.append({"n_bytes": n, "flat_measured_s": f["median_s"], "flat_model_s": pf,
                     "flat_rel_err": (pf - f["median_s"]) / f["median_s"],
                     "hier_measured_s": h["median_s"], "hier_model_s": ph,
                     "hier_rel_err": (ph - h["median_s"]) / h["median_s"],
                     "auto_choice": choose_allreduce(2, p, q, n, 1, coef)["algorithm"],
                     "measured_faster": "hierarchical" if h["median_s"] < f["median_s"] else "flat"})
    return rows


def analyse(points: dict, repeats: int, load: list) -> dict:
    fit_pts = [x for k, v in points.items() if k not in NOT_FITTED for x in v]
    coef = fit_model(fit_pts, feature=features_flat)
    cmp = compare_algorithms(points[HELD_OUT], points[HELD_OUT_HIER], coef)
    legacy = fit_model(fit_pts)
    legacy_errs = relative_errors(points[HELD_OUT], legacy)
    onenode = fit_model([x for k, v in points.items() if k.startswith("1node") for x in v])
    med = (lambda key: spread([abs(r[key]) for r in cmp])["median"])
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    return {"model": {"flat": ALGO_TEXT["flat"], "hierarchical": ALGO_TEXT["hierarchical"]},
            "layouts": {k: {"ranks": p, "ranks_per_node": q,
                            "algorithm": "hierarchical" if k.endswith("_hier") else "flat"}
                        for k, (p, q) in LAYOUTS.items()},
            "fitted_on": [k for k in LAYOUTS if k not in NOT_FITTED],
            "held_out": list(NOT_FITTED), "coef": coef, "coef_one_node_only": onenode,
            "held_out_median_abs_rel_err": med("flat_rel_err"),
            "held_out_hier_median_abs_rel_err": med("hier_rel_err"),
            "auto_matches_measured": sum(r["auto_choice"] == r["measured_faster"] for r in cmp),
            "sizes": len(cmp), "held_out_compare": cmp,
            "legacy_model": MODEL_TEXT, "legacy_coef": legacy,
            "legacy_held_out_median_abs_rel_err": spread([abs(e["rel_err"]) for e in legacy_errs])["median"],
            "fit_errors": [{"layout": f"p{e['ranks']}_q{e['ranks_per_node']}", "n_bytes": e["n_bytes"],
                            "rel_err": e["rel_err"]} for e in relative_errors(fit_pts, legacy)],
            "points": points, "repeats": repeats, "caveat": CAVEAT, "commit": commit,
            "loadavg": load}


def write(path: str, out: dict) -> None:
    Path(path).write_text(json.dumps(out, indent=1) + "\n")
    coef = out["coef"]
    print(json.dumps({k: coef[k] for k in ("t0", "alpha", "beta", "alpha_net", "beta_net")}))
    print(f"held out 2 nodes x 2 ranks: median |rel err| flat {out['held_out_median_abs_rel_err']:.3f}, "
          f"hierarchical {out['held_out_hier_median_abs_rel_err']:.3f} (legacy model, flat: "
          f"{out['legacy_held_out_median_abs_rel_err']:.3f}); auto picks the measured-faster one at "
          f"{out['auto_matches_measured']}/{out['sizes']} sizes")
    for r in out["held_out_compare"]:
        print(f"  {r['n_bytes']:>10} B  flat {r['flat_measured_s'] * 1e6:9.1f} us (model "
              f"{r['flat_model_s'] * 1e6:9.1f}, {r['flat_rel_err']:+.2f})  hier "
              f"{r['hier_measured_s'] * 1e6:9.1f} us (model {r['hier_model_s'] * 1e6:9.1f}, "
              f"{r['hier_rel_err']:+.2f})  auto {r['auto_choice']:<12} faster {r['measured_faster']}")


if __name__ == "__main__":
    main()
