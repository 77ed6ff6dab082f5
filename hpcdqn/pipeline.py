"""Pipeline model parallelism: one replica's Q-network cut into ``pp`` stages, one per rank.

Stage ``s`` of a replica holds the layers between two boundaries (see ``partition.py``: whole
layers, and a row-piece of a Linear layer where a boundary falls inside one), which is one
contiguous range of the flattened network's parameters: its own online and target
``FlatModule`` and its own Adam. The stages of a replica talk over ``grid.pp_comm`` with
buffer-based point-to-point MPI (``Isend`` / ``Recv`` of contiguous CPU float32 numpy views of torch
tensors, int64 for headers and greedy actions; no pickle). The same stage of every replica shares ``grid.dp_comm``, over which
its gradients are averaged exactly as in the data-parallel learner.

One update (``update(batch)``; the batch lives on the first stage):

1. The first stage sends a small control header down the pipeline (operation, batch size,
   micro-batches, activation shape), and the labels (actions, returns, discounts, importance
   weights) straight to the last stage.
2. The batch is split into ``M`` micro-batches. A *forward step* ``F(m)`` runs, on each stage,
   the online net on ``obs_m`` (with autograd) and, without grad, the target net on
   ``next_obs_m`` (and the online net on ``next_obs_m`` for double DQN), so the TD-target
   forwards ride in the same pipeline slots. The last stage turns them into the TD target and the
   loss with ``dqn.td_target`` / ``dqn.td_loss``, scaled by ``|m| / B`` so the accumulated
   gradient is the full-batch mean loss's. A *backward step* ``B(m)`` backpropagates and sends
   the gradient w.r.t. the stage's input to the previous stage.
3. Schedules: ``gpipe`` (all ``F`` then all ``B``) or ``1f1b`` (stage ``s`` warms up with
   ``P-1-s`` forwards, then alternates one forward / one backward, then cools down), which keeps
   at most ``P-s`` micro-batches of activations alive.
4. With prioritized replay the last stage sends the |TD errors| back to the first stage (which
   updates the priorities); loss and mean Q are reported by the last stage.
5. Each stage: allreduce-average its gradients over ``dp_comm`` (``GradSync``), clip with the
   norm over *all* stages (squared norms summed over ``pp_comm``, so it equals the unpartitioned
   norm), Adam step, target sync: ``DQNLearner.step_optimizer``, shared.

Acting (``greedy``) and evaluation are the same pipeline with one micro-batch and no backward.
Every operation is a collective over the replica's ``pp_comm``: the first stage passes data, the
others pass ``None`` and learn what to do from the header. Message kinds are kept apart by tags;
sends are non-blocking and completed before each operation returns, receives are blocking and
happen in an order consistent with the schedule, so no cycle of waits can form.

Large messages: with Open MPI's shared-memory transport and CMA single-copy (its default) the
receiver pulls an ``Isend``'s data itself while the sender computes. Without a single-copy
mechanism the sender must be inside MPI for its data to move; the schedule calls ``Testall`` on
in-flight sends between micro-batch steps, but transfers then advance only at step boundaries.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from .allreduce import GradSync
from .dqn import DQNLearner, td_loss, td_target, to_tensors
from .flat import FlatModule
from .grid import mpi
from .partition import boundary_offset, describe, layer_offsets, plan_stages, stage_modules

# message kinds (MPI tags on pp_comm)
TAG_CTRL = 100        # control header: operation, batch size, micro-batches, activation shape
TAG_ACT = 101         # forward: online-net activation on obs (training, with autograd)
TAG_GRAD = 102        # backward: gradient w.r.t. the receiver's output
TAG_TGT = 103         # forward: target-net activation on next_obs (TD target, no grad)
TAG_DBL = 104         # forward: online-net activation on next_obs (double DQN, no grad)
TAG_LABELS = 105      # first -> last: actions, returns, discounts, importance weights
TAG_RESULT = 106      # last -> first: |TD errors| (prioritized replay)
TAG_INFER = 107       # forward: acting / evaluation activation (no grad)
TAG_INFER_OUT = 108   # last -> first: greedy actions or Q-values

OP_GREEDY, OP_QVALUES, OP_UPDATE, OP_STOP = 1, 2, 3, 4
_OP_NAMES = {OP_GREEDY: "greedy", OP_QVALUES: "q_values", OP_UPDATE: "update", OP_STOP: "stop"}
HEADER_LEN = 16
_MAX_NDIM = HEADER_LEN - 4


class PipelineError(RuntimeError):
    """The stages of a replica disagree about what they are doing."""


def schedule_ops(kind: str, stage: int, stages: int, micro: int) -> list[tuple[str, int]]:
    """The ordered forward ('F') / backward ('B') steps of one stage for one update."""
    if kind == "gpipe":
        return [("F", m) for m in range(micro)] + [("B", m) for m in range(micro)]
    if kind != "1f1b":
        raise ValueError(f"unknown pipeline schedule {kind!r}: use gpipe or 1f1b")
    warm = min(stages - stage - 1, micro)
    ops = [("F", m) for m in range(warm)]
    for i in range(micro - warm):
        ops += [("F", warm + i), ("B", i)]
    ops += [("B", m) for m in range(micro - warm, micro)]
    return ops


def bubble_theory(stages: int, micro: int) -> float:
    return (stages - 1) / (micro + stages - 1)


def bubble_simulated(stages: int, micro: int, kind: str = "1f1b", forwards: int = 3,
                     backward_cost: float = 2.0, early_send: bool = True) -> list[float]:
    """Each stage's idle fraction of its own schedule window (first op to its last, as
    ``benchmarks/pipeline.py`` measures it) for this module's op order, by event simulation with
    equal stages, free messages and unit costs: each of the ``forwards`` forward passes of a
    micro-batch (online on obs; target and, for double DQN, online on next_obs) costs 1, its
    backward ``backward_cost``. With ``early_send`` each forward is passed on as soon as it is
    computed (``update`` does this), so the next stage starts after one unit rather than all of
    them, and the bubble is below the textbook ``(P-1)/(M+P-1)``; with ``early_send=False`` (one
    fused forward op) stage 0, whose window is the whole step, gets exactly the textbook value."""
    ops = []
    for s in range(stages):
        seq = []
        for k, m in schedule_ops(kind, s, stages, micro):
            if k == "B":
                seq.append((("B", m, 0), backward_cost))
            elif early_send:
                seq += [(("F", m, j), 1.0) for j in range(forwards)]
            else:
                seq.append((("F", m, 0), float(forwards)))
        ops.append(seq)
    done, clock, idle = {}, [0.0] * stages, [0.0] * stages
    ptr = [0] * stages
    while any(ptr[s] < len(ops[s]) for s in range(stages)):
        moved = False
        for s in range(stages):
            while ptr[s] < len(ops[s]):
                (k, m, j), cost = ops[s][ptr[s]]
                dep = (s - 1, (k, m, j)) if k == "F" and s > 0 else \
                    (s + 1, (k, m, j)) if k == "B" and s < stages - 1 else None
                if dep is not None and dep not in done:
                    break
                t0 = max(clock[s], done[dep] if dep is not None else 0.0)
                idle[s] += t0 - clock[s]
                clock[s] = t0 + cost
                done[(s, (k, m, j))] = clock[s]
                ptr[s] += 1
                moved = True
        if not moved:
            raise RuntimeError("pipeline schedule deadlocks")
    return [idle[s] / clock[s] for s in range(stages)]


def _split(n: int, micro: int) -> list[tuple[int, int]]:
    micro = max(1, min(micro, n))
    edges = [i * n // micro for i in range(micro + 1)]
    return [(edges[i], edges[i + 1]) for i in range(micro)]


def _as_np(t: torch.Tensor) -> np.ndarray:
    """A contiguous CPU float32 numpy view (a copy only if the tensor is elsewhere/strided)."""
    t = t.detach()
    if t.dtype != torch.float32:
        t = t.float()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous().numpy()


class PipelineLearner(DQNLearner):
    """One pipeline stage of one data-parallel replica (``grid.pp_rank`` of ``grid.pp``)."""

    def __init__(self, layers, cfg: dict, grid, device="cpu"):
        if grid.pp < 2:
            raise ValueError("PipelineLearner needs pp >= 2; use DQNLearner for pp=1")
        self.cfg, self.d, self.device = cfg, cfg["dqn"], torch.device(device)
        self.grid = grid
        self.P, self.stage = grid.pp, grid.pp_rank
        self.pp_comm, self.dp_comm = grid.pp_comm, grid.dp_comm
        self.first, self.last = grid.is_first_stage, grid.is_last_stage
        self.stages = plan_stages(layers, grid.pp, cfg["network"]["cuts"],
                                  cfg["network"]["split_layers"])
        offsets = layer_offsets(layers)
        self.param_ranges = [(boundary_offset(layers, a, offsets), boundary_offset(layers, b, offsets))
                             for a, b in self.stages]
        self.stage_sizes = [b - a for a, b in self.param_ranges]
        self.stage_contents = describe(self.stages)
        self._init_nets(stage_modules(layers, *self.stages[self.stage]), self.dp_comm)
        if self.online.numel != self.stage_sizes[self.stage]:
            raise RuntimeError(f"stage {self.stage} holds {self.online.numel} parameters, its "
                               f"range {self.param_ranges[self.stage]} says {self.stage_sizes[self.stage]}")
        self.micro = cfg["micro_batches"]
        self.schedule = cfg["schedule"]
        # the overlap hooks start a bucket's allreduce when its first backward completes it:
        # only correct with one micro-batch (one backward per parameter per update)
        self.sync = GradSync(self.online, self.dp_comm, cfg["parallel"]["bucket_mb"],
                             cfg["parallel"]["overlap"] and self.micro == 1)
        if not self.sync.overlap:   # (the overlap's hooks need autograd's per-parameter grads)
            self.online.accumulate_grads_in_place()
        self.updates = 0
        self._pending: list = []          # (request, buffer) of in-flight sends
        self._out_shapes: dict = {}
        # timing (seconds): blocked in receives/waits, inside the F/B schedule, whole updates
        self.wait_seconds = 0.0
        self.schedule_wait_seconds = 0.0
        self.schedule_seconds = 0.0
        self.update_seconds = 0.0

    # -- point-to-point helpers -----------------------------------------------------------------
    def _isend(self, arr: np.ndarray, dest: int, tag: int) -> None:
        MPI = mpi()
        arr = np.ascontiguousarray(arr)
        req = self.pp_comm.Isend([arr, MPI.FLOAT if arr.dtype == np.float32 else MPI.INT64_T],
                                 dest=dest, tag=tag)
        self._pending.append((req, arr))

    def _recv(self, shape, src: int, tag: int, dtype=np.float32) -> np.ndarray:
        MPI = mpi()
        buf = np.empty(shape, dtype=dtype)
        t = time.perf_counter()
        self.pp_comm.Recv([buf, MPI.FLOAT if buf.dtype == np.float32 else MPI.INT64_T],
                          source=src, tag=tag)
        self.wait_seconds += time.perf_counter() - t
        return buf

    def _progress(self) -> None:
        """Let in-flight sends advance (MPI progresses large messages only inside MPI calls),
        and let go of the buffers of those that completed."""
        if self._pending:
            self._pending = [(r, buf) for r, buf in self._pending if not r.Test()]

    def _finish_sends(self) -> None:
        if self._pending:
            t = time.perf_counter()
            mpi().Request.Waitall([r for r, _ in self._pending])
            self.wait_seconds += time.perf_counter() - t
            self._pending = []

    def _send_header(self, op: int, batch: int = 0, micro: int = 0, shape=()) -> None:
        if self.last:
            return
        if len(shape) > _MAX_NDIM:
            raise ValueError(f"activation of rank {len(shape) + 1} is too deep for the pipeline header")
        h = np.zeros(HEADER_LEN, dtype=np.int64)
        h[:4] = (op, batch, micro, len(shape))
        h[4:4 + len(shape)] = shape
        self._isend(h, self.stage + 1, TAG_CTRL)

    def _recv_header(self, expect: tuple[int, ...] | None = None):
        h = self._recv(HEADER_LEN, self.stage - 1, TAG_CTRL, np.int64)
        op, batch, micro, ndim = (int(v) for v in h[:4])
        if expect is not None and op not in expect:
            raise PipelineError(
                f"pipeline stage {self.stage} expected {'/'.join(_OP_NAMES[e] for e in expect)} but "
                f"stage {self.stage - 1} sent {_OP_NAMES.get(op, op)}: the stages of a replica must "
                "call the learner's collectives (greedy/update/evaluate) in the same order")
        return op, batch, micro, tuple(int(v) for v in h[4:4 + ndim])

    @torch.no_grad()
    def _out_shape(self, in_shape: tuple, dtype) -> tuple:
        """Per-sample shape of this stage's output for a per-sample input shape (cached)."""
        key = (tuple(in_shape), str(dtype))
        if key not in self._out_shapes:
            y = self.online(torch.zeros((1, *in_shape), dtype=dtype, device=self.device))
            self._out_shapes[key] = tuple(y.shape[1:])
        return self._out_shapes[key]

    def _to_dev(self, arr: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(arr)
        return t.to(self.device) if self.device.type != "cpu" else t

    # -- acting -----------------------------------------------------------------------------------
    def greedy(self, obs):
        """Collective over the replica: greedy actions on the first stage (None elsewhere)."""
        return self._infer(obs, OP_GREEDY)

    def q_values(self, obs):
        """Collective over the replica: Q-values on the first stage (None elsewhere)."""
        return self._infer(obs, OP_QVALUES)

    @torch.no_grad()
    def _infer(self, obs, op: int):
        if not self.first:
            _, batch, _, in_shape = self._recv_header(expect=(op,))
            self._serve_infer(op, batch, in_shape)
            return None
        x = torch.as_tensor(obs, device=self.device)
        batch = x.shape[0]
        self._send_header(op, batch, 1, self._out_shape(tuple(x.shape[1:]), x.dtype))
        self._isend(_as_np(self.online(x)), self.stage + 1, TAG_INFER)
        if op == OP_GREEDY:
            out = self._recv(batch, self.P - 1, TAG_INFER_OUT, np.int64)
        else:
            st = mpi().Status()
            self.pp_comm.Probe(source=self.P - 1, tag=TAG_INFER_OUT, status=st)
            n = st.Get_count(mpi().FLOAT)
            out = self._recv((batch, n // max(1, batch)), self.P - 1, TAG_INFER_OUT)
        self._finish_sends()
        return out

    @torch.no_grad()
    def _serve_infer(self, op: int, batch: int, in_shape: tuple) -> None:
        x = self._to_dev(self._recv((batch, *in_shape), self.stage - 1, TAG_INFER))
        if not self.last:
            self._send_header(op, batch, 1, self._out_shape(in_shape, x.dtype))
        y = self.online(x)
        if not self.last:
            self._isend(_as_np(y), self.stage + 1, TAG_INFER)
        elif op == OP_GREEDY:
            self._isend(y.argmax(1).cpu().numpy().astype(np.int64), 0, TAG_INFER_OUT)
        else:
            self._isend(_as_np(y), 0, TAG_INFER_OUT)
        self._finish_sends()

    def evaluate(self, run):
        """Replica 0's first stage runs ``run(self.greedy)`` while its other stages serve forward
        passes until told to stop; the result is returned on world rank 0, None elsewhere."""
        if self.grid.dp_rank != 0:
            return None
        if self.first:
            res = run(self.greedy)
            self._send_header(OP_STOP)
            self._finish_sends()
            return res
        while True:
            op, batch, _, in_shape = self._recv_header(expect=(OP_GREEDY, OP_QVALUES, OP_STOP))
            if op == OP_STOP:
                self._send_header(OP_STOP)
                self._finish_sends()
                return None
            self._serve_infer(op, batch, in_shape)

    # -- learning ---------------------------------------------------------------------------------
    def phase_targets(self, batches):
        """The target forwards are pipelined with the updates (no phase-wide pass here)."""
        return None

    def update(self, batch) -> dict:
        """Collective over the replica: ``batch`` on the first stage, None on the others."""
        t_start = time.perf_counter()
        d, P, s = self.d, self.P, self.stage
        double = d["double"]
        b = None
        if self.first:
            b = to_tensors(batch, self.device)
            n, micro = int(b["obs"].shape[0]), self.micro
            in_shape, in_dtype = tuple(b["obs"].shape[1:]), b["obs"].dtype
        else:
            _, n, micro, in_shape = self._recv_header(expect=(OP_UPDATE,))
            in_dtype = torch.float32
        splits = _split(n, micro)
        out_shape = None if self.last else self._out_shape(in_shape, in_dtype)
        self._send_header(OP_UPDATE, n, len(splits), out_shape)
        if self.first:
            labels = np.stack([batch.actions.astype(np.float32), batch.returns, batch.discounts,
                               batch.weights]).astype(np.float32)
            self._isend(labels, P - 1, TAG_LABELS)
        if self.last:
            raw = self._to_dev(self._recv((4, n), 0, TAG_LABELS))
            lab = {"actions": raw[0].long(), "returns": raw[1], "discounts": raw[2],
                   "weights": raw[3]}
            loss_sum, td_parts, q_parts = 0.0, {}, {}
        self.online.zero_grad_()
        saved: dict[int, tuple] = {}
        t_sched, w_sched = time.perf_counter(), self.wait_seconds

        for kind, m in schedule_ops(self.schedule, s, P, len(splits)):
            self._progress()
            lo, hi = splits[m]
            k = hi - lo
            if kind == "F":
                # each of the three forwards is sent on as soon as it is computed, so the next
                # stage starts its online forward while this one runs the TD-target forwards
                def arrive(tag, grad=False):
                    if self.first:
                        return b["obs"][lo:hi] if tag == TAG_ACT else b["next_obs"][lo:hi]
                    t = self._to_dev(self._recv((k, *in_shape), s - 1, tag))
                    return t.requires_grad_() if grad else t

                x = arrive(TAG_ACT, grad=True)
                y = self.online(x)
                if not self.last:
                    self._isend(_as_np(y), s + 1, TAG_ACT)
                with torch.no_grad():
                    yt = self.target(arrive(TAG_TGT))
                    if not self.last:
                        self._isend(_as_np(yt), s + 1, TAG_TGT)
                    yd = self.online(arrive(TAG_DBL)) if double else None
                    if double and not self.last:
                        self._isend(_as_np(yd), s + 1, TAG_DBL)
                if not self.last:
                    saved[m] = (x, y)
                else:
                    with torch.no_grad():
                        target = td_target(lab["returns"][lo:hi], lab["discounts"][lo:hi], yt, yd)
                    loss, td, q = td_loss(y, lab["actions"][lo:hi], target, lab["weights"][lo:hi],
                                          d["huber_delta"])
                    loss_sum += float(loss.detach()) * k / n
                    td_parts[m], q_parts[m] = td, q
                    saved[m] = (x, loss * (k / n))
            else:
                x, y = saved.pop(m)
                if self.last:
                    if y.requires_grad:
                        y.backward()
                else:
                    g = self._to_dev(self._recv((k, *out_shape), s + 1, TAG_GRAD))
                    if y.requires_grad:
                        y.backward(g)
                if not self.first:
                    gx = x.grad if x.grad is not None else torch.zeros_like(x)
                    self._isend(_as_np(gx), s - 1, TAG_GRAD)
        self.schedule_seconds += time.perf_counter() - t_sched
        self.schedule_wait_seconds += self.wait_seconds - w_sched

        # |TD| goes back to the first stage only where prioritized replay needs it (as DQNLearner)
        need_td = self.cfg["replay"]["prioritized"]
        out = {"loss": None, "q": None, "td_abs": None}
        if self.last:
            q = torch.cat([q_parts[m] for m in range(len(splits))])
            out["loss"], out["q"] = loss_sum, float(q.mean())
            if need_td:
                td_abs = torch.cat([td_parts[m] for m in range(len(splits))]).abs()
                self._isend(_as_np(td_abs), 0, TAG_RESULT)
        elif self.first and need_td:
            out["td_abs"] = self._recv(n, P - 1, TAG_RESULT)
        self._finish_sends()
        self.step_optimizer()
        self.update_seconds += time.perf_counter() - t_start
        return out

    def grad_norm(self) -> torch.Tensor:
        """The norm of the whole replica's gradient: squared stage norms summed over pp_comm."""
        g = self.online.flat.grad
        sq = np.array([float(torch.linalg.vector_norm(g, dtype=torch.float64)) ** 2 if g.numel() else 0.0])
        MPI = mpi()
        self.pp_comm.Allreduce(MPI.IN_PLACE, [sq, MPI.DOUBLE], op=MPI.SUM)
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
        return self._gather(self.online)

    def gather_target(self):
        return self._gather(self.target)

    def timings(self) -> dict:
        return {"wait_s": self.wait_seconds, "schedule_wait_s": self.schedule_wait_seconds,
                "schedule_s": self.schedule_seconds,
                "update_s": self.update_seconds, "allreduce_s": self.sync.seconds}
