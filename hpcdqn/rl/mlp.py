"""A plain MLP Q-network's update written out: forward and the loss's backward on plain
tensors, op for op what autograd runs, minus autograd's per-node bookkeeping (~70 us of a
~470 us CartPole update) and nn.Module's per-call overhead.

Taken only for a network that is *exactly* ``nn.Linear`` (with bias) / ``nn.ReLU`` alternating
(type identity: a subclass such as a noisy or low-rank Linear computes something else and gets
autograd), when the aten backward kernels it calls exist in this torch, and after
``check_against_autograd`` agreed on the real network (``hpcdqn.learner.plan`` decides).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hpcdqn.rl.networks import unroll


@dataclass
class Dense:
    """One Linear layer of a plain MLP as plain tensors: views into the flat parameter and
    gradient buffers (so they follow every in-place update, load and target sync)."""
    w: torch.Tensor       # [out, in]
    w_t: torch.Tensor     # w.t(), what addmm takes
    b: torch.Tensor
    dw: torch.Tensor      # views into the flat gradient buffer
    db: torch.Tensor


def kernels_available() -> bool:
    """The aten backward kernels ``mlp_td_backward`` calls (private torch API: guarded)."""
    ops = getattr(torch, "ops", None)
    aten = getattr(ops, "aten", None) if ops is not None else None
    return all(hasattr(aten, k) for k in ("huber_loss_backward", "threshold_backward"))


def mlp_layers(net: nn.Module) -> list[Dense] | None:
    """The layers of a plain MLP (Linear, ReLU, Linear, ..., ReLU, Linear, each Linear with a
    bias and a ``.grad`` buffer), in order; None for any other network (CNN, dueling head, a
    Linear subclass, ...)."""
    leaves = unroll(net)
    linears = leaves[0::2]
    if not (len(leaves) % 2 == 1
            and all(type(m) is nn.Linear and m.bias is not None and m.weight.grad is not None
                    and m.bias.grad is not None for m in linears)
            and all(type(m) is nn.ReLU for m in leaves[1::2])):
        return None
    return [Dense(m.weight.detach(), m.weight.detach().t(), m.bias.detach(), m.weight.grad,
                  m.bias.grad) for m in linears]


def mlp_forward(layers: list[Dense], x: torch.Tensor):
    """Q-values of an MLP and the input of every layer (for ``mlp_td_backward``): the same ops as
    its modules (``nn.Linear`` on a batch is ``addmm``)."""
    inputs = []
    for i, layer in enumerate(layers):
        inputs.append(x)
        x = torch.addmm(layer.b, x, layer.w_t)
        if i < len(layers) - 1:
            x = torch.relu(x)
    return x, inputs


def mlp_td_backward(layers: list[Dense], inputs: list, g: torch.Tensor) -> None:
    """The gradient of the loss w.r.t. every MLP parameter, written into the gradient buffers
    (every one overwritten), from ``g`` = dL/dQ (the loss's ``output_grad``): op for op the
    ones autograd runs for ``loss(mlp(obs)).backward()`` so the result is bitwise the same
    (tests/learner/test_update_math.py). ``inputs``: from ``mlp_forward``.

    dL/dW = g^T x,  dL/db = sum_i g_i,  g_in = (g W) * [x > 0]   (Linear, ReLU)
    """
    for i in range(len(layers) - 1, -1, -1):
        layer, x = layers[i], inputs[i]
        torch.sum(g, 0, out=layer.db)
        torch.mm(g.t(), x, out=layer.dw)
        if i > 0:   # x = relu(previous layer): the gradient passes where x > 0 (aten's kernel)
            g = torch.ops.aten.threshold_backward(g.mm(layer.w), x, 0)


def check_against_autograd(net: nn.Module, layers: list[Dense], grad: torch.Tensor,
                           in_features: int, loss, rows: int = 16) -> float:
    """The largest |difference| between the hand-written and autograd gradients of ``loss``
    (``rl.losses``) on ``net`` (whose parameters' gradients are views into ``grad``) for a
    synthetic batch, relative to the largest |gradient| (0: bitwise equal).
    Uses its own random generator (the global RNG streams are untouched) and leaves ``grad``
    zeroed; parameters are not changed."""
    gen = torch.Generator(device="cpu").manual_seed(12345)
    dev = layers[0].w.device
    obs = torch.randn(rows, in_features, generator=gen).to(dev)
    labels, target = loss.example(rows, layers[-1].w.shape[0], gen, dev)
    grad.zero_()
    loss(net(obs), labels, target)[0].backward()
    auto = grad.detach().clone()
    with torch.no_grad():
        q_all, inputs = mlp_forward(layers, obs)
        mlp_td_backward(layers, inputs, loss.output_grad(q_all, labels, target, 1.0))
    diff = scale = 0.0
    g, chunk = grad.detach(), 1 << 20      # compared a chunk at a time: no full-size temporaries
    for i in range(0, g.numel(), chunk):
        a = auto[i:i + chunk]
        diff = max(diff, float((g[i:i + chunk] - a).abs().max()))
        scale = max(scale, float(a.abs().max()))
    grad.zero_()
    return diff / scale if scale > 0 else diff
