"""The hand-written MLP backward (``rl.mlp``) for one pipeline stage of a plain MLP, split in two
passes as the zero-bubble schedules need them (Qi et al. 2023, "Zero Bubble Pipeline
Parallelism"):

- ``backward_input`` (B): the gradient w.r.t. the stage's input, which the previous stage waits
  for (on the critical path), and the list of weight-gradient products still to do;
- ``backward_weights`` (W): those products, added in place into the flat gradient buffer
  (``dW += g^T x``, ``db += sum_i g_i``), which nothing downstream waits for.

A stage holds whole ``nn.Linear`` / ``nn.ReLU`` leaves and, where a boundary falls inside a
Linear layer, ``partition.LinearPiece`` leaves (rows of the layer; the input passes through, see
its docstring). The ops are the ones autograd runs for those modules (``addmm``, ``mm``,
``threshold_backward``; the last stage starts from the loss's ``output_grad``), so the gradients equal autograd's up to the
order of floating-point accumulation; ``hpcdqn.learner.plan`` checks them against autograd on
the real stage at start-up (``check_against_autograd``) before taking this path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hpcdqn.parallel.partition import LinearPiece
from hpcdqn.rl.mlp import kernels_available
from hpcdqn.rl.networks import unroll


@dataclass
class StageOp:
    """One leaf of a stage as plain tensors (views into the flat parameter/gradient buffers)."""
    kind: str                        # linear | relu | piece
    w: torch.Tensor | None = None    # [rows, in]
    w_t: torch.Tensor | None = None
    b: torch.Tensor | None = None
    dw: torch.Tensor | None = None
    db: torch.Tensor | None = None
    first: bool = True               # (piece) the layer's first / last piece
    last: bool = True
    in_features: int = 0
    r0: int = 0                      # (piece) its first output row
    relu: bool = False               # (piece) the layer's activation follows (last piece)


def stage_ops(net: nn.Module) -> list[StageOp] | None:
    """The leaves of a plain-MLP stage as ``StageOp``s; None for anything else (type identity,
    as ``rl.mlp.mlp_layers``: subclasses compute something else)."""
    ops = []
    for m in unroll(net):
        if type(m) is nn.ReLU:
            ops.append(StageOp("relu"))
        elif type(m) is nn.Linear and m.bias is not None and m.weight.grad is not None:
            ops.append(StageOp("linear", m.weight.detach(), m.weight.detach().t(), m.bias.detach(),
                               m.weight.grad, m.bias.grad))
        elif (type(m) is LinearPiece and m.weight.grad is not None
              and (m.act is None or type(m.act) is nn.ReLU) and (not m.last or m.bias is not None)):
            b = m.bias.detach() if m.bias is not None else None
            ops.append(StageOp("piece", m.weight.detach(), m.weight.detach().t(), b, m.weight.grad,
                               m.bias.grad if m.bias is not None else None, m.first, m.last,
                               m.in_features, m.r0, m.act is not None))
        else:
            return None
    return ops if ops and kernels_available() else None


def forward(ops: list[StageOp], x: torch.Tensor):
    """The stage's output and what its backward needs (no autograd)."""
    saved = []
    for op in ops:
        if op.kind == "linear":
            saved.append(x)
            x = torch.addmm(op.b, x, op.w_t)
        elif op.kind == "relu":
            x = torch.relu(x)
            saved.append(x)
        else:
            xin = x if op.first else x[:, :op.in_features]
            h = xin.mm(op.w_t)
            zw = x.shape[1]
            if not op.last:
                saved.append((xin, None, zw))
                x = torch.cat([x, h], dim=1)
                continue
            y = h if op.first else torch.cat([x[:, op.in_features:], h], dim=1)
            y = y + op.b
            if op.relu:
                y = torch.relu(y)
            saved.append((xin, y if op.relu else None, zw))
            x = y
    return x, saved


def backward_input(ops: list[StageOp], saved: list, g: torch.Tensor, need_input: bool):
    """B: the gradient w.r.t. the stage's input (None where ``need_input`` is False: the first
    stage) and the weight-gradient work left for ``backward_weights``."""
    work = []
    for i in range(len(ops) - 1, -1, -1):
        op, s = ops[i], saved[i]
        more = i > 0 or need_input
        if op.kind == "relu":
            g = torch.ops.aten.threshold_backward(g, s, 0)
        elif op.kind == "linear":
            work.append((g, s, op.dw, g, op.db))
            g = g.mm(op.w) if more else None
        else:
            g = _piece_backward(op, s, g, work, more)
    return g, work


