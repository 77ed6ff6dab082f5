"""The cost model with roles (``hpcdqn.parallel.roles_model``) on known inputs: which side sets
the pace, the rate limiter's overlap, the shared-cores bound, the transfer and allreduce terms,
constants recovered from time splits made with known constants, the efficiency fit, the
committed defaults, and ``hpcdqn plan actors=N`` printing expected rates."""
import json
import math
from pathlib import Path

import pytest

from hpcdqn import cli
from hpcdqn.parallel import roles_model as rm
from hpcdqn.parallel.allreduce_model import DEFAULT_COEF, t_algorithm

ROOT = Path(__file__).resolve().parents[2]
C = {"actor_step_s": 1e-4, "actor_send_s": 8e-5, "learner_iter_s": 1e-5, "insert_s": 2e-5,
     "update_s": 1e-3, "compute_s": 9e-4, "eta_learner": 1.0, "eta_actor": 1.0}


def run(m=1, n=1, k=128, p=256, **kw):
    return {"learners": m, "actors": n, "num_envs": 1, "train_every": p, "updates_per_phase": k,
            "n_iters": 100 * p, "learn_start": p, "steps_per_iter": n, "total_updates": 99 * k,
            "send_every": 8, "publish_every": 64, "max_ahead": 0, "param_bytes": 0,
            "obs_bytes": 16, **kw}


PUB = rm.transfer(0, False)     # a weight message of param_bytes=0: the latency alone


def test_the_slower_side_sets_the_pace():
    # learner: U = 128 * 1e-3 + 2 publishes = 0.128 s; ingest 256 * 3e-5 = 7.68 ms;
    # actor 256 * 1.1e-4 = 28.16 ms
    t = rm.phase_time(C, run(), cores=None)
    assert t["limit"] == "learners"
    assert t["phase_s"] == pytest.approx(0.128 + 2 * PUB + 256 * 3e-5)
    assert t["w_A"] == pytest.approx(1e-4 + 8e-5 / 8 + 2 / 256 * PUB)
    w_a = 1e-4 + 1e-5 + PUB / 16 / 256       # k=4: 1/16 publish per phase
    few = rm.phase_time(C, run(k=4), cores=None)            # U = 4 ms: the actor is slower
    assert few["limit"] == "actors" and few["phase_s"] == pytest.approx(256 * w_a)
    p = rm.predict(C, run(k=4), cores=None)
    assert p["steady_env_fps"] == pytest.approx(1 / w_a)
    assert p["steady_updates_per_s"] == pytest.approx(4 / (256 * w_a))
    # over the run: 256 warm-up iterations at max(i_L, w_A) = w_A, then 99 phases
    wall = 256 * w_a + 99 * 256 * w_a
    assert p["wall_s"] == pytest.approx(wall) and p["env_fps"] == pytest.approx(100 * 256 / wall)


def test_the_rate_limiter_overlaps_at_most_max_ahead_iterations():
    """Actors may fill ``max_ahead`` iterations while their learner updates: with 16 of 256 the
    phase is U + P*w_A - 16*w_A, not max(U + P*i_L, P*w_A)."""
    w_a, u = 1e-4 + 1e-5 + 2 / 256 * PUB, 0.128 + 2 * PUB
    t = rm.phase_time(C, run(max_ahead=16), cores=None)
    assert t["phase_s"] == pytest.approx(u + 256 * w_a - 16 * w_a)
    assert rm.phase_time(C, run(max_ahead=256), cores=None)["phase_s"] == pytest.approx(u + 256 * 3e-5)


def test_shared_cores_bound_the_phase_by_all_ranks_work():
    """1 learner + 3 actors on 2 cores: (learner + 3 actors' work) / 2 with the efficiencies."""
    c = {**C, "eta_learner": 0.5, "eta_actor": 0.25}
    r = run(n=3, k=16)
    w = rm.role_work(c, r)
    learner, actor = w["U"] + 256 * w["i_L"], 256 * w["w_A"]
    t = rm.phase_time(c, r, cores=2)
    assert t["limit"] == "cores"
    assert t["phase_s"] == pytest.approx((learner / 0.5 + 3 * actor / 0.25) / 2)
    assert rm.phase_time(c, r, cores=4)["limit"] != "cores"       # a core per rank: no bound


def test_transfers_and_allreduce_come_from_the_data_parallel_model():
    w = 270_000
    assert rm.transfer(w, False) == pytest.approx(DEFAULT_COEF["alpha"] + DEFAULT_COEF["beta"] * w)
    assert rm.transfer(w, True) == pytest.approx(DEFAULT_COEF["alpha_net"] + DEFAULT_COEF["beta_net"] * w)
    assert rm.allreduce_s(1, w, True) == 0.0
    assert rm.allreduce_s(4, w, True) == pytest.approx(t_algorithm("flat", 4, w, DEFAULT_COEF, q=1))
    # 64 actors on one learner, remote: every publish (2 per phase of 128 updates) sends W bytes
    # to each actor, and every message of 8 steps crosses the network
    r = run(n=64, param_bytes=w)
    u = rm.role_work(C, r, remote=True)
    assert u["U"] == pytest.approx(128 * 1e-3 + 2 * 64 * rm.transfer(w, True))
    msg = rm.transfer(8 * rm.wire_bytes_per_transition(16), True)
    assert u["i_L"] == pytest.approx(1e-5 + 64 * 2e-5 + 64 * msg / 8)
    assert rm.wire_bytes_per_transition(16) == 48
    # updates/s fall as more actors take the weights: the publish term grows with N
    ups = [rm.predict(C, run(n=n, param_bytes=w), None, remote=True)["steady_updates_per_s"]
           for n in (1, 64, 1024)]
    assert ups[0] > ups[1] > ups[2]


