"""The actor's n-step transitions, the learner's replay of them and the wire format
(``hpcdqn.actors.nstep``, ``hpcdqn.actors.wire``): one process, no MPI."""
import numpy as np
import pytest

from hpcdqn.actors.nstep import NStepWindow, TransitionReplay
from hpcdqn.actors.wire import DATA, DONE, STOP, WEIGHTS, Layout, WireError, pack_ctrl, pack_done, unpack_ctrl
from hpcdqn.rl.replay import ReplayBuffer


def stream(steps, envs, rng):
    """Random vector-env steps with terminations and truncations."""
    obs = rng.normal(size=(envs, 3)).astype(np.float32)
    for _ in range(steps):
        nxt = rng.normal(size=(envs, 3)).astype(np.float32)
        term, trunc = rng.random(envs) < 0.15, rng.random(envs) < 0.1
        yield obs, rng.integers(0, 4, envs), rng.normal(size=envs).astype(np.float32), nxt, term, trunc
        obs = rng.normal(size=(envs, 3)).astype(np.float32)


@pytest.mark.parametrize("n", [1, 3])
def test_actor_nstep_targets_equal_the_replays(n):
    """Every transition the actor finishes has the return, bootstrap observation and discount
    that the sync replay computes for the same step at sampling time."""
    rng, envs, steps, gamma = np.random.default_rng(3), 4, 60, 0.9
    ref = ReplayBuffer(1000, envs, (3,), np.float32, n_step=n, gamma=gamma)
    win, got = NStepWindow(n, gamma), []
    for s in stream(steps, envs, rng):
        ref.add(*s)
        out = win.push(*s)
        if out is not None:
            got.append(out)
    assert len(got) == steps - (n - 1)
    idx = np.arange((steps - (n - 1)) * envs)          # [row, env] cells, row-major
    want = ref._gather(idx, np.ones(len(idx), np.float32))
    cat = {k: np.concatenate([g[k] for g in got]) for k in got[0]}
    assert np.array_equal(cat["obs"], want.obs) and np.array_equal(cat["next_obs"], want.next_obs)
    assert np.array_equal(cat["actions"], want.actions)
    assert np.allclose(cat["returns"], want.returns, atol=1e-6)
    assert np.allclose(cat["discounts"], want.discounts, atol=1e-7)
    assert (cat["discounts"] == 0).any() and (cat["discounts"] > 0).any()   # both kinds of ends


def test_transition_replay_samples_what_was_inserted():
    rep = TransitionReplay(50, (3,), np.float32, seed=1)
    tr = {"obs": np.arange(120, dtype=np.float32).reshape(40, 3), "actions": np.arange(40),
          "returns": np.arange(40, dtype=np.float32) / 2, "next_obs": -np.arange(120, dtype=np.float32).reshape(40, 3),
          "discounts": np.linspace(0, 1, 40).astype(np.float32)}
    rep.add_transitions(tr)
    rep.add_transitions({k: v[:20] for k, v in tr.items()})          # wraps the ring
    assert len(rep) == 50 and rep.inserted == 60
    b = rep.sample(200)
    i = b.actions
    assert np.array_equal(b.obs, tr["obs"][i]) and np.array_equal(b.next_obs, tr["next_obs"][i])
    assert np.array_equal(b.returns, tr["returns"][i]) and np.array_equal(b.discounts, tr["discounts"][i])
    assert set(i) <= set(range(40)) and len(set(i)) > 20
    per = TransitionReplay(50, (3,), np.float32, prioritized=True, seed=1)
    per.add_transitions(tr)
    per.update_priorities(np.arange(40), np.r_[np.zeros(39), 100.0])
    assert (per.sample(64).actions == 39).mean() > 0.9


