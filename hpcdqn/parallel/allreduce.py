"""Data parallelism: average gradients over the data-parallel communicator.

Gradients already live in one contiguous float32 buffer (``FlatModule.flat.grad``), cut into
size-capped *buckets* (contiguous slices). Each bucket is reduced with the buffer-based
``Allreduce(MPI.IN_PLACE, ...)`` and divided by the replica count. No pickle on the hot path.

``overlap=True``: buckets are laid out from the *last* layer backwards (the order autograd
finishes them); when every parameter of a bucket has its gradient, a non-blocking
``Iallreduce`` starts while backward continues on earlier layers. ``finish()`` waits for all.

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

from hpcdqn.parallel.flat import FlatModule
from hpcdqn.parallel.grid import mpi


def can_overlap(module: FlatModule, comm) -> bool:
    """Whether the overlapped path can work here: several replicas, gradients in host memory
    (the hooks hand MPI a numpy view of the buffer)."""
    return comm.Get_size() > 1 and not module.flat.is_cuda


class GradSync:
    """Averages ``module``'s flat gradient over ``comm``: blocking buckets, or (``overlap``, as
    ``hpcdqn.learner.plan`` decides it) non-blocking ``Iallreduce`` started from autograd hooks."""

    def __init__(self, module: FlatModule, comm, bucket_mb: float = 25.0, overlap: bool = False):
        self.module, self.comm = module, comm
        self.size = comm.Get_size()
        if overlap and not can_overlap(module, comm):
            raise ValueError("overlapped allreduce needs dp > 1 and gradients in host memory")
        self.overlap = overlap
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
            for a, b in self.buckets:
                self.comm.Allreduce(MPI.IN_PLACE, [host[a:b], MPI.FLOAT], op=MPI.SUM)
            g.copy_(torch.from_numpy(host))
        else:
            buf = g.detach().numpy()
            for a, b in self.buckets:
                self.comm.Allreduce(MPI.IN_PLACE, [buf[a:b], MPI.FLOAT], op=MPI.SUM)
        g.div_(self.size)
        self.seconds += time.perf_counter() - t
        self.calls += 1

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
