"""The cost model with roles: env frames/s and learner updates/s of an actor-learner run
(``actors=N``, ``dp=M`` learner replicas, ``hpcdqn.actors``) from measured per-role costs, the
transfer sizes and the cores the ranks share. Plain arithmetic: no MPI here.

One *iteration* is one vector-env step of every actor (``rl.schedule``); a training *phase* is
``P`` iterations (``train_every``) followed by ``K`` updates (``updates_per_phase``). Per
phase, on the busiest replica (``a = ceil(N / M)`` actors):

- a learner ingests ``P`` iterations: ``i_L = learner_iter_s + a*E*insert_s`` each (+ the wire
  terms below when the actors sit on other nodes), then updates:
  ``U = K*(update_s + allreduce(M, gradient bytes)) + publishes*a*(alpha + beta*W)``
  (weights of ``W`` bytes to each of its actors every ``publish_every`` updates);
- an actor makes ``P`` steps of ``w_A = actor_step_s + actor_send_s/send_every
  + (publishes/P)*(alpha + beta*W)`` each;
- the rate limiter: learners wait for data, actors wait once ``ahead`` iterations
  (``actor.max_ahead``, 0 = one phase) ahead of their learner, so the actors fill at most
  ``ahead`` iterations while the learner updates:
  ``phase = U + max(P*i_L, P*w_A - min(ahead*w_A, U))`` (``= max(U + P*i_L, P*w_A)`` when
  ``ahead >= P``: whichever side is slower sets the pace);
- the cores: with more ranks than cores (``M + N > C``) the phase is at least the CPU work of
  every rank over the cores, ``(M*(P*i_L + U)/eta_L + N*P*w_A/eta_A) / C``; the scheduling
  efficiencies ``eta_L``, ``eta_A`` (<= 1: context switches, cold caches, polling of the
  waiting ranks; per role because a learner's work comes in long update bursts and an
  actor's in short env steps between blocking calls) are the fitted scalars.

Warm-up iterations (no updates) cost ``max(i_L, w_A)`` (and the core bound). The allreduce
and point-to-point terms (``alpha``, ``beta``; ``alpha_net``, ``beta_net`` across nodes) are
the data-parallel cost model's (``allreduce_model.DEFAULT_COEF``), not refitted here. The
per-role constants come from a run's ``summary.json`` (``constants_from_summary``);
``DEFAULT_CONSTANTS`` are those of ``benchmarks/results/actors_costmodel.json``.
"""

from __future__ import annotations

import math
import statistics

from hpcdqn.parallel.allreduce_model import DEFAULT_COEF, t_algorithm

MODEL_TEXT = ("per phase of P iterations and K updates, busiest replica with a actors: "
              "phase = U + max(P*i_L, P*w_A - min(ahead*w_A, U)), i_L = learner_iter_s + "
              "a*E*insert_s, U = K*(update_s + allreduce(M)) + publishes*a*(alpha + "
              "beta*W), w_A = actor_step_s + actor_send_s/send_every + publishes/P*(alpha + "
              "beta*W); with M + N > C ranks on C cores phase >= (M*(P*i_L + U)/eta_L + N*P*w_A/eta_A)/C")
CONSTANTS = {
    "actor_step_s": "actor seconds per vector-env step outside sends and waits (env, inference, "
                    "n-step window, taking weights)",
    "actor_send_s": "actor seconds per message (pack + Isend of actor.send_every steps)",
    "learner_iter_s": "learner seconds per iteration outside ingest, updates and waits (the "
                      "loop, progress messages, logging)",
    "insert_s": "learner seconds per transition received and inserted into its replay shard",
    "update_s": "learner seconds per update without the allreduce: sampling, targets, "
                "gradient and optimizer step (fitted with learner_iter_s)",
    "compute_s": "of update_s, the timed gradient + optimizer step (reported, not used)",
}
# Fitted from benchmarks/results/actors_costmodel.json (CartPole-v1, the 256x256 MLP, 1 learner
# + 1 actor on 2 cores; eta_learner and eta_actor on 1 learner + 3 actors); ``tests/parallel/test_roles_model.py``
# checks these equal the file's.
DEFAULT_CONSTANTS = {"actor_step_s": 0.0001553, "actor_send_s": 4.827e-05, "learner_iter_s": 9.121e-06,
                     "insert_s": 1.799e-05, "update_s": 0.0008132, "compute_s": 0.0007184,
                     "eta_learner": 0.74, "eta_actor": 0.51}
