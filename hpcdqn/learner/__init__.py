"""Learners: one replica's share of the Q-network on this rank, and its update.

- ``base``: the ``Learner`` protocol (what the loop, evaluation and checkpoints call; which
  calls are collectives) and ``StageLearner``, the state and optimizer step both share;
- ``plan``: the execution plan of an update (gradient path, sync mode, optimizer, device);
- ``data_parallel``: the whole network on every rank, gradients averaged over replicas;
- ``pipelined``: one pipeline stage of a replica, micro-batches over point-to-point MPI.
"""

from __future__ import annotations

from hpcdqn.config import LearnerConfig
from hpcdqn.learner.base import COLLECTIVES, Learner, StageLearner
from hpcdqn.learner.data_parallel import DataParallelLearner
from hpcdqn.learner.pipelined import PipelineLearner
from hpcdqn.learner.plan import ExecutionPlan

__all__ = ["COLLECTIVES", "DataParallelLearner", "ExecutionPlan", "Learner", "PipelineLearner",
           "StageLearner", "build_learner"]


def build_learner(layout, grid, cfg: LearnerConfig, device: str, seed: int | None = None) -> Learner:
    """The learner for this rank's place in ``layout`` (a placed ``parallel.layout.RunLayout``;
    ``grid``: its communicators): data-parallel for pp=1, else its stage. The layout's layers
    are on the meta device; with ``seed`` only this rank's stage is ever allocated. ``cfg``: the
    learner's part of the config (``config.learner_config``)."""
    layers = list(layout.layers)
    if layout.pp == 1:
        return DataParallelLearner(layers, cfg, grid.dp_comm, device, seed=seed)
    return PipelineLearner(layers, cfg, grid, device, seed=seed, stages=layout.stages)
