"""Flat vs hierarchical allreduce: the two algorithms' times in the terms of the cost model
(``hpcdqn.cluster.costmodel``, which fits the coefficients and re-exports this), and the choice
``parallel.allreduce = auto`` makes from them (``hpcdqn.parallel.allreduce.choose_algorithm``).
Plain arithmetic: no MPI here."""

from __future__ import annotations

import math

TERMS = ("t0", "alpha", "beta", "alpha_net", "beta_net")
ALGO_TEXT = {
    "flat": "flat MPI_Allreduce over all p ranks: on one node t0 + alpha*log2(p) + beta*2(p-1)/p*n; "
            "on N > 1 nodes every round may cross the network: t0 + alpha_net*log2(p) "
            "+ beta_net*2(p-1)/p*n",
    "hierarchical": "reduce to a leader per node, allreduce among the N leaders, broadcast in the "
                    "node: 3*t0 + 2*alpha*log2(q) + beta*2(q-1)/q*n + alpha_net*log2(N) "
                    "+ beta_net*2(N-1)/N*n (q ranks on the fullest node)"}
# The coefficients ``auto`` uses: the fit of benchmarks/results/netns_costmodel.json (two network
# namespaces on a veth pair, 2 cores; between-node terms are veth's, not a cluster network's).
DEFAULT_COEF = {"t0": 0.0, "alpha": 1.99e-06, "beta": 2.24e-10,
                "alpha_net": 7.99e-06, "beta_net": 4.84e-10}


def features_flat(p: int, n: float, q: int | None = None) -> list[float]:
    """The terms of Open MPI's flat allreduce (``ALGO_TEXT['flat']``) for ``p`` ranks with ``q``
    on the fullest node: one node's shared-memory terms, or the network's on several nodes."""
    q = min(p, q or p)
    if q >= p:
        return [1.0, math.log2(p), 2 * (p - 1) / p * n, 0.0, 0.0]
    return [1.0, 0.0, 0.0, math.log2(p), 2 * (p - 1) / p * n]


def features_hier(p: int, n: float, q: int | None = None) -> list[float]:
    """The terms of the hierarchical allreduce (``ALGO_TEXT['hierarchical']``)."""
    q = min(p, q or p)
    nodes = math.ceil(p / q)
    return [3.0, 2 * math.log2(q), 2 * (q - 1) / q * n, math.log2(nodes), 2 * (nodes - 1) / nodes * n]


def t_algorithm(algorithm: str, p: int, n: float, coef: dict, q: int | None = None) -> float:
    """Predicted seconds of one ``algorithm`` ('flat' | 'hierarchical') allreduce of ``n`` bytes."""
    f = {"flat": features_flat, "hierarchical": features_hier}[algorithm](p, n, q)
    return sum(coef[k] * x for k, x in zip(TERMS, f))


def choose_allreduce(nodes: int, p: int, q: int, n_bytes: float, buckets: int = 1,
                     coef: dict | None = None) -> dict:
    """flat or hierarchical for ``p`` ranks on ``nodes`` nodes (``q`` on the fullest), ``n_bytes``
    per update in ``buckets`` equal buckets: flat on one node or with one rank per node (there
    the hierarchy adds calls and saves nothing), else the one predicted faster per update."""
    coef = coef or DEFAULT_COEF
    n = n_bytes / max(1, buckets)
    pred = {a: buckets * t_algorithm(a, p, n, coef, q) for a in ("flat", "hierarchical")}
    if nodes <= 1 or q <= 1:
        algo = "flat"
        why = "one node" if nodes <= 1 else "one rank per node"
    else:
        algo = "hierarchical" if pred["hierarchical"] < pred["flat"] else "flat"
        why = ("hierarchical predicted faster" if algo == "hierarchical"
               else "flat predicted at least as fast")
    return {"algorithm": algo, "reason": why, "nodes": nodes, "ranks": p, "ranks_per_node": q,
            "n_bytes": int(n_bytes), "buckets": buckets,
            "predicted_flat_s": pred["flat"], "predicted_hierarchical_s": pred["hierarchical"]}
