"""Image observations with actors (``hpcdqn.actors.frames``), one process, no MPI: a frame-stacked
env's steps sent as frames (each once), packed, unpacked and inserted by the learner's end give a
replay equal, array for array, to the one the env's own steps fill; a grid env (no stack) alike;
bad messages are refused before they are used."""
import numpy as np
import pytest

import frame_env  # noqa: F401  (registers frame_env:FrameToy-v0)

from hpcdqn.actors.frames import FrameFeed, FrameSink, FrameWire, sends_frames
from hpcdqn.actors.wire import HEADER, WireError, pack_done
from hpcdqn.config import load_config
from hpcdqn.rl.envs import frame_stack, make_vector_env
from hpcdqn.rl.framereplay import FrameReplay, make_replay
from hpcdqn.rl.rollout import Rollout

SEND = 5


def roll(env_id, seed, steps, sink, rng):
    env = make_vector_env(env_id, 2, seed)
    r = Rollout(env, np.random.default_rng(seed), env.reset(seed=seed)[0])
    for _ in range(steps):
        r.step(rng.integers(0, r.n_actions, 2), sink)
    return env


class Tee:
    """Both the direct replay and the actor's sink see each step (the sink's records kept)."""

    def __init__(self, replay, sink):
        self.replay, self.sink, self.records = replay, sink, []

    def add(self, *step):
        self.replay.add(*step)
        self.sink.add(*step)
        self.records.append(self.sink.done)


@pytest.mark.parametrize("env_id", ["frame_env:FrameToy-v0", "MinAtar/Breakout-v0"])
def test_frames_round_trip_fills_the_replay_the_env_would(env_id):
    """Two actors (2 envs each, 300 steps): their steps through the wire and FrameFeed give the
    learner a replay whose every array equals a replay filled by the same envs directly (the
    4-env replay a sync rank with these envs holds), and the message carries one frame per
    env step, not the stacks."""
    cfg = load_config(overrides=[f"env_id={env_id}", "num_envs=2", f"actor.send_every={SEND}",
                                 "dqn.n_step=3", "replay.prioritized=true"])
    probe = make_vector_env(env_id, 2, 0)
    k, space, n_act = frame_stack(probe), probe.single_observation_space, int(probe.single_action_space.n)
    assert sends_frames(space.shape, k) and (k == 4) == env_id.startswith("frame_env")
    feed = FrameFeed(space, k, n_act, actors=2, num_envs=2, send_every=SEND)
    learner = feed.make_replay(600, 5, cfg["dqn"], cfg["replay"], 100)
    assert isinstance(learner, FrameReplay) == bool(k) and learner.num_envs == 4
    direct = [make_replay(300, 2, space.shape, space.dtype, k, n_step=3, prioritized=True)
              for _ in range(2)]
    tees = [Tee(direct[a], FrameSink(2, k)) for a in range(2)]
    for a in range(2):
        roll(env_id, 10 + a, 300, tees[a], np.random.default_rng(a))
    wire = FrameWire(space.shape, space.dtype, 2, SEND, k, n_act)
    msgs = [[wire.unpack(wire.pack_data(i, [2] * SEND, t.records[i:i + SEND], [(1.0, 2)]))
             for i in range(0, 300, SEND)] for t in tees]
    frame = int(np.prod(space.shape[1:] if k else space.shape))
    assert msgs[0][1]["frames"].nbytes == SEND * 2 * frame        # one frame per env step
    off = [0, 0]
    for i in range(300):
        steps = []
        for a in range(2):
            m = msgs[a][i // SEND]
            if i % SEND == 0:
                off[a] = 0
            n = int(m["counts"][i % SEND])
            steps.append(FrameFeed.step(m, i % SEND, off[a], n))
            off[a] += n
        feed.insert(learner, steps)
    assert learner.inserted == 1200 and learner.sample_s == 0.0
    fields = ("frames", "ep_step") if k else ("obs", "next_obs")
    for key in fields + ("actions", "rewards", "terminated", "truncated"):
        want = np.concatenate([getattr(d, key) for d in direct], axis=1)
        assert np.array_equal(getattr(learner, key), want), key
    rows = (learner.pos - learner.window + np.arange(learner.window)) % learner.rows
    for e in range(4):      # every sampleable observation pair rebuilt alike
        col = np.full(len(rows), e % 2)
        for at in ("obs_at", "next_obs_at"):
            got = getattr(learner, at)(rows, np.full(len(rows), e))
            assert np.array_equal(got, getattr(direct[e // 2], at)(rows, col)), (at, e)
    assert learner.terminated.any() or learner.truncated.any()      # episodes ended inside


def test_bad_frames_messages_are_refused():
    space = make_vector_env("frame_env:FrameToy-v0", 2, 0).single_observation_space
    wire = FrameWire(space.shape, space.dtype, 2, SEND, 4, 3)
    sink, recs = FrameSink(2, 4), []
    roll("frame_env:FrameToy-v0", 1, 3, _Keep(sink, recs), np.random.default_rng(0))
    good = wire.pack_data(0, [2] * 3, recs, [])
    assert wire.unpack(good)["counts"].tolist() == [2, 0, 0]
    assert wire.unpack(pack_done({k: 1 for k in ("env_s", "inference_s", "send_s", "wait_s",
                                                "wall_s", "env_steps", "transitions_sent",
                                                "messages_sent", "weights_received",
                                                "episodes")}))["kind"] == 2
    assert wire.max_bytes >= good.nbytes
    cases = {"header says": good[:-1], "shorter than its header": good[:10]}
    big = good.copy()
    big[16:24] = np.array([SEND + 1], np.int64).view(np.uint8)
    cases["claims 6 steps"] = big
    act = good.copy()
    a0 = HEADER * 8 + 6 + 2 * int(np.prod(space.shape)) + 6 * int(np.prod(space.shape[1:]))
    act[a0:a0 + 8] = np.array([7], np.int64).view(np.uint8)
    cases["actions outside 0..2"] = act
    flag = good.copy()
    flag[HEADER * 8 + 2] = 1       # a start flag for step 1 that the start count does not have
    cases["do not add up to 2"] = flag
    for what, buf in cases.items():
        with pytest.raises(WireError, match=what):
            wire.unpack(buf)
    with pytest.raises(ValueError, match="cannot be sent as frames"):
        FrameSink(1, 4).add(np.zeros((1, 4, 2, 2)), [0], [0.0], np.ones((1, 4, 2, 2)), [False], [False])


class _Keep:
    def __init__(self, sink, recs):
        self.sink, self.recs = sink, recs

    def add(self, *step):
        self.sink.add(*step)
        self.recs.append(self.sink.done)
