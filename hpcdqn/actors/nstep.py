"""n-step transitions computed on the actor, and the learner's replay shard that holds them.

``NStepWindow`` keeps an actor's last ``n`` vector-env steps; once it holds ``n`` steps, each
new step completes the oldest one: its return ``sum_k gamma^k r_k`` up to ``n`` steps or the
episode's end, the observation it bootstraps from and the discount (``gamma^k``, or 0 after a
termination; a truncation bootstraps from the final observation). These are exactly the
targets ``rl.replay.ReplayBuffer`` computes at sampling time from raw steps, so a learner fed by
actors learns from the same n-step targets as a sync run.

``TransitionReplay`` is ``ReplayBuffer``'s ring, sampling and priorities over such finished
transitions (one column, ``n_step`` 1 in the ring's sense), with the stored discount.
"""

from __future__ import annotations

import numpy as np

from hpcdqn.rl.replay import Batch, ReplayBuffer


class NStepWindow:
    """The last ``n`` raw steps of ``num_envs`` envs; ``push`` returns the finished transitions."""

    def __init__(self, n: int, gamma: float):
        self.n, self.gamma = n, gamma
        self.steps: list[tuple] = []
        self.gpow = gamma ** np.arange(n + 1, dtype=np.float64)

    def push(self, obs, actions, rewards, next_obs, terminated, truncated) -> dict | None:
        """Add one vector-env step (arrays over envs); the oldest step's finished transitions
        (``obs``, ``actions``, ``returns``, ``next_obs``, ``discounts``; one per env) once the
        window holds ``n`` steps, else None."""
        self.steps.append((np.array(obs), np.asarray(actions), np.asarray(rewards, np.float64),
                           np.array(next_obs), np.asarray(terminated, bool),
                           np.asarray(truncated, bool)))
        if len(self.steps) < self.n:
            return None
        obs0, act0 = self.steps[0][0], self.steps[0][1]
        r = np.stack([s[2] for s in self.steps], axis=1)                      # [E, n]
        done = np.stack([s[4] | s[5] for s in self.steps], axis=1)
        alive = np.ones_like(done)
        alive[:, 1:] = np.cumprod(~done[:, :-1], axis=1).astype(bool)
        ret = (r * self.gpow[:self.n] * alive).sum(axis=1)
        last = alive.sum(axis=1) - 1                                          # 0..n-1
        envs = np.arange(len(last))
        nxt = np.stack([s[3] for s in self.steps], axis=1)[envs, last]
        term = np.stack([s[4] for s in self.steps], axis=1)[envs, last]
        disc = np.where(term, 0.0, self.gpow[last + 1])
        self.steps.pop(0)
        return {"obs": obs0, "actions": act0.astype(np.int64), "returns": ret.astype(np.float32),
                "next_obs": nxt, "discounts": disc.astype(np.float32)}


class TransitionReplay(ReplayBuffer):
    """A ring of finished n-step transitions (``NStepWindow``'s), sampled as ``ReplayBuffer``
    samples (uniform or prioritized): ``rewards`` holds the n-step return, ``discounts`` the
    discount to the bootstrap observation."""

    CELL_ROWS = ("actions", "rewards", "terminated", "truncated", "discounts")

    def __init__(self, capacity: int, obs_shape: tuple, obs_dtype, *, prioritized: bool = False,
                 alpha: float = 0.6, priority_eps: float = 1e-6, seed: int = 0,
                 raw_steps: tuple[int, float] = (1, 0.99)):
        """``raw_steps``: the run's (n_step, gamma), for raw env steps ``add``ed (a resume from
        a sync checkpoint)."""
        super().__init__(capacity, 1, obs_shape, obs_dtype, n_step=1, prioritized=prioritized,
                         alpha=alpha, priority_eps=priority_eps, seed=seed)
        self.discounts = np.zeros((self.rows, 1), dtype=np.float32)
        self.inserted = 0       # transitions ever added
        self.raw_steps, self.raw = raw_steps, None

    def add(self, obs, actions, rewards, next_obs, terminated, truncated, discounts=None) -> None:
        """One row of a resharded resume (one stream): a finished transition (``discounts``
        given: an actor run's checkpoint) or a raw env step (a sync run's), which becomes a
        finished transition once the n-step window holds ``n`` steps (the last ``n - 1`` steps
        of the stream are left out: their returns are not known)."""
        if discounts is not None:
            self.add_transitions({"obs": obs, "actions": actions, "returns": rewards,
                                  "next_obs": next_obs, "discounts": discounts})
            return
        if self.raw is None:
            self.raw = NStepWindow(*self.raw_steps)
        done = self.raw.push(obs, actions, rewards, next_obs, terminated, truncated)
        if done is not None:
            self.add_transitions(done)

    def add_transitions(self, t: dict) -> None:
        """Add finished transitions (``NStepWindow.push``'s dict, any count)."""
        n = len(t["actions"])
        if not n:
            return
        p = (self.pos + np.arange(n)) % self.rows
        self.obs[p, 0], self.next_obs[p, 0] = t["obs"], t["next_obs"]
        self.actions[p, 0], self.rewards[p, 0] = t["actions"], t["returns"]
        self.discounts[p, 0] = t["discounts"]
        self.terminated[p, 0] = np.asarray(t["discounts"]) == 0    # (a sync resume's n=1 view)
        self.pos = (self.pos + n) % self.rows
        self.filled = min(self.filled + n, self.rows)
        if self.tree is not None:
            self.tree.set(p, np.full(n, self.max_priority))
        self.inserted += n

    def _gather(self, idx: np.ndarray, weights: np.ndarray) -> Batch:
        return Batch(self.obs.reshape(self.cells, *self.obs.shape[2:])[idx],
                     self.actions.reshape(-1)[idx], self.rewards.reshape(-1)[idx],
                     self.next_obs.reshape(self.cells, *self.obs.shape[2:])[idx],
                     self.discounts.reshape(-1)[idx], weights, idx)
