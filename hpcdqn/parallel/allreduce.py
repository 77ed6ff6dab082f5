"""Data parallelism: average gradients over the data-parallel communicator.

Gradients already live in one contiguous float32 buffer (``FlatModule.flat.grad``), cut into
size-capped *buckets* (contiguous slices). Each bucket is reduced with the buffer-based
``Allreduce(MPI.IN_PLACE, ...)`` and divided by the replica count. No pickle on the hot path.

``overlap=True``: buckets are laid out from the *last* layer backwards (the order autograd
finishes them); when every parameter of a bucket has its gradient, a non-blocking
``Iallreduce`` starts while backward continues on earlier layers. ``finish()`` waits for all.

Algorithm (``parallel.allreduce``, chosen by :func:`choose_algorithm`): ``flat`` is Open MPI's
``MPI_Allreduce`` over all of ``comm``; ``hierarchical`` (:class:`HierarchicalAllreduce`)
reduces within each node to a leader (``Split_type(COMM_TYPE_SHARED)`` of ``comm``), allreduces
among the leaders and broadcasts within the node. ``auto`` is flat on one node (and with one rank
per node), else whichever ``hpcdqn.parallel.allreduce_model.choose_allreduce`` predicts faster. Both
give every rank the same bits; they differ from each other only in the order of the sum.

Time accounting: before the reduction every rank enters a timed ``Barrier`` on the same
communicator. The time inside it is *waiting for the slowest replica* (``wait_seconds``: its
own compute is done, another's is not); the time after it, inside the reductions, is the
*transfer* (``seconds``). Without the barrier the first rank to arrive would count its wait
as communication. Its cost is one barrier per update (a few microseconds in a node; measured
in the README), and a barrier's own latency is counted as waiting. With overlap, reductions
already in flight may progress inside the barrier (that part of the transfer is hidden anyway).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from hpcdqn.parallel.allreduce_model import choose_allreduce
from hpcdqn.parallel.flat import FlatModule
from hpcdqn.parallel.grid import mpi


ALGORITHMS = ("auto", "flat", "hierarchical")


class HierarchicalAllreduce:
    """Collective over ``comm`` to build: the node-local sub-communicator (ranks sharing memory)
    and, on each node's leader (its lowest rank in ``comm``), the communicator of the leaders.
    ``sum_(buf)`` sums a float32 numpy buffer in place over ``comm``: Reduce to the leader,
    Allreduce among leaders, Bcast in the node."""

    def __init__(self, comm):
        MPI = mpi()
        self.node_comm = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
        self.is_leader = self.node_comm.Get_rank() == 0
        self.leader_comm = comm.Split(0 if self.is_leader else MPI.UNDEFINED, key=comm.Get_rank())
        self.nodes = comm.allreduce(int(self.is_leader), op=MPI.SUM)
        self.ranks_per_node = comm.allreduce(self.node_comm.Get_size(), op=MPI.MAX)

    def sum_(self, buf) -> None:
        MPI = mpi()
        local = self.node_comm.Get_size() > 1
        if local:
            if self.is_leader:
                self.node_comm.Reduce(MPI.IN_PLACE, [buf, MPI.FLOAT], op=MPI.SUM, root=0)
            else:
                self.node_comm.Reduce([buf, MPI.FLOAT], None, op=MPI.SUM, root=0)
        if self.is_leader and self.leader_comm.Get_size() > 1:
            self.leader_comm.Allreduce(MPI.IN_PLACE, [buf, MPI.FLOAT], op=MPI.SUM)
        if local:
            self.node_comm.Bcast([buf, MPI.FLOAT], root=0)

    def free(self) -> None:
        for c in (self.node_comm, self.leader_comm):
            if c is not None and c != mpi().COMM_NULL:
                c.Free()


def choose_algorithm(requested: str, comm, n_bytes: int, buckets: int = 1) -> dict:
    """Collective over ``comm``: the allreduce to use for ``n_bytes`` of gradient per update in
    ``buckets`` buckets, with the node layout, both predicted times and the reason
    (``allreduce_model.choose_allreduce``; ``requested`` flat/hierarchical is taken as asked, but a
    one-node communicator is always flat: there the hierarchy is the flat allreduce plus calls)."""
    if requested not in ALGORITHMS:
        raise ValueError(f"parallel.allreduce={requested!r}: use one of {list(ALGORITHMS)}")
    MPI = mpi()
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    nodes = comm.allreduce(int(node.Get_rank() == 0), op=MPI.SUM)
    q = comm.allreduce(node.Get_size(), op=MPI.MAX)
    node.Free()
    out = choose_allreduce(nodes, comm.Get_size(), q, n_bytes, buckets)
    out["requested"] = requested
    if requested != "auto":
        out["algorithm"] = requested if nodes > 1 else "flat"
        out["reason"] = "as configured" if nodes > 1 else "one node (hierarchical = flat here)"
    return out


def can_overlap(module: FlatModule, comm) -> bool:
    """Whether the overlapped path can work here: several replicas, gradients in host memory
    (the hooks hand MPI a numpy view of the buffer)."""
    return comm.Get_size() > 1 and not module.flat.is_cuda


class GradSync:
    """Averages ``module``'s flat gradient over ``comm``: blocking buckets, or (``overlap``, as
    ``hpcdqn.learner.plan`` decides it) non-blocking ``Iallreduce`` started from autograd hooks."""

    def __init__(self, module: FlatModule, comm, bucket_mb: float = 25.0, overlap: bool = False,
                 algorithm: str = "flat"):
        self.module, self.comm = module, comm
        self.size = comm.Get_size()
        if overlap and not can_overlap(module, comm):
            raise ValueError("overlapped allreduce needs dp > 1 and gradients in host memory")
        if algorithm not in ("flat", "hierarchical") or (overlap and algorithm != "flat"):
            raise ValueError(f"allreduce algorithm {algorithm!r} (overlap={overlap}): use flat, or "
                             "hierarchical without overlap")
        self.overlap = overlap
        self.hier = HierarchicalAllreduce(comm) if algorithm == "hierarchical" and self.size > 1 else None
        self.seconds = 0.0           # transfer: inside the reductions, after every replica arrived
        self.wait_seconds = 0.0      # waiting for the slowest replica (the timed barrier)
        self.calls = 0
        self.buckets = self.bucket_bounds(module, bucket_mb)
        self._requests = []
        self._pending = {}
        if self.overlap:
            self._install_hooks()

    @staticmethod
    def bucket_bounds(module: FlatModule, bucket_mb: float) -> list[tuple[int, int]]:
        """Contiguous ``[start, end)`` buckets over the flat buffer, capped at ``bucket_mb`` MiB
        (one parameter may exceed it alone), built from the last layer backwards."""
        cap = max(1, int(bucket_mb * 2**20 / 4))
        bounds: list[tuple[int, int]] = []
        for off, n in reversed(module.slices):
            if bounds and bounds[-1][1] - off <= cap:
                bounds[-1] = (off, bounds[-1][1])     # grow the current bucket downwards
            else:
                bounds.append((off, off + n))         # start a new bucket
        return bounds or [(0, module.numel)]

    # -- blocking path ----------------------------------------------------------------------
    def __call__(self) -> None:
        """Average the gradients (blocking); with overlap, wait for the in-flight buckets."""
        if self.size == 1:
            return
        MPI = mpi()
        g = self.module.flat.grad
        self.wait_for_replicas(g)
        t = time.perf_counter()
        if self.overlap:
            MPI.Request.Waitall(self._requests)
            self._requests = []
            self._reset_pending()
        elif g.is_cuda:   # MPI without CUDA awareness: stage through host memory
            host = g.detach().cpu().numpy()
            self.sum_buckets(host)
            g.copy_(torch.from_numpy(host))
        else:
            self.sum_buckets(g.detach().numpy())
        g.div_(self.size)
        self.seconds += time.perf_counter() - t
        self.calls += 1

    def sum_buckets(self, buf) -> None:
        """Sum every bucket of the host buffer ``buf`` over ``comm`` in place (flat or hierarchical)."""
        MPI = mpi()
        for a, b in self.buckets:
            if self.hier is not None:
                self.hier.sum_(buf[a:b])
            else:
                self.comm.Allreduce(MPI.IN_PLACE, [buf[a:b], MPI.FLOAT], op=MPI.SUM)

    def wait_for_replicas(self, g: torch.Tensor) -> None:
        """Collective over ``comm``: a timed barrier, once this rank's gradient is computed
        (on a GPU: its kernels finished), so that waiting for the slowest replica is not
        counted as transfer."""
        if g.is_cuda:
            torch.cuda.synchronize(g.device)
        t = time.perf_counter()
        self.comm.Barrier()
        self.wait_seconds += time.perf_counter() - t

    # -- overlapped path --------------------------------------------------------------------
    def _reset_pending(self):
        self._pending = {i: 0 for i in range(len(self.buckets))}

    def _install_hooks(self):
        self._reset_pending()
        owner, need = [], [0] * len(self.buckets)
        for off, n in self.module.slices:
            bi = next(i for i, (a, b) in enumerate(self.buckets) if a <= off < b)
            owner.append(bi)
            need[bi] += 1
        self._need = need
        for p, bi in zip(self.module.params, owner):
            p.register_post_accumulate_grad_hook(lambda _p, bi=bi: self._ready(bi))

    def _ready(self, bi: int) -> None:
        self._pending[bi] += 1
        if self._pending[bi] == self._need[bi]:
            MPI = mpi()
            t = time.perf_counter()
            a, b = self.buckets[bi]
            buf = self.module.flat.grad.detach().numpy()[a:b]
            self._requests.append(self.comm.Iallreduce(MPI.IN_PLACE, [buf, MPI.FLOAT], op=MPI.SUM))
            self.seconds += time.perf_counter() - t


def broadcast_params(module: FlatModule, comm, root: int = 0) -> None:
    """Every replica starts from root's parameters, whatever its seed."""
    if comm.Get_size() > 1:
        MPI = mpi()
        host = module.flat.data.detach().cpu().numpy()
        comm.Bcast([host, MPI.FLOAT], root=root)
        if module.flat.is_cuda:
            module.flat.data.copy_(torch.from_numpy(host))


def check_consistent(value: float, comm, what: str = "parameters") -> None:
    """Stop loudly if the replicas' checksums differ (they must be bitwise equal)."""
    if comm.Get_size() == 1:
        return
    MPI = mpi()
    v = np.array([value, -value], dtype=np.float64)
    out = np.empty_like(v)
    comm.Allreduce(v, out, op=MPI.MAX)
    hi, lo = out[0], -out[1]
    if hi != lo:
        raise RuntimeError(
            f"data-parallel replicas diverged: {what} checksum ranges over [{lo!r}, {hi!r}] on "
            f"rank {comm.Get_rank()} of {comm.Get_size()}. Replicas must apply identical updates; "
            "this usually means a non-deterministic op or a rank that skipped an update.")
