"""Stall watchdog: every agreed phase (checkpoint, resume, model file, periodic eval broadcast,
gradient sync) has a deadline. A rank that waits past it prints which phase and which ranks have
not arrived, then aborts the job (``MPI_Abort``) with its own exit status (``EXIT_STALL``).

How a rank knows who is missing without blocking: before each phase every rank passes a *gate*
(``Watchdog.gate``) on a private duplicate of the communicator: it sends "arrived" to rank 0,
rank 0 also tells every rank that it arrived, and once rank 0 has heard from everyone it sends
"go". Everything is non-blocking (``Isend``/``Irecv`` polled with ``Test``), so a waiting rank
keeps its clock: past the deadline rank 0 names the ranks whose "arrived" is missing; another
rank names rank 0 if rank 0's "arrived" is missing, otherwise it gives rank 0 a few seconds to
report first. 3 (n - 1) small messages per gate: cheap next to the phase itself.

A rank that stalls *inside* a phase (after its gate) leaves the others in the next gate (every
``parallel.agree`` agreement passes one first) or in a blocking collective; for the latter a daemon
thread per rank, armed while a phase runs, aborts once the phase has run for its deadline plus
``GRACE_S`` (it cannot tell which ranks are missing there, and says so).

Leaving together: before ``MPI_Abort`` the aborting rank sends every other rank an "abort"
notice on the watchdog's communicator. A rank polls for it in its gate wait and in its watchdog
thread (every 0.5 s, also while the main thread is blocked in a collective, or just after a
stopped rank is continued) and leaves at once with the same status. So the job ends within a
second of the report, however long the launcher's grace between SIGTERM and SIGKILL (ranks
catch SIGTERM to checkpoint, so without the notice mpirun waits that grace out per rank).

Tests: ``HPCDQN_TEST_STALL=PHASE:RANK[@N]`` (``hpcdqn.testing.stall``) makes RANK stop itself
(SIGSTOP) at its N-th gate of PHASE (default the first), as if the node had frozen.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time

from hpcdqn.testing import stall

EXIT_STALL = 3                 # the exit status of a job a watchdog aborted
GRACE_S = 5.0                  # a non-root rank's wait for rank 0's report; the thread's margin
ABORT_TAG = 9                  # the "abort" notice on the watchdog's communicator
PHASES = ("checkpoint", "resume", "model file", "eval", "gradient sync")

_current: dict = {"dog": None}


def install(dog: "Watchdog | None") -> None:
    """Make ``dog`` the watchdog that ``gate`` (and ``parallel.agree``) use; None: none."""
    old = _current["dog"]
    if old is not None and old is not dog:
        old.stop()
    _current["dog"] = dog


def deadlines(deadline_s: float, ckpt_bytes_per_rank: int) -> dict[str, float]:
    """Each phase's deadline: ``deadline_s`` for every phase if > 0, none if < 0; 0: scaled to
    the phase (checkpoint/resume 300 s + 1 s per 20 MB a rank writes, model file 300 s,
    gradient sync 900 s, eval 1800 s, each raised to 20 times the longest the phase took so far
    in this run: many times what a healthy phase takes)."""
    if deadline_s > 0:
        return {"default": float(deadline_s)}
    if deadline_s < 0:
        return {"default": 0.0}
    io = 300.0 + ckpt_bytes_per_rank / 20e6
    return {"checkpoint": io, "resume": io, "model file": 300.0, "gradient sync": 900.0,
            "eval": 1800.0, "default": 900.0}


class phase:
    """``with phase("checkpoint"):`` -- the installed watchdog's gate, then the phase armed until
    the block ends (nothing if no watchdog is installed)."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        dog = _current["dog"]
        if dog is not None:
            dog.gate(self.name)
        return self

    def __exit__(self, *exc):
        dog = _current["dog"]
        if dog is not None:
            dog.done()
        return False


