"""Image observations with actors (MinAtar's grids, Atari's frame stacks): each frame sent once,
as the sync run's replay stores it.

An actor of an image env sends raw env steps, not n-step transitions (``FrameSink``): per step
and env the newest frame of the true next observation (the final one where the episode ended;
the whole next observation when the env does not stack frames), the action, the reward and the
terminated / truncated flags; and, for each env whose episode starts at that step, the
observation the env returned at its reset (a whole stack, whatever its padding). A frame-stacked
observation is never sent four times: a Pong step costs one 84x84 frame per env, not two stacks.

The learner (``FrameFeed``) rebuilds every env's observation pair from these (the observation:
the previous next observation, or the episode's initial one; the next observation: the
observation shifted by one frame with the new frame last) and adds the step to its replay
shard: the sync run's replay class (``FrameReplay`` for frame stacks, ``ReplayBuffer``
otherwise) with one column per env of each of its actors, in the fixed actor order, n-step
returns computed at sampling time: exactly what that replay would hold had its own envs made
the steps. The actor checks that its observations are such a stack (and that, inside an
episode, each observation is the previous next one) before it sends, so the learner never
rebuilds a wrong observation.

Message ``FRAMES`` (``wire.TAG_DATA``): the int64 header ``[MAGIC, FRAMES, steps, starts,
episodes, first iteration]``, then ``start`` uint8 [steps, E], the initial observations
[starts, *obs], ``frames`` [steps, E, *frame], ``actions`` int64, ``rewards`` float32,
``terminated`` and ``truncated`` uint8 (each [steps, E]) and the episodes that ended (float64
[episodes, 2]). The receiver bounds the size before allocating (``wire.recv_bytes`` with
``FrameWire.max_bytes``) and checks the header, the size, the flags, the start count and the
action range before using it.
"""

from __future__ import annotations

import math
import time

import numpy as np

from hpcdqn.actors.wire import DONE, FRAMES, HEADER, MAGIC, STATE, Layout, WireError, header, pack
from hpcdqn.rl.framereplay import replay_class
from hpcdqn.store.codec import decode, encode

STEP_KEYS = ("actions", "rewards", "terminated", "truncated")


def decode_array(x, shape: tuple, dtype, what: str) -> np.ndarray:
    """An array ``store.codec.encode`` wrote, checked to be of ``shape`` and ``dtype`` (its
    encoded size too) before it is decoded; ``ValueError`` naming ``what`` otherwise."""
    dt = np.dtype(dtype)
    size = int(np.prod(shape)) * dt.itemsize
    ok = (isinstance(x, dict) and x.get("__nd__") == dt.str and x.get("shape") == list(shape)
          and isinstance(x.get("b64"), str) and len(x["b64"]) == 4 * math.ceil(size / 3))
    if not ok:
        got = {k: x.get(k) for k in ("__nd__", "shape")} if isinstance(x, dict) else type(x).__name__
        raise ValueError(f"{what}: expected an array of shape {list(shape)} and dtype {dt.str}, "
                         f"found {got}")
    return np.array(decode(x))


def sends_frames(obs_shape: tuple, frame_stack: int) -> bool:
    """Whether an actor run sends raw frames (image observations: a frame stack, or any
    observation of 2 or more axes) rather than n-step transitions (vector observations)."""
    return frame_stack > 0 or len(obs_shape) >= 2


class FrameSink:
    """What ``Rollout.step`` stores into on an image env's actor: each step's record (``done``)."""

    def __init__(self, num_envs: int, frame_stack: int, obs_space=None):
        self.k, self.space = frame_stack, obs_space
        self.fresh = np.ones(num_envs, bool)   # the env's next step starts an episode
        self.last = None                         # the previous step's next observations
        self.done = None

    def state_dict(self) -> dict:
        """What the next step's check and start flags depend on (``store.codec``'s encoding)."""
        return {"frames": {"fresh": encode(self.fresh),
                           "last": None if self.last is None else encode(np.asarray(self.last))}}

    def load_state_dict(self, st: dict) -> None:
        """Inverse of ``state_dict``, shapes checked (``ValueError``)."""
        fr, E = st.get("frames") if isinstance(st, dict) else None, len(self.fresh)
        if not isinstance(fr, dict):
            raise ValueError("actor state without its frame sink's state ('frames')")
        self.fresh = decode_array(fr.get("fresh"), (E,), bool, "actor state 'frames.fresh'")
        self.last = None if fr.get("last") is None else decode_array(
            fr["last"], (E,) + tuple(self.space.shape), self.space.dtype, "actor state 'frames.last'")

    def add(self, obs, actions, rewards, next_obs, terminated, truncated) -> None:
        obs, next_obs = np.asarray(obs), np.asarray(next_obs)
        start, go_on = self.fresh, ~self.fresh
        self.check(obs, next_obs, go_on)
        self.done = {"start": start.astype(np.uint8), "starts": obs[start],
                     "frames": np.array(next_obs[:, -1] if self.k else next_obs),
                     "actions": np.asarray(actions, np.int64),
                     "rewards": np.asarray(rewards, np.float32),
                     "terminated": np.asarray(terminated, np.uint8),
                     "truncated": np.asarray(truncated, np.uint8)}
        self.fresh = np.logical_or(terminated, truncated)
        self.last = next_obs

    def check(self, obs, next_obs, go_on) -> None:
        """``ValueError`` unless the learner can rebuild these observations exactly."""
        ok = not go_on.any() or np.array_equal(obs[go_on], self.last[go_on])
        if ok and self.k:
            ok = np.array_equal(next_obs[:, :-1], obs[:, 1:])
        if not ok:
            raise ValueError(
                "actor: the observations cannot be sent as frames (inside an episode each "
                "observation must be the previous next one and, with a frame stack, each next "
                "observation the observation shifted by one frame on axis 0); the env needs "
                "gymnasium's FrameStackObservation as its last observation wrapper")


