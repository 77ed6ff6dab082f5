"""Atari environments as training and checkpoints use them, on the real ALE: exact state capture
and restore (sync and async vector envs, in either direction, JSON in between), async workers
started safely for MPI, evaluation without the training-only preprocessing, games logged with
their raw scores."""
import copy
import json
import os
import sys

import numpy as np
import pytest

from mpi_util import TESTS, run_mpi

ale_py = pytest.importorskip("ale_py", reason="ale-py not installed (./quickstart.sh installs it)")

from hpcdqn.rl.atari import AtariOptions  # noqa: E402
from hpcdqn.rl.envs import make_env, make_vector_env  # noqa: E402
from hpcdqn.rl.envstate import capture_env, restore_env  # noqa: E402
from hpcdqn.store.codec import env_state, restore_env_state  # noqa: E402

sys.path.insert(0, str(TESTS / "rl"))
from async_envs_mpi import trajectory  # noqa: E402

STICKY = {"sticky_actions": 0.25}      # exercises the sticky-action generator and held action


def test_restore_at_every_step_is_exact():
    """Capture one Breakout env after every step (resets and lost lives included), restore it
    into another env and step both: the same observation, reward and episode end each time."""
    o = AtariOptions.from_config(STICKY)
    a, b = make_env("ALE/Breakout-v5", o), make_env("ALE/Breakout-v5", o)
    a.reset(seed=0)
    b.reset(seed=5)
    resets = 0
    for t, act in enumerate(np.random.default_rng(0).integers(0, 4, 300)):
        assert restore_env(b, copy.deepcopy(capture_env(a))) == []
        sa, sb = a.step(act), b.step(act)
        np.testing.assert_array_equal(sa[0], sb[0], err_msg=f"step {t}")
        assert sa[1:4] == sb[1:4], t
        if sa[2] or sa[3]:
            a.reset()
            resets += 1
    assert resets >= 5
    a.close()
    b.close()


@pytest.mark.parametrize("kinds", [("sync", "async"), ("async", "sync")])
def test_vector_state_moves_between_sync_and_async(kinds):
    """A checkpoint's env state (JSON) taken from one vector env kind continues exactly in a
    fresh one of the other kind, made with another seed."""
    src = make_vector_env("ALE/Breakout-v5", 2, 1, kinds[0], STICKY)
    acts = np.random.default_rng(1).integers(0, 4, (250, 2))
    trajectory(src, acts[:100])
    st = json.loads(json.dumps(env_state(src)))
    dst = make_vector_env("ALE/Breakout-v5", 2, 99, kinds[1], STICKY)
    assert restore_env_state(dst, st) == []
    a, b = trajectory(src, acts[100:]), trajectory(dst, acts[100:])
    assert sum(s[2].sum() for s in a) >= 3                 # lives lost / games over included
    for t, (sa, sb) in enumerate(zip(a, b)):
        for x, y in zip(sa, sb):
            np.testing.assert_array_equal(x, y, err_msg=f"step {t}")
    src.close()
    dst.close()


def test_async_workers_come_from_forkserver():
    venv = make_vector_env("ALE/Pong-v5", 2, 0, "async")
    for p in venv.processes:
        stat = open(f"/proc/{p.pid}/stat").read().rsplit(")", 1)[1].split()
        assert int(stat[1]) != os.getpid(), "a sub-env process was forked from this process"
        assert b"MPI4PY_RC_INITIALIZE=false" in open(f"/proc/{p.pid}/environ", "rb").read()
    venv.close()


def test_async_envs_under_mpirun(tmp_path):
    """Real mpirun, MPI initialised before the envs: workers not forked from the rank, without
    the launcher's identity, MPI never loaded; state capture/restore exact across processes."""
    r = run_mpi(2, [TESTS / "rl" / "async_envs_mpi.py", "ALE/Breakout-v5"], timeout=240)
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(rows) == 2
    for row in rows:
        assert row["warnings"] == [] and row["resumed_same"] and row["dones"] >= 2, row
        for w in row["workers"]:
            assert not w["forked_from_rank"] and w["no_mpi_init"] and not w["libmpi_loaded"], w
            ids = [v for v in w["launcher_vars"] if v.startswith(("OMPI_", "PMI_"))
                   or any(k in v for k in ("RANK", "NAMESPACE", "URI"))]
            assert ids == [], w


def test_evaluation_plays_full_games_with_raw_scores():
    """training=False: no episodic life, no clipping; every episode end is a game's end and the
    summed rewards are its raw score (Breakout scores 1, 4 or 7 per brick)."""
    venv = make_vector_env("ALE/Breakout-v5", 2, 3, "sync", training=False)
    pre = venv.envs[0].env
    assert not pre.episodic and not pre.clip and pre.fire
    ret, ends, raw_rewards = np.zeros(2), 0, set()
    rng = np.random.default_rng(3)
    while ends < 4:
        _, r, term, trunc, infos = venv.step(rng.integers(0, 4, 2))
        ret += r
        raw_rewards.update(r[r > 0].tolist())
        for i in np.nonzero(term | trunc)[0]:
            fin = infos["final_info"]
            assert fin["_game_return"][i], "an episode ended before its game"
            assert fin["game_return"][i] == ret[i]
            ret[i], ends = 0.0, ends + 1
    train = make_vector_env("ALE/Breakout-v5", 1, 3)
    assert train.envs[0].env.episodic and train.envs[0].env.clip
    venv.close()
    train.close()


def test_rollout_logs_games_not_lives():
    """With episodic life, learning sees a lost life as an episode end; the log sees games."""
    from hpcdqn.rl.replay import ReplayBuffer
    from hpcdqn.rl.rollout import Rollout

    venv = make_vector_env("ALE/Breakout-v5", 2, 4)
    obs, _ = venv.reset(seed=4)
    replay = ReplayBuffer(2000, 2, obs.shape[1:], np.uint8, n_step=1, gamma=0.99)
    roll = Rollout(venv, np.random.default_rng(4), obs)
    dones, games = 0, []
    for _ in range(600):
        _, acts = roll.explore(1.0)
        games += roll.step(acts, replay)
        dones += int((roll.ep_len == 0).sum())      # envs whose episode ended at this step
    assert len(games) >= 2 and dones >= 4 * len(games), (dones, games)
    assert all(ret == int(ret) and length > 50 for ret, length in games), games
    venv.close()