def again(comm) -> None:
    """Another gate of the armed phase (``parallel.agree``, before its collective over ``comm``;
    only where ``comm`` spans the watchdog's ranks)."""
    dog = _current["dog"]
    if dog is not None and dog.spans(comm):
        dog.again()


class Watchdog:
    """Per rank: gates with deadlines over ``comm`` (collective: create it on every rank)."""

    def __init__(self, comm, deadlines: dict[str, float]):
        self.comm = comm.Dup()
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.deadlines = dict(deadlines)
        self.auto = "default" not in deadlines or len(deadlines) > 1   # scaled per phase
        self.longest: dict[str, float] = {}
        self.began: tuple[str, float] | None = None
        self.seen: dict[str, int] = {}
        self.armed: tuple[str, float, float] | None = None     # (phase, since, deadline)
        self._stop = threading.Event()
        self._threaded_mpi = _thread_multiple()
        self._thread = threading.Thread(target=self._watch, name="hpcdqn-watchdog", daemon=True)
        self._thread.start()
        atexit.register(self.stop)     # runs before mpi4py's MPI_Finalize (registered earlier)

    def deadline(self, phase: str) -> float:
        """The configured deadline, or (automatic deadlines) at least 20 times the longest
        this phase has taken so far on this rank, whichever is longer."""
        base = float(self.deadlines.get(phase, self.deadlines.get("default", 600.0)))
        if base <= 0 or not self.auto:
            return base
        return max(base, 20.0 * self.longest.get(phase, 0.0))

    # -- the gate ---------------------------------------------------------------------------------
    def gate(self, phase: str) -> None:
        """Collective: wait until every rank reached this gate, or abort past the deadline.
        Arms the phase (the thread watches it until ``done``)."""
        if self.began is None or self.began[0] != phase:
            self.began = (phase, time.monotonic())
        self.seen[phase] = self.seen.get(phase, 0) + 1
        stall(phase, self.rank, self.seen[phase])   # (a test hook)
        limit = self.deadline(phase)
        self.armed = (phase, time.monotonic(), limit)
        if self.size == 1 or limit <= 0:
            return
        if self.rank == 0:
            self._gate_root(phase, limit)
        else:
            self._gate_other(phase, limit)
        self.armed = (phase, time.monotonic(), limit)

    def _gate_root(self, phase: str, limit: float) -> None:
        from mpi4py import MPI

        one, others = bytearray(1), range(1, self.size)
        bufs = {r: bytearray(1) for r in others}
        recv = {r: self.comm.Irecv([bufs[r], MPI.BYTE], source=r, tag=1) for r in others}
        sends = [self.comm.Isend([one, MPI.BYTE], dest=r, tag=2) for r in others]
        pending = dict(recv)

        def missing():
            for r in [r for r, q in pending.items() if q.Test()]:
                del pending[r]
            return sorted(pending)

        self._wait(phase, limit, missing, lambda m: (
            f"rank{'s' if len(m) > 1 else ''} {', '.join(map(str, m))} of {self.size} "
            f"{'have' if len(m) > 1 else 'has'} not arrived"))
        sends += [self.comm.Isend([one, MPI.BYTE], dest=r, tag=3) for r in others]
        MPI.Request.Waitall(sends)

    def _gate_other(self, phase: str, limit: float) -> None:
        from mpi4py import MPI

        one, b0, b1 = bytearray(1), bytearray(1), bytearray(1)
        sent = self.comm.Isend([one, MPI.BYTE], dest=0, tag=1)
        arrived = self.comm.Irecv([b0, MPI.BYTE], source=0, tag=2)
        go = self.comm.Irecv([b1, MPI.BYTE], source=0, tag=3)
        st = {"root": False}

        def missing():
            st["root"] = st["root"] or bool(arrived.Test())
            return [] if go.Test() else [0]

        self._wait(phase, limit, missing, lambda _: (
            f"rank 0 of {self.size} has not arrived" if not st["root"] else
            f"rank 0 is still waiting for another rank of {self.size} (rank 0 names it)"),
            grace=lambda: 0.0 if not st["root"] else GRACE_S)
        arrived.Wait()
        sent.Wait()

    def _wait(self, phase, limit, missing, words, grace=lambda: 0.0) -> None:
        t0, polls = time.monotonic(), 0
        while True:
            left = missing()
            if not left:
                return
            waited = time.monotonic() - t0
            if waited > limit + grace():
                self.abort(phase, waited, words(left))
            if polls >= 200 and polls % 50 == 0:
                self.follow_abort()
            polls += 1      # yield first (a gate is usually passed within microseconds), then nap
            time.sleep(0 if polls < 200 else min(0.001, 2e-5 * (polls - 199)))

    def again(self) -> None:
        """Inside an armed phase (``parallel.agree`` calls this before its collective): pass
        another gate of the same phase; nothing if no phase is armed."""
        if self.armed is not None:
            self.gate(self.armed[0])

    def spans(self, comm) -> bool:
        from mpi4py import MPI

        return MPI.Comm.Compare(comm, self.comm) in (MPI.IDENT, MPI.CONGRUENT)

    def done(self) -> None:
        """The phase that the last gate opened is over (the thread stops watching it)."""
        if self.began is not None:
            phase, t0 = self.began
            self.longest[phase] = max(self.longest.get(phase, 0.0), time.monotonic() - t0)
        self.armed = self.began = None

    # -- aborting ---------------------------------------------------------------------------------
    def abort(self, phase: str, waited: float, who: str) -> None:
        sys.stderr.write(f"hpcdqn: stall: rank {self.rank} waited {waited:.1f} s in phase "
                         f"'{phase}' (deadline {self.deadline(phase):g} s, config key "
                         f"watchdog.deadline_s): {who}; aborting the job (exit status "
                         f"{EXIT_STALL})\n")
        sys.stderr.flush()
        sys.stdout.flush()
        from mpi4py import MPI

        self._notify_others()
        MPI.COMM_WORLD.Abort(EXIT_STALL)

    def _notify_others(self) -> None:
        """The "abort" notice to every other rank (eager 1-byte sends; a stopped or dead rank
        never receives it, so wait at most 0.5 s for them to leave this process)."""
        from mpi4py import MPI

        one = bytearray(1)
        sends = [self.comm.Isend([one, MPI.BYTE], dest=r, tag=ABORT_TAG)
                 for r in range(self.size) if r != self.rank]
        t0 = time.monotonic()
        while sends and not MPI.Request.Testall(sends) and time.monotonic() - t0 < 0.5:
            time.sleep(0.005)

    def follow_abort(self) -> None:
        """Leave now (exit status ``EXIT_STALL``) if another rank's watchdog aborted the job."""
        from mpi4py import MPI

        st = MPI.Status()
        if self.size > 1 and self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=ABORT_TAG, status=st):
            sys.stderr.write(f"hpcdqn: watchdog: rank {self.rank} leaves with the job: rank "
                             f"{st.Get_source()} aborted it (its stall report says why)\n")
            sys.stderr.flush()
            os._exit(EXIT_STALL)

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            if self._threaded_mpi:
                self.follow_abort()
            armed = self.armed
            if armed is None:
                continue
            phase, since, limit = armed
            if limit > 0 and time.monotonic() - since > limit + 2 * GRACE_S:
                self.abort(phase, time.monotonic() - since,
                           "stuck in a collective call of the phase (which ranks have not "
                           "arrived is not known there)")

    def stop(self) -> None:
        """End the watchdog thread (and wait for it: it may be inside an MPI call)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)


def _thread_multiple() -> bool:
    """Whether the watchdog thread may call MPI while the main thread is in a collective."""
    from mpi4py import MPI

    return MPI.Query_thread() == MPI.THREAD_MULTIPLE
