"""Replay for frame-stacked observations (Atari): each frame stored once.

A frame-stacking env (gymnasium's ``FrameStackObservation``: observations of shape
``(k, *frame)``, the newest frame last) shares k-1 frames between consecutive observations, and a
transition's next observation is the next transition's observation. ``FrameReplay`` keeps the
``ReplayBuffer`` ring (same rows, n-step returns, uniform and prioritized sampling) but stores, per
``[row, env]`` cell, only

- ``frames``: the newest frame of the transition's true next observation (the final observation's
  newest frame where the episode ended: same-step autoreset gives it in ``info['final_obs']``);
- ``ep_step`` (uint8): the transition's step inside its episode, saturated at k;
- ``start_seq``: which initial stack its episode started from (``starts``, below);

and, in a FIFO side store ``starts``, each episode's initial observation *as the env returned it*
(whatever its padding: gymnasium repeats the reset frame, SB3's VecFrameStack pads zeros), one
stack of k frames per episode start in the ring.

Rebuilding (``stacks``): the observation of the transition in row t with ``ep_step`` j is the last
k frames of ``initial stack ++ frames of the episode's rows before t``: position i (0 the oldest)
is ``initial[j + i]`` when ``j + i < k``, else ``frames[t - k + i]``; its next observation is the
same with j + 1 and ``frames[t - k + 1 + i]``. The ring holds ``margin = k`` rows more than the
sampleable window, so the oldest sampleable transition still has its k previous frames.

Exactness is checked as it is stored (``add``): each next observation must be the observation
shifted by one frame (``next[:-1] == obs[1:]``) and, inside an episode, each observation must be
the previous next observation; anything else (another wrapper after the frame stack, a stack on
another axis) is refused with a clear error instead of being rebuilt wrongly.
"""

from __future__ import annotations

import numpy as np

from hpcdqn.rl.replay import ReplayBuffer, tree_bytes

PLANNED_EPISODE_STEPS = 100   # transitions per episode start, unless the config says otherwise


def planned_episode_steps(replay: dict) -> int:
    """Transitions per episode start the start store is sized (and the memory planned) for:
    the ``[replay]`` section's ``episode_steps``, the rate the run will see (a config with many
    episode starts, such as Breakout with episodic life, sets it), else ``PLANNED_EPISODE_STEPS``."""
    given = int(replay.get("episode_steps", 0))
    return given if given > 0 else PLANNED_EPISODE_STEPS


