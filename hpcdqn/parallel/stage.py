"""One pipeline stage's chunk runtime, as torch's ``distributed.pipelining.PipelineStage``: the
stage's slice of the layers, its link to its neighbours, its forward and backward of one
micro-batch chunk, the activations it keeps between them, and the MPI tags they travel under. It knows nothing of
the model's loss: the last stage calls the ``loss_fn`` it was handed. ``run_schedule`` drives
the chunks in the order of the op list (``pipeline.schedule_ops``), as a torch ``pipelining``
schedule drives its stage.

A forward chunk ``F(m)`` runs the trained forward (kept for the backward, with autograd or on
the hand-written MLP path) and then each *side* forward (no gradient: e.g. a target network on
other inputs), each sent on as soon as it is computed so the next stage can start. A backward
chunk ``B(m)`` sends the gradient w.r.t. the stage's input to the previous stage; on the
hand-written path the weight gradients wait for ``backward_weight_one_chunk`` (``W(m)``).
"""

from __future__ import annotations

import torch

from hpcdqn.parallel import stage_mlp
from hpcdqn.parallel.pipeline import (TAG_ACT, TAG_DBL, TAG_GRAD, TAG_TGT, StageLink, as_np,
                                      schedule_ops)

# the tags of the side forwards, in the order they run in ``F(m)``
SIDE_TAGS = (TAG_TGT, TAG_DBL)


