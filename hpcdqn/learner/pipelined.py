"""The pipeline learner: one stage of one data-parallel replica's Q-network on this rank.

The stages of a replica run the operations of ``hpcdqn.parallel.pipeline`` (its docstring has
the protocol: header, micro-batches, schedules, tags) over ``grid.pp_comm``; each stage's
gradients are averaged over ``grid.dp_comm`` by the shared ``StageLearner`` step. Every public
operation here is a collective over the replica's stages: the first stage passes data, the
others pass ``None`` and learn what to do from the header.

As torch's ``distributed.pipelining``: a ``parallel.stage.PipelineStage`` (which knows nothing
of DQN) owns this stage's slice of the layers and its link, runs one forward, backward or
weight-gradient chunk and keeps the activations between them; ``parallel.stage.run_schedule``
drives it in the op list's order (``schedule_ops``); the last stage calls the loss handed to it
(``rl.losses``), so a new loss never touches the point-to-point runtime. What stays here is
the learner: the batch and its labels, the optimizer step, the gradient allreduce over dp
(``StageLearner``) and the greedy forwards for acting and evaluation.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import torch

from hpcdqn.config import LearnerConfig
from hpcdqn.learner.base import StageLearner
from hpcdqn.parallel.flat import FlatModule
from hpcdqn.parallel import stage_mlp
from hpcdqn.parallel.grid import mpi
from hpcdqn.parallel.layout import stage_bounds
from hpcdqn.parallel.partition import describe, param_ranges, stage_modules
from hpcdqn.parallel.pipeline import (OP_GREEDY, OP_QVALUES, OP_STOP, OP_UPDATE, TAG_INFER,
                                      TAG_INFER_OUT, TAG_LABELS, TAG_RESULT, as_np, micro_splits)
from hpcdqn.parallel.stage import PipelineStage, run_schedule
from hpcdqn.rl.losses import batch_labels, greedy_actions
from hpcdqn.rl.td import to_tensors


class StageInference:
    """The forward passes of one pipeline stage for acting and evaluation (collectives over the
    replica's stages). Needs ``online`` (this stage's FlatModule), ``pp_stage`` (its
    ``parallel.stage.PipelineStage``) and its ``link``, ``grid``, ``n_stages``, ``stage``,
    ``first``, ``last``, ``device`` and ``loss`` (``rl.losses``: Q-values and greedy actions
    from the last stage's output)."""

    # -- acting -----------------------------------------------------------------------------------
    def greedy(self, obs, needed: bool = True):
        """Collective over the replica's stages: greedy actions on the first stage (None
        elsewhere). Always runs (``needed`` is ignored: the other stages cannot know it)."""
        return self._infer(obs, OP_GREEDY)

    def q_values(self, obs):
        """Collective over the replica's stages: Q-values on the first stage (None elsewhere)."""
        return self._infer(obs, OP_QVALUES)

    @torch.no_grad()
    def _infer(self, obs, op: int):
        link = self.link
        if not self.first:
            _, batch, _, in_shape = link.recv_header(expect=(op,))
            self._serve_infer(op, batch, in_shape)
            return None
        x = torch.as_tensor(obs, device=self.device)
        batch = x.shape[0]
        link.send_header(op, batch, 1, self.pp_stage.output_shape(tuple(x.shape[1:]), x.dtype))
        link.isend(as_np(self.online(x)), self.stage + 1, TAG_INFER)
        if op == OP_GREEDY:
            out = link.recv(batch, self.n_stages - 1, TAG_INFER_OUT, np.int64)
        else:
            out = link.recv_floats_of_unknown_width(batch, self.n_stages - 1, TAG_INFER_OUT)
        link.finish_sends()
        return out

    @torch.no_grad()
    def _serve_infer(self, op: int, batch: int, in_shape: tuple) -> None:
        link = self.link
        x = self.pp_stage.to_device(link.recv((batch, *in_shape), self.stage - 1, TAG_INFER))
        if not self.last:
            link.send_header(op, batch, 1, self.pp_stage.output_shape(in_shape, x.dtype))
        y = self.online(x)
        if not self.last:
            link.isend(as_np(y), self.stage + 1, TAG_INFER)
        elif op == OP_GREEDY:
            link.isend(greedy_actions(y, self.loss).cpu().numpy().astype(np.int64), 0, TAG_INFER_OUT)
        else:
            link.isend(as_np(self.loss.q_values(y)), 0, TAG_INFER_OUT)
        link.finish_sends()

    def evaluate(self, run):
        """Collective over the replica's stages: replica 0's first stage runs
        ``run(self.greedy)`` while its other stages serve forward passes until told to stop;
        the result is returned on world rank 0, None elsewhere."""
        link = self.link
        if self.grid.dp_rank != 0:
            return None
        if self.first:
            res = run(self.greedy)
            link.send_header(OP_STOP)
            link.finish_sends()
            return res
        while True:
            op, batch, _, in_shape = link.recv_header(expect=(OP_GREEDY, OP_QVALUES, OP_STOP))
            if op == OP_STOP:
                link.send_header(OP_STOP)
                link.finish_sends()
                return None
            self._serve_infer(op, batch, in_shape)


class StagePolicy(StageInference):
    """One stage of a trained network for greedy evaluation with the run's own pp (``mpirun
    -n <pp> hpcdqn eval RUN``): this stage's online parameters only, no target, gradients or
    optimizer state. ``online``: the stage's FlatModule (``store.modelfile.load_model_stage``);
    ``loss``: the run's (``rl.losses.make_loss``): the last stage's Q-values come from it."""

    def __init__(self, online: FlatModule, grid, loss, device="cpu"):
        if grid.pp < 2:
            raise ValueError("StagePolicy needs pp >= 2: on one rank, use the whole network")
        self.online, self.grid, self.device = online, grid, torch.device(device)
        self.loss = loss
        self.n_stages, self.stage = grid.pp, grid.pp_rank
        self.first, self.last = grid.is_first_stage, grid.is_last_stage
        self.pp_stage = PipelineStage(grid.pp_comm, self.stage, self.n_stages, online, self.device)
        self.link = self.pp_stage.link


class PipelineLearner(StageInference, StageLearner):
    """One pipeline stage of one data-parallel replica (``grid.pp_rank`` of ``grid.pp``)."""

    def __init__(self, layers, cfg: LearnerConfig, grid, device="cpu", seed: int | None = None,
                 stages=None, loss=None):
        """``layers``: the whole network, real or (with ``seed``) on the meta device; this rank
        materialises only its stage (rows of a cut layer included). ``stages``: the run
        layout's stage bounds (``parallel.layout``; None: cut here by the same rule). ``loss``:
        ``rl.losses`` (None: the config's), called by the last stage only."""
        if grid.pp < 2:
            raise ValueError("PipelineLearner needs pp >= 2; use DataParallelLearner for pp=1")
        self.grid = grid
        self.n_stages, self.stage = grid.pp, grid.pp_rank
        self.first, self.last = grid.is_first_stage, grid.is_last_stage
        self.stages = list(stages or stage_bounds(layers, grid.pp, cfg.network))
        self.param_ranges = param_ranges(layers, self.stages)
        self.stage_sizes = [b - a for a, b in self.param_ranges]
        self.stage_contents = describe(self.stages)
        lo, hi = self.param_ranges[self.stage]
        super().__init__(stage_modules(layers, *self.stages[self.stage]), cfg, grid.dp_comm,
                         device, pipeline=True, init=(layers, lo, hi, seed),
                         stage_ends=(self.first, self.last), loss=loss)
        if self.online.numel != self.stage_sizes[self.stage]:
            raise RuntimeError(f"stage {self.stage} holds {self.online.numel} parameters, its "
                               f"range {self.param_ranges[self.stage]} says {self.stage_sizes[self.stage]}")
        self.pp_comm = grid.pp_comm
        self.micro = cfg.micro_batches
        self.schedule = cfg.schedule
        self.plan = self._plan_per_stage()
        # the hand-written stage backward where the plan took it (``parallel.stage_mlp``)
        self.mlp = stage_mlp.stage_ops(self.online.net) if self.plan.gradient == "mlp-manual" else None
        # this stage's chunk runtime (its link, chunks, kept activations; ``parallel.stage``)
        self.pp_stage = PipelineStage(grid.pp_comm, self.stage, self.n_stages, self.online,
                                      self.device, self.mlp)
        self.link = self.pp_stage.link
        # timing (seconds): blocked inside the F/B schedule, inside it; blocked on the other
        # stages anywhere in an update (receives, send completion, the norm over pp_comm);
        # whole updates
        self.schedule_wait_seconds = 0.0
        self.schedule_seconds = 0.0
        self.update_link_wait_seconds = 0.0
        self.norm_wait_seconds = 0.0
        self.update_seconds = 0.0

    def _plan_per_stage(self):
        """Collective over pp_comm: this stage's plan, its notes naming every stage's gradient
        path (what rank 0 prints at start and summary.json records). One path per network: the
        hand-written backward only where every stage can take it (a CNN's dense head alone
        stays on autograd, as the CNN does on one rank)."""
        paths = ("mlp-manual", "autograd-accumulate", "autograd")
        mine = np.array([paths.index(self.plan.gradient)], dtype=np.int64)
        every = np.empty(self.n_stages, dtype=np.int64)
        self.pp_comm.Allgather([mine, mpi().INT64_T], [every, mpi().INT64_T])
        plan, notes = self.plan, list(self.plan.notes)
        if (every != 0).any():           # (every rank sees the same ``every``)
            if plan.gradient == "mlp-manual":
                plan = dataclasses.replace(plan, gradient="autograd-accumulate")
                self.online.accumulate_grads_in_place()
                notes.append("hand-written backward off: not every stage is a plain MLP")
            every[every == 0] = 1
        notes.append("gradient per stage: " + ", ".join(f"{s}: {paths[int(c)]}"
                                                        for s, c in enumerate(every)))
        if self.schedule == "zbh1" and plan.gradient != "mlp-manual":
            notes.append("zbh1 on autograd: the weight gradients run inside B (no B/W split)")
        return dataclasses.replace(plan, notes=(*notes, f"schedule={self.schedule}"))

    # -- learning ---------------------------------------------------------------------------------
    def phase_targets(self, batches):
        """The target forwards are pipelined with the updates (no phase-wide pass here)."""
        return None

    def update(self, batch, q_next_target=None) -> dict:
        """Collective over the replica's stages, then dp_comm: ``batch`` on the first stage,
        None on the others (``q_next_target`` is unused: the target forwards are pipelined)."""
        t_start, w_start = time.perf_counter(), self.link.wait_seconds
        b = None
        if self.first:
            b = to_tensors(batch, self.device)
            n, micro = int(b["obs"].shape[0]), self.micro
            in_shape, in_dtype = tuple(b["obs"].shape[1:]), b["obs"].dtype
        else:
            _, n, micro, in_shape = self.link.recv_header(expect=(OP_UPDATE,))
            in_dtype = torch.float32
        splits = micro_splits(n, micro)
        out_shape = None if self.last else self.pp_stage.output_shape(in_shape, in_dtype)
        self.link.send_header(OP_UPDATE, n, len(splits), out_shape)
        lab = self._labels(batch, n)
        if self.mlp is None:     # (the hand-written path's first W writes the gradients)
            self.online.zero_grad_()
        t_sched, w_sched = time.perf_counter(), self.link.wait_seconds
        loss_sum, td_parts, q_parts = self._run_schedule(b, lab, splits, in_shape, out_shape, n)
        self.schedule_seconds += time.perf_counter() - t_sched
        self.schedule_wait_seconds += self.link.wait_seconds - w_sched
        out = self._report(loss_sum, td_parts, q_parts, len(splits), n)
        self.link.finish_sends()
        self.update_link_wait_seconds += self.link.wait_seconds - w_start
        self.step_optimizer()
        self.update_seconds += time.perf_counter() - t_start
        return out

    def _labels(self, batch, n: int) -> dict | None:
        """The loss's named label arrays, first stage -> last stage (one message each, in the
        loss's order); on the last stage: {name: tensor}, None elsewhere."""
        if self.first:
            for arr in batch_labels(batch, self.loss).values():
                self.link.isend(arr, self.n_stages - 1, TAG_LABELS)
        if not self.last:
            return None
        return {k: self.pp_stage.to_device(self.link.recv(n, 0, TAG_LABELS, dt))
                for k, dt in self.loss.labels.items()}

    def _run_schedule(self, b, lab, splits, in_shape, out_shape, n):
        """One step of this stage's chunks (``parallel.stage``): the online forward on the
        observations, the target forwards (and double DQN's online one) on the next ones as its
        side forwards, the loss handed to the last stage as ``_chunk_loss``."""
        st = {"loss": 0.0, "td": {}, "q": {}}
        side = (self.target, self.online) if self.loss.double else (self.target,)
        feed = None
        if self.first:
            def feed(m, k):
                lo, hi = splits[m]
                return b["obs"][lo:hi] if k == 0 else b["next_obs"][lo:hi]
        self.pp_stage.begin_step(splits, in_shape, out_shape, feed, side,
                                 lambda m, y, outs: self._chunk_loss(m, y, outs, lab, splits, n, st))
        run_schedule(self.pp_stage, self.schedule)
        return st["loss"], st["td"], st["q"]

    def _chunk_loss(self, m, y, outs, lab, splits, n, st):
        """The last stage: the loss handed in, on micro-batch ``m`` (its share of the batch
        mean); returns what the stage backpropagates: the scaled loss (autograd) or dL/dy."""
        lo, hi = splits[m]
        lab_m, share = {key: v[lo:hi] for key, v in lab.items()}, (hi - lo) / n
        with torch.no_grad():
            target = self.loss.target(lab_m, outs[0], outs[1] if self.loss.double else None)
        loss, td, q = self.loss(y, lab_m, target)
        st["loss"] += float(loss.detach()) * share
        st["td"][m], st["q"][m] = td, q
        if self.mlp is not None:
            return None, lambda: self.loss.output_grad(y, lab_m, target, share)
        return loss * share, None

    def _report(self, loss_sum, td_parts, q_parts, n_micro: int, n: int) -> dict:
        """Loss and mean Q from the last stage; |TD| back to the first stage only where
        prioritized replay needs it (as the data-parallel learner)."""
        need_td = self.cfg.prioritized
        out = {"loss": None, "q": None, "td_abs": None}
        if self.last:
            q = torch.cat([q_parts[m] for m in range(n_micro)])
            out["loss"], out["q"] = loss_sum, float(q.mean())
            if need_td:
                td_abs = torch.cat([td_parts[m] for m in range(n_micro)]).abs()
                self.link.isend(as_np(td_abs), 0, TAG_RESULT)
        elif self.first and need_td:
            out["td_abs"] = self.link.recv(n, self.n_stages - 1, TAG_RESULT)
        return out

    def grad_norm(self) -> torch.Tensor:
        """Collective over pp_comm: the norm of the whole replica's gradient (squared stage norms
        summed)."""
        g = self.online.flat.grad
        # float32 norms of 4M-element chunks (no copy: a float64 cast, even a chunk at a time,
        # was the update's largest temporary and fragmented the heap), squares summed in float64
        chunk = 1 << 22
        sq = np.array([sum(float(torch.linalg.vector_norm(g[i:i + chunk])) ** 2
                           for i in range(0, g.numel(), chunk))])
        MPI = mpi()
        t = time.perf_counter()
        self.pp_comm.Allreduce(MPI.IN_PLACE, [sq, MPI.DOUBLE], op=MPI.SUM)
        self.norm_wait_seconds += time.perf_counter() - t
        return torch.tensor(math.sqrt(sq[0]), dtype=g.dtype, device=g.device)

    # -- what the training loop and checkpoints ask ---------------------------------------------
    def param_range(self) -> tuple[int, int]:
        """This stage's range ``[lo, hi)`` of the flattened network's parameters."""
        return self.param_ranges[self.stage]

    def _gather(self, module: FlatModule):
        """The full network's flat vector (layer order) on world rank 0; None elsewhere."""
        if self.grid.dp_rank != 0:
            return None
        mine = np.ascontiguousarray(module.numpy_data(), dtype=np.float32)
        MPI = mpi()
        sizes = np.array(self.stage_sizes, dtype=np.int64)
        displs = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        full = np.empty(int(sizes.sum()), dtype=np.float32) if self.first else None
        recv = [full, (sizes.tolist(), displs.tolist()), MPI.FLOAT] if self.first else None
        self.pp_comm.Gatherv([mine, MPI.FLOAT], recv, root=0)
        return full

    def gather_online(self):
        """Collective over the replica's stages: the whole online network on world rank 0."""
        return self._gather(self.online)

    def gather_target(self):
        """Collective over the replica's stages: the whole target network on world rank 0."""
        return self._gather(self.target)

    def bubble_seconds(self) -> float:
        """The pipeline bubble as measured: seconds this stage spent blocked on the replica's
        other stages inside updates (receives, completing sends, the gradient norm's allreduce
        over pp_comm). Acting's pipelined forwards are not included (they are not updates)."""
        return self.update_link_wait_seconds + self.norm_wait_seconds

    def timings(self) -> dict:
        """Seconds since start: 'wait_s' (every StageLink wait, acting included),
        'schedule_wait_s' / 'schedule_s' (blocked inside / the whole forward-backward schedule),
        'bubble_s' (``bubble_seconds``), 'update_s', 'allreduce_s' (transfer), 'dp_wait_s'
        (for the slowest replica)."""
        return {"wait_s": self.link.wait_seconds, "schedule_wait_s": self.schedule_wait_seconds,
                "schedule_s": self.schedule_seconds, "bubble_s": self.bubble_seconds(),
                "update_s": self.update_seconds, "allreduce_s": self.sync.seconds,
                "dp_wait_s": self.sync.wait_seconds}

    def reset_timings(self) -> None:
        """Zero every timer (a benchmark's warm-up is over)."""
        self.link.wait_seconds = self.schedule_wait_seconds = self.schedule_seconds = 0.0
        self.update_link_wait_seconds = self.norm_wait_seconds = self.update_seconds = 0.0
        self.sync.seconds = self.sync.wait_seconds = 0.0
