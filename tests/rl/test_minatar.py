"""MinAtar (Young & Tian 2019): the ids, the observations as replay and checkpoints keep them,
the env state a checkpoint captures, the paper's CNN and centred RMSprop, and (real mpirun,
real files) a MinAtar run resumed from a checkpoint ending bit for bit as the uninterrupted one.
The learning test is under the ``minatar`` marker."""

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from mpi4py import MPI

from mpi_util import ROOT, hpcdqn

from hpcdqn.config import learner_config, load_config
from hpcdqn.learner import DataParallelLearner
from hpcdqn.parallel.flat import FlatModule
from hpcdqn.parallel.partition import (boundary_offset, cut_into_stages, layer_offsets,
                                       stage_modules)
from hpcdqn.rl.envs import make_vector_env
from hpcdqn.rl.networks import build_layers, initial_flat, meta_layers, num_params
from hpcdqn.rl.replay import Batch, ReplayBuffer
from hpcdqn.store.codec import decode, encode, env_state, restore_env_state
from hpcdqn.store.errors import CheckpointCorrupt

GAMES = {"Asterix": 4, "Breakout": 4, "Freeway": 7, "Seaquest": 10, "SpaceInvaders": 6}
CONFIG = str(ROOT / "configs" / "minatar_breakout.toml")


@pytest.mark.parametrize("game,channels", GAMES.items())
def test_ids_observations_and_exact_env_state(game, channels):
    """Every game: 6 actions on -v0, (C, 10, 10) uint8 {0, 1}; a state captured mid-run and
    restored (through the checkpoint's JSON) into a freshly made, differently seeded env
    replays the same observations, rewards and episode ends for the same actions."""
    v = make_vector_env(f"MinAtar/{game}-v0", 2, seed=3)
    assert v.single_observation_space.shape == (channels, 10, 10)
    assert v.single_observation_space.dtype == np.uint8 and v.single_action_space.n == 6
    rng = np.random.default_rng(0)
    for a in rng.integers(0, 6, (200, 2)):
        obs = v.step(a)[0]
    assert obs.dtype == np.uint8 and set(np.unique(obs)) <= {0, 1}
    st = json.loads(json.dumps(env_state(v)))
    acts = rng.integers(0, 6, (600, 2))
    ref = [tuple(x.copy() for x in v.step(a)[:3]) for a in acts]
    assert len({r[0].tobytes() for r in ref}) > 100        # the game moves
    w = make_vector_env(f"MinAtar/{game}-v0", 2, seed=99)
    assert restore_env_state(w, st) == []
    for a, (o, r, t) in zip(acts, ref):
        o2, r2, t2 = w.step(a)[:3]
        assert np.array_equal(o, o2) and np.array_equal(r, r2) and np.array_equal(t, t2)
    fresh = make_vector_env(f"MinAtar/{game}-v0", 2, seed=99)   # without the state: different
    assert any(not np.array_equal(fresh.step(a)[0], o) for a, (o, _, _) in zip(acts, ref))


def test_minimal_action_set_and_randomstate_bounds():
    assert make_vector_env("MinAtar/Breakout-v1", 1, seed=0).single_action_space.n == 3
    rs = np.random.RandomState(5)
    rs.rand(7)
    back = decode(json.loads(json.dumps(encode(rs))))
    assert np.array_equal(back.rand(5), rs.rand(5))
    bad = json.loads(json.dumps(encode(rs)))
    bad["__randomstate__"]["keys"] = encode(np.zeros(10**4, np.uint32))   # oversized state
    with pytest.raises(CheckpointCorrupt, match="624 uint32"):
        decode(bad)
    bad["__randomstate__"]["keys"] = encode(np.zeros(624, np.uint32))
    bad["__randomstate__"]["pos"] = 10**6
    with pytest.raises(CheckpointCorrupt, match="position"):
        decode(bad)


def test_replay_keeps_one_byte_per_cell_without_float_copies():
    obs_shape = (4, 10, 10)
    rb = ReplayBuffer(1000, 1, obs_shape, np.uint8)
    assert rb.obs.dtype == np.uint8 and rb.next_obs.dtype == np.uint8
    per = rb.nbytes / rb.capacity
    assert per == 2 * 400 + 8 + 4 + 1 + 1     # obs + next_obs bytes, action, reward, two flags
    o = np.random.default_rng(0).integers(0, 2, (1, *obs_shape)).astype(np.uint8)
    for _ in range(5):
        rb.add(o, np.zeros(1, np.int64), np.ones(1), o, np.zeros(1, bool), np.zeros(1, bool))
    b = rb.sample(4)
    assert b.obs.dtype == np.uint8 and np.array_equal(b.obs[0], o[0])