def test_wire_round_trip_and_refusals():
    lay = Layout((3,), np.float32, num_envs=2, max_steps=4)
    tr = [{"obs": np.ones((2, 3), np.float32), "actions": np.array([0, 1]),
           "returns": np.array([1.0, 2.0], np.float32), "next_obs": np.zeros((2, 3), np.float32),
           "discounts": np.array([0.0, 0.9], np.float32)}]
    buf = lay.pack_data(5, [0, 2], tr, [(10.0, 10)])
    assert buf.nbytes <= lay.max_bytes
    m = lay.unpack(buf)
    assert m["kind"] == DATA and m["first"] == 5 and list(m["counts"]) == [0, 2]
    assert np.array_equal(m["returns"], [1.0, 2.0]) and np.array_equal(m["episodes"], [[10.0, 10.0]])
    with pytest.raises(WireError, match="bytes"):
        lay.unpack(buf[:-4])
    bad = buf.copy()
    bad[16:24] = np.array([99], np.int64).view(np.uint8)     # 99 steps > max_steps
    with pytest.raises(WireError, match="claims"):
        lay.unpack(bad)
    assert lay.unpack(pack_done({k: 1 for k in ("env_s", "inference_s", "send_s", "wait_s", "wall_s",
                                                "env_steps", "transitions_sent", "messages_sent",
                                                "weights_received", "episodes")}))["kind"] == DONE
    kind, value, p = unpack_ctrl(pack_ctrl(WEIGHTS, 7, np.arange(5)), 5)
    assert (kind, value) == (WEIGHTS, 7) and np.array_equal(p, np.arange(5))
    assert unpack_ctrl(pack_ctrl(STOP, 3), 5)[:2] == (STOP, 3)
    with pytest.raises(WireError):
        unpack_ctrl(pack_ctrl(WEIGHTS, 7, np.arange(4)), 5)


def test_raw_steps_resharded_into_finished_transitions_equal_the_replays_targets():
    """A sync checkpoint's env steps ``add``ed to a learner's replay (a sync -> actors
    resharded resume) become the same n-step transitions the sync replay samples; finished
    transitions (an actor checkpoint's, ``discounts`` given) go in as they are."""
    rng, steps, gamma, n = np.random.default_rng(5), 50, 0.9, 3
    ref = ReplayBuffer(1000, 1, (3,), np.float32, n_step=n, gamma=gamma)
    rep = TransitionReplay(1000, (3,), np.float32, raw_steps=(n, gamma))
    for s in stream(steps, 1, rng):
        ref.add(*s)
        rep.add(*s)
    assert rep.filled == steps - (n - 1)
    want = ref._gather(np.arange(steps - (n - 1)), np.ones(steps - (n - 1), np.float32))
    b = rep._gather(np.arange(rep.filled), np.ones(rep.filled, np.float32))
    assert np.array_equal(b.obs, want.obs) and np.array_equal(b.next_obs, want.next_obs)
    assert np.allclose(b.returns, want.returns, atol=1e-6) and np.allclose(b.discounts, want.discounts)
    assert np.array_equal(rep.terminated[:rep.filled, 0], want.discounts == 0)   # an n=1 sync view
    again = TransitionReplay(1000, (3,), np.float32, raw_steps=(n, gamma))
    for i in range(rep.filled):
        again.add(b.obs[i:i + 1], b.actions[i:i + 1], b.returns[i:i + 1], b.next_obs[i:i + 1],
                  None, None, discounts=b.discounts[i:i + 1])
    assert again.filled == rep.filled and np.array_equal(again.discounts, rep.discounts)
    assert np.array_equal(again.rewards, rep.rewards) and np.array_equal(again.obs, rep.obs)


def test_state_messages_round_trip_and_are_bounded():
    """``STATE`` (actor -> learner) and ``RESTORE`` (learner -> actor): JSON after the int64
    header (no pickle), their length checked against the header, and bounded on receipt."""
    from hpcdqn.actors.wire import RESTORE, STATE, max_state_bytes, pack_json
    from hpcdqn.store.codec import decode, encode

    lay = Layout((4,), np.float32, 1, 3)
    st = {"it": 7, "params": encode(np.arange(5, dtype=np.float32))}
    got = lay.unpack(pack_json(STATE, st))
    assert got["kind"] == STATE and got["state"]["it"] == 7
    assert np.array_equal(decode(got["state"]["params"]), np.arange(5, dtype=np.float32))
    kind, _, obj = unpack_ctrl(pack_json(RESTORE, st), 5)
    assert kind == RESTORE and obj == st
    with pytest.raises(WireError, match="header says"):
        lay.unpack(pack_json(STATE, st)[:-3])
    bad = pack_json(STATE, st)
    bad[48:50] = 0xFF                     # not UTF-8 JSON any more
    with pytest.raises(WireError, match="not JSON"):
        lay.unpack(bad)
    assert max_state_bytes(1000) < max_state_bytes(2000) < 2 ** 27
