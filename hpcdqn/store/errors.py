"""The errors of the checkpoint store (every store module raises these; imports nothing of
hpcdqn). Kinds decide what resume does with a file (see ``checkpointer.Checkpointer.resume``):

- ``CheckpointCorrupt``: damaged (checksum mismatch, HDF5 damage, truncation, a missing or
  malformed dataset or attribute): set aside, recorded, an older checkpoint is tried;
- ``CheckpointMismatch`` / ``CheckpointIncompatible``: valid, but not loadable by this run
  (another env or network, an impossible reshard, a newer major format): refused with the
  reason, the file untouched;
- ``CheckpointTransient``: an I/O error that may clear (EIO, EAGAIN, ...) after retries with
  backoff: a clear failure, the file untouched;
- ``CheckpointIOError``: a collective phase failed on some rank; raised on every rank with the
  same message (``agreed``: the launcher prints it once).
"""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint is unreadable, corrupted, or does not fit this run."""


class CheckpointCorrupt(CheckpointError):
    """The file is damaged: set it aside and try an older one."""


class CheckpointMismatch(CheckpointError):
    """The checkpoint is valid but belongs to another environment / network."""


class CheckpointIncompatible(CheckpointMismatch):
    """The checkpoint is valid but cannot be loaded by this run (reshard, newer format)."""


class CheckpointTransient(CheckpointError):
    """Reading failed with an I/O error that persisted through the retries."""


class CheckpointIOError(CheckpointError):
    """A collective phase failed on one or more ranks; every rank raises the same message."""

    agreed = True     # every rank knows: one message (rank 0), a clean exit, no MPI_Abort


class RunDirBusy(CheckpointError):
    """The run directory is owned by another job, or holds another run's checkpoints."""

    agreed = True


class RunFileError(CheckpointIOError):
    """Writing a run file (metrics, eval.csv, summary, model file, lock) failed; agreed."""

    kind = "I/O"