def test_minatar_cnn_layers_and_stage_only_construction():
    layers = build_layers((4, 10, 10), 6, [128], kind="minatar", seed=2)
    assert [num_params(m) for m in layers] == [0, 4 * 16 * 9 + 16, 0, 1024 * 128 + 128, 128 * 6 + 6]
    x = torch.randint(0, 2, (3, 4, 10, 10), dtype=torch.uint8)
    assert FlatModule(layers)(x).shape == (3, 6)
    full = FlatModule(build_layers((4, 10, 10), 6, [128], kind="minatar", seed=11)).flat.data
    meta = meta_layers((4, 10, 10), 6, [128], kind="minatar")
    off = layer_offsets(meta)
    stages = cut_into_stages(meta, 2)
    assert len(stages) == 2
    got = []
    for a, b in stages:
        lo, hi = boundary_offset(meta, a, off), boundary_offset(meta, b, off)
        m = FlatModule(stage_modules(meta, a, b))
        m.load_flat_(initial_flat(meta, 11, lo, hi))
        got.append(m.flat.data)
    assert torch.equal(torch.cat(got), full)
    with pytest.raises(ValueError, match="needs image observations"):
        build_layers((4,), 2, [8], kind="minatar")


def _learner(opt="rmsprop"):
    cfg = load_config(CONFIG, {"dqn.optimizer": opt})
    return DataParallelLearner(build_layers((4, 10, 10), 6, [128], kind="minatar", seed=3),
                               learner_config(cfg),
                               MPI.COMM_SELF), cfg


def _batch(rng):
    o = rng.integers(0, 2, (32, 4, 10, 10)).astype(np.uint8)
    n = rng.integers(0, 2, (32, 4, 10, 10)).astype(np.uint8)
    return Batch(o, rng.integers(0, 6, 32), rng.standard_normal(32).astype(np.float32), n,
                 np.full(32, 0.99, np.float32), np.ones(32, np.float32), np.arange(32))


def test_centred_rmsprop_matches_torch_and_resumes_bitwise():
    """The learner's update with dqn.optimizer=rmsprop equals a plain torch RMSprop (centered,
    alpha 0.95, eps 0.01) on the same network and loss; its state saved after 3 updates and
    loaded into a fresh learner continues bit for bit."""
    a, cfg = _learner()
    assert isinstance(a.opt, torch.optim.RMSprop) and a.opt.param_groups[0]["centered"]
    assert "RMSprop" in a.plan.describe()
    net = FlatModule(build_layers((4, 10, 10), 6, [128], kind="minatar", seed=3))
    tgt = FlatModule(build_layers((4, 10, 10), 6, [128], kind="minatar", seed=3), grad=False)
    opt = torch.optim.RMSprop([net.flat], lr=2.5e-4, alpha=0.95, eps=0.01, centered=True)
    rng = np.random.default_rng(0)
    batches = [_batch(rng) for _ in range(6)]
    for b in batches[:3]:
        a.update(b)
        with torch.no_grad():
            y = torch.as_tensor(b.returns) + torch.as_tensor(b.discounts) * \
                tgt(torch.as_tensor(b.next_obs)).max(1).values
        q = net(torch.as_tensor(b.obs)).gather(1, torch.as_tensor(b.actions)[:, None])[:, 0]
        net.zero_grad_()
        torch.nn.functional.smooth_l1_loss(q, y).backward()
        opt.step()
    assert torch.allclose(a.online.flat.data, net.flat.data, atol=1e-6, rtol=1e-5)
    assert not torch.equal(a.online.flat.data, tgt.flat.data)
    arrays, scalars = a.state_arrays(), a.state_scalars()
    assert scalars["adam_step"] == 3.0 and np.abs(arrays["exp_avg"]).max() > 0
    b2, _ = _learner()
    b2.load_state({k: np.array(v) for k, v in arrays.items()}, dict(scalars))
    for b in batches[3:]:
        a.update(b)
        b2.update(b)
    assert torch.equal(a.online.flat.data, b2.online.flat.data)
    assert torch.equal(a.opt.state[a.online.flat]["square_avg"], b2.opt.state[b2.online.flat]["square_avg"])


def test_paper_epsilon_schedule():
    from hpcdqn.rl.schedule import epsilon_at
    d = load_config(CONFIG)["dqn"]
    assert epsilon_at(d, 5_000_000, 0) == 1.0 and epsilon_at(d, 5_000_000, 5000) == 1.0
    assert epsilon_at(d, 5_000_000, 55_000) == pytest.approx(0.55)
    assert epsilon_at(d, 5_000_000, 105_000) == pytest.approx(0.1)
    assert epsilon_at(d, 5_000_000, 4_000_000) == pytest.approx(0.1)


def test_wrong_network_kind_is_a_clear_error(tmp_path):
    r = hpcdqn(1, ["train", "network.kind=minatar", "total_steps=100", f"run_dir={tmp_path}/x",
                   "log.progress=false"], timeout=120, check=False)
    assert r.returncode != 0 and "network.kind='minatar' needs image observations" in r.stderr
    assert "Traceback" not in r.stderr


