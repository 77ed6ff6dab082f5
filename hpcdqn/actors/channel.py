"""Point-to-point plumbing both ends share: non-blocking sends whose buffers are kept until
they complete (``Outbox``) and polling receives that give up after a deadline (``Inbox``), so
a silent peer stops the job with a message instead of hanging it."""

from __future__ import annotations

import time

from hpcdqn.actors.wire import recv_bytes


class PeerTimeout(RuntimeError):
    """The other side sent nothing for ``actor.timeout_s`` seconds."""


class Outbox:
    """Isends in flight, each with its buffer (a buffer must live until its send completes)."""

    def __init__(self, comm, MPI):
        self.comm, self.MPI, self.pending = comm, MPI, []

    def send(self, buf, dest: int, tag: int) -> None:
        self.pending.append((self.comm.Isend([buf, self.MPI.BYTE], dest=dest, tag=tag), buf))
        self.prune()

    def prune(self) -> None:
        """Forget the sends that completed."""
        if self.pending:
            self.pending = [(r, b) for r, b in self.pending if not r.Test()]

    def wait_all(self, timeout_s: float, what: str) -> None:
        """Wait until every send completed (the receivers took them); ``PeerTimeout`` after
        ``timeout_s`` seconds."""
        end = time.monotonic() + timeout_s
        while self.pending:
            self.prune()
            if time.monotonic() > end:
                raise PeerTimeout(f"{len(self.pending)} message(s) to {what} not received "
                                  f"after {timeout_s:.0f} s (actor.timeout_s)")
            time.sleep(0.001)


class Inbox:
    """Probing receives from one communicator with a byte limit per message."""

    def __init__(self, comm, MPI, limit: int, timeout_s: float):
        self.comm, self.MPI, self.limit, self.timeout_s = comm, MPI, limit, timeout_s

    def poll(self, source: int, tag: int, limit: int | None = None):
        """A waiting message from ``source`` (a fresh byte buffer), or None; ``limit``: bytes
        allowed instead of the inbox's own (a state message)."""
        st = self.MPI.Status()
        if not self.comm.Iprobe(source=source, tag=tag, status=st):
            return None
        return recv_bytes(self.comm, self.MPI, st, limit or self.limit)

    def wait(self, source: int, tag: int, what: str, limit: int | None = None):
        """The next message from ``source``, polling with a short back-off; ``PeerTimeout``
        naming ``what`` after ``timeout_s`` seconds of silence."""
        end, nap = time.monotonic() + self.timeout_s, 0.0
        while True:
            buf = self.poll(source, tag, limit)
            if buf is not None:
                return buf
            if time.monotonic() > end:
                raise PeerTimeout(f"no message from {what} (rank {source}) for "
                                  f"{self.timeout_s:.0f} s (actor.timeout_s): did it stop?")
            time.sleep(nap)
            nap = min(0.002, nap + 0.0001)
