import json

import numpy as np
import pytest

from hpcdqn.rl.replay import ReplayBuffer, SumTree


def _add(buf, t, env_rewards, term=None, trunc=None, E=1):
    """Add one vector step whose obs encode the time t (obs = t, next_obs = t + 0.5)."""
    obs = np.full((E, 1), t, dtype=np.float32)
    buf.add(obs, np.zeros(E, dtype=np.int64), np.asarray(env_rewards, dtype=np.float32),
            obs + 0.5, np.asarray(term if term is not None else [False] * E),
            np.asarray(trunc if trunc is not None else [False] * E))


def test_ring_wraps_and_keeps_newest():
    buf = ReplayBuffer(8, 2, (1,), np.float32, seed=0)
    assert buf.rows == 4
    for t in range(10):
        _add(buf, t, [t, -t], E=2)
    assert len(buf) == 8 and buf.pos == 10 % 4
    # rows now hold t = 8, 9, 6, 7
    assert sorted(buf.obs[:, 0, 0].tolist()) == [6, 7, 8, 9]
    assert np.array_equal(buf.rewards[:, 1], -buf.obs[:, 0, 0])
    b = buf.sample(1000)
    assert set(np.unique(b.obs[:, 0])) == {6.0, 7.0, 8.0, 9.0}
    assert np.allclose(b.next_obs[:, 0], b.obs[:, 0] + 0.5)


def test_one_step_discount_terminated_vs_truncated():
    buf = ReplayBuffer(10, 1, (1,), np.float32, gamma=0.9)
    _add(buf, 0, [1.0], term=[True])
    _add(buf, 1, [1.0], trunc=[True])
    b = buf._gather(np.array([0, 1]), np.ones(2, np.float32))
    assert b.discounts[0] == 0.0                      # termination: no bootstrap
    assert b.discounts[1] == pytest.approx(0.9)       # truncation: bootstraps


def test_nstep_returns_stop_at_episode_end_and_bootstrap_truncation():
    g = 0.5
    buf = ReplayBuffer(100, 1, (1,), np.float32, n_step=3, gamma=g)
    # episode A: t=0,1,2 terminates at t=2; episode B: t=3,4 truncated at t=4; episode C: t=5..9
    rewards = [1, 2, 4, 8, 16, 1, 1, 1, 1, 1]
    term = [0, 0, 1, 0, 0, 0, 0, 0, 0, 0]
    trunc = [0, 0, 0, 0, 1, 0, 0, 0, 0, 0]
    for t in range(10):
        _add(buf, t, [rewards[t]], term=[bool(term[t])], trunc=[bool(trunc[t])])
    b = buf._gather(np.arange(8), np.ones(8, np.float32))
    # t=0: 1 + .5*2 + .25*4, terminated inside the window -> no bootstrap
    assert b.returns[0] == pytest.approx(1 + g * 2 + g * g * 4)
    assert b.discounts[0] == 0.0 and b.next_obs[0, 0] == 2.5
    # t=1: 2 + .5*4 then stop (terminated at t=2)
    assert b.returns[1] == pytest.approx(2 + g * 4) and b.discounts[1] == 0.0
    # t=2: terminal step itself
    assert b.returns[2] == pytest.approx(4) and b.discounts[2] == 0.0
    # t=3: 8 + .5*16, truncated at t=4 -> bootstrap from t=4's final obs with gamma^2
    assert b.returns[3] == pytest.approx(8 + g * 16)
    assert b.discounts[3] == pytest.approx(g ** 2) and b.next_obs[3, 0] == 4.5
    # t=4: truncation step: bootstrap gamma^1
    assert b.returns[4] == pytest.approx(16) and b.discounts[4] == pytest.approx(g)
    # t=5: a full 3-step window inside episode C, never reaching back into B
    assert b.returns[5] == pytest.approx(1 + g + g * g)
    assert b.discounts[5] == pytest.approx(g ** 3) and b.next_obs[5, 0] == 7.5


def test_nstep_vector_envs_are_independent_columns():
    g = 0.9
    buf = ReplayBuffer(100, 2, (1,), np.float32, n_step=2, gamma=g)
    # env 0 terminates at t=0; env 1 never does
    _add(buf, 0, [1, 10], term=[True, False], E=2)
    _add(buf, 1, [2, 20], E=2)
    _add(buf, 2, [3, 30], E=2)
    b = buf._gather(np.array([0, 1]), np.ones(2, np.float32))   # row 0, env 0 and env 1
    assert b.returns[0] == pytest.approx(1) and b.discounts[0] == 0
    assert b.returns[1] == pytest.approx(10 + g * 20) and b.discounts[1] == pytest.approx(g * g)


def test_incomplete_nstep_rows_are_not_sampled():
    buf = ReplayBuffer(16, 1, (1,), np.float32, n_step=3, gamma=0.9, seed=1)
    for t in range(5):
        _add(buf, t, [1.0])
    assert buf.sampleable_rows == 3
    b = buf.sample(2000)
    assert set(np.unique(b.obs[:, 0])) == {0.0, 1.0, 2.0}
    for t in range(5, 40):   # wrap around several times
        _add(buf, t, [1.0])
    b = buf.sample(5000)
    seen = set(np.unique(b.obs[:, 0]).tolist())
    assert seen == set(float(x) for x in range(40 - 16, 40 - 2))


