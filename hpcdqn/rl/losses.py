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

    def __init__(self, dqn: dict, network: dict):
        self.double = bool(dqn["double"])

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

    def __init__(self, dqn: dict, network: dict):
        super().__init__(dqn, network)
        self.huber_delta = float(dqn["huber_delta"])

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


class C51Loss(Loss):
    """C51 (Bellemare et al. 2017): per action, the network outputs the logits of a
    distribution over ``network.atoms`` returns evenly spaced on [``v_min``, ``v_max``]; the
    target is the next state's distribution (greedy action by its mean: the target net's, or
    the online net's with double) shifted by the n-step return and discount and projected back
    onto the atoms; the loss is the importance-weighted cross-entropy to it, which is also the
    priority (as Rainbow's)."""

    def __init__(self, dqn: dict, network: dict):
        super().__init__(dqn, network)
        self.atoms = int(network["atoms"])
        self.v_min, self.v_max = float(network["v_min"]), float(network["v_max"])
        self.support = torch.linspace(self.v_min, self.v_max, self.atoms)

    def _logits(self, out):
        return out.view(out.shape[0], -1, self.atoms)

    def q_values(self, out):
        return (torch.softmax(self._logits(out), -1) * self.support.to(out.device)).sum(-1)

    def target(self, labels: dict, next_target, next_online=None):
        z = self.support.to(next_target.device)
        p = torch.softmax(self._logits(next_target), -1)
        a = self.q_values(next_online if next_online is not None else next_target).argmax(1)
        p_a = p[torch.arange(p.shape[0], device=p.device), a]
        tz = labels["returns"].unsqueeze(1) + labels["discounts"].unsqueeze(1) * z
        b = ((tz.clamp(self.v_min, self.v_max) - self.v_min) * ((self.atoms - 1) / (self.v_max - self.v_min))
             ).clamp(0, self.atoms - 1)
        lo, hi = b.floor().long(), b.ceil().long()
        m = torch.zeros_like(p_a)
        m.scatter_add_(1, lo, p_a * (hi - b + (lo == hi)))      # (lo == hi: all of it to lo)
        return m.scatter_add_(1, hi, p_a * (b - lo))

    def __call__(self, out, labels: dict, target):
        logp = torch.log_softmax(self._logits(out), -1)
        logp_a = logp[torch.arange(out.shape[0], device=out.device), labels["actions"]]
        ce = -(target * logp_a).sum(-1)
        q = (logp_a.detach().exp() * self.support.to(out.device)).sum(-1)
        return (labels["weights"] * ce).mean(), ce.detach(), q

    def example(self, rows, width, gen, device):
        actions = torch.randint(0, width // self.atoms, (rows,), generator=gen).to(device)
        target = torch.softmax(torch.randn(rows, self.atoms, generator=gen), -1).to(device)
        weights = torch.rand(rows, generator=gen).to(device)
        return {"actions": actions, "weights": weights}, target


def make_loss(dqn: dict, network: dict) -> Loss:
    """The loss the network's head trains with (``network.head``), from the config's ``[dqn]``
    and ``[network]`` sections."""
    head = network.get("head", "q")
    losses = {"q": TDLoss, "c51": C51Loss}
    if head not in losses:
        raise ValueError(f"network.head={head!r} has no loss; one of {sorted(losses)}")
    return losses[head](dqn, network)


def greedy_actions(out: torch.Tensor, loss: Loss | None = None) -> torch.Tensor:
    """argmax_a Q(s, a) from a network's raw output (``loss.q_values``; none: ``out`` is Q)."""
    return (out if loss is None else loss.q_values(out)).argmax(1)


def batch_labels(batch, loss: Loss) -> dict:
    """The label arrays ``loss`` needs from a replay ``Batch``, in the dtypes they travel in."""
    return {k: np.ascontiguousarray(getattr(batch, k), dtype=dt) for k, dt in loss.labels.items()}
