"""The loss a learner minimises, as one object both learners are handed (``make_loss``): the
data-parallel learner calls it on the whole network's output, the pipeline learner's last
stage on its micro-batch; neither knows what it computes.

A loss says
- ``labels``: the named per-sample label arrays it needs from a replay ``Batch`` besides the
  observations (with their dtypes; the pipeline carries exactly these to its last stage);
- ``double``: whether it also wants the online network's output on ``next_obs``;
- ``target(labels, next_target, next_online)``: the (detached) bootstrap target;
- ``__call__(out, labels, target)``: (loss, per-sample TD errors for priorities, per-sample
  Q(s, a)) for the network's raw output ``out``;
- ``output_grad(out, labels, target, scale)``: dL/d``out`` of ``scale * loss``, what the
  hand-written MLP backward (``rl.mlp``, ``parallel.stage_mlp``) starts from;
- ``q_values(out)``: Q-values from the raw output (``greedy_actions`` takes their argmax).
"""

from __future__ import annotations

import numpy as np
import torch

from hpcdqn.rl.td import td_loss, td_target

# a replay batch's label fields and the dtype each travels in
LABELS = {"actions": np.int64, "returns": np.float32, "discounts": np.float32,
          "weights": np.float32}


class Loss:
    """What every loss offers (see the module docstring); ``output_grad`` by autograd on the
    loss alone (the network's forward is not taped)."""
    labels = LABELS

    def __init__(self, cfg: dict):
        self.double = bool(cfg["dqn"]["double"])

    def q_values(self, out: torch.Tensor) -> torch.Tensor:
        return out

    def output_grad(self, out, labels: dict, target, scale: float) -> torch.Tensor:
        with torch.enable_grad():
            leaf = out.detach().requires_grad_()
            loss, _, _ = self(leaf, labels, target)
            (g,) = torch.autograd.grad(loss * scale, leaf)
        return g

    def example(self, rows: int, width: int, gen: torch.Generator, device) -> tuple[dict, object]:
        """Synthetic labels and target for ``rows`` outputs of ``width`` (the hand-written
        backward's start-up check against autograd)."""
        raise NotImplementedError


class TDLoss(Loss):
    """DQN's weighted Huber TD loss (``rl.td``): double DQN, n-step returns, PER weights."""

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.huber_delta = float(cfg["dqn"]["huber_delta"])

    def target(self, labels: dict, next_target, next_online=None):
        return td_target(labels["returns"], labels["discounts"], next_target, next_online)

    def __call__(self, out, labels: dict, target):
        return td_loss(out, labels["actions"], target, labels["weights"], self.huber_delta)

    def output_grad(self, out, labels: dict, target, scale: float) -> torch.Tensor:
        """Written out: the ops autograd runs for ``scale * td_loss`` (bitwise the same)."""
        actions = labels["actions"]
        q = out.gather(1, actions.unsqueeze(1)).squeeze(1)
        g = torch.full_like(q, scale) / q.numel() * labels["weights"]
        # Huber's derivative by aten's own kernel (reduction 0: none): clip(...) * g rounds differently
        g = torch.ops.aten.huber_loss_backward(g, q, target, 0, self.huber_delta)
        return torch.zeros_like(out).scatter_add_(1, actions.unsqueeze(1), g.unsqueeze(1))

    def example(self, rows, width, gen, device):
        actions = torch.randint(0, width, (rows,), generator=gen).to(device)
        target = (torch.randn(rows, generator=gen) * 2).to(device)
        weights = torch.rand(rows, generator=gen).to(device)
        return {"actions": actions, "weights": weights}, target


def make_loss(cfg: dict) -> Loss:
    """The loss the config's network head trains with (``network.head``)."""
    head = cfg["network"].get("head", "q")
    losses = {"q": TDLoss}
    if head not in losses:
        raise ValueError(f"network.head={head!r} has no loss; one of {sorted(losses)}")
    return losses[head](cfg)


def greedy_actions(out: torch.Tensor, loss: Loss | None = None) -> torch.Tensor:
    """argmax_a Q(s, a) from a network's raw output (``loss.q_values``; none: ``out`` is Q)."""
    return (out if loss is None else loss.q_values(out)).argmax(1)


def batch_labels(batch, loss: Loss) -> dict:
    """The label arrays ``loss`` needs from a replay ``Batch``, in the dtypes they travel in."""
    return {k: np.ascontiguousarray(getattr(batch, k), dtype=dt) for k, dt in loss.labels.items()}
