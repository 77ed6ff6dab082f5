"""What every learner is: the ``Learner`` protocol the training loop, evaluation and checkpoints
use, and ``StageLearner``, the state and optimizer step both learners share.

A learner holds one replica's part of the Q-network on this rank (the whole network, or one
pipeline stage): online and target ``FlatModule``, Adam, and the gradient sync over the
stage's data-parallel communicator. Methods marked *collective* must be called by every rank of
the communicator named, in the same order; the training loop calls the same sequence on every
rank, so a rank that holds no environments passes ``None`` where it has no data.
"""

from __future__ import annotations

import copy
from typing import Protocol

import numpy as np
import torch

from hpcdqn.config import LearnerConfig
from hpcdqn.learner import plan as plan_mod
from hpcdqn.parallel.allreduce import GradSync, broadcast_params, check_consistent
from hpcdqn.parallel.flat import FlatModule
from hpcdqn.rl.losses import make_loss
from hpcdqn.rl.networks import initial_flat, is_meta
from hpcdqn.rl.optim import make_optimizer, optimizer_state, optimizer_step, restore_optimizer

# the protocol's collectives: (method, over which ranks)
COLLECTIVES = {"greedy": "the replica's stages (pp_comm)",
               "q_values": "the replica's stages (pp_comm)",
               "update": "the replica's stages (pp_comm), then the stage's replicas (dp_comm)",
               "evaluate": "the replica's stages (pp_comm)",
               "gather_online": "the replica's stages (pp_comm)",
               "check_consistency": "the stage's replicas (dp_comm)",
               "time_split": "the communicator given (the training loop: the world)"}

# where an update's time goes (``StageLearner.time_split``); 'other' is the rest of the wall
# time: acting, env steps, replay, logging, checkpoints
TIME_KINDS = ("compute", "allreduce", "wait", "bubble")


class Learner(Protocol):
    """The learner interface (see ``COLLECTIVES`` for the methods that are collective)."""
    plan: plan_mod.ExecutionPlan
    updates: int
    device: torch.device
    param_ranges: list[tuple[int, int]]   # every stage's [lo, hi) of the flattened network
    stage_contents: list[str]             # every stage's layers, for people

    # collectives
    def greedy(self, obs: np.ndarray | None, needed: bool = True) -> np.ndarray | None:
        """Greedy actions for ``obs`` (first stage; None elsewhere). ``needed=False``: every
        action is exploratory, a learner that can may skip the forward (returns None)."""

    def update(self, batch, q_next_target=None) -> dict:
        """One gradient update on ``batch`` (first stage; None elsewhere): {'loss', 'q',
        'td_abs'} where known on this rank, else None values."""

    def evaluate(self, run):
        """``run(greedy)`` on replica 0; its result on world rank 0, None elsewhere."""

    def gather_online(self) -> np.ndarray | None:
        """The whole online network's flat parameters on world rank 0 (None elsewhere)."""

    def check_consistency(self) -> None:
        """Stop loudly if the replicas' parameters differ."""

    def time_split(self, wall: float, comm) -> dict:
        """The time split of this process's ``wall`` seconds, averaged over ``comm``'s ranks."""

    # local
    def phase_targets(self, batches) -> list | None: ...
    def set_lr(self, lr: float) -> None: ...
    def sync_seconds(self) -> float: ...
    def replica_wait_seconds(self) -> float: ...
    def bubble_seconds(self) -> float: ...
    def time_split_seconds(self) -> dict: ...
    def param_range(self) -> tuple[int, int]: ...
    def parameter_bytes(self) -> int: ...
    def state_arrays(self) -> dict: ...
    def state_scalars(self) -> dict: ...
    def load_state(self, arrays: dict, scalars: dict) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, sd: dict) -> None: ...


