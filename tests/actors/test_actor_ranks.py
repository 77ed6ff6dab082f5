"""Actor ranks and learner ranks (``hpcdqn.actors``) under real ``mpirun``: the layout's
refusals, a run that ends cleanly with every rank's role and time split, and lockstep runs that
repeat bitwise."""
import json

import h5py
import numpy as np
import pytest

from hpcdqn.config import ConfigError, load_config
from hpcdqn.parallel.grid import LayoutError
from hpcdqn.parallel.layout import Role, RunLayout
from hpcdqn.rl.networks import initial_flat, network_layers
from mpi_util import ROOT, hpcdqn, run_mpi

TINY = ["total_steps=2400", "dqn.learning_starts=400", "dqn.train_frequency=100",
        "dqn.gradient_steps=20", "network.hidden=[32, 32]", "eval.episodes=10",
        "log.progress=false", "log.tensorboard=false", "actor.publish_every=20"]


def test_layout_gives_roles_and_refuses_what_cannot_work():
    cfg = load_config(overrides=["actors=3"])
    lay = RunLayout.resolve(cfg, world=5, rank=4)
    assert lay.roles == (Role.LEARNER,) * 2 + (Role.ACTOR,) * 3 and lay.role is Role.ACTOR
    assert (lay.dp, lay.actor_index, lay.dp_rank) == (2, 2, 0)       # actor 2 feeds replica 0
    assert lay.actors_of(0) == [2, 4] and lay.actors_of(1) == [3]
    assert lay.schedule.steps_per_iter == 3 and lay.replay_here == 0
    assert RunLayout.resolve(cfg, world=5, rank=1).replay_here == 50_000
    assert "learner: ranks 0-1; actor: ranks 2-4" in lay.describe_roles()
    assert RunLayout.resolve(load_config(), world=2).roles == (Role.ENV_LEARNER,) * 2
    with pytest.raises(LayoutError, match=r"world has 3 ranks: launch mpirun -n 4"):
        RunLayout.resolve(cfg, world=3)
    pp = RunLayout.resolve(load_config(overrides=["actors=3", "pp=2"]), world=7, rank=6)
    assert (pp.dp, pp.dp_rank, pp.feeds) == (2, 0, 0) and pp.actors_of(1) == [5]
    assert "learner: ranks 0-3 (replay on first stages 0, 2); actor: ranks 4-6" in pp.describe_roles()
    with pytest.raises(LayoutError, match="not a multiple of pp=2: launch mpirun -n 3"):
        RunLayout.resolve(load_config(overrides=["actors=1", "pp=2"]), world=4)
    with pytest.raises(ConfigError, match="not supported yet"):
        RunLayout.resolve(load_config(overrides=["actors=1", "checkpoint_every=1000"]), world=2)


def test_actors_explore_with_a_fixed_schedule_or_the_apex_ladder():
    """Actor i of N: the run's epsilon schedule, or (dqn.epsilon_ladder) Ape-X's
    eps^(1 + 7 i / (N - 1)) with a fixed eps = 0.4 (epsilon_start = epsilon_end)."""
    fixed = ["actors=3", "dqn.uniform_warmup=false", "dqn.epsilon_start=0.4", "dqn.epsilon_end=0.4"]
    cfg = load_config(overrides=fixed + ["dqn.epsilon_ladder=true"])
    clock = RunLayout.resolve(cfg, world=4).schedule
    got = [clock.epsilon(cfg, 10, i, 3) for i in range(3)]
    assert np.allclose(got, [0.4, 0.4 ** 4.5, 0.4 ** 8])
    flat = load_config(overrides=fixed)
    assert [RunLayout.resolve(flat, world=4).schedule.epsilon(flat, 10, i, 3) for i in range(3)] == [0.4] * 3


def test_too_few_ranks_stop_the_job_with_one_clear_error(tmp_path):
    r = hpcdqn(2, ["train", "actors=2", f"run_dir={tmp_path}", *TINY], timeout=120, check=False)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.count("actors=2 needs at least one learner rank") == 1, r.stderr[-2000:]
    assert "world = actors + dp x pp" in r.stderr


def test_plan_shows_the_roles():
    r = run_mpi(1, ["-m", "hpcdqn.cli", "plan", "--ranks", "5", "actors=3"], timeout=120)
    assert "world=5 = 3 actors + dp 2 x pp 1" in r.stdout
    assert "roles: learner: ranks 0-1; actor: ranks 2-4 (actor i feeds learner replica i mod 2)" in r.stdout
    assert "actor ranks: parameters 264.01 KiB" in r.stdout


def test_a_stalled_actor_ends_the_job_with_its_name(tmp_path):
    """Actor rank 2 stops itself (SIGSTOP) at its 100th env step: its learner, waiting for its
    data, names it after actor.timeout_s and the whole job ends (no hang)."""
    r = hpcdqn(3, ["train", "actors=2", "actor.timeout_s=2", f"run_dir={tmp_path}", *TINY],
               env={"HPCDQN_TEST_STALL": "actor:2@100"}, timeout=120, check=False)
    assert r.returncode != 0
    assert "no message from actor 2 (rank 2) for 2 s" in r.stderr, r.stderr[-3000:]


