"""Replay memory: a preallocated numpy ring of raw 1-step transitions, one column per vector env.

Layout ``[row, env]``: each vector-env step writes one row, so each env's transitions are
contiguous in time. That makes n-step returns a vectorized look-ahead along the row axis that
stops at the first episode end, and keeps episodes recoverable (for export).

With gymnasium's same-step autoreset, ``next_obs`` of a finished episode is the true final
observation, never the reset one. A *termination* ends the return without bootstrapping; a
*truncation* (time limit) ends it and bootstraps from the final observation.

Rows whose n-step look-ahead would run past the newest row (the last ``n-1``) are not sampled
until they are complete. The sampleable *window* is the newest ``rows_for(capacity)`` rows; a
subclass may keep ``margin`` older rows in the ring (``FrameReplay``, ``hpcdqn/rl/framereplay.py``:
the frames that the oldest sampleable observations are rebuilt from).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Batch:
    obs: np.ndarray
    actions: np.ndarray        # int64 [B]
    returns: np.ndarray        # float32 [B]: sum_k gamma^k r_{t+k} up to n steps or episode end
    next_obs: np.ndarray
    discounts: np.ndarray      # float32 [B]: gamma^k if we bootstrap from next_obs, else 0
    weights: np.ndarray        # float32 [B]: importance weights (ones when uniform)
    indices: np.ndarray        # int64 [B]: flat leaf indices, for priority updates


class SumTree:
    """Array sum tree over ``size`` leaves; vectorized update and stratified prefix-sum search."""

    def __init__(self, size: int):
        self.leaves = 1 << max(0, int(size - 1).bit_length())
        self.tree = np.zeros(2 * self.leaves, dtype=np.float64)

    @property
    def total(self) -> float:
        return float(self.tree[1])

    def get(self, idx: np.ndarray) -> np.ndarray:
        return self.tree[self.leaves + np.asarray(idx)]

    def set(self, idx: np.ndarray, values: np.ndarray) -> None:
        idx = np.asarray(idx, dtype=np.int64) + self.leaves
        self.tree[idx] = values
        idx = np.unique(idx >> 1)
        while idx[0] >= 1:
            self.tree[idx] = self.tree[2 * idx] + self.tree[2 * idx + 1]
            if idx[0] == 1:
                break
            idx = np.unique(idx >> 1)

    def find(self, prefix: np.ndarray) -> np.ndarray:
        """Leaf index i with cumsum[i-1] <= prefix < cumsum[i], for each prefix."""
        u = np.array(prefix, dtype=np.float64)
        node = np.ones(len(u), dtype=np.int64)
        while node[0] < self.leaves:
            left = self.tree[2 * node]
            right = u >= left
            u = np.where(right, u - left, u)
            node = 2 * node + right
        return node - self.leaves


class ReplayBuffer:
    """Transitions with whole observations (``obs`` and ``next_obs`` stored as given). The
    ring, n-step returns, uniform and prioritized sampling; ``FrameReplay``
    (``hpcdqn.rl.framereplay``) keeps this and stores frame-stacked observations once."""

    margin = 0    # ring rows kept before the sampleable window (FrameReplay: the frame history)

    def __init__(self, capacity: int, num_envs: int, obs_shape: tuple, obs_dtype, *,
                 n_step: int = 1, gamma: float = 0.99, prioritized: bool = False,
                 alpha: float = 0.6, priority_eps: float = 1e-6, seed: int = 0):
        self.num_envs = num_envs
        self.window = self.rows_for(capacity, num_envs, n_step)   # rows that can be sampled
        self.rows = self.window + self.margin                     # rows of the ring
        self.capacity = self.window * num_envs                    # transitions that can be sampled
        self.cells = self.rows * num_envs
        self.n_step, self.gamma = n_step, gamma
        shape = (self.rows, num_envs)
        self.allocate(shape, tuple(obs_shape), np.dtype(obs_dtype))
        self.actions = np.zeros(shape, dtype=np.int64)
        self.rewards = np.zeros(shape, dtype=np.float32)
        self.terminated = np.zeros(shape, dtype=bool)
        self.truncated = np.zeros(shape, dtype=bool)
        self.pos = 0          # next row to write
        self.filled = 0       # rows written so far (<= rows)
        self.rng = np.random.default_rng(seed)
        self.prioritized = prioritized
        self.alpha, self.priority_eps = alpha, priority_eps
        self.max_priority = 1.0
        self.tree = SumTree(self.cells) if prioritized else None
        self._gpow = gamma ** np.arange(n_step + 1, dtype=np.float64)

    # -- what the observations take (FrameReplay overrides these) ---------------------------------
    OBS_ROWS = ("obs", "next_obs")     # per-cell observation arrays, as checkpointed
    CELL_ROWS = ("actions", "rewards", "terminated", "truncated")   # the other per-cell arrays

    def allocate(self, shape: tuple, obs_shape: tuple, obs_dtype) -> None:
        self.obs = np.zeros(shape + obs_shape, dtype=obs_dtype)
        self.next_obs = np.zeros_like(self.obs)

    def store_obs(self, p: int, obs, next_obs, done) -> None:
        self.obs[p] = obs
        self.next_obs[p] = next_obs

    def obs_at(self, rows: np.ndarray, envs: np.ndarray) -> np.ndarray:
        return self.obs.reshape(self.cells, *self.obs.shape[2:])[rows * self.num_envs + envs]

    def next_obs_at(self, rows: np.ndarray, envs: np.ndarray) -> np.ndarray:
        return self.next_obs.reshape(self.cells, *self.obs.shape[2:])[rows * self.num_envs + envs]

    @staticmethod
    def nbytes_for(capacity: int, num_envs: int, obs_shape: tuple, obs_dtype, n_step: int,
                   prioritized: bool) -> int:
        """Bytes the buffer's arrays take once filled (obs, next_obs, actions, rewards, flags,
        sum tree), without building it."""
        cells = ReplayBuffer.rows_for(capacity, num_envs, n_step) * num_envs
        obs = cells * int(np.prod(obs_shape)) * np.dtype(obs_dtype).itemsize
        return 2 * obs + cells * (8 + 4 + 1 + 1) + tree_bytes(cells, prioritized)

    @property
    def nbytes(self) -> int:
        """Bytes of this buffer's arrays (reserved; pages are touched as it fills)."""
        n = sum(getattr(self, k).nbytes for k in self.OBS_ROWS + self.CELL_ROWS)
        return n + (self.tree.tree.nbytes if self.tree is not None else 0)

    @staticmethod
    def rows_for(capacity: int, num_envs: int, n_step: int) -> int:
        """Rows of the sampleable [row, env] window for a capacity in transitions."""
        return max(capacity // num_envs, n_step + 1)

    def __len__(self) -> int:
        return min(self.filled, self.window) * self.num_envs

    @property
    def sampleable_rows(self) -> int:
        return max(0, min(self.filled, self.window) - (self.n_step - 1))

    def add(self, obs, actions, rewards, next_obs, terminated, truncated) -> None:
        """One vector-env step: arrays with leading dimension num_envs."""
        p = self.pos
        self.store_obs(p, obs, next_obs, np.logical_or(terminated, truncated))
        self.actions[p] = actions
        self.rewards[p] = rewards
        self.terminated[p] = terminated
        self.truncated[p] = truncated
        self.pos = (p + 1) % self.rows
        self.filled = min(self.filled + 1, self.rows)
        if self.tree is not None:
            envs = np.arange(self.num_envs)
            zeros = np.zeros(self.num_envs)
            if self.margin and self.filled > self.window:   # this row left the window
                self.tree.set(((p - self.window) % self.rows) * self.num_envs + envs, zeros)
            if self.n_step > 1:  # row p is not complete yet; row p-(n-1) just became complete
                self.tree.set(p * self.num_envs + envs, zeros)
            q = (p - (self.n_step - 1)) % self.rows
            if self.filled >= self.n_step:
                self.tree.set(q * self.num_envs + envs, np.full(self.num_envs, self.max_priority))

    # -- sampling ---------------------------------------------------------------------------
    def _oldest_row(self) -> int:
        """The oldest row of the sampleable window."""
        return (self.pos - min(self.filled, self.window)) % self.rows

    def sample(self, batch_size: int, beta: float = 0.4) -> Batch:
        n_rows = self.sampleable_rows
        if n_rows <= 0:
            raise RuntimeError("replay buffer has no complete transition to sample yet")
        if self.tree is None:
            k = self.rng.integers(0, n_rows, size=batch_size)
            rows = (self._oldest_row() + k) % self.rows
            envs = self.rng.integers(0, self.num_envs, size=batch_size)
            idx = rows * self.num_envs + envs
            weights = np.ones(batch_size, dtype=np.float32)
        else:
            total = self.tree.total
            seg = total / batch_size
            prefix = (np.arange(batch_size) + self.rng.random(batch_size)) * seg
            idx = self.tree.find(np.minimum(prefix, np.nextafter(total, 0)))
            p = self.tree.get(idx)
            # guard against float round-off landing on an empty leaf
            bad = p <= 0
            if bad.any():
                idx[bad] = idx[~bad][0] if (~bad).any() else self.tree.find(np.array([0.0]))[0]
                p = self.tree.get(idx)
            n_valid = n_rows * self.num_envs
            w = (n_valid * p / total) ** (-beta)
            weights = (w / w.max()).astype(np.float32)
        return self._gather(idx, weights)

    def sample_many(self, k: int, batch_size: int, beta: float = 0.4) -> list[Batch]:
        """k minibatches for one training phase. Uniform: one gather of k * batch_size
        transitions cut into views (the same distribution as k separate draws, less overhead).
        Prioritized: k separate draws, since priorities change between updates."""
        if self.tree is not None:
            return [self.sample(batch_size, beta) for _ in range(k)]
        big = self.sample(k * batch_size, beta)
        fields = [big.obs, big.actions, big.returns, big.next_obs, big.discounts, big.weights,
                  big.indices]
        return [Batch(*(f[i * batch_size:(i + 1) * batch_size] for f in fields)) for i in range(k)]

    def _gather(self, idx: np.ndarray, weights: np.ndarray) -> Batch:
        rows, envs = np.divmod(idx, self.num_envs)
        n = self.n_step
        if n == 1:   # flat indices (a [row, env] pair index is ~3x slower)
            ret = self.rewards.reshape(-1)[idx]
            disc = np.where(self.terminated.reshape(-1)[idx], 0.0, self.gamma).astype(np.float32)
            return Batch(self.obs_at(rows, envs), self.actions.reshape(-1)[idx], ret,
                         self.next_obs_at(rows, envs), disc, weights, idx)
        rk = (rows[:, None] + np.arange(n)) % self.rows                  # [B, n]
        ek = envs[:, None]
        r = self.rewards[rk, ek].astype(np.float64)
        done = self.terminated[rk, ek] | self.truncated[rk, ek]
        # alive[:, k]: step k is still inside the episode that started at row t
        alive = np.ones_like(done)
        alive[:, 1:] = np.cumprod(~done[:, :-1], axis=1).astype(bool)
        ret = (r * self._gpow[:n] * alive).sum(axis=1)
        steps = alive.sum(axis=1)                                         # 1..n
        last = rk[np.arange(len(idx)), steps - 1]
        term = self.terminated[last, envs]
        disc = np.where(term, 0.0, self._gpow[steps])
        return Batch(self.obs_at(rows, envs), self.actions.reshape(-1)[idx], ret.astype(np.float32),
                     self.next_obs_at(last, envs), disc.astype(np.float32), weights, idx)

    def update_priorities(self, idx: np.ndarray, td_abs: np.ndarray) -> None:
        if self.tree is None:
            return
        pr = (np.abs(td_abs).astype(np.float64) + self.priority_eps) ** self.alpha
        # a duplicate index takes its last value; the tree stays consistent either way
        self.tree.set(idx, pr)
        self.max_priority = max(self.max_priority, float(pr.max()))

    # -- state (what a checkpoint keeps of the replay) ------------------------------------------
    def state_dict(self) -> dict:
        """Arrays [rows, num_envs, ...]: the ring's per-cell arrays (``OBS_ROWS``, then
        ``CELL_ROWS``) and, prioritized, the leaf ``priorities``, all views of this replay (a
        checkpoint may read into them in place, as torch's DCP loads into a state dict); small
        metadata: ``pos``, ``filled``, ``max_priority`` and the sampling ``rng``."""
        sd = {k: getattr(self, k) for k in self.OBS_ROWS + self.CELL_ROWS}
        if self.tree is not None:
            leaves = self.tree.tree[self.tree.leaves:self.tree.leaves + self.cells]
            sd["priorities"] = leaves.reshape(self.rows, self.num_envs)
        sd.update(pos=self.pos, filled=self.filled, max_priority=self.max_priority, rng=self.rng)
        return sd

    def load_state_dict(self, sd: dict) -> None:
        """Load a ``state_dict``. Its parts are optional: the contents (the per-cell arrays with
        ``pos`` and ``filled``; a resharded resume fills them through ``add`` instead), the
        priorities with ``max_priority``, the ``rng`` (kept where absent). Raises ValueError
        where the contents are inconsistent."""
        if "pos" in sd:
            for k in self.OBS_ROWS + self.CELL_ROWS:
                if sd[k] is not getattr(self, k):
                    getattr(self, k)[...] = sd[k]
            pos, filled = int(sd["pos"]), int(sd["filled"])
            if not (0 <= filled <= self.rows and 0 <= pos < self.rows):
                raise ValueError(f"pos {pos}, filled {filled} outside its {self.rows} rows")
            self.pos, self.filled = pos, filled
            self.load_derived(sd)
        if self.tree is not None and "priorities" in sd:
            pr = np.array(sd["priorities"], np.float64).reshape(-1)
            self.tree.tree[:] = 0.0
            self.tree.set(np.arange(pr.size), pr)
            self.max_priority = float(sd["max_priority"])
        if "rng" in sd:
            self.rng = sd["rng"]

    def load_derived(self, sd: dict) -> None:
        """After the contents were loaded: rebuild what is derived from them (FrameReplay)."""

    def reseed(self, seed: list[int]) -> None:
        """A new sampling RNG from ``seed`` (a resharded resume that has none to continue)."""
        self.rng = np.random.default_rng(seed + [7])


def tree_bytes(cells: int, prioritized: bool) -> int:
    """Bytes of the sum tree over ``cells`` leaves (0 without prioritized replay)."""
    if not prioritized:
        return 0
    leaves = 1
    while leaves < cells:
        leaves *= 2
    return 2 * leaves * 8
