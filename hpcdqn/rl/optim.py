"""Adam on one flat parameter vector: torch's fused kernel called directly, with guarded
fallbacks to the public ``torch.optim.Adam.step`` wherever a private torch API is missing."""

from __future__ import annotations

import numpy as np
import torch


def scalar_dtype(fused: bool = False) -> torch.dtype:
    """The dtype torch.optim keeps Adam's ``step`` in (``torch.optim.optimizer._get_scalar_dtype``,
    private: mirrored when it is missing)."""
    try:
        from torch.optim.optimizer import _get_scalar_dtype
    except ImportError:   # pragma: no cover - depends on the torch version
        return torch.float32 if fused or torch.get_default_dtype() != torch.float64 else torch.float64
    return _get_scalar_dtype(is_fused=fused) if fused else _get_scalar_dtype()


def direct_fused_available() -> bool:
    """Whether ``adam_step`` can call the fused kernel itself (private API ``torch._fused_adam_``)."""
    return callable(getattr(torch, "_fused_adam_", None))


def make_adam(flat: torch.nn.Parameter, d: dict) -> torch.optim.Adam:
    """Adam on one flat parameter; the fused kernel where torch has it for this device."""
    try:
        return torch.optim.Adam([flat], lr=d["lr"], eps=d["adam_eps"], fused=True)
    except (RuntimeError, TypeError):  # pragma: no cover - older torch / unsupported device
        return torch.optim.Adam([flat], lr=d["lr"], eps=d["adam_eps"], foreach=False)


def uses_direct_kernel(opt: torch.optim.Optimizer) -> bool:
    if not isinstance(opt, torch.optim.Adam):
        return False
    g = opt.param_groups[0]
    return bool(g.get("fused")) and len(opt.param_groups) == 1 and len(g["params"]) == 1 \
        and direct_fused_available()


def adam_step(opt: torch.optim.Adam) -> None:
    """``opt.step()`` for our one-flat-parameter fused Adam, minus torch.optim's per-call Python
    overhead (hooks, profiler records: ~80 us, as much as the fused kernel itself for a CartPole
    net). Same state layout and the same kernel as torch's fused path, so results are bitwise
    equal (tests/learner/test_update_math.py) and checkpoints see an ordinary torch Adam.
    Anything else (not fused, several parameters, no ``torch._fused_adam_``): ``opt.step()``."""
    if not uses_direct_kernel(opt):
        opt.step()
        return
    g = opt.param_groups[0]
    p = g["params"][0]
    st = opt.state[p]
    if not st:   # torch's lazy init for the fused path
        st["step"] = torch.zeros((), dtype=scalar_dtype(fused=True), device=p.device)
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
    if step <= 0:
        opt.state.pop(p, None)
        return
    g = opt.param_groups[0]
    if g.get("capturable") or g.get("fused"):
        t = torch.zeros((), dtype=scalar_dtype(fused=bool(g.get("fused"))), device=p.device)
    else:
        t = torch.tensor(0.0, dtype=scalar_dtype(), device="cpu")
    t.fill_(step)
    opt.state[p] = {
        "step": t,
        "exp_avg": torch.as_tensor(np.asarray(exp_avg, np.float32)).to(p.device).clone(),
        "exp_avg_sq": torch.as_tensor(np.asarray(exp_avg_sq, np.float32)).to(p.device).clone()}


def adam_state(opt: torch.optim.Adam, p: torch.nn.Parameter) -> tuple[float, torch.Tensor | None,
                                                                     torch.Tensor | None]:
    """(step, exp_avg, exp_avg_sq) of ``p``; (0, None, None) before the first update."""
    st = opt.state.get(p, {})
    if not st:
        return 0.0, None, None
    return float(st["step"]), st["exp_avg"], st["exp_avg_sq"]


# -- the optimizer the config names (dqn.optimizer): Adam, or RMSprop (the MinAtar paper) ---------
# A checkpoint keeps two moment vectors per stage under the names Adam gives them ('exp_avg',
# 'exp_avg_sq') and the step count ('adam_step'); RMSprop's are its gradient average (centered
# only; zeros otherwise) and its squared-gradient average.

def make_optimizer(flat: torch.nn.Parameter, d: dict) -> torch.optim.Optimizer:
    """``dqn.optimizer`` on one flat parameter: fused Adam (``make_adam``) or torch's RMSprop
    (single-tensor path, no momentum)."""
    if d.get("optimizer", "adam") == "rmsprop":
        return torch.optim.RMSprop([flat], lr=d["lr"], alpha=d["rmsprop_alpha"],
                                   eps=d["rmsprop_eps"], centered=d["rmsprop_centered"],
                                   foreach=False)
    return make_adam(flat, d)


def optimizer_step(opt: torch.optim.Optimizer) -> None:
    if isinstance(opt, torch.optim.Adam):
        adam_step(opt)
    else:
        opt.step()


def optimizer_state(opt: torch.optim.Optimizer, p: torch.nn.Parameter):
    """(step, first moment, second moment) of ``p``; (0, None, None) before the first update.
    RMSprop: (step, grad_avg or zeros when not centered, square_avg)."""
    if isinstance(opt, torch.optim.Adam):
        return adam_state(opt, p)
    st = opt.state.get(p, {})
    if not st:
        return 0.0, None, None
    m1 = st.get("grad_avg")
    return float(st["step"]), (m1 if m1 is not None else torch.zeros_like(p.data)), st["square_avg"]


def restore_optimizer(opt: torch.optim.Optimizer, p: torch.nn.Parameter, step: float, m1, m2) -> None:
    """Set the optimizer's state for ``p`` exactly as its lazy init would create it, filled with
    the given moments and step (step 0: no state)."""
    if isinstance(opt, torch.optim.Adam):
        restore_adam(opt, p, step, m1, m2)
        return
    if step <= 0:
        opt.state.pop(p, None)
        return
    g = opt.param_groups[0]

    def vec(a):
        return torch.as_tensor(np.asarray(a, np.float32)).to(p.device).clone()

    st = {"step": torch.tensor(float(step), dtype=scalar_dtype()), "square_avg": vec(m2)}
    if g["momentum"] > 0:      # (hpcdqn makes none; torch's layout if one were made)
        st["momentum_buffer"] = torch.zeros_like(p.data)
    if g["centered"]:
        st["grad_avg"] = vec(m1)
    opt.state[p] = st
