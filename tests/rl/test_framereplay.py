"""FrameReplay (each frame stored once) against the naive reference that stores whole stacks
(ReplayBuffer), fed the same transitions of a real frame-stacking env (gymnasium's
FrameStackObservation over a scripted image env, our same-step-autoreset SyncVectorEnv): the
same batches, field by field, across terminations, truncations, ring wrap-around, vector envs
and n-step returns."""

import gymnasium as gym
import numpy as np
import pytest

import frame_env
from hpcdqn.rl.envs import SyncVectorEnv, final_next_obs, frame_stack
from hpcdqn.rl.framereplay import FrameReplay, StartStore, make_replay, start_index
from hpcdqn.rl.replay import ReplayBuffer

FIELDS = ("obs", "actions", "returns", "next_obs", "discounts", "weights")


def vec_env(num_envs, padding="reset", size=8, seed=0, p_end=0.05, limit=20):
    fns = [lambda: gym.wrappers.TimeLimit(frame_env.make(size, 4, padding, p_end), limit)
           for _ in range(num_envs)]
    env = SyncVectorEnv(fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    return env, env.reset(seed=seed)[0]


def step(env, obs, rng, bufs):
    a = rng.integers(0, 3, env.num_envs)
    nxt, r, term, trunc, info = env.step(a)
    real = final_next_obs(nxt, term | trunc, info)
    for b in bufs:
        b.add(obs, a, r, real, term, trunc)
    return nxt, term, trunc


def age(buf, idx):
    """(age in rows from the newest, env) of flat indices: comparable across ring sizes."""
    rows, envs = np.divmod(idx, buf.num_envs)
    return (buf.pos - 1 - rows) % buf.rows, envs


def same_batch(a, b, ref, ours):
    for k in FIELDS:
        x, y = getattr(a, k), getattr(b, k)
        assert x.dtype == y.dtype and np.array_equal(x, y), k
    for u, v in zip(age(ref, a.indices), age(ours, b.indices)):
        assert np.array_equal(u, v)


@pytest.mark.parametrize("num_envs,n_step,padding", [(1, 1, "reset"), (1, 3, "zero"),
                                                       (4, 1, "zero"), (4, 3, "reset")])
def test_uniform_batches_equal_the_reference(num_envs, n_step, padding):
    env, obs = vec_env(num_envs, padding)
    assert frame_stack(env) == 4
    kw = dict(n_step=n_step, gamma=0.9)
    ref = ReplayBuffer(48 * num_envs, num_envs, (4, 8, 8), np.uint8, seed=3, **kw)
    ours = make_replay(48 * num_envs, num_envs, (4, 8, 8), np.uint8, frame_stack=4, seed=3, **kw)
    assert isinstance(ours, FrameReplay) and ours.window == ref.rows
    rng = np.random.default_rng(1)
    ends = {"term": 0, "trunc": 0}
    for t in range(400):                       # ~8 wraps of the ring
        obs, term, trunc = step(env, obs, rng, (ref, ours))
        ends["term"] += int(term.sum())
        ends["trunc"] += int(trunc.sum())
        if ref.sampleable_rows > 0 and t % 7 == 0:
            same_batch(ref.sample(64), ours.sample(64), ref, ours)
    assert ends["term"] >= 10 and ends["trunc"] >= 5, ends
    # every sampleable transition, not just random ones
    rows = (ref._oldest_row() + np.arange(ref.sampleable_rows)) % ref.rows
    idx = (rows[:, None] * num_envs + np.arange(num_envs)).reshape(-1)
    oidx = (((rows - ref.pos) % ref.rows + ours.pos - ref.rows) % ours.rows)[:, None] * num_envs
    oidx = (oidx + np.arange(num_envs)).reshape(-1)
    w = np.ones(len(idx), np.float32)
    same_batch(ref._gather(idx, w), ours._gather(oidx, w), ref, ours)
    # one initial stack held per episode start in the ring, no more
    assert len(ours.starts) == np.count_nonzero(ours.ep_step == 0) > 0


@pytest.mark.parametrize("num_envs,n_step", [(1, 3), (4, 1)])
def test_prioritized_batches_and_priorities_equal_the_reference(num_envs, n_step):
    """Same transitions, same priorities (the sum trees order their leaves differently, so a
    stratified draw picks other cells: both are compared on the same transitions)."""
    env, obs = vec_env(num_envs, "reset", seed=5)
    kw = dict(n_step=n_step, gamma=0.9, prioritized=True, alpha=0.7)
    ref = ReplayBuffer(40 * num_envs, num_envs, (4, 8, 8), np.uint8, **kw)
    ours = FrameReplay(40 * num_envs, num_envs, (4, 8, 8), np.uint8, **kw)
    rng = np.random.default_rng(2)
    for t in range(300):
        obs, _, _ = step(env, obs, rng, (ref, ours))
        if ref.sampleable_rows > 0 and t % 5 == 0:
            a = ref.sample(16, beta=0.5)
            r_age, r_env = age(ref, a.indices)
            oidx = ((ours.pos - 1 - r_age) % ours.rows) * num_envs + r_env
            b = ours._gather(oidx, a.weights)
            same_batch(a, b, ref, ours)
            td = rng.random(16) * 3
            ref.update_priorities(a.indices, td)
            ours.update_priorities(oidx, td)
    # the priority of every transition, by age
    ages = np.arange(ref.rows)
    for e in range(num_envs):
        pr = ref.tree.get(((ref.pos - 1 - ages) % ref.rows) * num_envs + e)
        po = ours.tree.get(((ours.pos - 1 - ages) % ours.rows) * num_envs + e)
        assert np.array_equal(pr, po)
    hist = ((ours.pos - 1 - np.arange(ref.rows, ours.rows)) % ours.rows) * num_envs
    assert not ours.tree.get(hist).any()        # the history rows are never sampled
    assert ref.tree.total == pytest.approx(ours.tree.total, rel=1e-12)


def test_restore_rebuilds_the_same_sampler():
    """What a checkpoint stores (frames, ep_step, flags, pos, filled, initial stacks) is enough:
    a restored buffer samples the same batches and goes on storing exactly."""
    env, obs = vec_env(2, "zero", seed=9)
    a = FrameReplay(60, 2, (4, 8, 8), np.uint8, n_step=3, seed=4)
    rng = np.random.default_rng(0)
    for _ in range(130):
        obs, _, _ = step(env, obs, rng, (a,))
    b = FrameReplay(60, 2, (4, 8, 8), np.uint8, n_step=3, seed=4)
    for k in FrameReplay.OBS_ROWS + ("actions", "rewards", "terminated", "truncated"):
        getattr(b, k)[...] = getattr(a, k)
    b.pos, b.filled = a.pos, a.filled
    b.restore(a.starts.held())
    for _ in range(3):
        same_batch(a.sample(32), b.sample(32), a, b)
    for _ in range(50):
        obs, _, _ = step(env, obs, rng, (a, b))
        same_batch(a.sample(32), b.sample(32), a, b)
    # a damaged index is refused, not rebuilt wrongly
    bad = FrameReplay(60, 2, (4, 8, 8), np.uint8, n_step=3)
    for k in FrameReplay.OBS_ROWS + ("terminated", "truncated"):
        getattr(bad, k)[...] = getattr(a, k)
    bad.pos, bad.filled = a.pos, a.filled
    with pytest.raises(ValueError, match="initial stacks"):
        bad.restore(a.starts.held()[:-1])
    bad.ep_step[a.pos - 1] = 9
    with pytest.raises(ValueError, match="ep_step"):
        bad.restore(a.starts.held())


def test_start_index_rules():
    steps = np.array([[2], [3], [0], [1], [2], [0]], np.uint8)     # ring order, k = 3
    assert start_index(steps, 3, 4).ravel().tolist() == [-1, -1, 0, 0, 0, 1]
    with pytest.raises(ValueError, match="not in the ring"):
        start_index(steps, 3, 5)        # row 1 (saturated) would need frames before the ring


def test_not_a_frame_stack_is_refused():
    buf = FrameReplay(16, 1, (4, 8, 8), np.uint8)
    rng = np.random.default_rng(0)
    obs = rng.integers(0, 255, (1, 4, 8, 8), dtype=np.uint8)
    nxt = rng.integers(0, 255, (1, 4, 8, 8), dtype=np.uint8)       # not obs shifted by one
    with pytest.raises(ValueError, match="FrameStackObservation"):
        buf.add(obs, [0], [0.0], nxt, [False], [False])


def test_start_store_fifo_grows_in_order():
    s = StartStore((2,), np.int64, capacity=2)
    seqs = [int(s.push(np.array([[i, i]]))[0]) for i in range(5)]
    s.pop(2)
    s.push(np.array([[5, 5], [6, 6]]))
    assert seqs == [0, 1, 2, 3, 4] and len(s) == 5
    assert s.held()[:, 0].tolist() == [2, 3, 4, 5, 6]
    assert s.get(np.array([6, 2]))[:, 0].tolist() == [6, 2]


def test_non_stacked_env_keeps_whole_observations():
    env = gym.vector.SyncVectorEnv([lambda: gym.make("CartPole-v1")])
    assert frame_stack(env) == 0
    assert type(make_replay(100, 1, (4,), np.float32, frame_stack=0)) is ReplayBuffer


@pytest.mark.parametrize("episode_steps", [25, 100])
def test_start_store_is_allocated_for_the_planned_episode_rate(episode_steps):
    """The start store is allocated once for one start per ``episode_steps`` transitions, and
    the planner counts exactly what is allocated; shorter episodes than planned still work (it
    grows)."""
    buf = make_replay(400, 2, (4, 8, 8), np.uint8, frame_stack=4, episode_steps=episode_steps,
                      n_step=1)
    cap = len(buf.starts.data)
    assert cap == max(8, 4, buf.rows * 2 // episode_steps + 2)
    assert buf.nbytes == FrameReplay.nbytes_for(400, 2, (4, 8, 8), np.uint8, 1, False, episode_steps)
    stack = np.zeros((2, 4, 8, 8), np.uint8)
    for _ in range(cap):       # every transition ends an episode: more starts than planned
        buf.starts.push(stack)
    assert len(buf.starts) == 2 * cap and len(buf.starts.data) >= 2 * cap
