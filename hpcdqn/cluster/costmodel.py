"""The communication model of a scaling study, fitted to measured sweeps and tested on a held-out
rank count.

**The sweep** (``bench_main``, run under mpirun/srun at every rank count of a study): in-place
float32 SUM ``MPI_Allreduce`` (what the gradient sync does) over message sizes from 4 B to 64 MiB
(powers of 4, plus the gradient's own size), OSU-style: warm-up calls, then many iterations per
size (about ``target_s`` seconds' worth, at least ``min_iters``), each iteration after a
``Barrier`` and timed on every rank; an iteration's time is the slowest rank's. Reported per
size: the median over iterations and its spread (25th and 75th percentiles), never a best-of-N.

**The model** (``t_allreduce``), for ``p`` ranks on ``N`` nodes with ``q`` ranks on the fullest
node (hierarchical, as Open MPI's HAN or MPICH's SMP-aware collectives do it: within the node,
then between nodes)::

    t(p, n) = t0 + alpha * log2(q) + beta * 2(q-1)/q * n            (inside a node)
                 + alpha_net * log2(N) + beta_net * 2(N-1)/N * n    (between nodes)

a call overhead ``t0``, a latency per recursive-doubling round and a ring/Rabenseifner bandwidth
term at each level. The coefficients are non-negative least squares on relative error over the
sweep medians (``fit_model``); a level whose terms no measured point exercises (no multi-node
point, say) stays at zero and the fit says so. How the cost grows with ``p`` is *tested*:
``held_out`` fits on every rank count but the largest and reports the relative error of the
prediction at the largest, per message size. The throughput prediction adds a **straggler
term** for training: the replicas' wait before each allreduce, ``sigma * E[max of dp standard
normals]`` (the mean replica waits for the slowest), with ``sigma`` fitted to the waits the
study measured (``fit_straggler``). ``hpcdqn.cluster.scale`` runs the study and draws it.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from pathlib import Path

from hpcdqn.parallel.allreduce_model import (ALGO_TEXT, DEFAULT_COEF, TERMS, choose_allreduce,  # noqa: F401
                                             features_flat, features_hier, t_algorithm)

PREDICT_RANKS = [2 ** k for k in range(1, 11)]     # 2 ... 1024
EXTRAPOLATION_FACTOR = 8       # predictions beyond 8x the largest fitted p are marked as such
LABEL = "prediction (model)"
MODEL_TEXT = ("t(p, n) = t0 + alpha*log2(q) + beta*2(q-1)/q*n + alpha_net*log2(N) "
              "+ beta_net*2(N-1)/N*n  (q ranks on the fullest node, N nodes)")
MAX_SWEEP_BYTES = 64 * 2**20


def sweep_sizes(grad_bytes: int | None = None, max_bytes: int = MAX_SWEEP_BYTES) -> list[int]:
    """4 B, 16 B, ... (powers of 4) up to ``max_bytes``, plus the gradient's size."""
    sizes = {4 ** k for k in range(1, 40) if 4 ** k <= max_bytes}
    if grad_bytes:
        sizes.add(max(4, int(grad_bytes) // 4 * 4))
    return sorted(sizes)


def spread(values) -> dict:
    """Median and the 25th/75th percentiles."""
    import numpy as np

    q = np.percentile(np.asarray(values, dtype=np.float64), [25, 50, 75])
    return {"median": float(q[1]), "p25": float(q[0]), "p75": float(q[2])}


def bench_main(sizes: list[int], path: str, target_s: float = 0.2, min_iters: int = 10,
               max_iters: int = 2000, algorithm: str = "flat") -> None:
    """Under mpirun/srun: the sweep (see the module docstring); rank 0 writes JSON to ``path``.
    ``algorithm``: ``flat`` (MPI_Allreduce) or ``hierarchical`` (``HierarchicalAllreduce``, the
    gradient sync's ``parallel.allreduce = hierarchical``)."""
    import numpy as np
    from mpi4py import MPI

    from hpcdqn.parallel.allreduce import HierarchicalAllreduce
    from hpcdqn.parallel.grid import RankGrid

    comm = MPI.COMM_WORLD
    grid = RankGrid(comm, 1)
    hier = HierarchicalAllreduce(comm) if algorithm == "hierarchical" else None

    def allreduce(buf):
        if hier is not None:
            hier.sum_(buf)
        else:
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    points = []
    for nbytes in sizes:
        buf = np.zeros(max(1, nbytes // 4), dtype=np.float32)
        t = time.perf_counter()
        for _ in range(5):                                   # warm-up (and a first estimate)
            allreduce(buf)
        one = comm.allreduce((time.perf_counter() - t) / 5, op=MPI.MAX)
        iters = comm.bcast(int(min(max_iters, max(min_iters, target_s / max(one, 1e-7)))), root=0)
        dt = np.empty(iters)
        for i in range(iters):
            comm.Barrier()
            t = time.perf_counter()
            allreduce(buf)
            dt[i] = time.perf_counter() - t
        slowest = np.empty_like(dt)
        comm.Allreduce(dt, slowest, op=MPI.MAX)              # an iteration = its slowest rank
        s = spread(slowest)
        points.append({"n_bytes": int(buf.nbytes), "iters": iters, "median_s": s["median"],
                       "p25_s": s["p25"], "p75_s": s["p75"]})
    if comm.Get_rank() == 0:
        Path(path).write_text(json.dumps({"ranks": comm.Get_size(), "nodes": grid.nodes,
                                          "ranks_per_node": max(grid.ranks_per_node),
                                          "algorithm": algorithm, "points": points}))
    if hier is not None:
        hier.free()
    grid.free()


# -- the model ----------------------------------------------------------------------------------
def features(p: int, n: float, q: int | None = None) -> list[float]:
    """The model's terms for ``p`` ranks, ``n`` bytes, ``q`` ranks on the fullest node (default:
    all on one node)."""
    q = min(p, q or p)
    nodes = math.ceil(p / q)
    return [1.0, math.log2(q), 2 * (q - 1) / q * n, math.log2(nodes), 2 * (nodes - 1) / nodes * n]


def t_allreduce(p: int, n: float, coef: dict, q: int | None = None) -> float:
    return sum(c * f for c, f in zip((coef[k] for k in TERMS), features(p, n, q)))


def nnls_small(A, b):
    """Non-negative least squares for a handful of columns: the best non-negative solution over
    every subset of columns (exact for so few; no SciPy needed)."""
    import numpy as np

    best, best_err = np.zeros(A.shape[1]), float(((A @ np.zeros(A.shape[1]) - b) ** 2).sum())
    for k in range(1, A.shape[1] + 1):
        for cols in itertools.combinations(range(A.shape[1]), k):
            c = np.zeros(A.shape[1])
            c[list(cols)] = np.linalg.lstsq(A[:, cols], b, rcond=None)[0]
            err = float(((A @ c - b) ** 2).sum())
            if (c >= 0).all() and err < best_err - 1e-15:
                best, best_err = c, err
    return best


def fit_model(points: list[dict], feature=features) -> dict:
    """Coefficients (``TERMS``, seconds and seconds/byte, all >= 0) fitted to sweep points
    ({ranks, n_bytes, median_s[, ranks_per_node]}) by least squares on relative error, with the
    terms of ``feature`` (default: ``features``; ``features_flat`` for a flat MPI_Allreduce across
    nodes). Terms no point exercises (every column zero) stay 0 and are listed in 'unfitted'."""
    import numpy as np

    pts = [q for q in points if q["median_s"] > 0]
    if not pts:
        return {**{k: 0.0 for k in TERMS}, "unfitted": list(TERMS), "points": 0}
    X = np.array([feature(q["ranks"], q["n_bytes"], q.get("ranks_per_node")) for q in pts])
    t = np.array([q["median_s"] for q in pts])
    used = [j for j in range(len(TERMS)) if np.any(X[:, j] != 0)]
    coef = np.zeros(len(TERMS))
    coef[used] = nnls_small(X[:, used] / t[:, None], np.ones_like(t))
    return {**{k: float(c) for k, c in zip(TERMS, coef)},
            "unfitted": [TERMS[j] for j in range(len(TERMS)) if j not in used],
            "points": len(pts), "ranks": sorted({q["ranks"] for q in pts})}


def relative_errors(points: list[dict], coef: dict) -> list[dict]:
    """Each point with the model's value and (model - measured) / measured."""
    out = []
    for q in points:
        m = t_allreduce(q["ranks"], q["n_bytes"], coef, q.get("ranks_per_node"))
        out.append({**q, "model_s": m, "rel_err": (m - q["median_s"]) / q["median_s"]})
    return out


def held_out_skipped(points: list[dict]) -> str | None:
    """Why the held-out test cannot be made on these sweep points (None: it can). The fit must
    see communication (a rank count p >= 2: at p = 1 an allreduce is a local copy, every term
    but t0 is zero) and another communicating rank count must be left to test on."""
    ranks = sorted({q["ranks"] for q in points})
    talking = [p for p in ranks if p >= 2]
    if len(talking) >= 2:
        return None
    return (f"skipped: a held-out test needs at least two communicating rank counts (p >= 2), one "
            f"to fit the communication terms and one to test them on; this sweep has p={ranks}"
            + (f" (a fit on p={[p for p in ranks if p < talking[0]]} has no communication term "
               f"to predict p={talking[0]} with)" if talking and talking[0] > ranks[0] else ""))


def held_out(points: list[dict], grad_bytes: int | None = None) -> dict | None:
    """Fit on every rank count but the largest, predict the largest: per-size relative errors,
    their median |error| and the error at the gradient's size (None where ``held_out_skipped``
    says why: fewer than two communicating rank counts, nothing to fit or test on)."""
    ranks = sorted({q["ranks"] for q in points})
    if held_out_skipped(points):
        return None
    top = ranks[-1]
    coef = fit_model([q for q in points if q["ranks"] < top])
    errs = relative_errors([q for q in points if q["ranks"] == top], coef)
    at_grad = [e for e in errs if grad_bytes and e["n_bytes"] == max(4, int(grad_bytes) // 4 * 4)]
    return {"held_out_ranks": top, "fitted_on_ranks": ranks[:-1], "coef": coef,
            "median_abs_rel_err": float(spread([abs(e["rel_err"]) for e in errs])["median"]),
            "rel_err_at_grad_bytes": at_grad[0]["rel_err"] if at_grad else None,
            "errors": [{"n_bytes": e["n_bytes"], "measured_s": e["median_s"],
                        "model_s": e["model_s"], "rel_err": e["rel_err"]} for e in errs]}


# -- the straggler term -------------------------------------------------------------------------
def expected_max_normal(p: int) -> float:
    """E[max of p independent standard normals] (0 for p = 1), by numerical integration."""
    if p <= 1:
        return 0.0
    import numpy as np

    x = np.linspace(-9.0, 9.0, 20001)
    pdf = np.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    return float(np.trapezoid(x * p * pdf * cdf ** (p - 1), x))


def fit_straggler(waits: list[tuple[int, float]]) -> float | None:
    """``sigma`` [s] of ``wait(dp) = sigma * E[max of dp normals]`` from measured (dp, seconds
    waited per update) pairs (dp > 1), least squares; None without any."""
    pts = [(dp, w) for dp, w in waits if dp > 1]
    if not pts:
        return None
    e = [expected_max_normal(dp) for dp, _ in pts]
    return max(0.0, sum(ei * w for ei, (_, w) in zip(e, pts)) / sum(ei * ei for ei in e))


# -- the throughput prediction ------------------------------------------------------------------
def predict(base: dict, coef: dict, meta: dict, sigma: float | None, band: float | None,
            ranks=PREDICT_RANKS) -> list[dict]:
    """Throughput and efficiency at ``ranks`` (and the measured ones) from the smallest measured
    rank count's medians ``base`` ({ranks, wall_s, updates, env_steps, allreduce_s, wait_s}: the
    time per update outside the gradient sync is kept) plus, per update, the model's allreduce
    of ``grad_bytes / pp`` bytes over ``dp`` replicas (in <= ``bucket_mb`` buckets) and the
    straggler wait ``sigma * E[max of dp normals]``. Weak: per-replica work is constant; strong:
    each replica's env steps and updates shrink as 1/dp. ``band``: the relative error applied to
    the allreduce time for the low/high columns. Each row says how far it extrapolates: beyond
    ``EXTRAPOLATION_FACTOR`` times the largest fitted rank count, and onto more nodes than any
    measurement had (``meta['measured_nodes']``: there the between-node terms are whatever the
    fit could say, zero without multi-node sweeps)."""
    pp, mode = meta["pp"], meta["mode"]
    n = (meta.get("grad_bytes") or 0) / pp
    buckets = max(1, math.ceil(n / (meta.get("bucket_mb", 25.0) * 2**20)))
    q = meta.get("ranks_per_node") or None
    q_dp = max(1, q // pp) if q else None         # a stage's replicas on one node
    dp0 = base["ranks"] // pp
    per_update = (base["wall_s"] - base["allreduce_s"] - base["wait_s"]) / base["updates"]
    fitted = max(coef.get("ranks") or [1])
    node_max = max(meta.get("measured_nodes") or [1])

    def wall(dp, rel):
        t_ar = buckets * t_allreduce(dp, n / buckets, coef, q_dp) * (1 + rel) if dp > 1 else 0.0
        t = per_update + t_ar + (sigma or 0.0) * expected_max_normal(dp)
        updates = base["updates"] * (1 if mode == "weak" else dp0 / dp)
        return updates * t, t_ar

    steps = (lambda dp: base["env_steps"] * (dp / dp0 if mode == "weak" else 1))
    ref, _ = wall(dp0, 0.0)
    out = []
    for p in sorted(set(ranks) | set(meta.get("measured_ranks", []))):
        dp = p // pp
        nodes = math.ceil(p / q) if q else 1
        row = {"ranks": p, "dp": dp, "nodes": nodes,
               "extrapolation": p > EXTRAPOLATION_FACTOR * fitted,
               "beyond_measured_nodes": nodes > node_max}
        for tag, rel in (("", 0.0), ("_low", band or 0.0), ("_high", -(band or 0.0))):
            w, t_ar = wall(dp, rel)
            row[f"env_steps_per_s{tag}"] = steps(dp) / w
            ideal = ref * (1 if mode == "weak" else dp0 / dp)
            row[f"efficiency{tag}"] = ideal / w
            if not tag:
                row["updates_per_s"] = base["updates"] * (1 if mode == "weak" else dp0 / dp) / w
                row["t_allreduce_s"] = t_ar
                row["t_wait_s"] = (sigma or 0.0) * expected_max_normal(dp)
        out.append({k: (round(v, 9) if isinstance(v, float) else v) for k, v in row.items()})
    return out
