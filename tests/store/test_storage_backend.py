"""A storage backend is one class (``hpcdqn.store.storage``): ``MemoryStorage`` below, a stub
that keeps checkpoints in a dict, round-trips a real checkpoint of a small run through the
interface (the checkpointer's collect/plan, ``writer.write_parts``, verification against the
checksums, loading into fresh parts) and everything comes back bit for bit: the learner, the
replay (prioritized, n-step), the acting state and the environments (the two runs then go on
identically)."""

import json

import numpy as np
import pytest
import torch
from mpi4py import MPI

from hpcdqn.config import learner_config, load_config
from hpcdqn.learner import build_learner
from hpcdqn.parallel.grid import RankGrid
from hpcdqn.parallel.layout import RunLayout
from hpcdqn.rl.envs import frame_stack, make_vector_env
from hpcdqn.rl.framereplay import make_replay
from hpcdqn.rl.rollout import Rollout
from hpcdqn.store.checkpointer import Checkpointer
from hpcdqn.store.errors import CheckpointCorrupt
from hpcdqn.store.writer import dataset_attrs, write_parts


class MemoryDataset:
    def __init__(self, data: np.ndarray, attrs: dict):
        self.data, self.attrs = data, attrs
        self.shape, self.dtype = data.shape, data.dtype

    def read(self, sel=slice(None)) -> np.ndarray:
        return np.array(self.data[sel])

    def read_into(self, out: np.ndarray, sel=slice(None)) -> None:
        out[...] = self.data[sel]


class MemorySource:
    def __init__(self, stored: dict):
        self.attrs, self.datasets = stored["attrs"], stored["datasets"]

    def has(self, name: str) -> bool:
        return name in self.datasets

    def dataset(self, name: str):
        return self.datasets.get(name)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


class MemoryStorage:
    """The whole backend: ``write`` (collective: rank 0 gathers every rank's parts) and ``open``."""
    io_mode = "memory"

    def __init__(self):
        self.stored = {}

    def write(self, target, comm, specs, parts, crcs, root_attrs) -> None:
        everyone = comm.gather(parts, root=0)
        if comm.Get_rank() != 0:
            return
        datasets = {}
        for s in specs:
            data = np.zeros(s.shape, s.dtype)
            for own, a, b in s.parts:
                data[a:b] = everyone[own][s.name]
            datasets[s.name] = MemoryDataset(data, dataset_attrs(s, crcs))
        self.stored[target] = {"attrs": dict(root_attrs), "datasets": datasets}

    def open(self, target):
        return MemorySource(self.stored[target])


CFG = ["num_envs=2", "network.hidden=[16, 16]", "dqn.buffer_size=200",
       "dqn.n_step=3", "replay.prioritized=true", "dqn.batch_size=8", "seed=3"]


def small_run(seed: int, storage, steps: int = 0, env_id: str = "CartPole-v1"):
    """A first stage's parts (learner, replay, rollout) and a checkpointer writing to
    ``storage``; ``steps`` env steps with an update after every 10th."""
    cfg = load_config(overrides=CFG + [f"seed={seed}", f"env_id={env_id}"])
    grid = RankGrid(MPI.COMM_WORLD, 1)
    env = make_vector_env(cfg["env_id"], cfg["num_envs"], seed, cfg["vector"], cfg["atari"])
    space, n_actions = env.single_observation_space, int(env.single_action_space.n)
    layout = RunLayout.resolve(cfg, 1).place(cfg["network"], space.shape, n_actions)
    layers = list(layout.layers)
    learner = build_learner(layout, grid, learner_config(cfg), "cpu", seed=seed)
    replay = make_replay(cfg["dqn"]["buffer_size"], cfg["num_envs"], space.shape, space.dtype,
                         frame_stack(env), n_step=cfg["dqn"]["n_step"], prioritized=True,
                         seed=seed + 7)
    rollout = Rollout(env, np.random.default_rng(seed), env.reset(seed=seed)[0])
    env_info = {"env_id": cfg["env_id"], "obs_shape": list(space.shape),
                "obs_dtype": np.dtype(space.dtype).str, "n_actions": n_actions}
    ckpt = Checkpointer("unused", cfg, grid, layers, env_info, learner, replay, rollout,
                        frame_stack(env), storage=storage)
    for i in range(steps):
        step(learner, replay, rollout, update=i % 10 == 9, eps=1.0)
    return ckpt, learner, replay, rollout