class PipelineStage:
    """Stage ``index`` of ``n_stages`` over ``pp_comm``. ``module``: this stage's slice of the
    layers, the one trained (its hand-written ops ``mlp`` where the plan took that path, else
    None: autograd)."""

    def __init__(self, pp_comm, index: int, n_stages: int, module, device, mlp=None):
        self.index, self.n_stages = index, n_stages
        self.first, self.last = index == 0, index == n_stages - 1
        self.module, self.device, self.mlp = module, torch.device(device), mlp
        self.link = StageLink(pp_comm, index, n_stages)
        self.out_shapes: dict = {}
        self.begin_step([], (), None)

    def to_device(self, arr) -> torch.Tensor:
        """A received numpy array as a tensor on this stage's device."""
        t = torch.from_numpy(arr)
        return t.to(self.device) if self.device.type != "cpu" else t

    @torch.no_grad()
    def output_shape(self, in_shape: tuple, dtype) -> tuple:
        """Per-sample shape of this stage's output for a per-sample input shape (cached)."""
        key = (tuple(in_shape), str(dtype))
        if key not in self.out_shapes:
            y = self.module(torch.zeros((1, *in_shape), dtype=dtype, device=self.device))
            self.out_shapes[key] = tuple(y.shape[1:])
        return self.out_shapes[key]

    def begin_step(self, splits, in_shape, out_shape, feed=None, side=(), loss_fn=None) -> None:
        """One step's chunks: ``splits`` the micro-batch rows, ``in_shape`` / ``out_shape`` the
        per-sample activation shapes in and out of this stage (out: None on the last stage).
        ``feed(m, k)`` (first stage): input ``k`` of micro-batch ``m`` (0: the trained forward's,
        1 + i: side forward i's). ``side``: the no-grad modules run after the trained forward.
        ``loss_fn(m, y, side_outputs)`` (last stage): returns ``(loss, output_grad)``, the loss
        to backpropagate (autograd) or a callable giving dL/dy (hand-written path)."""
        if len(side) > len(SIDE_TAGS):
            raise ValueError(f"at most {len(SIDE_TAGS)} side forwards, got {len(side)}")
        self.splits, self.in_shape, self.out_shape = splits, in_shape, out_shape
        self.feed, self.side, self.loss_fn = feed, tuple(side), loss_fn
        self.saved: dict = {}
        self.work: dict = {}
        self.grads_written = False     # (hand-written path) has a W of this step run yet

    def _arrive(self, m: int, k: int, tag: int, grad: bool = False) -> torch.Tensor:
        if self.first:
            return self.feed(m, k)
        lo, hi = self.splits[m]
        t = self.to_device(self.link.recv((hi - lo, *self.in_shape), self.index - 1, tag))
        return t.requires_grad_() if grad and self.mlp is None else t

    def _pass_on(self, y: torch.Tensor, tag: int) -> None:
        if not self.last:
            self.link.isend(as_np(y), self.index + 1, tag)

    def forward_one_chunk(self, m: int) -> None:
        """F(m): the trained forward, then the side forwards; the last stage calls the loss. On
        the hand-written path a side forward of the trained module itself (double DQN's online
        net on the next observations) rides in the trained forward's GEMMs (its rows appended:
        one pass over the weights instead of two; both results are sent before the other side
        forwards run), on every micro-batch but the first: the next stage waits for the first
        message of F(0) (the pipeline's start-up lag), which fusing would double."""
        x = self._arrive(m, 0, TAG_ACT, grad=True)
        outs: list = [None] * len(self.side)
        fused = self._fused_side() if m > 0 else None
        if self.mlp is not None:
            with torch.no_grad():
                if fused is None:
                    y, keep = stage_mlp.forward(self.mlp, x)
                else:
                    x2 = self._arrive(m, 1 + fused, SIDE_TAGS[fused])
                    y2, keep = stage_mlp.forward(self.mlp, torch.cat([x, x2]))
                    y, outs[fused] = y2[:x.shape[0]], y2[x.shape[0]:]
                    keep = stage_mlp.first_rows(keep, x.shape[0])
        else:
            y, keep = self.module(x), None
        self._pass_on(y, TAG_ACT)
        if fused is not None:
            self._pass_on(outs[fused], SIDE_TAGS[fused])
        with torch.no_grad():
            for i, module in enumerate(self.side):
                if i != fused:
                    outs[i] = module(self._arrive(m, 1 + i, SIDE_TAGS[i]))
                    self._pass_on(outs[i], SIDE_TAGS[i])
        if not self.last:
            self.saved[m] = (x, y, keep, None)
            return
        loss, output_grad = self.loss_fn(m, y, outs)
        if self.mlp is not None:       # the hand-written backward starts from ``output_grad``
            self.saved[m] = (x, y, keep, output_grad)
        else:
            self.saved[m] = (x, loss, None, None)

    def _fused_side(self) -> int | None:
        """The index of the side forward that is the trained module itself (hand-written path
        only; the same on every stage: the plan takes that path on all or none)."""
        if self.mlp is None:
            return None
        return next((i for i, mod in enumerate(self.side) if mod is self.module), None)

    def backward_one_chunk(self, m: int) -> None:
        """B(m): the gradient w.r.t. this stage's input, sent to the previous stage (on the
        hand-written path the weight gradients are left to ``backward_weight_one_chunk``;
        autograd does all)."""
        x, y, keep, output_grad = self.saved.pop(m)
        if self.last and self.mlp is not None:
            g = output_grad()
        elif not self.last:
            lo, hi = self.splits[m]
            g = self.to_device(self.link.recv((hi - lo, *self.out_shape), self.index + 1, TAG_GRAD))
        if self.mlp is not None:
            gx, self.work[m] = stage_mlp.backward_input(self.mlp, keep, g, not self.first)
        else:
            if y.requires_grad:
                y.backward() if self.last else y.backward(g)
            gx = None if self.first else (x.grad if x.grad is not None else torch.zeros_like(x))
        if not self.first:
            self.link.isend(as_np(gx), self.index - 1, TAG_GRAD)

    def backward_weight_one_chunk(self, m: int) -> None:
        """W(m): the weight gradients of micro-batch ``m`` (hand-written path; autograd's
        backward already did them). The step's first W writes the gradient buffers (no zeroing
        pass before the step: ``grads_written``), the others add to them."""
        work = self.work.pop(m, None)
        if work is not None:
            stage_mlp.backward_weights(work, overwrite=not self.grads_written)
            self.grads_written = True


def run_schedule(stage: PipelineStage, schedule: str) -> None:
    """Drive ``stage`` through one step (set by ``begin_step``) in the op list's order
    (``pipeline.schedule_ops``): F, B and, for ``zbh1``, a separate W per micro-batch."""
    for kind, m in schedule_ops(schedule, stage.index, stage.n_stages, len(stage.splits)):
        stage.link.progress()
        if kind == "F":
            stage.forward_one_chunk(m)
        elif kind == "B":
            stage.backward_one_chunk(m)
            if schedule != "zbh1":        # no separate weight-gradient step
                stage.backward_weight_one_chunk(m)
        else:
            stage.backward_weight_one_chunk(m)