DEFAULT_SOURCE = ("defaults, from benchmarks/results/actors_costmodel.json: CartPole-v1, MLP "
                  "256x256, 1 learner + 1 actor on a 2-core VM; eta_learner, eta_actor: 1 learner "
                  "+ 3 actors there")


def transfer(n_bytes: float, remote: bool, coef: dict | None = None) -> float:
    """Seconds of one point-to-point message of ``n_bytes``: in a node (shared memory) or
    across nodes (``remote``), in the data-parallel model's latency/bandwidth terms."""
    c = coef or DEFAULT_COEF
    if remote:
        return c["alpha_net"] + c["beta_net"] * n_bytes
    return c["alpha"] + c["beta"] * n_bytes


def wire_bytes_per_transition(obs_bytes: int) -> int:
    """Bytes one n-step transition takes in a data message (``actors.wire``): two observations,
    an int64 action, a float32 return and discount."""
    return 2 * obs_bytes + 8 + 4 + 4


def allreduce_s(m: int, grad_bytes: float, remote: bool, coef: dict | None = None) -> float:
    """One gradient allreduce among ``m`` learners (flat; one learner per node if ``remote``)."""
    if m <= 1:
        return 0.0
    return t_algorithm("flat", m, grad_bytes, coef or DEFAULT_COEF, q=1 if remote else m)


def role_work(c: dict, run: dict, remote: bool = False, coef: dict | None = None) -> dict:
    """Per-phase work of one learner and per-iteration work of one actor (seconds).

    ``run``: ``learners`` (M), ``actors`` (N), ``num_envs`` (E), ``train_every`` (P),
    ``updates_per_phase`` (K), ``send_every``, ``publish_every``, ``param_bytes`` (W),
    ``obs_bytes``; ``remote``: actors and learners on different nodes (network terms)."""
    m, n, e, p = run["learners"], run["actors"], run["num_envs"], run["train_every"]
    a = math.ceil(n / m)
    pubs = run["updates_per_phase"] / run["publish_every"]
    w_pub = transfer(run["param_bytes"], remote, coef)
    per_msg = transfer(run["send_every"] * e * wire_bytes_per_transition(run["obs_bytes"]),
                       True, coef) if remote else 0.0
    i_l = c["learner_iter_s"] + a * e * c["insert_s"] + a * per_msg / run["send_every"]
    allreduce = allreduce_s(m, run["param_bytes"], remote, coef)
    updates = run["updates_per_phase"] * (c["update_s"] + allreduce)
    w_a = c["actor_step_s"] + c["actor_send_s"] / run["send_every"] + pubs / p * w_pub
    return {"i_L": i_l, "U": updates + pubs * a * w_pub, "w_A": w_a, "actors_per_learner": a,
            "updates_s": updates, "publish_s": pubs * a * w_pub, "ingest_s": p * i_l}


