"""Schedules: when the loop trains, logs and how epsilon, learning rate and PER's beta move.

Units: ``total_steps`` counts env steps over all data-parallel replicas; ``learning_starts`` and
``train_frequency`` are env steps per replica (``config.training_grid`` turns them into vector
steps); one *iteration* of the training loop is one vector-env step of every replica, i.e.
``num_envs * dp`` global env steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hpcdqn.config import training_grid


def linear_schedule(start: float, end: float, duration: float, t: float) -> float:
    if duration <= 0:
        return end
    return start + (end - start) * min(1.0, max(0.0, t / duration))


def epsilon_at(dqn: dict, total_steps: int, step: int, rank: int = 0, ranks: int = 1,
               ladder: bool = False) -> float:
    """Linear epsilon-greedy schedule over ``exploration_fraction * total_steps`` env steps.
    With the Ape-X ladder, replica i explores with eps^(1 + 7 i / (N - 1))."""
    eps = linear_schedule(dqn["epsilon_start"], dqn["epsilon_end"],
                          dqn["exploration_fraction"] * total_steps, step)
    if ladder and ranks > 1:
        eps = eps ** (1.0 + 7.0 * rank / (ranks - 1))
    return eps


@dataclass(frozen=True)
class Schedule:
    """The run's clock, in loop iterations (identical on every rank)."""
    steps_per_iter: int     # global env steps per iteration (num_envs * dp)
    n_iters: int
    train_every: int        # a training phase after iterations train_every, 2 train_every, ...
    learn_start: int        # ... that lie at or past this iteration (SB3's grid)
    log_every: int
    total_updates: int

    @classmethod
    def from_config(cls, cfg: dict, dp: int) -> "Schedule":
        spi = cfg["num_envs"] * dp
        n_iters = math.ceil(cfg["total_steps"] / spi)
        train_every, learn_start = training_grid(cfg)
        n_phases = max(1, n_iters // train_every - learn_start // train_every)
        return cls(spi, n_iters, train_every, learn_start, max(1, cfg["log"]["every"] // spi),
                   n_phases * cfg["dqn"]["gradient_steps"])

    def env_steps(self, iterations: int) -> int:
        return iterations * self.steps_per_iter

    def warming_up(self, it: int) -> bool:
        return it < self.learn_start

    def trains_after(self, it: int) -> bool:
        return it >= self.learn_start and (it + 1) % self.train_every == 0

    def logs_after(self, it: int) -> bool:
        return (it + 1) % self.log_every == 0 or it == self.n_iters - 1

    def epsilon(self, cfg: dict, it: int, dp_rank: int, dp: int) -> float:
        """This replica's exploration at iteration ``it`` (1 during a uniform warm-up)."""
        d = cfg["dqn"]
        if d["uniform_warmup"] and self.warming_up(it):
            return 1.0
        return epsilon_at(d, cfg["total_steps"], self.env_steps(it), dp_rank, dp, d["epsilon_ladder"])

    def progress(self, updates: int) -> float:
        """Share of the run's updates done: drives the lr and beta schedules."""
        return updates / max(1, self.total_updates)