def summary(r):
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_two_learners_two_actors_end_cleanly_with_every_ranks_role(tmp_path):
    """Asynchronous mode: 2 learner replicas (allreduce among themselves) fed by 2 actors."""
    r = hpcdqn(4, ["train", "actors=2", f"run_dir={tmp_path}", *TINY], timeout=240)
    s = summary(r)
    assert s["roles"] == ["learner", "learner", "actor", "actor"] and s["dp"] == 2
    assert s["job_ranks"] == 4 and s["world"] == 2      # the grid's world: the learners
    assert s["env_steps"] == 2400 and s["updates"] > 0 and s["eval_episodes"] == 10
    actors = [x for x in s["ranks"] if x["role"] == "actor"]
    learners = [x for x in s["ranks"] if x["role"] == "learner"]
    assert [a["learner"] for a in actors] == [0, 1]
    for a in actors:      # every env step made, its transitions sent (but the last n-1), a DONE
        assert a["env_steps"] == 1200 and a["transitions_sent"] == 1200 - 2
        assert a["weights_received"] >= 2
        assert all(a[k] >= 0 for k in ("env_s", "inference_s", "send_s", "wait_s"))
    for x in learners:
        assert x["inserted"] == 1198 and x["allreduce_s"] > 0 and x["sampled"] > 0
        assert all(k in x for k in ("receive_insert_s", "wait_data_s", "sample_s", "compute_s"))
    assert json.loads((tmp_path / "summary.json").read_text())["ranks"] == s["ranks"]
    assert (tmp_path / "model.h5").is_file()


def test_lockstep_runs_repeat_bitwise_and_pipelined_learners_act_alike(tmp_path):
    """1 learner + 2 actors in lockstep twice: the same final parameters, bit for bit, and not
    the initial ones (the test can fail). A pp=2 learner (its first stage holds the replay and
    talks to the actors; the weights are gathered over its stages before they are sent) ends
    within float rounding of it: its actors acted alike."""
    params = []
    for name, extra in (("a", []), ("b", []), ("pp2", ["pp=2"])):
        r = hpcdqn(3 + len(extra), ["train", "actors=2", "actor.lockstep=true", "actor.send_every=3",
                                    "seed=3", f"run_dir={tmp_path / name}", *TINY, *extra], timeout=240)
        s = summary(r)
        assert s["lockstep"] is True
        with h5py.File(tmp_path / name / "model.h5") as f:
            params.append(f["online"][...])
    assert np.array_equal(params[0], params[1])
    cfg = load_config(overrides=["seed=3", "network.hidden=[32, 32]"])
    start = initial_flat(network_layers(cfg["network"], (4,), 2), 3)
    assert params[0].shape == start.shape and np.abs(params[0] - start.numpy()).max() > 1e-3
    assert s["roles"] == ["learner", "learner", "actor", "actor"] and (s["dp"], s["pp"]) == (1, 2)
    assert [x["inserted"] for x in s["ranks"][:2]] == [2 * (1200 - 2), 0]
    assert np.abs(params[2] - params[0]).max() < 1e-5


FRAMES = ["env_id=frame_env:FrameToy-v0", "num_envs=2", "total_steps=800", "dqn.learning_starts=400",
          "dqn.train_frequency=100", "dqn.gradient_steps=5", "network.hidden=[32]", "eval.episodes=0",
          "log.progress=false", "log.tensorboard=false", "dqn.buffer_size=600", "dqn.n_step=3",
          "replay.prioritized=true", "actor.publish_every=10", "actor.send_every=3", "seed=3"]


def test_frame_stacked_lockstep_runs_repeat_bitwise(tmp_path):
    """A frame-stacked image env (tests/frame_env.py behind gymnasium's FrameStackObservation)
    with 1 learner + 2 actors in lockstep, twice: the actors send raw frames (one per env step,
    not stacks), the learner's frame replay takes every step, and both runs end with the same
    parameters bit for bit (not the initial ones)."""
    env = {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}       # the ranks import frame_env
    params = []
    for name in ("a", "b"):
        r = hpcdqn(3, ["train", "actors=2", "actor.lockstep=true", f"run_dir={tmp_path / name}",
                       *FRAMES], timeout=300, env=env)
        s = summary(r)
        with h5py.File(tmp_path / name / "model.h5") as f:
            params.append(f["online"][...])
    assert np.array_equal(params[0], params[1])
    learner, actors = s["ranks"][0], s["ranks"][1:]
    assert learner["inserted"] == 800 and s["updates"] == 20
    assert learner["sampled"] == 20 * s["schedule"]["batch_per_replica"]
    for a in actors:       # every env step sent as frames (none held back by an n-step window)
        assert a["env_steps"] == a["transitions_sent"] == 400 and a["messages_sent"] >= 67
    cfg = load_config(overrides=FRAMES)
    start = initial_flat(network_layers(cfg["network"], (4, 36, 36), 3), 3)
    assert np.abs(params[0] - start.numpy()).max() > 1e-3


def test_minatar_with_two_actors_ends_cleanly(tmp_path):
    """MinAtar Breakout (its config, a short window) with 1 learner + 2 actors: the grids go
    over the wire once per env step and the run ends with every rank's role and a greedy
    evaluation."""
    r = hpcdqn(3, ["train", "--config", str(ROOT / "configs" / "minatar_breakout.toml"), "actors=2",
                   "total_steps=600", "dqn.learning_starts=300", "dqn.train_frequency=20",
                   "dqn.gradient_steps=2", "dqn.buffer_size=2000", "checkpoint_every=0",
                   "eval.episodes=10", "log.progress=false", f"run_dir={tmp_path}"], timeout=300)
    s = summary(r)
    assert s["roles"] == ["learner", "actor", "actor"] and s["env_steps"] == 600
    assert s["ranks"][0]["inserted"] == 600 and s["updates"] == 30 and s["eval_episodes"] == 10
    assert all(a["env_steps"] == a["transitions_sent"] == 300 for a in s["ranks"][1:])
