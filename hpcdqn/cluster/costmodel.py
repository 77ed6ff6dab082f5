"""The allreduce cost model of a scaling study: a microbenchmark of ``MPI_Allreduce`` (in place,
float32, sum: what the gradient sync does), the fitted model

    t_allreduce(p, n_bytes) = alpha * log2(p) + beta * 2 * (p - 1) / p * n_bytes

(a latency term per tree/recursive-doubling stage and a ring-style bandwidth term), and the
throughput and efficiency it predicts at rank counts not measured (``hpcdqn.cluster.scale`` runs
the study and draws it). A model, not a measurement: it ignores contention, stragglers, topology
and pipeline traffic.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

PREDICT_RANKS = [16, 32, 64, 128, 256, 512, 1024]
LABEL = "prediction (model)"


def bench_main(sizes: list[int], path: str, batches: int = 5, target_s: float = 0.05) -> None:
    """Under mpirun/srun: time in-place float32 SUM Allreduce per message size (max over ranks,
    best of ``batches`` batches, so other load on shared machines disturbs it least)."""
    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    points = []
    for nbytes in sizes:
        buf = np.zeros(max(1, nbytes // 4), dtype=np.float32)
        for _ in range(3):
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        comm.Barrier()
        t = time.perf_counter()
        comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        one = comm.allreduce(time.perf_counter() - t, op=MPI.MAX)
        iters = int(min(2000, max(5, target_s / max(one, 1e-7))))
        iters = comm.bcast(iters, root=0)
        best = math.inf
        for _ in range(batches):
            comm.Barrier()
            t = time.perf_counter()
            for _ in range(iters):
                comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            dt = comm.allreduce((time.perf_counter() - t) / iters, op=MPI.MAX)
            best = min(best, dt)
        points.append([int(buf.nbytes), best])
    if comm.Get_rank() == 0:
        Path(path).write_text(json.dumps({"ranks": comm.Get_size(), "points": points}))


def fit_allreduce(points: list[dict]) -> tuple[float, float]:
    """alpha [s], beta [s/byte] >= 0 for t = alpha*log2(p) + beta*2(p-1)/p*n, least squares on
    relative error (the timings span orders of magnitude)."""
    import numpy as np

    pts = [q for q in points if q["ranks"] > 1 and q["seconds"] > 0]
    if not pts:
        return 0.0, 0.0
    X = np.array([[math.log2(q["ranks"]), 2 * (q["ranks"] - 1) / q["ranks"] * q["n_bytes"]]
                  for q in pts])
    t = np.array([q["seconds"] for q in pts])
    Xw, tw = X / t[:, None], np.ones_like(t)

    def solve(cols):
        coef = np.zeros(2)
        if cols:
            coef[cols] = np.linalg.lstsq(Xw[:, cols], tw, rcond=None)[0]
        return coef

    def err(c):
        return float(((Xw @ c - tw) ** 2).sum())

    coef = solve([0, 1])
    if (coef < 0).any():   # 2-variable NNLS: the best of the feasible one-term fits
        cands = [c for c in (solve([0]), solve([1])) if (c >= 0).all()]
        coef = min(cands, key=err) if cands else np.zeros(2)
    return float(coef[0]), float(coef[1])


def t_allreduce(p: int, n_bytes: float, alpha: float, beta: float, buckets: int = 1) -> float:
    if p <= 1:
        return 0.0
    return buckets * alpha * math.log2(p) + beta * 2 * (p - 1) / p * n_bytes


def predict(rows, alpha, beta, meta, ranks=PREDICT_RANKS) -> tuple[list[dict], dict]:
    """Throughput/efficiency at ``ranks`` from the smallest measured point plus the fitted
    allreduce cost. Compute time per replica is the baseline's wall time minus its allreduce
    time; each update adds one gradient allreduce over the ``dp`` replicas (``grad_bytes/pp``
    bytes per stage). Weak: per-replica work is constant; strong: each replica's env steps and
    updates shrink as 1/dp (so do compute and the number of allreduces)."""
    pp, mode = meta["pp"], meta["mode"]
    n = (meta.get("grad_bytes") or 0) / pp
    buckets = max(1, math.ceil(n / (meta.get("bucket_mb", 25.0) * 2**20)))
    p0 = min(r["ranks"] for r in rows)
    base = [r for r in rows if r["ranks"] == p0]
    mean = {k: sum(r[k] for r in base) / len(base)
            for k in ("wall_s", "allreduce_share", "env_steps", "updates")}
    dp0 = p0 // pp
    comp = mean["wall_s"] * (1 - mean["allreduce_share"])    # seconds of non-allreduce work
    upd = mean["updates"]

    def point(p):
        dp = p // pp
        tar = t_allreduce(dp, n, alpha, beta, buckets)
        if mode == "weak":
            wall = comp + upd * tar
            steps, updates = mean["env_steps"] * dp / dp0, upd
        else:
            wall = (comp + upd * tar) * dp0 / dp
            steps, updates = mean["env_steps"], upd * dp0 / dp
        return {"ranks": p, "dp": dp, "env_steps_per_s": steps / wall, "updates_per_s": updates / wall,
                "t_allreduce_s": tar, "allreduce_share": updates * tar / wall, "wall": wall}

    ref = point(p0)
    out = []
    for p in sorted(set(ranks) | {r["ranks"] for r in rows}):
        q = point(p)
        q["efficiency"] = ref["wall"] / q["wall"] if mode == "weak" else \
            (ref["wall"] * p0) / (q["wall"] * p)
        q.pop("wall")
        out.append({k: (round(v, 9) if isinstance(v, float) else v) for k, v in q.items()})
    info = {"label": LABEL, "mode": mode,
            "model": "t_allreduce(p, n_bytes) = alpha*log2(p) + beta*2*(p-1)/p*n_bytes",
            "alpha_s": alpha, "beta_s_per_byte": beta,
            "bandwidth_bytes_per_s": (1 / beta) if beta > 0 else None,
            "grad_bytes": meta.get("grad_bytes"), "bytes_per_allreduce": n, "buckets": buckets,
            "baseline": {"ranks": p0, **{k: round(v, 6) for k, v in mean.items()},
                         "compute_s": round(comp, 6)},
            "assumptions": [
                "compute time per replica as measured at the smallest rank count",
                "one gradient allreduce per update over the dp replicas, cost from the fitted model",
                "no contention, stragglers, topology effects or pipeline traffic; this is a "
                "prediction, not a measurement"],
            "rows": out}
    return out, info