def phase_time(c: dict, run: dict, cores: int, remote: bool = False,
               coef: dict | None = None) -> dict:
    """Seconds of one training phase and one warm-up iteration, and which side sets the pace:
    ``learners``, ``actors`` or ``cores`` (``cores``: CPU cores the M + N ranks share; 0 or
    None: one core per rank)."""
    w = role_work(c, run, remote, coef)
    m, n, p = run["learners"], run["actors"], run["train_every"]
    ahead = run.get("max_ahead") or p
    i_l, u, w_a = w["i_L"], w["U"], w["w_A"]
    learner, actor = u + p * i_l, p * w_a
    phase = u + max(p * i_l, p * w_a - min(ahead * w_a, u))
    warm = max(i_l, w_a)
    limit = "learners" if learner >= actor else "actors"
    if cores and m + n > cores:
        el, ea = c.get("eta_learner", 1.0), c.get("eta_actor", 1.0)
        cpu = (m * learner / el + n * actor / ea) / cores
        warm = max(warm, (m * i_l / el + n * w_a / ea) / cores)
        if cpu > phase:
            phase, limit = cpu, "cores"
    return {**w, "phase_s": phase, "warmup_iter_s": warm, "limit": limit}


def predict(c: dict, run: dict, cores: int, remote: bool = False, coef: dict | None = None) -> dict:
    """Predicted env frames/s and learner updates/s of ``run`` (``role_work``'s keys and the
    schedule's ``n_iters``, ``learn_start``, ``steps_per_iter``, ``total_updates``): over the
    whole run (warm-up included, as ``summary.json``'s) and in steady training."""
    t = phase_time(c, run, cores, remote, coef)
    p, start = run["train_every"], min(run["learn_start"], run["n_iters"])
    wall = start * t["warmup_iter_s"] + (run["n_iters"] - start) / p * t["phase_s"]
    steady_fps = p * run["steps_per_iter"] / t["phase_s"]
    return {"env_fps": run["n_iters"] * run["steps_per_iter"] / wall,
            "updates_per_s": run["total_updates"] / wall, "wall_s": wall,
            "steady_env_fps": steady_fps,
            "steady_updates_per_s": run["updates_per_phase"] / t["phase_s"],
            "limit": t["limit"], "phase_s": t["phase_s"]}


def run_from_schedule(sched: dict, learners: int, actors: int, actor_cfg: dict,
                      param_bytes: int, obs_bytes: int) -> dict:
    """``predict``'s ``run`` from a resolved schedule (``Schedule.as_dict()`` /
    ``summary.json``'s ``schedule``) and the ``[actor]`` config section."""
    return {"learners": learners, "actors": actors, "num_envs": sched["num_envs"],
            "train_every": sched["train_every"], "updates_per_phase": sched["updates_per_phase"],
            "n_iters": sched["n_iters"], "learn_start": sched["learn_start"],
            "steps_per_iter": sched["steps_per_iter"], "total_updates": sched["total_updates"],
            "send_every": actor_cfg["send_every"], "publish_every": actor_cfg["publish_every"],
            "max_ahead": actor_cfg["max_ahead"], "param_bytes": param_bytes, "obs_bytes": obs_bytes}


# -- from measurements ---------------------------------------------------------------------------
def measured_rates(summary: dict) -> dict:
    """A run's achieved rates from its ``summary.json``: env frames/s and learner updates/s
    over the learners' loop wall time (warm-up included)."""
    wall = summary["wall_s"]
    return {"wall_s": wall, "env_fps": summary["env_steps"] / wall,
            "updates_per_s": summary["updates"] / wall}


