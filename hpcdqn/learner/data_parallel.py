"""The data-parallel learner: the whole Q-network on every rank (one pipeline stage), gradients
averaged over the replicas (``dp_comm``: any communicator, COMM_SELF, a Split, a Dup...)."""

from __future__ import annotations

import time

import numpy as np
import torch

from hpcdqn.config import LearnerConfig
from hpcdqn.learner.base import StageLearner
from hpcdqn.rl.networks import is_meta, num_params
from hpcdqn.rl.losses import greedy_actions
from hpcdqn.rl.mlp import mlp_forward, mlp_layers, mlp_td_backward
from hpcdqn.rl.replay import Batch
from hpcdqn.rl.td import to_tensors


class DataParallelLearner(StageLearner):
    """One replica's online + target network, optimizer and update, on one rank."""

    def __init__(self, layers, cfg: LearnerConfig, dp_comm, device="cpu", seed: int | None = None,
                 loss=None):
        """``layers``: real, or on the meta device with ``seed`` (their initial values are then
        those ``build_layers(seed=seed)`` gives); ``loss``: ``rl.losses`` (None: the config's)."""
        init = (layers, 0, sum(num_params(m) for m in layers), seed) if is_meta(layers) else None
        super().__init__(layers, cfg, dp_comm, device, pipeline=False, init=init, loss=loss)
        self.param_ranges = [(0, self.online.numel)]     # one stage: the whole network
        self.stage_contents = [f"layers [0, {len(layers)})"]
        # the plan chose the hand-written MLP update: act and learn on plain tensors
        self.mlp = mlp_layers(self.online.net) if self.plan.gradient == "mlp-manual" else None

    # -- acting ------------------------------------------------------------------------------
    @torch.no_grad()
    def q_values(self, obs: np.ndarray) -> np.ndarray:
        """Collective over the replica's stages (here: this rank alone)."""
        return self.loss.q_values(self.online(torch.as_tensor(obs, device=self.device))).cpu().numpy()

    def greedy(self, obs, needed: bool = True):
        """Collective over the replica's stages (here: this rank alone): greedy actions; None
        without computing them when ``needed`` is False."""
        if not needed:
            return None
        x = torch.as_tensor(obs, device=self.device)
        with torch.no_grad():
            out = mlp_forward(self.mlp, x)[0] if self.mlp is not None else self.online(x)
            return greedy_actions(out, self.loss).cpu().numpy()

    def evaluate(self, run):
        """Collective over the replica's stages: ``run(policy)`` on replica 0 (None elsewhere)."""
        return run(self.greedy) if self.dp_comm.Get_rank() == 0 else None

    # -- learning ----------------------------------------------------------------------------
    @torch.no_grad()
    def phase_targets(self, batches: list[Batch] | None):
        """Target-net Q(s', .) for every minibatch of a training phase in one forward pass (the
        target net does not change inside a phase: the loop syncs it between phases, every
        ``target_update_every`` env steps, as SB3 does). None for fewer than two minibatches.
        Same values as per-update forwards, far fewer calls."""
        if batches is None or len(batches) < 2:
            return None
        nxt = torch.as_tensor(np.concatenate([b.next_obs for b in batches]), device=self.device)
        # ~1k-row chunks: big enough for efficient GEMMs, small enough to stay in cache
        q = torch.cat([self.target(c) for c in torch.split(nxt, 1024)])
        return torch.split(q, len(batches[0].actions))

    def update(self, batch: Batch, q_next_target=None) -> dict:
        """Collective over dp_comm: one gradient update on ``batch``."""
        t_start = time.perf_counter()
        b, loss_fn = to_tensors(batch, self.device), self.loss
        lab = {k: b[k] for k in loss_fn.labels}
        with torch.no_grad():
            q_next_t = self.target(b["next_obs"]) if q_next_target is None else q_next_target
            q_next_o = self.online(b["next_obs"]) if loss_fn.double else None
            y = loss_fn.target(lab, q_next_t, q_next_o)
        if self.mlp is None:
            self.online.zero_grad_()
            loss, td, q = loss_fn(self.online(b["obs"]), lab, y)
            loss.backward()
        else:   # the same forward and gradients, written out (every gradient is overwritten)
            q_all, inputs = mlp_forward(self.mlp, b["obs"])
            loss, td, q = loss_fn(q_all, lab, y)
            mlp_td_backward(self.mlp, inputs, loss_fn.output_grad(q_all, lab, y, 1.0))
        self.step_optimizer()
        td_abs = td.abs().cpu().numpy() if self.cfg.prioritized else None
        self.update_seconds += time.perf_counter() - t_start
        return {"loss": float(loss.detach()), "q": float(q.mean()), "td_abs": td_abs}

    # -- what the loop and checkpoints ask ---------------------------------------------------
    def gather_online(self) -> np.ndarray:
        """Collective over the replica's stages (here: this rank alone)."""
        return self.online.numpy_data().copy()

    def gather_target(self) -> np.ndarray:
        return self.target.numpy_data().copy()

    def param_range(self) -> tuple[int, int]:
        """The range ``[lo, hi)`` of the flattened network's parameters held by this rank (all)."""
        return self.param_ranges[0]