def test_sum_tree_total_and_find():
    tree = SumTree(5)
    tree.set(np.arange(5), np.array([1.0, 0.0, 3.0, 2.0, 4.0]))
    assert tree.total == pytest.approx(10.0)
    assert tree.find(np.array([0.0, 0.99, 1.0, 3.99, 4.0, 5.99, 6.0, 9.99])).tolist() == \
        [0, 0, 2, 2, 3, 3, 4, 4]
    tree.set(np.array([4]), np.array([0.0]))
    assert tree.total == pytest.approx(6.0)


def test_per_sampling_proportions_and_importance_weights():
    E, N = 1, 8
    buf = ReplayBuffer(N, E, (1,), np.float32, prioritized=True, alpha=1.0, priority_eps=1e-9, seed=3)
    for t in range(N):
        _add(buf, t, [0.0])
    prios = np.array([1, 2, 3, 4, 0.5, 0.5, 1, 8], dtype=np.float64)
    buf.update_priorities(np.arange(N), prios)
    counts = np.zeros(N)
    for _ in range(200):
        b = buf.sample(256, beta=0.5)
        counts += np.bincount(b.indices, minlength=N)
    freq = counts / counts.sum()
    expected = prios / prios.sum()
    assert np.allclose(freq, expected, atol=0.01), (freq, expected)
    # importance weights: (N * P(i))^-beta normalised by the batch max
    b = buf.sample(64, beta=0.5)
    p = prios[b.indices] / prios.sum()
    w = (N * p) ** -0.5
    assert np.allclose(b.weights, w / w.max(), rtol=1e-5)
    # beta = 0: all ones
    assert np.allclose(buf.sample(32, beta=0.0).weights, 1.0)


def test_per_alpha_and_new_transitions_get_max_priority():
    buf = ReplayBuffer(8, 1, (1,), np.float32, prioritized=True, alpha=0.5, priority_eps=0.0)
    _add(buf, 0, [0.0])
    buf.update_priorities(np.array([0]), np.array([16.0]))
    assert buf.tree.get(np.array([0]))[0] == pytest.approx(4.0)   # 16 ** 0.5
    _add(buf, 1, [0.0])
    assert buf.tree.get(np.array([1]))[0] == pytest.approx(4.0)   # max priority so far


def test_sample_many_cuts_one_uniform_draw_into_batches():
    buf = ReplayBuffer(64, 2, (1,), np.float32, n_step=2, gamma=0.5, seed=0)
    for t in range(40):
        _add(buf, t, [1.0, 2.0], term=[t % 7 == 6, False], E=2)
    bs = buf.sample_many(5, 16)
    assert len(bs) == 5 and all(len(b.actions) == 16 for b in bs)
    ref = ReplayBuffer(64, 2, (1,), np.float32, n_step=2, gamma=0.5, seed=0)
    for t in range(40):
        _add(ref, t, [1.0, 2.0], term=[t % 7 == 6, False], E=2)
    big = ref.sample(80)
    assert np.array_equal(np.concatenate([b.returns for b in bs]), big.returns)
    assert np.array_equal(np.concatenate([b.obs for b in bs]), big.obs)


@pytest.mark.parametrize("num_envs", [1, 3])
def test_sync_vector_env_steps_exactly_like_gymnasium(num_envs):
    """hpcdqn's lean SyncVectorEnv.step: the same observations, rewards, flags, final_obs and
    state as gymnasium's SyncVectorEnv, step for step, over many autoresets."""
    import gymnasium as gym

    from hpcdqn.rl.envs import SyncVectorEnv, env_thunk

    mode = gym.vector.AutoresetMode.SAME_STEP
    ref = gym.vector.SyncVectorEnv([env_thunk("CartPole-v1") for _ in range(num_envs)],
                                   autoreset_mode=mode)
    ours = SyncVectorEnv([env_thunk("CartPole-v1") for _ in range(num_envs)], autoreset_mode=mode)
    assert np.array_equal(ref.reset(seed=5)[0], ours.reset(seed=5)[0])
    rng = np.random.default_rng(0)
    ends = 0
    for _ in range(3000):
        a = rng.integers(0, 2, num_envs)
        r, o = ref.step(a), ours.step(a)
        for x, y in zip(r[:4], o[:4]):
            assert x.dtype == y.dtype and np.array_equal(x, y)
        assert r[4].keys() == o[4].keys()
        if "final_obs" in r[4]:
            ends += 1
            assert np.array_equal(r[4]["_final_obs"], o[4]["_final_obs"])
            for x, y in zip(r[4]["final_obs"], o[4]["final_obs"]):
                assert (x is None and y is None) or np.array_equal(x, y)
        assert o[0] is not ours.step_obs          # a copy, as gymnasium's (copy=True)
    assert ends > 50
    # the state a checkpoint captures is enough to go on exactly: capture it, step on, restore it
    # into a fresh env, step with the same actions: the same results, step for step
    from hpcdqn.store.codec import env_state, restore_env_state

    captured = json.loads(json.dumps(env_state(ours)))
    actions = [rng.integers(0, 2, num_envs) for _ in range(500)]
    expected = [ours.step(a) for a in actions]
    fresh = SyncVectorEnv([env_thunk("CartPole-v1") for _ in range(num_envs)], autoreset_mode=mode)
    fresh.reset(seed=99)
    assert restore_env_state(fresh, captured) == []
    for a, r in zip(actions, expected):
        o = fresh.step(a)
        for x, y in zip(r[:4], o[:4]):
            assert x.dtype == y.dtype and np.array_equal(x, y)