class FrameWire(Layout):
    """Sizes and packing of one run's ``FRAMES`` messages (identical on actors and learners)."""

    def __init__(self, obs_shape: tuple, obs_dtype, num_envs: int, max_steps: int,
                 frame_stack: int, n_actions: int):
        super().__init__(obs_shape, obs_dtype, num_envs, max_steps)
        self.frame_shape = self.obs_shape[1:] if frame_stack else self.obs_shape
        self.frame_bytes = int(np.prod(self.frame_shape)) * self.obs_dtype.itemsize
        self.n_actions = n_actions

    def frames_bytes(self, steps: int, starts: int, episodes: int) -> int:
        cells = steps * self.num_envs
        return HEADER * 8 + cells * (1 + self.frame_bytes + 8 + 4 + 1 + 1) + \
            starts * self.obs_bytes + episodes * 16

    @property
    def max_bytes(self) -> int:
        n = self.max_steps * self.num_envs
        return max(self.frames_bytes(self.max_steps, n, n), super().max_bytes)

    def pack_data(self, first_it: int, counts: list[int], tr: list[dict], eps: list) -> np.ndarray:
        """``counts`` (E per step) are implied; ``tr``: ``FrameSink.done`` of each step."""
        cat = {k: np.concatenate([t[k] for t in tr]) for k in ("starts",)}
        ep = np.array(eps, np.float64).reshape(-1, 2)
        stk = {k: np.stack([t[k] for t in tr]) for k in ("start", "frames") + STEP_KEYS}
        return pack([MAGIC, FRAMES, len(tr), len(cat["starts"]), len(ep), first_it],
                    stk["start"], cat["starts"].astype(self.obs_dtype, copy=False),
                    stk["frames"].astype(self.obs_dtype, copy=False), stk["actions"],
                    stk["rewards"], stk["terminated"], stk["truncated"], ep)

    def unpack(self, buf: np.ndarray) -> dict:
        """A ``FRAMES`` message as arrays (views of ``buf``; ``DONE`` and ``STATE`` as
        ``Layout.unpack`` gives them); ``WireError`` if inconsistent. ``counts``: the episode
        starts of each step."""
        head = header(buf, (FRAMES, DONE, STATE))
        if head[1] != FRAMES:
            return super().unpack(buf)
        steps, n_st, n_ep, first = (int(x) for x in head[2:6])
        E = self.num_envs
        if not (0 < steps <= self.max_steps and 0 <= n_st <= steps * E and 0 <= n_ep <= steps * E):
            raise WireError(f"frames message claims {steps} steps, {n_st} starts, {n_ep} episodes")
        if buf.nbytes != self.frames_bytes(steps, n_st, n_ep):
            raise WireError(f"frames message of {buf.nbytes} bytes, its header says "
                            f"{self.frames_bytes(steps, n_st, n_ep)}")
        out, off = {"kind": FRAMES, "first": first}, HEADER * 8
        for key, dt, shape in (("start", np.uint8, (steps, E)),
                               ("starts", self.obs_dtype, (n_st,) + self.obs_shape),
                               ("frames", self.obs_dtype, (steps, E) + self.frame_shape),
                               ("actions", np.int64, (steps, E)), ("rewards", np.float32, (steps, E)),
                               ("terminated", np.uint8, (steps, E)), ("truncated", np.uint8, (steps, E)),
                               ("episodes", np.float64, (n_ep, 2))):
            size = int(np.prod(shape)) * np.dtype(dt).itemsize
            out[key] = buf[off:off + size].view(dt).reshape(shape)
            off += size
        self.check(out, n_st)
        out["counts"] = out["start"].sum(axis=1, dtype=np.int64)
        return out

    def check(self, m: dict, n_starts: int) -> None:
        flags = np.concatenate([m[k].reshape(-1) for k in ("start", "terminated", "truncated")])
        if flags.size and flags.max() > 1:
            raise WireError("frames message with flags other than 0 / 1")
        if int(m["start"].sum()) != n_starts:
            raise WireError(f"frames message's start flags do not add up to {n_starts}")
        a = m["actions"]
        if a.size and (a.min() < 0 or a.max() >= self.n_actions):
            raise WireError(f"frames message with actions outside 0..{self.n_actions - 1}")