def _piece_backward(op: StageOp, s, g, work: list, more: bool):
    xin, out, zw = s
    if not op.last:                       # output [z, h]
        gz, gh = g[:, :zw], g[:, zw:]
        work.append((gh, xin, op.dw, None, None))
        if not more:
            return None
        gx = gh.mm(op.w)
        if op.first:
            return gz + gx
        return torch.cat([gz[:, :op.in_features] + gx, gz[:, op.in_features:]], dim=1)
    if out is not None:
        g = torch.ops.aten.threshold_backward(g, out, 0)
    gh = g[:, op.r0:]
    work.append((gh, xin, op.dw, g, op.db))
    if not more:
        return None
    gx = gh.mm(op.w)
    return gx if op.first else torch.cat([gx, g[:, :op.r0]], dim=1)


def backward_weights(work: list, overwrite: bool = False) -> None:
    """W: every weight and bias gradient of one micro-batch, added into the gradient buffers
    (``overwrite``: written over them, as adding to zeroed buffers would, bit for bit)."""
    for gw, x, dw, gb, db in work:
        if overwrite:
            torch.mm(gw.t(), x, out=dw)
            if db is not None:
                torch.sum(gb, 0, out=db)
            continue
        dw.addmm_(gw.t(), x)
        if db is not None:
            db.add_(gb.sum(0))


def first_rows(saved: list, rows: int) -> list:
    """What ``forward`` kept for the backward, cut to the first ``rows`` rows (a forward of
    several inputs stacked by rows, of which only the first is backpropagated). Copies: a view
    would keep the whole stacked tensor alive until the backward: twice the activations the
    memory planner counts (``learner.budget.activation_bytes``)."""
    out = []
    for s in saved:
        if isinstance(s, tuple):
            xin, y, zw = s
            out.append((xin[:rows].clone(), None if y is None else y[:rows].clone(), zw))
        else:
            out.append(s[:rows].clone())
    return out


def check_against_autograd(online, ops: list[StageOp], in_width: int, last: bool,
                           need_input: bool, loss, rows: int = 16) -> float:
    """The largest |hand-written - autograd| over the stage's parameter gradients and its input
    gradient, relative to the largest autograd value, on a synthetic micro-batch (its own
    generator; leaves the gradient buffer zeroed). ``loss`` (``rl.losses``): the last stage's;
    its ``output_grad`` starts the hand-written backward there."""
    gen = torch.Generator(device="cpu").manual_seed(12345)
    dev, grad = online.flat.device, online.flat.grad
    x = torch.randn(rows, in_width, generator=gen).to(dev)
    grad.zero_()
    xa = x.clone().requires_grad_(need_input)
    y = online(xa)
    if last:
        labels, target = loss.example(rows, y.shape[1], gen, dev)
        (loss(y, labels, target)[0] * 0.5).backward()
    else:
        gy = torch.randn(y.shape, generator=gen).to(dev)
        y.backward(gy)
    auto, auto_x = grad.detach().clone(), (xa.grad if need_input else None)
    grad.zero_()
    with torch.no_grad():
        out, saved = forward(ops, x)
        if last:
            gy = loss.output_grad(out, labels, target, 0.5)
        gx, work = backward_input(ops, saved, gy, need_input)
        backward_weights(work)
    pairs = [(grad.detach(), auto)] + ([(gx, auto_x)] if need_input else [])
    diff = scale = 0.0
    for mine, ref in pairs:      # a chunk at a time: no full-size temporaries
        mine, ref, chunk = mine.flatten(), ref.flatten(), 1 << 20
        for i in range(0, ref.numel(), chunk):
            diff = max(diff, float((mine[i:i + chunk] - ref[i:i + chunk]).abs().max()))
            scale = max(scale, float(ref[i:i + chunk].abs().max()))
    grad.zero_()
    return diff / scale if scale > 0 else diff


def input_width(ops: list[StageOp]) -> int:
    """The width of the activation a stage of these ops takes."""
    op = ops[0]
    return op.w.shape[1] if op.kind == "linear" or op.first else op.in_features + op.r0