def step(learner, replay, rollout, update=True, eps=0.5):
    explore, random_actions = rollout.explore(eps)
    greedy = learner.greedy(rollout.obs, needed=not explore.all())
    actions = rollout.choose(explore, random_actions, greedy)
    rollout.step(actions, replay)
    if update and replay.sampleable_rows > 0:
        out = learner.update(replay.sample(8))
        return out["loss"]
    return None


def same(a, b) -> bool:
    if isinstance(a, np.random.Generator):
        return a.bit_generator.state == b.bit_generator.state
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("env_id", ["CartPole-v1", "frame_env:FrameToy-v0"])
def test_a_memory_backend_round_trips_a_checkpoint(env_id):
    """CartPole: whole observations; FrameToy: a frame-stacked replay (frames, initial stacks).
    130 steps: the ring (100 rows) has wrapped."""
    mem = MemoryStorage()
    ckpt, learner, replay, rollout = small_run(3, mem, 130, env_id)
    assert replay.filled == replay.rows and (env_id == "CartPole-v1") == (replay.margin == 0)
    counters = {"iteration_next": 130, "env_steps": 260, "episodes": 4, "epsilon": 0.5,
                "wall_s": 1.5}
    torch.manual_seed(11)
    write_parts(mem, "ck", MPI.COMM_WORLD, **ckpt.collect(counters, {"ret": 9.0, "n": 1}))
    stored = mem.stored["ck"]
    assert json.loads(stored["attrs"]["counters"])["env_steps"] == 260
    assert stored["attrs"]["io_mode"] == "memory" and "replay/priorities" in stored["datasets"]

    ckpt2, learner2, replay2, rollout2 = small_run(4, mem, 0, env_id)   # other seed: other state
    assert not same(learner.state_dict()["online"], learner2.state_dict()["online"])
    torch.manual_seed(0)
    st = ckpt2.load("ck")
    assert st["exact"] and st["warnings"] == [] and st["window"] == {"ret": 9.0, "n": 1}
    assert st["counters"]["env_steps"] == 260 and st["counters"]["updates"] == learner.updates
    assert same(learner.state_dict(), learner2.state_dict())
    assert same(replay.state_dict(), replay2.state_dict())
    assert same(replay.tree.tree, replay2.tree.tree)          # the sum tree rebuilt exactly
    a, b = rollout.state_dict(), rollout2.state_dict()
    assert all(same(a[k], b[k]) for k in ("rng", "obs", "ep_ret", "ep_len"))
    loaded = torch.get_rng_state()
    torch.manual_seed(11)
    assert torch.equal(loaded, torch.get_rng_state())            # this rank's torch RNG

    # the two go on identically: environments, acting and sampling RNGs, priorities, Adam
    torch.manual_seed(5)
    losses = [step(learner, replay, rollout, i % 4 == 0) for i in range(20)]
    torch.manual_seed(5)
    losses2 = [step(learner2, replay2, rollout2, i % 4 == 0) for i in range(20)]
    assert losses == losses2 and same(learner.state_dict(), learner2.state_dict())
    assert same(rollout.obs, rollout2.obs) and same(replay.state_dict(), replay2.state_dict())


def test_a_damaged_part_is_found_through_the_interface():
    mem = MemoryStorage()
    ckpt, *_ = small_run(3, mem, steps=10)
    counters = {"iteration_next": 10, "env_steps": 20, "episodes": 0, "epsilon": 1.0, "wall_s": 0.0}
    write_parts(mem, "ck", MPI.COMM_WORLD, **ckpt.collect(counters, None))
    mem.stored["ck"]["datasets"]["replay/rewards"].data[3, 1] += 1.0
    with pytest.raises(CheckpointCorrupt, match="'replay/rewards'.*checksum mismatch"):
        small_run(4, mem)[0].load("ck")
