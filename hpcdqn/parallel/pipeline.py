"""Pipeline model parallelism, the point-to-point layer: one replica's Q-network cut into ``pp``
stages, one per rank (the learner on top: ``hpcdqn.learner.pipelined``).

Stage ``s`` of a replica holds the layers between two boundaries (see ``partition.py``: whole
layers, and a row-piece of a Linear layer where a boundary falls inside one), which is one
contiguous range of the flattened network's parameters: its own online and target
``FlatModule`` and its own Adam. The stages of a replica talk over ``grid.pp_comm`` with
buffer-based point-to-point MPI (``Isend`` / ``Recv`` of contiguous CPU float32 numpy views of torch
tensors, int64 for headers and greedy actions; no pickle). The same stage of every replica shares ``grid.dp_comm``, over which
its gradients are averaged exactly as in the data-parallel learner.

One update (``update(batch)``; the batch lives on the first stage):

1. The first stage sends a small control header down the pipeline (operation, batch size,
   micro-batches, activation shape), and the loss's named label arrays (``Loss.labels``: for
   DQN actions, returns, discounts, importance weights; one message each) straight to the last
   stage.
2. The batch is split into ``M`` micro-batches. A *forward step* ``F(m)`` runs, on each stage,
   the online net on ``obs_m`` (with autograd) and, without grad, the target net on
   ``next_obs_m`` (and the online net on ``next_obs_m`` for double DQN), so the TD-target
   forwards ride in the same pipeline slots. The last stage turns them into the target and the
   loss with the loss it was handed (``rl.losses``), scaled by ``|m| / B`` so the accumulated
   gradient is the full-batch mean loss's. A *backward step* ``B(m)`` backpropagates and sends
   the gradient w.r.t. the stage's input to the previous stage.
3. Schedules, over ``n_stages`` stages: ``gpipe`` (all ``F`` then all ``B``), ``1f1b`` (stage
   ``s`` warms up with ``n_stages-1-s`` forwards, then alternates one forward / one backward,
   then cools down), which keeps at most ``n_stages-s`` micro-batches of activations alive, or
   ``zbh1`` (zero bubble, ZB-H1: the backward split into ``B``, the gradient w.r.t. the stage's
   input that the previous stage waits for, and ``W``, the weight gradients, deferred to fill
   the waits; at most ``min(M, n_stages)`` micro-batches alive on any stage, 1F1B's peak;
   ``zero_bubble_ops``). The split needs the
   hand-written MLP backward (``parallel.stage_mlp``); on an autograd stage ``B`` runs the whole
   backward and ``W`` nothing.
4. With prioritized replay the last stage sends the |TD errors| back to the first stage (which
   updates the priorities); loss and mean Q are reported by the last stage.
5. Each stage: allreduce-average its gradients over ``dp_comm`` (``GradSync``), clip with the
   norm over *all* stages (squared norms summed over ``pp_comm``, so it equals the unpartitioned
   norm), Adam step: ``StageLearner.step_optimizer``, shared (the loop syncs the target).

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

import time

import numpy as np
import torch

from hpcdqn.parallel.grid import mpi

# message kinds (MPI tags on pp_comm)
TAG_CTRL = 100        # control header: operation, batch size, micro-batches, activation shape
TAG_ACT = 101         # forward: online-net activation on obs (training, with autograd)
TAG_GRAD = 102        # backward: gradient w.r.t. the receiver's output
TAG_TGT = 103         # forward: target-net activation on next_obs (TD target, no grad)
TAG_DBL = 104         # forward: online-net activation on next_obs (double DQN, no grad)
TAG_LABELS = 105      # first -> last: the loss's label arrays, one message each, in its order
TAG_RESULT = 106      # last -> first: |TD errors| (prioritized replay)
TAG_INFER = 107       # forward: acting / evaluation activation (no grad)
TAG_INFER_OUT = 108   # last -> first: greedy actions or Q-values

OP_GREEDY, OP_QVALUES, OP_UPDATE, OP_STOP = 1, 2, 3, 4
OP_NAMES = {OP_GREEDY: "greedy", OP_QVALUES: "q_values", OP_UPDATE: "update", OP_STOP: "stop"}
HEADER_LEN = 16
_MAX_NDIM = HEADER_LEN - 4


class PipelineError(RuntimeError):
    """The stages of a replica disagree about what they are doing."""


SCHEDULES = ("gpipe", "1f1b", "zbh1")
ZB_COSTS = (3.0, 1.0, 1.0)    # F (online, target, double forwards), B (input grad), W (weights)


def schedule_ops(kind: str, stage: int, n_stages: int, micro: int) -> list[tuple[str, int]]:
    """The ordered forward ('F') / backward ('B') steps of one stage for one update; ``zbh1``
    also has weight-gradient steps ('W'): its 'B' is the input gradient only."""
    if kind == "gpipe":
        return [("F", m) for m in range(micro)] + [("B", m) for m in range(micro)]
    if kind == "zbh1":
        return zero_bubble_ops(n_stages, micro)[stage]
    if kind != "1f1b":
        raise ValueError(f"unknown pipeline schedule {kind!r}: use one of {', '.join(SCHEDULES)}")
    warm = min(n_stages - stage - 1, micro)
    ops = [("F", m) for m in range(warm)]
    for i in range(micro - warm):
        ops += [("F", warm + i), ("B", i)]
    ops += [("B", m) for m in range(micro - warm, micro)]
    return ops


def zero_bubble_ops(n_stages: int, micro: int, costs=ZB_COSTS) -> list[list[tuple[str, int]]]:
    """ZB-H1 (Qi et al. 2023): every stage's F / B (input gradient) / W (weight gradient) steps,
    from an event simulation with the unit ``costs``: each stage starts, of the steps it can
    start, the one it can start first (ties: B, then F, then W), with at most ``min(micro, n_stages)``
    micro-batches between their F and their W on any stage: 1F1B's peak activation memory (its
    first stage's; ZB-H1's bound: later stages hold more than under 1F1B, never more than the
    first). W waits for nothing on another stage, so the deferred W steps fill the waits of 1F1B's cool-down,
    and run in micro-batch order (the gradient accumulates in 1F1B's order). The same on every
    rank (deterministic), and deadlock-free with blocking receives: the steps of all stages,
    sorted by simulated start, are an order in which every receive's message was sent before."""
    cf, cb, cw = costs
    done: dict = {}
    clock, nf, nb, nw = [0.0] * n_stages, [0] * n_stages, [0] * n_stages, [0] * n_stages
    ops: list[list[tuple[str, int]]] = [[] for _ in range(n_stages)]
    while any(nw[s] < micro for s in range(n_stages)):
        best = None
        for s in range(n_stages):
            for cand in _zb_candidates(s, n_stages, micro, clock, nf, nb, nw, done):
                if best is None or cand < best:
                    best = cand
        if best is None:
            raise RuntimeError("zero-bubble schedule deadlocks")
        start, _, s, kind, m = best
        clock[s] = start + {"F": cf, "B": cb, "W": cw}[kind]
        done[(s, kind, m)] = clock[s]
        {"F": nf, "B": nb, "W": nw}[kind][s] += 1
        ops[s].append((kind, m))
    return ops


def _zb_candidates(s, n_stages, micro, clock, nf, nb, nw, done):
    """(start, priority, stage, kind, micro-batch) of each step stage ``s`` could start next."""
    out = []
    if nb[s] < nf[s]:
        dep = done.get((s + 1, "B", nb[s]) if s < n_stages - 1 else (s, "F", nb[s]))
        if dep is not None:
            out.append((max(clock[s], dep), 0, s, "B", nb[s]))
    if nf[s] < micro and nf[s] - nw[s] < min(micro, n_stages):
        dep = done.get((s - 1, "F", nf[s])) if s > 0 else 0.0
        if dep is not None:
            out.append((max(clock[s], dep), 1, s, "F", nf[s]))
    if nw[s] < nb[s]:
        out.append((clock[s], 2, s, "W", nw[s]))
    return out


def bubble_theory(n_stages: int, micro: int) -> float:
    return (n_stages - 1) / (micro + n_stages - 1)


def bubble_simulated(n_stages: int, micro: int, kind: str = "1f1b", forwards: int = 3,
                     backward_cost: float = 2.0, early_send: bool = True,
                     fused_double: bool = False) -> list[float]:
    """Each stage's idle fraction of its own schedule window (first op to its last, as
    ``benchmarks/pipeline.py`` measures it) for this module's op order, by event simulation with
    equal stages, free messages and unit costs: each of the ``forwards`` forward passes of a
    micro-batch (online on obs; target and, for double DQN, online on next_obs) costs 1, its
    backward ``backward_cost`` (``zbh1``: half in B, the input gradient, half in W). With ``early_send`` each forward is passed on as soon as it is
    computed (``update`` does this), so the next stage starts after one unit rather than all of
    them, and the bubble is below the textbook ``(n_stages-1)/(micro+n_stages-1)``; with ``early_send=False`` (one
    fused forward op) stage 0, whose window is the whole step, gets exactly the textbook value.
    ``fused_double``: the second forward rides in the first's GEMMs (``PipelineStage`` on the
    hand-written path, double DQN, every micro-batch but the first): one op of cost 2, both
    sent at its end."""
    ops = []
    for s in range(n_stages):
        seq = []
        split = kind == "zbh1"            # B: the input gradient, W: the weights' (half each)
        for k, m in schedule_ops(kind, s, n_stages, micro):
            if k in ("B", "W"):
                seq.append(((k, m, 0), backward_cost / 2 if split else backward_cost))
            elif early_send and fused_double and forwards >= 2 and m > 0:
                seq += [(("F", m, 0), 2.0)] + [(("F", m, j), 1.0) for j in range(2, forwards)]
            elif early_send:
                seq += [(("F", m, j), 1.0) for j in range(forwards)]
            else:
                seq.append((("F", m, 0), float(forwards)))
        ops.append(seq)
    done, clock, idle = {}, [0.0] * n_stages, [0.0] * n_stages
    ptr = [0] * n_stages
    while any(ptr[s] < len(ops[s]) for s in range(n_stages)):
        moved = False
        for s in range(n_stages):
            while ptr[s] < len(ops[s]):
                (k, m, j), cost = ops[s][ptr[s]]
                dep = (s - 1, (k, m, j)) if k == "F" and s > 0 else \
                    (s + 1, (k, m, j)) if k == "B" and s < n_stages - 1 else None
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
    return [idle[s] / clock[s] for s in range(n_stages)]


def micro_splits(n: int, micro: int) -> list[tuple[int, int]]:
    micro = max(1, min(micro, n))
    edges = [i * n // micro for i in range(micro + 1)]
    return [(edges[i], edges[i + 1]) for i in range(micro)]


def as_np(t: torch.Tensor) -> np.ndarray:
    """A contiguous CPU float32 numpy view (a copy only if the tensor is elsewhere/strided)."""
    t = t.detach()
    if t.dtype != torch.float32:
        t = t.float()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous().numpy()


class StageLink:
    """Point-to-point between the stages of one replica (``pp_comm``): non-blocking sends whose
    buffers are kept alive until they complete, blocking receives (timed), the control header.
    The learner's pipelined operations (``hpcdqn.learner.pipelined``) are built on it."""

    def __init__(self, pp_comm, stage: int, n_stages: int):
        self.comm, self.stage, self.n_stages = pp_comm, stage, n_stages
        self.first, self.last = stage == 0, stage == n_stages - 1
        self.pending: list = []          # (request, buffer) of in-flight sends
        self.wait_seconds = 0.0          # blocked in receives and waits

    def isend(self, arr: np.ndarray, dest: int, tag: int) -> None:
        MPI = mpi()
        arr = np.ascontiguousarray(arr)
        req = self.comm.Isend([arr, MPI.FLOAT if arr.dtype == np.float32 else MPI.INT64_T],
                              dest=dest, tag=tag)
        self.pending.append((req, arr))

    def recv(self, shape, src: int, tag: int, dtype=np.float32) -> np.ndarray:
        MPI = mpi()
        buf = np.empty(shape, dtype=dtype)
        t = time.perf_counter()
        self.comm.Recv([buf, MPI.FLOAT if buf.dtype == np.float32 else MPI.INT64_T],
                       source=src, tag=tag)
        self.wait_seconds += time.perf_counter() - t
        return buf

    def recv_floats_of_unknown_width(self, rows: int, src: int, tag: int) -> np.ndarray:
        """A [rows, ?] float32 message whose width the receiver does not know (Q-values)."""
        st = mpi().Status()
        self.comm.Probe(source=src, tag=tag, status=st)
        n = st.Get_count(mpi().FLOAT)
        return self.recv((rows, n // max(1, rows)), src, tag)

    def progress(self) -> None:
        """Let in-flight sends advance (MPI progresses large messages only inside MPI calls),
        and let go of the buffers of those that completed."""
        if self.pending:
            self.pending = [(r, buf) for r, buf in self.pending if not r.Test()]

    def finish_sends(self) -> None:
        if self.pending:
            t = time.perf_counter()
            mpi().Request.Waitall([r for r, _ in self.pending])
            self.wait_seconds += time.perf_counter() - t
            self.pending = []

    def send_header(self, op: int, batch: int = 0, micro: int = 0, shape=()) -> None:
        """To the next stage (nothing on the last): operation, batch size, micro-batches and the
        per-sample activation shape the next stage will receive."""
        if self.last:
            return
        if len(shape) > _MAX_NDIM:
            raise ValueError(f"activation of rank {len(shape) + 1} is too deep for the pipeline header")
        h = np.zeros(HEADER_LEN, dtype=np.int64)
        h[:4] = (op, batch, micro, len(shape))
        h[4:4 + len(shape)] = shape
        self.isend(h, self.stage + 1, TAG_CTRL)

    def recv_header(self, expect: tuple[int, ...] | None = None):
        """From the previous stage: (op, batch, micro, shape); a clear error if ``op`` is not
        one of ``expect``."""
        h = self.recv(HEADER_LEN, self.stage - 1, TAG_CTRL, np.int64)
        op, batch, micro, ndim = (int(v) for v in h[:4])
        if expect is not None and op not in expect:
            raise PipelineError(
                f"pipeline stage {self.stage} expected {'/'.join(OP_NAMES[e] for e in expect)} but "
                f"stage {self.stage - 1} sent {OP_NAMES.get(op, op)}: the stages of a replica must "
                "call the learner's collectives (greedy/update/evaluate) in the same order")
        return op, batch, micro, tuple(int(v) for v in h[4:4 + ndim])
