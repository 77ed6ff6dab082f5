"""Error agreement around collective phases, and the fault-injection hook of the tests.

The pattern, used for every phase of a checkpoint (create, write, flush, close, rename, verify,
read)::

    with Local() as loc:          # this rank's work; an exception is caught, not raised
        ...
    agree(comm, "flush", path, loc.err)   # collective: raises on every rank if any rank failed

``agree`` reduces a flag over the ranks (MAX), and only if some rank failed gathers the failing
ranks' messages; every rank then raises the same ``CheckpointIOError`` naming rank, file, phase
and errno. No rank makes a further collective call after a local error before this agreement,
so one rank's ENOSPC cannot leave the others waiting in a collective, and no collective call
sits in a ``finally`` that runs after a local error.

Fault injection (tests only): ``HPCDQN_TEST_FAULT=PHASE:RANK:ERRNO[:COUNT][@ENV_STEPS][,...]``
makes ``fault(PHASE, rank, path)`` raise ``OSError(ERRNO)`` on that rank (COUNT times, default
every time; only for checkpoints at or after ENV_STEPS). ERRNO is a name (ENOSPC, EIO, EDQUOT)
or a number.
"""

from __future__ import annotations

import errno as errno_mod
import os
import sys
import time


from hpcdqn.parallel.lifecycle import gather_errors
from hpcdqn.store.errors import (CheckpointCorrupt, CheckpointError, CheckpointIncompatible,
                                 CheckpointIOError, CheckpointMismatch, CheckpointTransient,
                                 RunFileError)

FAULT_ENV = "HPCDQN_TEST_FAULT"
_fired: dict[str, int] = {}
# errors that may clear on a retry (network file systems, overloaded servers)
TRANSIENT_ERRNOS = {errno_mod.EIO, errno_mod.EAGAIN, errno_mod.EINTR, errno_mod.ETIMEDOUT,
                    errno_mod.ESTALE, errno_mod.EBUSY}
_steps = {"now": 0}


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
    if isinstance(err, CheckpointError):
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


# the kinds a read phase can agree on, least destructive first: a file is set aside only when
# every failing rank found it corrupt
_KINDS = (CheckpointIncompatible, CheckpointMismatch, CheckpointTransient, CheckpointCorrupt)


def _kind(err: BaseException) -> str:
    for k in _KINDS:
        if isinstance(err, k):
            return k.__name__
    if isinstance(err, OSError) and err.errno in TRANSIENT_ERRNOS:
        return CheckpointTransient.__name__
    return CheckpointError.__name__


def agree(comm, phase: str, path, err: BaseException | None, what: str = "checkpoint",
          keep_kind: bool = False, cls=CheckpointIOError) -> None:
    """Collective over ``comm`` (None: this process alone): if any rank's ``err`` is set, raise
    the same error on every rank -- a ``CheckpointIOError`` naming the failing ranks, file, phase
    and errno, or with ``keep_kind`` the kind the failing ranks agree on (see ``_KINDS``)."""
    world = comm.Get_size() if comm is not None else 1
    mine = None if err is None else (_kind(err), describe(err, path))
    if world > 1:
        from hpcdqn.parallel.watchdog import again

        again(comm)   # a rank that stalled in this phase is named here, past its deadline
    got = gather_errors(comm, mine)
    if got is None:
        return
    bad = [(r, g) for r, g in enumerate(got) if g is not None]
    if keep_kind:
        kinds = {k for _, (k, _) in bad}
        cls = next((k for k in _KINDS if k.__name__ in kinds), CheckpointError)
        e = cls(bad[0][1][1] + (f" (rank {bad[0][0]}, phase '{phase}')" if world > 1 else ""))
    else:
        ranks = ", ".join(str(r) for r, _ in bad)
        head = f"{what} {phase} failed on rank{'s' if len(bad) > 1 else ''} {ranks} of {world}"
        body = "; ".join(f"rank {r}: {m}" for r, (_, m) in bad[:4]) + ("; ..." if len(bad) > 4 else "")
        e = cls(f"{head} (file '{path}', phase '{phase}'): {body}")
    e.agreed, e.phase, e.ranks = True, phase, [r for r, _ in bad]
    raise e


def agree_write(comm, what: str, path, err: BaseException | None) -> None:
    """Collective: ``agree`` for a run file written by one rank (metrics, eval.csv, summary,
    model file): every rank raises the same ``RunFileError`` (one line, exit status 2)."""
    agree(comm, "write", path, err, what=what, cls=RunFileError)


def set_steps(env_steps: int) -> None:
    _steps["now"] = int(env_steps)


def _specs():
    for item in filter(None, (x.strip() for x in os.environ.get(FAULT_ENV, "").split(","))):
        body, _, at = item.partition("@")
        fields = body.split(":")
        if len(fields) < 3:
            raise ValueError(f"{FAULT_ENV}: '{item}' is not PHASE:RANK:ERRNO[:COUNT][@ENV_STEPS]")
        count = int(fields[3]) if len(fields) > 3 else -1
        yield item, fields[0], int(fields[1]), fields[2], count, int(at or 0)


def fault(phase: str, rank: int, path) -> None:
    """Tests only: raise the OSError that ``HPCDQN_TEST_FAULT`` asks for at this phase/rank."""
    if FAULT_ENV not in os.environ:
        return
    for item, ph, r, code, count, at in _specs():
        if ph != phase or r != rank or _steps["now"] < at:
            continue
        if count >= 0 and _fired.get(item, 0) >= count:
            continue
        _fired[item] = _fired.get(item, 0) + 1
        num = int(code) if code.isdigit() else getattr(errno_mod, code)
        print(f"hpcdqn: test fault: {code} at phase '{phase}' on rank {rank} "
              f"t={time.time():.3f}", file=sys.stderr, flush=True)
        raise OSError(num, f"{os.strerror(num)} (injected by {FAULT_ENV})", str(path))
