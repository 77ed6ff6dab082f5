"""The DQN math, top to bottom (Mnih et al. 2015; double DQN: van Hasselt et al. 2016).

For a minibatch of (s, a, R, s', discount) where R is the (n-step) return and ``discount`` is
gamma^k, or 0 after a termination (a time-limit truncation still bootstraps):

    a*  = argmax_a' Q_online(s', a')        (double DQN)   or   argmax_a' Q_target(s', a')
    y   = R + discount * Q_target(s', a*)
    L   = mean_i  w_i * huber(Q_online(s_i, a_i) - y_i)     (w: PER importance weights, or 1)

then: gradients averaged over data-parallel replicas -> clip global norm -> Adam step;
the target network is synced every ``target_update_every`` updates (hard copy, or Polyak tau).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .allreduce import GradSync, broadcast_params, check_consistent
from .flat import FlatModule, unroll
from .replay import Batch


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


@dataclass
class Dense:
    """One Linear layer of a plain MLP as plain tensors: views into the flat parameter and
    gradient buffers (so they follow every in-place update, load and target sync)."""
    w: torch.Tensor       # [out, in]
    w_t: torch.Tensor     # w.t(), what addmm takes
    b: torch.Tensor
    dw: torch.Tensor      # views into flat.grad
    db: torch.Tensor


def mlp_layers(module: FlatModule) -> list[Dense] | None:
    """The layers of a plain MLP Q-network (Linear, ReLU, Linear, ..., ReLU, Linear, each with a
    bias), in order; None for any other network (CNN, dueling head, ...)."""
    leaves = unroll(module.net)
    linears = leaves[0::2]
    if not (len(leaves) % 2 == 1
            and all(isinstance(m, nn.Linear) and m.bias is not None for m in linears)
            and all(isinstance(m, nn.ReLU) for m in leaves[1::2])):
        return None
    return [Dense(m.weight.detach(), m.weight.detach().t(), m.bias.detach(), m.weight.grad,
                  m.bias.grad) for m in linears]


def mlp_forward(layers: list[Dense], x: torch.Tensor):
    """Q-values of an MLP and the input of every layer (for ``mlp_td_backward``): the same ops as
    its modules (``nn.Linear`` on a batch is ``addmm``), minus the per-call module, Parameter and
    autograd overhead (for a 1-row greedy step it is most of the time)."""
    inputs = []
    for i, layer in enumerate(layers):
        inputs.append(x)
        x = torch.addmm(layer.b, x, layer.w_t)
        if i < len(layers) - 1:
            x = torch.relu(x)
    return x, inputs


def mlp_td_backward(layers: list[Dense], inputs: list, q_all, q, actions, target, weights,
                    huber_delta: float) -> None:
    """The gradient of ``td_loss`` w.r.t. every MLP parameter, written into the flat gradient
    buffer: the backward pass written out, op for op the ones autograd runs for
    ``td_loss(mlp(obs)).backward()`` so the result is bitwise the same (tests/test_dqn_math.py),
    minus autograd's per-node bookkeeping (~70 us of a ~470 us CartPole update).
    ``q_all, inputs = mlp_forward(...)``; ``q``: Q(s_i, a_i).

    dL/dq_i = w_i / B * clip(q_i - y_i, -delta, delta)   (mean, weights, Huber)
    dL/dW   = g^T x,  dL/db = sum_i g_i,  g_in = (g W) * [x > 0]   (Linear, ReLU)
    """
    g = (torch.ones_like(q) / q.numel()) * weights
    # Huber's derivative by aten's own kernel (reduction 0: none): clip(...) * g rounds differently
    g = torch.ops.aten.huber_loss_backward(g, q, target, 0, huber_delta)
    g = torch.zeros_like(q_all).scatter_add_(1, actions.unsqueeze(1), g.unsqueeze(1))
    for i in range(len(layers) - 1, -1, -1):
        layer, x = layers[i], inputs[i]
        torch.sum(g, 0, out=layer.db)
        torch.mm(g.t(), x, out=layer.dw)
        if i > 0:   # x = relu(previous layer): the gradient passes where x > 0 (aten's kernel)
            g = torch.ops.aten.threshold_backward(g.mm(layer.w), x, 0)


def to_tensors(batch: Batch, device) -> dict:
    on_cpu = torch.device(device).type == "cpu"

    def t(x):   # (from_numpy: the same zero-copy tensor as as_tensor on the CPU, 2x cheaper)
        return torch.from_numpy(x) if on_cpu and isinstance(x, np.ndarray) else \
            torch.as_tensor(x, device=device)

    return {"obs": t(batch.obs), "actions": t(batch.actions), "returns": t(batch.returns),
            "next_obs": t(batch.next_obs), "discounts": t(batch.discounts),
            "weights": t(batch.weights)}


class DQNLearner:
    """One replica's online + target network, optimizer and update (single pipeline stage).

    ``dp_comm``: the data-parallel communicator over which gradients are averaged (any
    communicator: COMM_SELF, a Split of COMM_WORLD, a Dup...).
    """

    def __init__(self, layers, cfg: dict, dp_comm, device="cpu"):
        d = cfg["dqn"]
        self.cfg, self.d, self.device = cfg, d, torch.device(device)
        self._init_nets(layers, dp_comm)
        self.param_ranges = [(0, self.online.numel)]     # one stage: the whole network
        self.sync = GradSync(self.online, dp_comm, cfg["parallel"]["bucket_mb"],
                             cfg["parallel"]["overlap"])
        self.dp_comm = dp_comm
        self.updates = 0
        # a plain MLP acts and learns on plain tensors, without autograd (same numbers:
        # mlp_forward, mlp_td_backward); not with the overlapped allreduce (autograd hooks)
        self.mlp = None if self.sync.overlap else mlp_layers(self.online)

    def _init_nets(self, layers, dp_comm) -> None:
        """Online net (broadcast from replica 0), target copy (no grad) and Adam, for ``layers``."""
        self.online = FlatModule(layers, self.device)
        self.target = FlatModule([_clone(m) for m in layers], self.device)
        broadcast_params(self.online, dp_comm)
        self.target.load_flat_(self.online.flat.data)
        for p in self.target.parameters():
            p.requires_grad_(False)
        self.opt = make_adam(self.online.flat, self.d)

    # -- acting ------------------------------------------------------------------------------
    @torch.no_grad()
    def q_values(self, obs: np.ndarray) -> np.ndarray:
        return self.online(torch.as_tensor(obs, device=self.device)).cpu().numpy()

    def greedy(self, obs: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(obs, device=self.device)
        if self.mlp is not None:
            return mlp_forward(self.mlp, x)[0].argmax(1).cpu().numpy()
        with torch.no_grad():
            return self.online(x).argmax(1).cpu().numpy()

    # -- learning ----------------------------------------------------------------------------
    def set_lr(self, lr: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr

    @torch.no_grad()
    def phase_targets(self, batches: list[Batch]):
        """Target-net Q(s', .) for every minibatch of a training phase in one forward pass, when
        the target net cannot change inside the phase (hard sync on phase boundaries: tau = 1
        and target_update_every a multiple of gradient_steps). Otherwise None. Same values as
        per-update forwards, far fewer calls (SB3's target_update_interval=10 env steps with
        train_freq 256 is exactly this case)."""
        d = self.d
        if d["tau"] < 1.0 or d["target_update_every"] % d["gradient_steps"] or len(batches) < 2:
            return None
        nxt = torch.as_tensor(np.concatenate([b.next_obs for b in batches]), device=self.device)
        # ~1k-row chunks: big enough for efficient GEMMs, small enough to stay in cache
        q = torch.cat([self.target(c) for c in torch.split(nxt, 1024)])
        return torch.split(q, len(batches[0].actions))

    def update(self, batch: Batch, q_next_target=None) -> dict:
        d = self.d
        b = to_tensors(batch, self.device)
        with torch.no_grad():
            q_next_t = self.target(b["next_obs"]) if q_next_target is None else q_next_target
            q_next_o = self.online(b["next_obs"]) if d["double"] else None
            y = td_target(b["returns"], b["discounts"], q_next_t, q_next_o)
        if self.mlp is None:
            self.online.zero_grad_()
            loss, td, q = td_loss(self.online(b["obs"]), b["actions"], y, b["weights"],
                                  d["huber_delta"])
            loss.backward()
        else:   # the same forward and gradients, written out (every gradient is overwritten)
            q_all, inputs = mlp_forward(self.mlp, b["obs"])
            loss, td, q = td_loss(q_all, b["actions"], y, b["weights"], d["huber_delta"])
            mlp_td_backward(self.mlp, inputs, q_all, q, b["actions"], y, b["weights"],
                            d["huber_delta"])
        self.step_optimizer()
        td_abs = td.abs().cpu().numpy() if self.cfg["replay"]["prioritized"] else None
        return {"loss": float(loss.detach()), "q": float(q.mean()), "td_abs": td_abs}

    def step_optimizer(self) -> None:
        """Allreduce-average the gradients, clip, Adam, maybe sync the target.

        Shared by every learner: a pipeline stage overrides only ``grad_norm`` (the norm over all
        of its replica's stages)."""
        self.sync()
        if self.d["max_grad_norm"] > 0:
            g = self.online.flat.grad
            coef = self.d["max_grad_norm"] / (float(self.grad_norm()) + 1e-6)
            if coef < 1.0:          # (a factor of 1 would change nothing: skip the pass)
                g.mul_(coef)
        adam_step(self.opt)
        self.updates += 1
        if self.updates % self.d["target_update_every"] == 0:
            self.sync_target()

    def grad_norm(self) -> torch.Tensor:
        """The L2 norm of the whole network's (averaged) gradient."""
        return torch.linalg.vector_norm(self.online.flat.grad)

    @torch.no_grad()
    def sync_target(self) -> None:
        tau = self.d["tau"]
        if tau >= 1.0:
            self.target.flat.data.copy_(self.online.flat.data)
        else:
            self.target.flat.data.lerp_(self.online.flat.data, tau)

    # -- what the training loop asks every learner ---------------------------------------------
    def check_consistency(self) -> None:
        check_consistent(self.online.checksum(), self.dp_comm)

    def sync_seconds(self) -> float:
        return self.sync.seconds

    def gather_online(self) -> np.ndarray:
        return self.online.numpy_data().copy()

    def gather_target(self) -> np.ndarray:
        return self.target.numpy_data().copy()

    def evaluate(self, run):
        """Run ``run(policy)`` on replica 0 (other replicas return None)."""
        return run(self.greedy) if self.dp_comm.Get_rank() == 0 else None

    def param_range(self) -> tuple[int, int]:
        """The range ``[lo, hi)`` of the flattened network's parameters held by this rank (all);
        ``param_ranges`` lists every stage's."""
        return self.param_ranges[0]

    def parameter_bytes(self) -> int:
        """Bytes of online + target parameters + Adam moments held by this rank."""
        return adam_model_bytes(self.online, self.target, self.opt)

    # -- state ---------------------------------------------------------------------------------
    def load_state_arrays(self, arrays: dict) -> None:
        """Load parameters, target, Adam moments and step (from a checkpoint), bit for bit."""
        self.online.load_flat_(arrays["online"])
        self.target.load_flat_(arrays["target"])
        step = float(np.asarray(arrays.get("adam_step", [0.0])).reshape(-1)[0])
        restore_adam(self.opt, self.online.flat, step, arrays.get("adam_exp_avg"),
                     arrays.get("adam_exp_avg_sq"))


def adam_model_bytes(online: FlatModule, target: FlatModule, opt) -> int:
    n = online.flat.numel() + target.flat.numel()
    st = opt.state.get(online.flat, {})
    moments = [v for k, v in st.items() if k in ("exp_avg", "exp_avg_sq") and torch.is_tensor(v)]
    n_moments = sum(v.numel() for v in moments) if moments else 2 * online.flat.numel()
    return 4 * (n + n_moments)


def make_adam(flat: torch.nn.Parameter, d: dict) -> torch.optim.Adam:
    """Adam on one flat parameter; the fused kernel where torch has it for this device."""
    try:
        return torch.optim.Adam([flat], lr=d["lr"], eps=d["adam_eps"], fused=True)
    except (RuntimeError, TypeError):  # pragma: no cover - older torch / unsupported device
        return torch.optim.Adam([flat], lr=d["lr"], eps=d["adam_eps"], foreach=False)


def adam_step(opt: torch.optim.Adam) -> None:
    """``opt.step()`` for our one-flat-parameter fused Adam, minus torch.optim's per-call Python
    overhead (hooks, profiler records: ~80 us, as much as the fused kernel itself for a CartPole
    net). Same state layout and the same kernel as torch's fused path, so results are bitwise
    equal (tests/test_dqn_math.py) and checkpoints see an ordinary torch Adam."""
    g = opt.param_groups[0]
    if not g.get("fused") or len(opt.param_groups) != 1 or len(g["params"]) != 1:
        opt.step()
        return
    p = g["params"][0]
    st = opt.state[p]
    if not st:   # torch's lazy init for the fused path
        from torch.optim.optimizer import _get_scalar_dtype

        st["step"] = torch.zeros((), dtype=_get_scalar_dtype(is_fused=True), device=p.device)
        st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    st["step"].add_(1)
    beta1, beta2 = g["betas"]
    with torch.no_grad():
        torch._fused_adam_([p], [p.grad], [st["exp_avg"]], [st["exp_avg_sq"]], [], [st["step"]],
                           lr=g["lr"], beta1=beta1, beta2=beta2, weight_decay=g["weight_decay"],
                           eps=g["eps"], amsgrad=False, maximize=False)


def restore_adam(opt: torch.optim.Adam, p: torch.nn.Parameter, step: float, exp_avg, exp_avg_sq) -> None:
    """Set Adam's state for ``p`` exactly as torch's lazy init would create it, filled with the
    given moments and step (step 0: no state, as before the first update)."""
    from torch.optim.optimizer import _get_scalar_dtype

    if step <= 0:
        opt.state.pop(p, None)
        return
    g = opt.param_groups[0]
    if g.get("capturable") or g.get("fused"):
        t = torch.zeros((), dtype=_get_scalar_dtype(is_fused=g.get("fused")), device=p.device)
    else:
        t = torch.tensor(0.0, dtype=_get_scalar_dtype(), device="cpu")
    t.fill_(step)
    opt.state[p] = {
        "step": t,
        "exp_avg": torch.as_tensor(np.asarray(exp_avg, np.float32)).to(p.device).clone(),
        "exp_avg_sq": torch.as_tensor(np.asarray(exp_avg_sq, np.float32)).to(p.device).clone()}


def _clone(m):
    import copy

    return copy.deepcopy(m)
