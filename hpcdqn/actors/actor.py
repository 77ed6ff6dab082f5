"""The actor loop: vector envs stepped with a local CPU copy of the online network, n-step
transitions (image envs: raw frames, each once, ``actors.frames``) sent to the learner replica ``i mod dp`` in batches of ``actor.send_every`` env
steps (non-blocking sends), the newest weights picked up without blocking (``lockstep``: at the
fixed update counts the learner publishes them at), and the rate limit: an actor runs at most
``actor.max_ahead`` iterations ahead of its learner's loop. It ends when its learner says
``STOP`` (the run's end, or a signal all learners agreed on), answering with ``DONE`` and its
time split."""

from __future__ import annotations

import time

import numpy as np
import torch

from hpcdqn.actors.channel import Inbox, Outbox
from hpcdqn.actors.frames import FrameSink, FrameWire, sends_frames
from hpcdqn.actors.nstep import NStepWindow
from hpcdqn.actors.wire import (PROGRESS, STOP, TAG_CTRL, TAG_DATA, WEIGHTS, Layout, max_ctrl_bytes,
                                pack_done, unpack_ctrl)
from hpcdqn.parallel.flat import FlatModule
from hpcdqn.parallel.grid import mpi
from hpcdqn.rl.envs import frame_stack, make_vector_env
from hpcdqn.rl.losses import greedy_actions, make_loss
from hpcdqn.rl.networks import network_layers
from hpcdqn.rl.rollout import Rollout
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


def actor_env(cfg: dict, index: int):
    """Actor ``index``'s vector envs (seeded as replica ``index`` of a sync run) and their seed."""
    seed = cfg["seed"] + 1000 * index
    return make_vector_env(cfg["env_id"], cfg["num_envs"], seed, cfg["vector"], cfg["atari"]), seed


def actor_feed(cfg: dict, env):
    """What the actor's steps go into and the wire that packs them: raw frames for image
    observations (``actors.frames``), else the n-step window's finished transitions."""
    space, k = env.single_observation_space, frame_stack(env)
    if sends_frames(space.shape, k):
        return FrameSink(cfg["num_envs"], k), FrameWire(
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
        self.stats = {k: 0.0 for k in ("env_s", "inference_s", "send_s", "wait_s", "env_steps",
                                       "transitions_sent", "messages_sent", "weights_received",
                                       "episodes")}
        self.batch = self.new_batch(0)

    @staticmethod
    def new_batch(first: int) -> dict:
        return {"first": first, "counts": [], "transitions": [], "episodes": []}

    # -- messages from the learner ----------------------------------------------------------------
    def take(self, buf, load: bool = True):
        """Act on one learner message; weights are loaded (``load``) or returned for later."""
        kind, value, params = unpack_ctrl(buf, self.net.numel)
        if kind == WEIGHTS:
            self.stats["weights_received"] += 1
            if not load:
                return value, params
            self.net.load_flat_(torch.from_numpy(params.copy()))
            self.version = value
        elif kind == PROGRESS:
            self.progress = max(self.progress, value)
        elif kind == STOP:
            self.stopped = True
        return None

    def poll(self) -> None:
        """Take every learner message waiting (non-blocking), loading only the newest weights."""
        newest = None
        while not self.stopped and (buf := self.inbox.poll(self.learner, TAG_CTRL)) is not None:
            newest = self.take(buf, load=False) or newest
        if newest is not None:
            self.version = newest[0]
            self.net.load_flat_(torch.from_numpy(newest[1].copy()))

    def block(self) -> None:
        """Send what is buffered, then wait for the learner's next message (counted as wait)."""
        self.flush()
        t = time.perf_counter()
        self.take(self.inbox.wait(self.learner, TAG_CTRL, "its learner"))
        self.stats["wait_s"] += time.perf_counter() - t

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
    def run(self) -> dict:
        """Act until the learner says stop; returns this actor's figures (``DONE``'s)."""
        t0, clock, ac = time.perf_counter(), self.clock, self.ac
        k, updates, needed, ahead = ac["publish_every"], 0, 0, max_ahead(self.cfg, clock)
        while self.version < 0 and not self.stopped:    # the learner's initial weights
            self.block()
        for it in range(clock.n_iters):
            self.poll()
            while not self.stopped and (it >= self.progress + ahead
                                        or (ac["lockstep"] and self.version < needed)):
                self.block()
            if self.stopped:
                break
            self.step(it)
            if clock.trains_after(it):      # the learner publishes after the same phases
                before, updates = updates, updates + clock.updates_per_phase
                needed = updates if updates // k > before // k else needed
            if len(self.batch["counts"]) >= ac["send_every"]:
                self.flush()
        self.flush()
        while not self.stopped:
            self.block()
        self.rollout.close()
        self.stats["wall_s"] = time.perf_counter() - t0
        self.out.send(pack_done(self.stats), self.learner, TAG_DATA)
        self.out.wait_all(self.ac["timeout_s"], "the learner")
        return {"role": "actor", "rank": self.layout.rank, "index": self.idx,
                "learner": self.learner, **self.stats}