def summary_with(c: dict, n_iters: int, updates: int, actors: int = 1) -> dict:
    """A summary.json whose time split follows the constants ``c`` exactly (1 learner)."""
    ingest, busy = n_iters * actors * c["insert_s"], n_iters * c["learner_iter_s"] + updates * c["update_s"]
    pub = rm.transfer(1000 * 4, False) * (updates // 64 + 1)
    steps = n_iters
    ranks = [{"role": "learner", "receive_insert_s": ingest, "wait_data_s": 0.5,
              "inserted": n_iters * actors, "compute_s": updates * c["compute_s"],
              "update_s": updates * c["update_s"], "sample_s": 0.0}]
    ranks += [{"role": "actor", "wall_s": steps * c["actor_step_s"] + 2.0 + 0.1 + pub,
               "wait_s": 2.0, "send_s": 0.1, "env_steps": steps, "messages_sent": 0.1 / c["actor_send_s"]}
              for _ in range(actors)]
    return {"wall_s": busy + ingest + 0.5 + pub * actors, "updates": updates, "ranks": ranks,
            "parameter_bytes_per_stage": [1000 * 4 * 4],
            "schedule": {"num_envs": 1, "train_every": 256, "updates_per_phase": updates * 256 // n_iters,
                         "n_iters": n_iters, "learn_start": 0, "steps_per_iter": actors,
                         "total_updates": updates}}


def test_constants_are_recovered_from_time_splits_made_with_them():
    ac = {"send_every": 8, "publish_every": 64, "max_ahead": 0}
    got = rm.constants_from_summaries([summary_with(C, 12800, 6400), summary_with(C, 12800, 400)],
                                      ac, 16)
    for k in rm.CONSTANTS:
        assert got[k] == pytest.approx(C[k], rel=1e-6), k
    assert rm.nonneg_lstsq2([(1, 0, 2), (0, 1, -1)]) == (2.0, 0.0)      # no negative cost


def test_the_efficiencies_are_recovered_from_points_made_with_them():
    truth = {**C, "eta_learner": 0.8, "eta_actor": 0.4}
    pts = [(r, rm.predict(truth, r, 2)["env_fps"]) for r in (run(n=3, k=16), run(n=3, k=128))]
    assert rm.fit_eta(C, pts, 2) == {"eta_learner": 0.8, "eta_actor": 0.4}


def test_the_defaults_are_the_committed_measurement():
    res = json.loads((ROOT / "benchmarks/results/actors_costmodel.json").read_text())
    for k, v in rm.DEFAULT_CONSTANTS.items():
        assert math.isclose(v, res["constants"][k], rel_tol=1e-3), k


def test_plan_prints_expected_rates_and_the_constants_it_used(capsys, tmp_path):
    assert cli.main(["plan", "--ranks", "4", "--cores", "2", "actors=3"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("expected rates"))
    assert "2 cores shared by the 4 ranks, one node" in line and "set the pace" in line
    fps = float(line.split("): ")[1].split(" env frames/s")[0].replace(",", ""))
    assert 500 < fps < 50_000
    assert "measured constants used (defaults, from benchmarks/results/actors_costmodel.json" in out
    assert f"update_s={rm.DEFAULT_CONSTANTS['update_s']:.3g}" in out
    # another config, another source; a run's own summary as the constants
    summ = tmp_path / "summary.json"
    summ.write_text(json.dumps(summary_with({**C, "update_s": 2e-3}, 12800, 6400)))
    assert cli.main(["plan", "--ranks", "9", "--ranks-per-node", "1", "actors=8",
                     "--rates-from", str(summ), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)["expected_rates"]
    assert r["remote"] and r["source"].startswith(f"measured from {summ}")
    # one replay ratio: the per-iteration part is the default's, the rest goes to update_s
    iters_per_update = 12800 / 6400
    assert r["constants"]["update_s"] == pytest.approx(
        2e-3 + iters_per_update * (C["learner_iter_s"] - rm.DEFAULT_CONSTANTS["learner_iter_s"]))
    assert cli.main(["plan", "--ranks", "3", "actors=2", "network.hidden=[64]"]) == 0
    assert "the defaults, not this config's" in capsys.readouterr().out
    summ.write_text(json.dumps({"env_steps": 100, "updates": 10, "wall_s": 1.0}))   # a sync run's
    assert cli.main(["plan", "--ranks", "2", "actors=1", "--rates-from", str(summ)]) == 2
    assert "not an actors > 0 run" in capsys.readouterr().err