def run_of_summary(summary: dict, actor_cfg: dict, obs_bytes: int) -> dict:
    """``predict``'s ``run`` for the layout and schedule a ``summary.json`` records (its
    ``parameter_bytes_per_stage`` hold online + target parameters and Adam's two moments:
    4x the network's bytes)."""
    s = summary
    m = s.get("dp") or sum(r["role"] == "learner" for r in s["ranks"])
    n = s.get("actors") or sum(r["role"] == "actor" for r in s["ranks"])
    return run_from_schedule(s["schedule"], m, n, actor_cfg,
                             sum(int(b) for b in s["parameter_bytes_per_stage"]) // 4, obs_bytes)


def nonneg_lstsq2(rows: list[tuple[float, float, float]]) -> tuple[float, float]:
    """Non-negative least squares of ``y = a*x1 + b*x2`` over ``(x1, x2, y)`` rows (closed form;
    a coefficient that would be negative is set to 0 and the other refitted)."""
    s11 = sum(x1 * x1 for x1, _, _ in rows)
    s22 = sum(x2 * x2 for _, x2, _ in rows)
    s12 = sum(x1 * x2 for x1, x2, _ in rows)
    y1 = sum(x1 * y for x1, _, y in rows)
    y2 = sum(x2 * y for _, x2, y in rows)
    det = s11 * s22 - s12 * s12
    if det > 1e-12 * max(s11 * s22, 1e-300):
        a, b = (y1 * s22 - y2 * s12) / det, (y2 * s11 - y1 * s12) / det
        if a >= 0 and b >= 0:
            return a, b
    a_only = max(0.0, y1 / s11) if s11 else 0.0
    b_only = max(0.0, y2 / s22) if s22 else 0.0
    err_a = sum((y - a_only * x1) ** 2 for x1, _, y in rows)
    err_b = sum((y - b_only * x2) ** 2 for _, x2, y in rows)
    return (a_only, 0.0) if err_a <= err_b else (0.0, b_only)


def constants_from_summaries(summaries: list[dict], actor_cfg: dict, obs_bytes: int) -> dict:
    """The per-role constants (``CONSTANTS``) from the time splits of runs without
    oversubscription: actor and ingest figures are medians over runs and actors; the learner's
    busy time (wall minus waiting for data, ingest and the modelled weight sends) is split into
    a per-iteration and a per-update part by least squares over the runs, which therefore need
    two different updates per iteration (e.g. two replay ratios). The modelled weight transfers
    are taken out so ``predict`` can add them back at any layout."""
    step, send, insert, compute, rest = [], [], [], [], []
    for s in summaries:
        roles = {r.get("role") for r in s.get("ranks", ())}
        if not {"learner", "actor"} <= roles:
            raise ValueError("a summary without learner and actor ranks (not an actors > 0 run)")
        run = run_of_summary(s, actor_cfg, obs_bytes)
        pub = transfer(run["param_bytes"], False)
        learner = next(r for r in s["ranks"] if r["role"] == "learner")
        n_pubs = s["updates"] // run["publish_every"] + 1
        for a in (r for r in s["ranks"] if r["role"] == "actor"):
            steps = a["env_steps"] / run["num_envs"]
            step.append((a["wall_s"] - a["wait_s"] - a["send_s"] - n_pubs * pub) / steps)
            send.append(a["send_s"] / max(1, a["messages_sent"]))
        insert.append(learner["receive_insert_s"] / max(1, learner["inserted"]))
        compute.append(learner["compute_s"] / max(1, s["updates"]))
        busy = (s["wall_s"] - learner["wait_data_s"] - learner["receive_insert_s"]
                - n_pubs * run["actors"] * pub)
        rest.append((run["n_iters"], s["updates"], busy))
    if len({round(u / n, 9) for n, u, _ in rest}) > 1:
        iter_s, update_s = nonneg_lstsq2(rest)
    else:                   # one updates-per-iteration: the per-iteration part is the default's
        iter_s = DEFAULT_CONSTANTS["learner_iter_s"]
        update_s = statistics.median(max(0.0, b - n * iter_s) / max(1, u) for n, u, b in rest)
    med = statistics.median
    return {"actor_step_s": med(step), "actor_send_s": med(send), "learner_iter_s": iter_s,
            "insert_s": med(insert), "update_s": update_s, "compute_s": med(compute)}


def rel_err(pred: float, meas: float) -> float:
    return pred / meas - 1.0


def fit_eta(c: dict, points: list[tuple[dict, float]], cores: int) -> dict:
    """The scheduling efficiencies ``eta_learner`` and ``eta_actor`` (each 0.2 .. 1.0, to 0.01)
    that minimise the squared log error of the predicted env frames/s over ``points``
    (``(run, measured fps)``): a grid in steps of 0.05, then 0.01 around its best; among equal
    errors the larger efficiencies (the fewer assumed losses) win."""
    def err(el: float, ea: float) -> float:
        eta = {"eta_learner": el, "eta_actor": ea}
        return sum(math.log(predict({**c, **eta}, run, cores)["env_fps"] / fps) ** 2
                   for run, fps in points)

    def best_of(ls: list[int], as_: list[int]) -> tuple[int, int]:
        best, best_err = (ls[0], as_[0]), math.inf
        for el in ls:
            for ea in as_:
                e = err(el / 100, ea / 100)
                if e < best_err - 1e-12:
                    best, best_err = (el, ea), e
        return best

    def near(x: int) -> list[int]:
        return [k for k in range(min(100, x + 5), max(19, x - 6), -1)]

    coarse = best_of(list(range(100, 19, -5)), list(range(100, 19, -5)))
    el, ea = best_of(near(coarse[0]), near(coarse[1]))
    return {"eta_learner": el / 100, "eta_actor": ea / 100}


# -- for hpcdqn plan -----------------------------------------------------------------------------
def plan_rates(plan: dict, actor_cfg: dict, obs_bytes: int, cores: int | None = None,
               remote: bool = False, constants: dict | None = None,
               source: str | None = None) -> dict:
    """Expected rates of the layout ``plan`` describes (``learner.budget.plan_memory``'s dict
    with ``actors > 0``): ``predict`` with ``constants`` (default ``DEFAULT_CONSTANTS``) on
    ``cores`` shared cores (None: one per rank), the weights and data crossing the network
    where ``remote``."""
    c = {**DEFAULT_CONSTANTS, **(constants or {})}
    run = run_from_schedule(plan["schedule"], plan["dp"], plan["actors"], actor_cfg,
                            plan["actor_parameters_bytes"], obs_bytes)
    p = predict(c, run, cores or 0, remote)
    w = phase_time(c, run, cores or 0, remote)
    p["per_phase"] = {k: w[k] for k in ("updates_s", "publish_s", "ingest_s")}
    p["per_phase"]["actors_s"] = run["train_every"] * w["w_A"]
    return {**p, "constants": c, "source": source or DEFAULT_SOURCE, "cores": cores,
            "remote": remote, "learners": plan["dp"], "actors": plan["actors"]}


def describe_rates(r: dict) -> str:
    """``plan_rates`` as lines for people."""
    where = (f"{r['cores']} cores shared by the {r['learners'] + r['actors']} ranks" if r["cores"]
             else "one core per rank (--cores N: N cores shared)")
    net = "actors on other nodes than their learner" if r["remote"] else "one node"
    side = {"learners": "the learners", "actors": "the actors (env steps)",
            "cores": "the shared cores"}[r["limit"]]
    ph = r["per_phase"]
    consts = ", ".join(f"{k}={r['constants'][k]:.3g}" for k in (*CONSTANTS, "eta_learner", "eta_actor"))
    return "\n".join([
        f"expected rates (cost model with roles, {where}, {net}): {r['env_fps']:,.0f} env frames/s, "
        f"{r['updates_per_s']:,.0f} learner updates/s over the run (steady training "
        f"{r['steady_env_fps']:,.0f} frames/s, {r['steady_updates_per_s']:,.0f} updates/s); "
        f"{side} set the pace (per training phase: learner updates {ph['updates_s']:.3g} s, "
        f"weight sends {ph['publish_s']:.3g} s, ingest {ph['ingest_s']:.3g} s; an actor's env "
        f"steps {ph['actors_s']:.3g} s)",
        f"  measured constants used ({r['source']}): {consts}"])


DEFAULTS_NOTE = ("the defaults, not this config's: measure this config with a short actor run "
                 "and pass its summary.json with --rates-from")
