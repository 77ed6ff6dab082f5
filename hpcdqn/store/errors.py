"""The errors of the checkpoint store (every store module raises these) and their agreement
over the ranks (``agree``, ``agree_write``: ``parallel.agree`` with the store's kinds). Kinds decide what resume does with a file (see ``checkpointer.Checkpointer.resume``):

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

from hpcdqn.parallel.agree import TRANSIENT_ERRNOS, agree_phase


class CheckpointError(ValueError):
    """A checkpoint is unreadable, corrupted, or does not fit this run."""

    says_itself = True      # ``parallel.agree.describe``: the message is the line


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


# the kinds a read phase can agree on, least destructive first: a file is set aside only when
# every failing rank found it corrupt
KINDS = (CheckpointIncompatible, CheckpointMismatch, CheckpointTransient, CheckpointCorrupt)


def kind_of(err: BaseException) -> str:
    """The name of the kind of checkpoint error ``err`` is (an OSError that may clear on a
    retry: transient)."""
    for k in KINDS:
        if isinstance(err, k):
            return k.__name__
    if isinstance(err, OSError) and err.errno in TRANSIENT_ERRNOS:
        return CheckpointTransient.__name__
    return CheckpointError.__name__


def agree(comm, phase: str, path, err: BaseException | None, what: str = "checkpoint",
          keep_kind: bool = False, cls=CheckpointIOError) -> None:
    """Collective over ``comm`` (None: this process alone): if any rank's ``err`` is set, raise
    the same error on every rank -- a ``CheckpointIOError`` naming the failing ranks, file, phase
    and errno, or with ``keep_kind`` the kind the failing ranks agree on (see ``KINDS``)."""
    if keep_kind:
        agree_phase(comm, phase, path, err, CheckpointError, what, kind_of, KINDS)
    else:
        agree_phase(comm, phase, path, err, cls, what, kind_of)


def agree_write(comm, what: str, path, err: BaseException | None) -> None:
    """Collective: ``agree`` for a run file written by one rank (metrics, eval.csv, summary,
    model file): every rank raises the same ``RunFileError`` (one line, exit status 2)."""
    agree(comm, "write", path, err, what=what, cls=RunFileError)
