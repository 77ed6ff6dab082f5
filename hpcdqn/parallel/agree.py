"""Error agreement around collective phases: every rank learns whether any rank failed, and
all raise the same error, before anyone makes the next collective call.

The pattern, used for every phase of a checkpoint (create, write, flush, close, rename, verify,
read), the run files and the model file::

    with Local() as loc:          # this rank's work; an exception is caught, not raised
        ...
    agree_phase(comm, "flush", path, loc.err, cls)   # collective: raises everywhere if any failed

``agree_phase`` reduces a flag over the ranks (MAX), and only if some rank failed gathers the
failing ranks' messages; every rank then raises the same error naming rank, file, phase and
errno. No rank makes a further collective call after a local error before this agreement, so
one rank's ENOSPC cannot leave the others waiting in a collective, and no collective call sits
in a ``finally`` that runs after a local error. The checkpoint store's kinds of error and their
agreement: ``store.errors``.
"""

from __future__ import annotations

import errno as errno_mod
import os

from hpcdqn.parallel.lifecycle import gather_errors

# errors that may clear on a retry (network file systems, overloaded servers)
TRANSIENT_ERRNOS = {errno_mod.EIO, errno_mod.EAGAIN, errno_mod.EINTR, errno_mod.ETIMEDOUT,
                    errno_mod.ESTALE, errno_mod.EBUSY}


class Local:
    """Catches this rank's exception (``err``) instead of raising it; see ``agree``."""

    def __init__(self):
        self.err: BaseException | None = None

    def __enter__(self):
        return self

    def __exit__(self, et, ev, tb):
        if ev is not None and isinstance(ev, Exception):
            self.err = ev
            return True
        return False      # KeyboardInterrupt / SystemExit go through


def describe(err: BaseException, path=None) -> str:
    """One line naming what happened: for a write that found no room, the file system's state
    ("file system full: N bytes free on DIR"), a quota, or the errno as it is (EIO stays EIO)."""
    code = os_errno(err)
    if code:
        name = errno_mod.errorcode.get(code, str(code))
        filename = getattr(err, "filename", None) or path
        where = f" on '{filename}'" if filename else ""
        return f"{cause(code, filename)}{name} ({os.strerror(code)}){where}"
    if getattr(err, "says_itself", False):     # (an error of ours: its message is the line)
        return str(err)
    return f"{type(err).__name__}: {err}"


def os_errno(err: BaseException) -> int | None:
    """The errno of an OSError, also where HDF5 only wrote it into the message ("errno = 28")."""
    if isinstance(err, OSError) and err.errno:
        return int(err.errno)
    if not isinstance(err, (OSError, RuntimeError)):
        return None
    import re

    m = re.search(r"errno = (\d+)", str(err))
    return int(m.group(1)) if m else None


def cause(code: int, filename=None) -> str:
    """What ENOSPC / EDQUOT mean for the file system under ``filename`` ("" for other errnos):
    checked after the failure (statvfs), so the message says whether the disk really is full."""
    if code not in (errno_mod.ENOSPC, errno_mod.EDQUOT):
        return ""
    d = _existing_dir(filename)
    try:
        st = os.statvfs(d)
        free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
        inodes = st.f_favail if st.f_files else None
    except (OSError, TypeError):
        return "file system full: " if code == errno_mod.ENOSPC else "disk quota exceeded: "
    if code == errno_mod.EDQUOT:
        return f"disk quota exceeded on {d} ({free} bytes free on the file system): "
    if inodes == 0:
        return f"file system full: no free inodes on {d}: "
    if free < max(64 * 2**20, total // 100):
        return f"file system full: {free} bytes free on {d}: "
    return (f"no space left on device although {free} bytes are free on {d} now "
            "(reserved or freed since; quota or file system limit?): ")


def _existing_dir(filename):
    from pathlib import Path

    p = Path(filename) if filename else Path(".")
    for d in (p, *p.parents):
        if d.is_dir():
            return str(d)
    return "."


def agree_phase(comm, phase: str, path, err: BaseException | None, cls, what: str = "checkpoint",
                kind_of=None, kinds: tuple = ()) -> None:
    """Collective over ``comm`` (None: this process alone): if any rank's ``err`` is set, raise
    the same error on every rank -- a ``cls`` naming the failing ranks, file, phase and errno,
    or with ``kinds`` (classes, the least destructive first) the first kind that some failing
    rank's ``kind_of(err)`` (a class name) names, with the first failing rank's message."""
    world = comm.Get_size() if comm is not None else 1
    this_rank = None if err is None else ((kind_of or (lambda e: type(e).__name__))(err),
                                     describe(err, path))
    if world > 1:
        from hpcdqn.parallel.watchdog import again

        again(comm)   # a rank that stalled in this phase is named here, past its deadline
    got = gather_errors(comm, this_rank)
    if got is None:
        return
    bad = [(r, g) for r, g in enumerate(got) if g is not None]
    if kinds:
        names = {k for _, (k, _) in bad}
        cls = next((k for k in kinds if k.__name__ in names), cls)
        e = cls(bad[0][1][1] + (f" (rank {bad[0][0]}, phase '{phase}')" if world > 1 else ""))
    else:
        ranks = ", ".join(str(r) for r, _ in bad)
        head = f"{what} {phase} failed on rank{'s' if len(bad) > 1 else ''} {ranks} of {world}"
        body = "; ".join(f"rank {r}: {m}" for r, (_, m) in bad[:4]) + ("; ..." if len(bad) > 4 else "")
        e = cls(f"{head} (file '{path}', phase '{phase}'): {body}")
    e.agreed, e.phase, e.ranks = True, phase, [r for r, _ in bad]
    raise e