def planned_starts(cells: int, num_envs: int, episode_steps: int) -> int:
    """Initial stacks held for a ring of ``cells``: one per ``episode_steps`` transitions, plus
    one per env (its current episode)."""
    return max(8, 2 * num_envs, cells // max(1, episode_steps) + num_envs)
MAX_STACK = 255               # ep_step is uint8


class StartStore:
    """Episode-start stacks in a FIFO addressed by sequence number (``seq % capacity``); grows
    by doubling. Starts are pushed in ring order and leave in the same order."""

    def __init__(self, stack_shape: tuple, dtype, capacity: int = 8):
        self.data = np.zeros((capacity,) + tuple(stack_shape), dtype)
        self.first = 0      # sequence number of the oldest stack held
        self.next = 0       # sequence number of the next stack pushed

    def __len__(self) -> int:
        return self.next - self.first

    def _grow(self, need: int) -> None:
        cap = len(self.data)
        if need <= cap:
            return
        new_cap = 1 << int(need - 1).bit_length()
        data = np.zeros((new_cap,) + self.data.shape[1:], self.data.dtype)
        seqs = np.arange(self.first, self.next)
        data[seqs % new_cap] = self.data[seqs % cap]
        self.data = data

    def push(self, stacks: np.ndarray) -> np.ndarray:
        self._grow(len(self) + len(stacks))
        seqs = np.arange(self.next, self.next + len(stacks))
        self.data[seqs % len(self.data)] = stacks
        self.next += len(stacks)
        return seqs

    def pop(self, n: int) -> None:
        self.first += n

    def get(self, seqs: np.ndarray) -> np.ndarray:
        return self.data[np.asarray(seqs) % len(self.data)]

    def held(self) -> np.ndarray:
        """The stacks held, oldest first."""
        return self.get(np.arange(self.first, self.next))

    def load(self, stacks: np.ndarray, first: int = 0) -> None:
        if len(stacks) > len(self.data):      # (else: keep the planned allocation)
            self.data = np.zeros((len(stacks),) + self.data.shape[1:], self.data.dtype)
        self.first = self.next = first
        self._grow(len(stacks))
        self.push(stacks)


def stacks(frames: np.ndarray, rows: np.ndarray, envs: np.ndarray, steps: np.ndarray, k: int,
           shift: int, initial) -> np.ndarray:
    """Rebuilt stacks [B, k, *frame]. ``frames`` [R, E, *frame]: a ring (indices wrap);
    ``rows``/``envs``/``steps`` [B]: each transition's cell and ``ep_step``; ``shift`` 0: its
    observation, 1: its next observation; ``initial(b)``: the initial stacks [len(b), k, *frame]
    of transitions ``b`` (called only for those whose stack reaches into it)."""
    i = np.arange(k)
    src = (rows[:, None] + (shift - k) + i) % frames.shape[0]
    out = frames[src, envs[:, None]]
    m = steps.astype(np.int64)[:, None] + shift + i
    b, p = np.nonzero(m < k)
    if len(b):
        ub, inv = np.unique(b, return_inverse=True)
        out[b, p] = initial(ub)[inv, m[b, p]]
    return out


def start_index(steps: np.ndarray, k: int, window: int) -> np.ndarray:
    """Which initial stack each cell uses, from ``ep_step`` alone: ``steps`` [T, E] in ring order
    (oldest row first); the stacks are numbered 0.. in the order (row, env) of the cells with
    ep_step 0. Returns [T, E] int64 (-1 where the episode started before the ring). Raises
    ValueError if a cell of the newest ``window`` rows could not be rebuilt (its frames or its
    episode start are not in the ring): the data are not what FrameReplay writes."""
    T = len(steps)
    steps = steps.astype(np.int64)
    if (steps > k).any():
        raise ValueError(f"ep_step values above the frame stack {k}")
    is_start = steps == 0
    seq = np.where(is_start, np.cumsum(is_start.reshape(-1)).reshape(steps.shape) - 1, -1)
    t = np.arange(T)[:, None]
    src = t - steps                                   # the row of the episode start (or t - k)
    own = (steps < k) & (src >= 0)
    cols = np.broadcast_to(np.arange(steps.shape[1]), steps.shape)
    seq = np.where(own, seq[np.maximum(src, 0), cols], -1)
    recent = t >= T - window
    if (recent & (src < 0)).any() or (recent & own & (seq < 0)).any():
        raise ValueError("a recent transition's frames or episode start are not in the ring")
    return seq


class FrameReplay(ReplayBuffer):
    """``ReplayBuffer`` for observations ``(k, *frame)`` stacked by the env along axis 0."""

    OBS_ROWS = ("frames", "ep_step")   # per-cell observation arrays, as checkpointed

    def __init__(self, capacity: int, num_envs: int, obs_shape: tuple, obs_dtype,
                 episode_steps: int = PLANNED_EPISODE_STEPS, **kw):
        """``episode_steps``: the start store is allocated once for one episode start per that
        many transitions (``planned_starts``: what the memory plan counts); it grows (doubling,
        with a copy) only if episodes are shorter."""
        self.episode_steps = episode_steps
        k = int(obs_shape[0])
        if not 1 <= k <= MAX_STACK:
            raise ValueError(f"FrameReplay needs a frame stack of 1..{MAX_STACK} frames on axis 0, "
                             f"got observation shape {tuple(obs_shape)}")
        self.k = self.margin = k
        super().__init__(capacity, num_envs, obs_shape, obs_dtype, **kw)

    def allocate(self, shape: tuple, obs_shape: tuple, obs_dtype) -> None:
        self.obs_shape = obs_shape
        self.frames = np.zeros(shape + obs_shape[1:], dtype=obs_dtype)
        self.ep_step = np.zeros(shape, dtype=np.uint8)
        self.start_seq = np.zeros(shape, dtype=np.int64)
        self.starts = StartStore(obs_shape, obs_dtype,
                                 planned_starts(shape[0] * shape[1], shape[1], self.episode_steps))
        E = shape[1]
        self.cur_step = np.zeros(E, dtype=np.int64)     # ep_step of each env's next transition
        self.cur_seq = np.zeros(E, dtype=np.int64)      # and its episode's initial stack
        self.last_next = np.zeros((E,) + obs_shape, dtype=obs_dtype)

    @property
    def nbytes(self) -> int:
        return (super().nbytes + self.start_seq.nbytes + self.starts.data.nbytes
                + self.last_next.nbytes)

    @staticmethod
    def nbytes_for(capacity: int, num_envs: int, obs_shape: tuple, obs_dtype, n_step: int,
                   prioritized: bool, episode_steps: int = PLANNED_EPISODE_STEPS) -> int:
        """Bytes once filled: frames, per-cell fields, sum tree, the start store as allocated
        (one initial stack per ``episode_steps`` transitions) and the last next observations."""
        k = int(obs_shape[0])
        cells = (ReplayBuffer.rows_for(capacity, num_envs, n_step) + k) * num_envs
        frame = int(np.prod(obs_shape[1:])) * np.dtype(obs_dtype).itemsize
        starts = planned_starts(cells, num_envs, episode_steps)
        return (cells * (frame + 8 + 4 + 1 + 1 + 1 + 8) + tree_bytes(cells, prioritized)
                + (starts + num_envs) * k * frame)

    def store_obs(self, p: int, obs, next_obs, done) -> None:
        if self.filled == self.rows:        # row p is overwritten: its episode starts leave
            self.starts.pop(int(np.count_nonzero(self.ep_step[p] == 0)))
        self._check(obs, next_obs)
        new = self.cur_step == 0
        if new.any():
            self.cur_seq[new] = self.starts.push(np.asarray(obs)[new])
        self.frames[p] = next_obs[:, -1]
        self.ep_step[p] = self.cur_step
        self.start_seq[p] = self.cur_seq
        self.cur_step = np.where(done, 0, np.minimum(self.cur_step + 1, self.k))
        self.last_next[...] = next_obs

    def _check(self, obs, next_obs) -> None:
        go_on = self.cur_step > 0
        if go_on.all():
            same = np.array_equal(obs, self.last_next)
        else:
            same = np.array_equal(obs[go_on], self.last_next[go_on])
        if same and np.array_equal(next_obs[:, :-1], obs[:, 1:]):
            return
        raise ValueError(
            "FrameReplay: the observations are not a frame stack on axis 0 (each next observation "
            "the observation shifted by one frame, each observation the previous next one inside "
            "an episode); the env needs gymnasium's FrameStackObservation as its last "
            "observation wrapper, or use the whole-observation ReplayBuffer")

    def _initial(self, rows: np.ndarray, envs: np.ndarray):
        return lambda b: self.starts.get(self.start_seq[rows[b], envs[b]])

    def obs_at(self, rows: np.ndarray, envs: np.ndarray) -> np.ndarray:
        return stacks(self.frames, rows, envs, self.ep_step[rows, envs], self.k, 0,
                      self._initial(rows, envs))

    def next_obs_at(self, rows: np.ndarray, envs: np.ndarray) -> np.ndarray:
        return stacks(self.frames, rows, envs, self.ep_step[rows, envs], self.k, 1,
                      self._initial(rows, envs))

    # -- checkpoints -------------------------------------------------------------------------
    def ring_order(self) -> np.ndarray:
        """The rows written so far, oldest first."""
        oldest = self.pos if self.filled == self.rows else 0
        return (oldest + np.arange(self.filled)) % self.rows

    def state_dict(self) -> dict:
        """``ReplayBuffer.state_dict`` and ``starts``: the initial stacks held, oldest first (a
        copy)."""
        return dict(super().state_dict(), starts=self.starts.held())

    def load_derived(self, sd: dict) -> None:
        self.restore(sd["starts"])

    def restore(self, starts: np.ndarray) -> None:
        """After ``frames``, ``ep_step``, the flags, ``pos`` and ``filled`` were loaded: take the
        initial stacks (oldest first) and rebuild the derived state (``start_seq``, each env's
        current episode). Raises ValueError if the data are inconsistent."""
        order = self.ring_order()
        seq = start_index(self.ep_step[order], self.k, min(self.filled, self.window))
        n = int(np.count_nonzero(self.ep_step[order] == 0))
        if len(starts) != n:
            raise ValueError(f"{len(starts)} initial stacks for {n} episode starts")
        self.starts.load(starts)
        self.start_seq[...] = -1
        self.start_seq[order] = seq
        self.cur_step[:] = 0
        if self.filled:
            last = order[-1]
            done = self.terminated[last] | self.truncated[last]
            self.cur_step[:] = np.where(done, 0, np.minimum(self.ep_step[last].astype(np.int64) + 1,
                                                            self.k))
            self.cur_seq[:] = self.start_seq[last]
            envs = np.arange(self.num_envs)
            self.last_next[...] = self.next_obs_at(np.full(self.num_envs, last), envs)


def replay_class(frame_stack: int) -> type:
    """FrameReplay for observations stacked by the env (``frame_stack`` frames on axis 0),
    ReplayBuffer (whole observations) otherwise."""
    return FrameReplay if frame_stack > 0 else ReplayBuffer


def make_replay(capacity: int, num_envs: int, obs_shape: tuple, obs_dtype, frame_stack: int = 0,
                **kw) -> ReplayBuffer:
    return replay_class(frame_stack)(capacity, num_envs, obs_shape, obs_dtype, **kw)


def replay_nbytes(capacity: int, num_envs: int, obs_shape: tuple, obs_dtype, n_step: int,
                  prioritized: bool, frame_stack: int = 0,
                  episode_steps: int = PLANNED_EPISODE_STEPS) -> int:
    if frame_stack > 0:
        return FrameReplay.nbytes_for(capacity, num_envs, obs_shape, obs_dtype, n_step,
                                      prioritized, episode_steps)
    return ReplayBuffer.nbytes_for(capacity, num_envs, obs_shape, obs_dtype, n_step, prioritized)


def ring_rows(capacity: int, num_envs: int, n_step: int, frame_stack: int = 0) -> int:
    """Rows of a replay shard's ring (what a checkpoint stores per shard)."""
    return ReplayBuffer.rows_for(capacity, num_envs, n_step) + max(0, frame_stack)
