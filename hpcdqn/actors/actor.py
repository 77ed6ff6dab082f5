"""The actor loop: vector envs stepped with a local CPU copy of the online network, n-step
transitions (image envs: raw frames, each once, ``actors.frames``) sent to the learner replica ``i mod dp`` in batches of ``actor.send_every`` env
steps (non-blocking sends), the newest weights picked up without blocking (``lockstep``: at the
fixed update counts the learner publishes them at), and the rate limit: an actor runs at most
``actor.max_ahead`` iterations ahead of its learner's loop. It ends when its learner says
``STOP`` (the run's end, or a signal all learners agreed on), answering with ``DONE`` and its
time split.

At a checkpoint the learner asks (``CKPT``); the actor sends what it has buffered, then its
state (``state_dict``: the iteration it would step next, its environments and acting RNG as a
sync rollout saves them, the n-step window or, with an image env, the frame sink's start flags
and last observations, its network and counters) and goes on. A resumed
actor waits for ``RESTORE`` first: that state, or where to start afresh (its environments
re-seeded, as a resharded sync resume re-seeds a replica without state)."""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

from hpcdqn.actors.channel import Inbox, Outbox
from hpcdqn.actors.frames import FrameSink, FrameWire, sends_frames
from hpcdqn.actors.nstep import NStepWindow
from hpcdqn.actors.wire import (CKPT, PROGRESS, RESTORE, STATE, STOP, TAG_CTRL, TAG_DATA, WEIGHTS,
                                Layout, max_ctrl_bytes, max_state_bytes, pack_done, pack_json,
                                unpack_ctrl)
from hpcdqn.parallel.flat import FlatModule
from hpcdqn.parallel.grid import mpi
from hpcdqn.rl.envs import frame_stack, make_vector_env
from hpcdqn.rl.losses import greedy_actions, make_loss
from hpcdqn.rl.networks import network_layers
from hpcdqn.rl.rollout import Rollout
from hpcdqn.store.codec import decode, decode_env, encode, encode_env
from hpcdqn.testing import stall


def max_ahead(cfg: dict, clock) -> int:
    """Iterations an actor may run ahead of its learner: ``actor.max_ahead``, or (0) one
    training phase."""
    return cfg["actor"]["max_ahead"] or clock.train_every


class _Sink:
    """What ``Rollout.step`` stores into: the actor's n-step window."""

    def __init__(self, window: NStepWindow):
        self.window, self.done = window, None

    def add(self, obs, actions, rewards, next_obs, terminated, truncated) -> None:
        self.done = self.window.push(obs, actions, rewards, next_obs, terminated, truncated)

    def state_dict(self) -> dict:
        return {"window": encode(self.window.steps)}

    def load_state_dict(self, st: dict) -> None:
        self.window.steps = list(decode(st["window"]))


def actor_env(cfg: dict, index: int):
    """Actor ``index``'s vector envs (seeded as replica ``index`` of a sync run) and their seed."""
    seed = cfg["seed"] + 1000 * index
    return make_vector_env(cfg["env_id"], cfg["num_envs"], seed, cfg["vector"], cfg["atari"]), seed


def actor_feed(cfg: dict, env):
    """What the actor's steps go into and the wire that packs them: raw frames for image
    observations (``actors.frames``), else the n-step window's finished transitions."""
    space, k = env.single_observation_space, frame_stack(env)
    if sends_frames(space.shape, k):
        return FrameSink(cfg["num_envs"], k, space), FrameWire(
            space.shape, space.dtype, cfg["num_envs"], cfg["actor"]["send_every"], k,
            int(env.single_action_space.n))
    return (_Sink(NStepWindow(cfg["dqn"]["n_step"], cfg["dqn"]["gamma"])),
            Layout(space.shape, space.dtype, cfg["num_envs"], cfg["actor"]["send_every"]))


