"""The DQN math, top to bottom (Mnih et al. 2015; double DQN: van Hasselt et al. 2016).

For a minibatch of (s, a, R, s', discount) where R is the (n-step) return and ``discount`` is
gamma^k, or 0 after a termination (a time-limit truncation still bootstraps):

    a*  = argmax_a' Q_online(s', a')        (double DQN)   or   argmax_a' Q_target(s', a')
    y   = R + discount * Q_target(s', a*)
    L   = mean_i  w_i * huber(Q_online(s_i, a_i) - y_i)     (w: PER importance weights, or 1)

then: gradients averaged over data-parallel replicas -> clip global norm -> Adam step;
the target network is synced every ``target_update_every`` global env steps (hard copy, or
Polyak tau), by the training loop, between training phases.
The learners (``hpcdqn.learner``) run exactly these functions, on one rank or split over
pipeline stages, through the loss object they are handed (``rl.losses.TDLoss``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from hpcdqn.rl.replay import Batch


def td_target(returns, discounts, q_next_target, q_next_online=None):
    """y = R + discount * Q_target(s', a*), a* from the online net (double) or the target net."""
    chooser = q_next_online if q_next_online is not None else q_next_target
    a_star = chooser.argmax(dim=1, keepdim=True)
    return returns + discounts * q_next_target.gather(1, a_star).squeeze(1)


def td_loss(q_all, actions, target, weights, huber_delta: float):
    """Weighted Huber loss of Q(s, a) against the (detached) target; also returns the TD errors."""
    q = q_all.gather(1, actions.unsqueeze(1)).squeeze(1)
    td = q - target
    loss = (weights * F.huber_loss(q, target, reduction="none", delta=huber_delta)).mean()
    return loss, td.detach(), q.detach()


def to_tensors(batch: Batch, device) -> dict:
    """A replay batch as tensors on ``device`` (zero-copy on the CPU)."""
    on_cpu = torch.device(device).type == "cpu"

    def t(x):   # (from_numpy: the same zero-copy tensor as as_tensor on the CPU, 2x cheaper)
        return torch.from_numpy(x) if on_cpu and isinstance(x, np.ndarray) else \
            torch.as_tensor(x, device=device)

    return {"obs": t(batch.obs), "actions": t(batch.actions), "returns": t(batch.returns),
            "next_obs": t(batch.next_obs), "discounts": t(batch.discounts),
            "weights": t(batch.weights)}