# -- exact resume (real mpirun, real files) --------------------------------------------------------
TINY = [CONFIG, "total_steps=2000", "dqn.learning_starts=500", "dqn.exploration_steps=1000",
        "dqn.train_frequency=2",
        "dqn.buffer_size=2000", "dqn.target_update_every=200", "checkpoint_every=1000",
        "keep_last=3", "eval.episodes=0", "log.every=500", "log.progress=false",
        "log.tensorboard=false", "seed=4"]


def _arrays(path, prefixes):
    out = {}
    with h5py.File(path) as f:
        f.visititems(lambda k, o: out.__setitem__(k, o[...])
                     if isinstance(o, h5py.Dataset) and k.startswith(prefixes) else None)
    return out


def test_minatar_resume_is_bitwise_equal_to_uninterrupted(tmp_path):
    """dp=2, the paper's protocol shortened (and an update every 2nd frame): stopped at 1300 (not
    a checkpoint, log or target boundary) and resumed, the run ends bit for bit as the
    uninterrupted one: model, parameters, optimizer moments and the replay with its uint8
    observations."""
    a, b = tmp_path / "a", tmp_path / "b"
    sa = json.loads(hpcdqn(2, ["train", "--config", *TINY[:1], *TINY[1:], f"run_dir={a}"],
                           timeout=300).stdout.strip().splitlines()[-1])
    assert sa["env_steps"] == 2000 and sa["updates"] > 300
    hpcdqn(2, ["train", "--config", *TINY[:1], *TINY[1:], f"run_dir={b}", "stop_after=1300"],
           timeout=300)
    r = hpcdqn(2, ["train", "--resume", str(b)], timeout=300)
    assert "resumed exactly from" in r.stderr and "ckpt-000000001300.h5" in r.stderr
    name = "ckpt-000000002000.h5"
    pa = _arrays(a / "checkpoints" / name, ("params/", "adam/", "replay/"))
    pb = _arrays(b / "checkpoints" / name, ("params/", "adam/", "replay/"))
    assert pa.keys() == pb.keys() and any(k.startswith("replay/") for k in pa)
    assert pa["replay/obs"].dtype == np.uint8 and pa["replay/obs"].shape[-3:] == (4, 10, 10)
    assert pa["replay/obs"].max() == 1
    for k in pa:
        assert pa[k].dtype == pb[k].dtype and np.array_equal(pa[k], pb[k]), k
    with h5py.File(a / "model.h5") as fa, h5py.File(b / "model.h5") as fb:
        assert np.array_equal(fa["online"][...], fb["online"][...])


# -- learning (marker: minatar) --------------------------------------------------------------------
# A faster variant of the paper's protocol (one update per 4 frames, epsilon annealed over 20k
# frames after a 2k-frame warm-up), 70k frames of Breakout. Budget and threshold were chosen from
# runs on seeds 12, 13 and 14 (never on seed 1, which this test uses;
# benchmarks/results/minatar_ci_tuning.json): at 60k frames their final training episodes scored
# 2.42 (s12, at 80k: 2.25), 2.32 and 1.92, their 30-episode greedy evaluations 2.7 (80k), 3.1 and
# 3.5, all still rising; a uniform random policy scores about 0.5 per episode (the first log
# row, all random, is checked to say so).
LEARN = ["total_steps=70000", "dqn.train_frequency=4", "dqn.exploration_steps=20000",
         "dqn.learning_starts=2000", "eval.episodes=30", "checkpoint=false", "log.every=5000",
         "log.progress=false", "log.tensorboard=false", "seed=1"]
LEARN_THRESHOLD = 1.5


@pytest.mark.minatar
def test_breakout_learns_well_above_random(tmp_path):
    import csv

    run = tmp_path / "run"
    r = hpcdqn(1, ["train", "--config", CONFIG, *LEARN, f"run_dir={run}"], timeout=600)
    s = json.loads(r.stdout.strip().splitlines()[-1])
    with open(run / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert float(rows[0]["episodic_return"]) < 0.8          # random play: ~0.5
    last = final_episodes_return(rows)
    print({"final_training_episodes_return": last, "eval_return_mean": s["eval_return_mean"],
           "wall_s": s["wall_s"]})
    assert last >= LEARN_THRESHOLD, (last, s["eval_return_mean"])
    assert s["eval_return_mean"] >= LEARN_THRESHOLD, s


def final_episodes_return(rows, at_least=100):
    """Mean training return over the newest metrics rows holding >= ``at_least`` episodes."""
    total = n = 0.0
    prev = [0] + [int(r["episodes"]) for r in rows[:-1]]
    for r, before in zip(reversed(rows), reversed(prev)):
        k = int(r["episodes"]) - before
        if k > 0:
            total, n = total + k * float(r["episodic_return"]), n + k
        if n >= at_least:
            break
    return total / n