class TimedSampling:
    """A replay that counts the seconds spent sampling and the env steps inserted."""

    sample_s, inserted = 0.0, 0

    def sample(self, *a, **kw):
        t = time.perf_counter()
        out = super().sample(*a, **kw)
        self.sample_s += time.perf_counter() - t
        return out

    def sample_many(self, *a, **kw):
        t = time.perf_counter()
        out = super().sample_many(*a, **kw)
        self.sample_s += time.perf_counter() - t
        return out

    def add(self, *a) -> None:
        super().add(*a)
        self.inserted += self.num_envs


class FrameFeed:
    """The learner's end: one step of each of its actors -> one row of its replay shard."""

    def __init__(self, obs_space, frame_stack: int, n_actions: int, actors: int, num_envs: int,
                 send_every: int):
        self.k, self.actors = frame_stack, actors
        self.wire = FrameWire(obs_space.shape, obs_space.dtype, num_envs, send_every, frame_stack,
                              n_actions)
        self.last = np.zeros((actors * num_envs,) + tuple(obs_space.shape), obs_space.dtype)
        self.seen = np.zeros(actors * num_envs, bool)      # the env's first episode has started

    def state_dict(self) -> dict:
        """Every env's last next observation and whether its first episode started (a
        checkpoint's, beside the actors' states: ``store.codec``'s encoding)."""
        return {"last": encode(self.last), "seen": encode(self.seen)}

    def load_state_dict(self, st: dict) -> None:
        """Inverse of ``state_dict``, shapes and dtypes checked before decoding (``ValueError``)."""
        if not isinstance(st, dict):
            raise ValueError("no frame feed state ('frames')")
        last = decode_array(st.get("last"), self.last.shape, self.last.dtype, "frame feed 'last'")
        self.seen = decode_array(st.get("seen"), self.seen.shape, bool, "frame feed 'seen'")
        self.last = last

    def make_replay(self, capacity: int, seed: int, dqn: dict, replay: dict, episode_steps: int):
        """The sync run's replay class, one column per env of every actor, sampling timed
        (``dqn``, ``replay``: the config's sections; ``episode_steps``: the start store's plan)."""
        w, base = self.wire, replay_class(self.k)
        cls = type(f"Timed{base.__name__}", (TimedSampling, base), {})
        extra = {"episode_steps": episode_steps} if self.k else {}
        return cls(capacity, self.actors * w.num_envs, w.obs_shape, w.obs_dtype, n_step=dqn["n_step"],
                   gamma=dqn["gamma"], prioritized=replay["prioritized"], alpha=replay["alpha"],
                   priority_eps=replay["priority_eps"], seed=seed, **extra)

    @staticmethod
    def step(msg: dict, k: int, off: int, n: int) -> dict:
        """Step ``k`` of a message; its initial observations are ``starts[off:off + n]``."""
        return {"start": msg["start"][k].astype(bool), "starts": msg["starts"][off:off + n],
                "frames": msg["frames"][k], **{key: msg[key][k] for key in STEP_KEYS}}

    def insert(self, replay, steps: list[dict]) -> None:
        """One step of every actor (actor order) into ``replay`` as one vector-env step."""
        cat = {key: np.concatenate([s[key] for s in steps]) for key in steps[0]}
        start = cat["start"]
        if (~start & ~self.seen).any():
            raise WireError("an actor sent a step of an env whose episode never started")
        self.seen |= start
        obs = self.last.copy() if start.any() else self.last
        obs[start] = cat["starts"]
        nxt = np.concatenate([obs[:, 1:], cat["frames"][:, None]], axis=1) if self.k \
            else np.array(cat["frames"])
        replay.add(obs, cat["actions"], cat["rewards"], nxt, cat["terminated"].astype(bool),
                   cat["truncated"].astype(bool))
        self.last = nxt