class Actor:
    """One actor rank (``layout.role`` is ``actor``) of an actor-learner run over ``comm`` (the world)."""

    def __init__(self, cfg: dict, layout, comm):
        MPI = mpi()
        self.cfg, self.layout, self.comm, self.clock = cfg, layout, comm, layout.schedule
        self.idx, self.learner = layout.actor_index, layout.feeds
        self.ac = cfg["actor"]
        env, seed = actor_env(cfg, self.idx)
        space = env.single_observation_space
        layers = network_layers(cfg["network"], space.shape, env.single_action_space.n,
                                seed=cfg["seed"], meta=False)
        self.net, self.loss = FlatModule(layers), make_loss(cfg["dqn"], cfg["network"])
        self.rollout = Rollout(env, np.random.default_rng([cfg["seed"], self.idx, 29]),
                               env.reset(seed=seed)[0])
        self.sink, self.wire = actor_feed(cfg, env)
        self.out = Outbox(comm, MPI)
        # 1.5x the learner's patience: a learner waiting for a silent actor names it first
        self.inbox = Inbox(comm, MPI, max_ctrl_bytes(self.net.numel), 1.5 * self.ac["timeout_s"])
        self.version, self.progress, self.stopped = -1, 0, False
        self.it = self.updates = self.needed = 0     # the loop's position (a checkpoint's)
        self.newest = None          # weights received, not loaded yet
        self.stopped_by = 0         # the signal that stopped the run (STOP's value)
        self.stats = {k: 0.0 for k in ("env_s", "inference_s", "send_s", "wait_s", "env_steps",
                                       "transitions_sent", "messages_sent", "weights_received",
                                       "episodes")}
        self.batch = self.new_batch(0)

    @staticmethod
    def new_batch(first: int) -> dict:
        return {"first": first, "counts": [], "transitions": [], "episodes": []}

    # -- messages from the learner ----------------------------------------------------------------
    def take(self, buf, load: bool = True) -> None:
        """Act on one learner message; weights are loaded now (``load``) or kept for later."""
        kind, value, params = unpack_ctrl(buf, self.net.numel)
        if kind == WEIGHTS:
            self.stats["weights_received"] += 1
            self.newest = (value, params)
            if load:
                self.load_newest()
        elif kind == PROGRESS:
            self.progress = max(self.progress, value)
        elif kind == STOP:         # (its value: the signal that stopped a checkpointed run)
            self.stopped, self.stopped_by = True, value
        elif kind == CKPT:
            self.load_newest()      # (the weights it got before the checkpoint are its state)
            self.send_state()
        elif kind == RESTORE:
            self.load_state_dict(params)

    def load_newest(self) -> None:
        if self.newest is not None:
            self.version = self.newest[0]
            self.net.load_flat_(torch.from_numpy(self.newest[1].copy()))
            self.newest = None

    def poll(self) -> None:
        """Take every learner message waiting (non-blocking), loading only the newest weights."""
        while not self.stopped and (buf := self.inbox.poll(self.learner, TAG_CTRL)) is not None:
            self.take(buf, load=False)
        self.load_newest()

    def block(self, limit: int | None = None) -> None:
        """Send what is buffered, then wait for the learner's next message (counted as wait;
        ``limit``: its bytes, where it may be ``RESTORE``)."""
        self.flush()
        t = time.perf_counter()
        self.take(self.inbox.wait(self.learner, TAG_CTRL, "its learner", limit))
        self.stats["wait_s"] += time.perf_counter() - t

    # -- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything the actor's future depends on, at the top of iteration ``it`` (JSON-able:
        ``store.codec``'s encoding)."""
        acting = self.rollout.state_dict()
        return {"it": self.it, "updates": self.updates, "needed": self.needed,
                "version": self.version, "progress": self.progress,
                "params": encode(self.net.numpy_data().copy()),
                "rng": encode(acting["rng"]), "obs": encode(np.asarray(acting["obs"])),
                "ep_ret": encode(acting["ep_ret"]), "ep_len": encode(acting["ep_len"]),
                "env": encode_env(acting["env"]), **self.sink.state_dict()}

    def send_state(self) -> None:
        """Send the buffered steps, then this actor's state (``STATE``, after them in order)."""
        self.flush()
        self.stats["states_sent"] = self.stats.get("states_sent", 0) + 1
        stall("actor-state", self.layout.rank, self.stats["states_sent"])   # ...=actor-state:RANK@N
        self.out.send(pack_json(STATE, self.state_dict()), self.learner, TAG_DATA)

    def load_state_dict(self, st: dict) -> None:
        """``RESTORE``: continue from a ``state_dict``, or (``fresh``) start afresh at
        iteration ``it``: environments re-seeded, no n-step window, the learner's weights next."""
        self.it, self.progress = int(st["it"]), int(st["progress"])
        self.updates = self.needed = int(st["updates"])
        self.batch = self.new_batch(self.it)
        if st.get("fresh"):
            self.rollout.reseed([int(x) for x in st["seed"]])
            return
        self.needed, self.version = int(st["needed"]), int(st["version"])
        self.net.load_flat_(torch.from_numpy(np.ascontiguousarray(decode(st["params"]), np.float32)))
        warnings = self.rollout.load_state_dict({
            "rng": decode(st["rng"]), "obs": decode(st["obs"]), "ep_ret": decode(st["ep_ret"]),
            "ep_len": decode(st["ep_len"]), "env": decode_env(st["env"])})
        for w in warnings:
            print(f"hpcdqn: actor {self.idx}: {w}", file=sys.stderr, flush=True)
        self.sink.load_state_dict(st)

    # -- acting -------------------------------------------------------------------------------------
    @torch.no_grad()
    def greedy(self, obs: np.ndarray) -> np.ndarray:
        return greedy_actions(self.net(torch.as_tensor(obs)), self.loss).numpy()

    def step(self, it: int) -> None:
        """One vector-env step at iteration ``it``; its finished transitions join the batch."""
        r, st = self.rollout, self.stats
        stall("actor", self.layout.rank, it + 1)        # HPCDQN_TEST_STALL=actor:RANK@STEP
        eps = self.clock.epsilon(self.cfg, it, self.idx, self.layout.actors)
        t0 = time.perf_counter()
        explore, random_actions = r.explore(eps)
        greedy = None if explore.all() else self.greedy(r.obs)
        t1 = time.perf_counter()
        ended = r.step(r.choose(explore, random_actions, greedy), self.sink)
        st["inference_s"] += t1 - t0
        st["env_s"] += time.perf_counter() - t1
        done, b = self.sink.done, self.batch
        b["counts"].append(0 if done is None else len(done["actions"]))
        if done is not None:
            b["transitions"].append(done)
        b["episodes"] += [(float(ret), float(n)) for ret, n in ended]
        st["env_steps"] += r.num_envs
        st["episodes"] += len(ended)

    def flush(self) -> None:
        """Send the buffered steps (non-blocking), if any."""
        b = self.batch
        if not b["counts"]:
            return
        t = time.perf_counter()
        buf = self.wire.pack_data(b["first"], b["counts"], b["transitions"], b["episodes"])
        self.out.send(buf, self.learner, TAG_DATA)
        self.stats["transitions_sent"] += sum(b["counts"])
        self.stats["messages_sent"] += 1
        self.batch = self.new_batch(b["first"] + len(b["counts"]))
        self.stats["send_s"] += time.perf_counter() - t

    # -- the loop -----------------------------------------------------------------------------------
    def run(self, resumed: bool = False) -> dict:
        """Act until the learner says stop; returns this actor's figures (``DONE``'s).
        ``resumed``: the learner's first message is ``RESTORE``."""
        t0, clock, ac = time.perf_counter(), self.clock, self.ac
        k, ahead = ac["publish_every"], max_ahead(self.cfg, clock)
        if resumed:
            self.block(max_state_bytes(self.net.numel))
        while self.version < 0 and not self.stopped:    # the learner's initial weights
            self.block()
        for it in range(self.it, clock.n_iters):
            self.it = it
            self.poll()
            while not self.stopped and (it >= self.progress + ahead
                                        or (ac["lockstep"] and self.version < self.needed)):
                self.block()
            if self.stopped:
                break
            self.step(it)
            if clock.trains_after(it):      # the learner publishes after the same phases
                before = self.updates
                self.updates += clock.updates_per_phase
                self.needed = self.updates if self.updates // k > before // k else self.needed
            if len(self.batch["counts"]) >= ac["send_every"]:
                self.flush()
        else:
            self.it = clock.n_iters
        self.flush()
        while not self.stopped:
            self.block()
        self.rollout.close()
        self.stats["wall_s"] = time.perf_counter() - t0
        self.out.send(pack_done(self.stats), self.learner, TAG_DATA)
        self.out.wait_all(self.ac["timeout_s"], "the learner")
        return {"role": "actor", "rank": self.layout.rank, "index": self.idx,
                "learner": self.learner, **self.stats,
                **({"stopped_by_signal": self.stopped_by, "checkpointed": True} if self.stopped_by else {})}