class StageLearner:
    """Online + target network, Adam and gradient sync for ``modules`` (the whole network or one
    pipeline stage), and the optimizer step: allreduce-average, clip by the global norm, Adam,
    target sync. ``pipeline``: whether ``modules`` are one stage of several (the plan differs)."""

    def __init__(self, modules, cfg: LearnerConfig, dp_comm, device="cpu", pipeline: bool = False,
                 init=None, stage_ends: tuple[bool, bool] = (True, True), loss=None):
        """``modules`` real (their values are the start), or on the meta device: then ``init``
        = (the whole network's meta layers, lo, hi, seed) and this rank computes only its
        range [lo, hi) of the initial values (``networks.initial_flat``), allocating nothing
        of any other stage. ``loss``: what the update minimises (``rl.losses``; None: the
        config's, ``make_loss``). ``cfg``: the learner's part of the config
        (``config.learner_config``)."""
        self.cfg, self.d, self.device = cfg, cfg.dqn, torch.device(device)
        self.loss = loss if loss is not None else make_loss(cfg.dqn, cfg.network)
        self.dp_comm = dp_comm
        meta = is_meta(modules)
        if meta and init is None:
            raise ValueError("StageLearner: modules on the meta device need init=(layers, lo, hi, seed)")
        targets = [copy.deepcopy(m) for m in modules]     # (meta: free; before online takes them)
        self.online = FlatModule([copy.deepcopy(m) for m in modules] if meta else modules, self.device)
        if meta:
            layers, lo, hi, seed = init
            initial_flat(layers, seed, lo, hi, out=self.online.flat.data)   # in place: no copy
        self.target = FlatModule(targets, self.device, grad=False)   # no gradient buffer
        broadcast_params(self.online, dp_comm)    # every replica starts from replica 0's values
        self.target.load_flat_(self.online.flat.data)
        self.opt = make_optimizer(self.online.flat, self.d)
        buckets = GradSync.bucket_bounds(self.online, cfg.parallel["bucket_mb"])
        self.plan = plan_mod.decide(cfg, self.online, self.opt, dp_comm, pipeline, len(buckets),
                                    stage_ends, self.loss)
        self.sync = GradSync(self.online, dp_comm, cfg.parallel["bucket_mb"], self.plan.overlap,
                             self.plan.allreduce)
        if self.plan.gradient == "autograd-accumulate":
            self.online.accumulate_grads_in_place()
        self.updates = 0
        self.update_seconds = 0.0      # inside update() (the time split's whole)

    # -- optimizer step -------------------------------------------------------------------------
    def set_lr(self, lr: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr

    @property
    def lr(self) -> float:
        return float(self.opt.param_groups[0]["lr"])

    def step_optimizer(self) -> None:
        """Collective over dp_comm (and, for a pipeline stage's norm, pp_comm): allreduce-average
        the gradients, clip, Adam. (The training loop syncs the target: ``sync_target``, every
        ``dqn.target_update_every`` env steps.)"""
        self.sync()
        if self.d["max_grad_norm"] > 0:
            g = self.online.flat.grad
            coef = self.d["max_grad_norm"] / (float(self.grad_norm()) + 1e-6)
            if coef < 1.0:          # (a factor of 1 would change nothing: skip the pass)
                g.mul_(coef)
        optimizer_step(self.opt)
        self.updates += 1

    def grad_norm(self) -> torch.Tensor:
        """The L2 norm of this learner's (averaged) gradient."""
        return torch.linalg.vector_norm(self.online.flat.grad)

    @torch.no_grad()
    def sync_target(self) -> None:
        """This rank's part of the target network := online (tau = 1), or Polyak-averaged
        towards it (local: every stage syncs its own part at the same loop iteration)."""
        tau = self.d["tau"]
        if tau >= 1.0:
            self.target.flat.data.copy_(self.online.flat.data)
        else:
            self.target.flat.data.lerp_(self.online.flat.data, tau)

    # -- what the loop and the reports ask -------------------------------------------------------
    def check_consistency(self) -> None:
        """Collective over dp_comm: the replicas' parameter checksums must agree."""
        check_consistent(self.online.checksum(), self.dp_comm)

    def sync_seconds(self) -> float:
        """Seconds in the gradient allreduce's transfer (after every replica arrived)."""
        return self.sync.seconds

    def replica_wait_seconds(self) -> float:
        """Seconds waiting for the slowest replica before the gradient allreduce."""
        return self.sync.wait_seconds

    def bubble_seconds(self) -> float:
        """Seconds a pipeline stage spent blocked on its neighbours inside updates (0 here)."""
        return 0.0

    def time_split_seconds(self) -> dict:
        """This rank's seconds inside updates, by kind (``TIME_KINDS``): 'allreduce' (transfer),
        'wait' (for the slowest replica), 'bubble' (blocked on the replica's other stages),
        'compute' (the rest of the update: forwards, backward, clip, Adam); and 'update'."""
        u, ar, w, b = self.update_seconds, self.sync_seconds(), self.replica_wait_seconds(), \
            self.bubble_seconds()
        return {"update": u, "compute": max(0.0, u - ar - w - b), "allreduce": ar, "wait": w,
                "bubble": b}

    def time_split(self, wall: float, comm) -> dict:
        """Collective over ``comm`` (the training loop passes the world): where this process's
        last ``wall`` seconds went, averaged over ``comm``'s ranks: ``seconds`` and ``shares``
        (of ``wall``) per kind in ``TIME_KINDS`` plus 'other' (everything outside updates:
        acting, env steps, replay, logging, checkpoints), ``per_update_ms`` (mean over updates),
        and ``per_rank`` (each rank's seconds, for the spread)."""
        return split_over_ranks(self.time_split_seconds(), self.updates, wall, comm)

    def parameter_bytes(self) -> int:
        """Bytes of online + target parameters + Adam moments held by this rank."""
        m = self.memory_bytes()
        return m["parameters"] + m["target"] + m["optimizer"]

    def memory_bytes(self) -> dict:
        """The bytes of the tensors this rank's learner holds, by category: 'parameters'
        (online), 'target', 'gradients' (0 where there is no buffer), 'optimizer' (Adam's
        moments; before the first step, what the first step will allocate)."""
        def nbytes(t):
            return 0 if t is None else t.numel() * t.element_size()

        _, m1, m2 = optimizer_state(self.opt, self.online.flat)
        moments = nbytes(m1) + nbytes(m2) if m1 is not None else 2 * nbytes(self.online.flat)
        return {"parameters": nbytes(self.online.flat), "target": nbytes(self.target.flat),
                "gradients": nbytes(self.online.flat.grad) + nbytes(self.target.flat.grad),
                "optimizer": moments}

    # -- state (what a checkpoint stores of this rank's learner) --------------------------------
    def state_arrays(self) -> dict:
        """{'online'|'target'|'exp_avg'|'exp_avg_sq': this stage's flat float32 vector} (the Adam
        moments are zeros before the first update)."""
        _, m1, m2 = optimizer_state(self.opt, self.online.flat)
        flat = {"online": self.online.numpy_data(), "target": self.target.numpy_data()}
        if m1 is not None:
            flat["exp_avg"] = m1.detach().cpu().numpy()
            flat["exp_avg_sq"] = m2.detach().cpu().numpy()
        else:
            flat["exp_avg"] = flat["exp_avg_sq"] = np.zeros(self.online.numel, np.float32)
        return flat

    def state_scalars(self) -> dict:
        """{'updates', 'adam_step', 'lr'}."""
        step, _, _ = optimizer_state(self.opt, self.online.flat)
        return {"updates": int(self.updates), "adam_step": step, "lr": self.lr}

    def load_state(self, arrays: dict, scalars: dict) -> None:
        """Load ``state_arrays``/``state_scalars`` (from a checkpoint) bit for bit."""
        self.online.load_flat_(arrays["online"])
        self.target.load_flat_(arrays["target"])
        step = float(scalars["adam_step"])
        restore_optimizer(self.opt, self.online.flat, step, arrays.get("exp_avg") if step > 0 else None,
                     arrays.get("exp_avg_sq") if step > 0 else None)
        self.updates = int(scalars["updates"])
        self.set_lr(scalars["lr"])

    # -- state_dict: the learner's part of a checkpoint in one dict (``store.checkpointer``) -----
    STATE_ARRAYS = ("online", "target", "exp_avg", "exp_avg_sq")
    STATE_SCALARS = ("updates", "adam_step", "lr")

    def state_dict(self) -> dict:
        """This stage's flat float32 vectors (``STATE_ARRAYS``) and counters (``STATE_SCALARS``)."""
        return {**self.state_arrays(), **self.state_scalars()}

    def load_state_dict(self, sd: dict) -> None:
        """Load a ``state_dict`` bit for bit."""
        self.load_state({k: sd[k] for k in self.STATE_ARRAYS},
                        {k: sd[k] for k in self.STATE_SCALARS})


def split_over_ranks(mine: dict, updates: int, wall: float, comm) -> dict:
    """Collective over ``comm``: ``StageLearner.time_split`` from each rank's seconds (one
    ``Allgather`` of a few floats)."""
    kinds = ("update",) + TIME_KINDS
    v = np.array([mine[k] for k in kinds] + [wall], dtype=np.float64)
    allv = np.empty((comm.Get_size(), v.size), dtype=np.float64)
    if comm.Get_size() > 1:
        comm.Allgather(v, allv)
    else:
        allv[0] = v
    mean = allv.mean(axis=0)
    sec = dict(zip(kinds, mean[:-1].tolist()))
    wall_mean = float(mean[-1])
    sec["other"] = max(0.0, wall_mean - sec["update"])
    parts = TIME_KINDS + ("other",)
    return {"wall_s": round(wall_mean, 6),
            "seconds": {k: round(sec[k], 6) for k in parts},
            "shares": {k: round(sec[k] / wall_mean, 6) if wall_mean > 0 else 0.0 for k in parts},
            "per_update_ms": {k: round(1e3 * sec[k] / updates, 6) if updates else 0.0
                              for k in ("update",) + TIME_KINDS},
            "per_rank": [{"rank": r, **{k: round(float(x), 6) for k, x in zip(kinds, row[:-1])}}
                         for r, row in enumerate(allv)]}
