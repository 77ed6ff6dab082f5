"""Job lifecycle: an exception on any rank ends the whole job promptly with that rank's traceback;
SIGINT/SIGTERM/SIGUSR1 ask every rank to stop (or checkpoint) at the next agreed point."""

from __future__ import annotations

import signal
import sys
import time
import traceback

import numpy as np

_stop = {"signal": 0}
_broken: list = []          # HDF5 files whose flush failed: never closed (see keep_broken)
_on_leave: list = []        # what a fast exit still does (release the run directory's lock)


def keep_broken(handle) -> None:
    """An HDF5 file whose flush or close failed (ENOSPC, EIO): HDF5 1.10 crashes (SIGSEGV in
    ``H5F__close_cb``) closing it again, at once or at interpreter exit. It is kept referenced,
    never closed, and the process leaves with ``leave`` (no HDF5 atexit)."""
    _broken.append(handle)


def on_leave(fn) -> None:
    """``fn()`` runs before a fast exit (``leave``), where atexit handlers are skipped."""
    _on_leave.append(fn)


def leave(status: int, comm=None, collective: bool = True) -> None:
    """Collective over ``comm`` (default: the world, every rank leaving together, as after an
    agreed error): if any rank holds a broken HDF5 file (``keep_broken``), every rank runs its
    ``on_leave`` callbacks, flushes, meets the others at a barrier and leaves with
    ``os._exit(status)``: no rank calls MPI_Finalize (HDF5 closes its files there, and would
    crash on the broken one), none is left waiting in it. Otherwise it returns (the caller
    exits normally). ``collective=False``: this rank alone decides (where the others may not
    be leaving with it)."""
    import os

    MPI = sys.modules.get("mpi4py.MPI")
    mpi_up = collective and MPI is not None and MPI.Is_initialized() and not MPI.Is_finalized()
    if mpi_up:
        comm = comm or MPI.COMM_WORLD
        broken = comm.allreduce(1 if _broken else 0, op=MPI.MAX) if comm.Get_size() > 1 else len(_broken)
    else:
        broken = len(_broken)
    if not broken:
        return
    for fn in _on_leave:
        try:
            fn()
        except Exception:  # noqa: BLE001 - leaving anyway
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    if mpi_up and comm.Get_size() > 1:
        comm.Barrier()
    os._exit(status)


def install_signal_handlers() -> None:
    def handler(signum, frame):
        if _stop["signal"] == signum and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        _stop["signal"] = signum

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        try:
            signal.signal(s, handler)
        except (ValueError, OSError):  # not the main thread
            pass


def agree_signal(comm) -> int:
    """Collective: the highest-priority signal any rank saw (SIGTERM/INT > USR1 > none)."""
    from mpi4py import MPI

    rank_order = {0: 0, int(signal.SIGUSR1): 1, int(signal.SIGINT): 2, int(signal.SIGTERM): 3}
    seen = np.array([rank_order.get(int(_stop["signal"]), 0)], dtype=np.int32)
    if comm.Get_size() > 1:
        comm.Allreduce(MPI.IN_PLACE, seen, op=MPI.MAX)
    return {v: k for k, v in rank_order.items()}[int(seen[0])]


USER_ERRORS = ("ConfigError", "LayoutError", "CheckpointError", "EnvError")


def user_error_kind(e: BaseException) -> str | None:
    """'config', 'layout', 'checkpoint' or 'env' for errors that mean "your input is wrong"
    (they carry a message that says what to do); None for anything else."""
    for c in type(e).__mro__:
        if c.__name__ in USER_ERRORS:
            return c.__name__[:-len("Error")].lower()
    return None


def is_user_error(e: BaseException) -> bool:
    return user_error_kind(e) is not None


def _user_error_class(kind: str):
    """The exception class of a user-error kind (``user_error_kind``), for ranks that agree on
    another rank's error without having raised one themselves (set-up phases raise config,
    layout and env errors; checkpoint errors are agreed by ``store`` itself)."""
    if kind == "layout":
        from hpcdqn.parallel.grid import LayoutError as cls
    elif kind == "env":
        from hpcdqn.rl.envs import EnvError as cls
    else:
        from hpcdqn.config import ConfigError as cls
    return cls


def gather_errors(comm, this_rank):
    """Collective over ``comm`` (None: this process alone): ``None`` when no rank holds an error
    (``this_rank`` is None everywhere: one Allreduce of a flag, the cheap common case), else every
    rank's ``this_rank`` in rank order (an allgather). The one cross-rank step of every agreed phase
    (``agree_user_errors`` here, ``parallel.agree.agree_phase`` for files)."""
    if comm is None or comm.Get_size() == 1:
        return None if this_rank is None else [this_rank]
    from mpi4py import MPI

    flag = np.array([0 if this_rank is None else 1], np.int32)
    comm.Allreduce(MPI.IN_PLACE, flag, op=MPI.MAX)
    return comm.allgather(this_rank) if flag[0] else None


def agree_user_errors(comm, err: BaseException | None) -> None:
    """Collective over ``comm``, after a set-up phase that every rank runs alike (resolving the
    config for the layout, building the envs, the memory plan): if some rank's ``err`` is a user
    error (``user_error_kind``), every rank raises the same agreed error, whose distinct
    messages (``.messages``) ``abort_on_exception`` prints once (rank 0) before every rank exits
    with status 2: no MPI_Abort, so no Open MPI abort report. A rank whose ``err`` is anything
    else re-raises it (its traceback, then MPI_Abort); the others go on and are ended by that
    abort."""
    this_rank = None if err is None else (user_error_kind(err), str(err))
    got = gather_errors(comm, this_rank)
    if got is None:
        return
    if err is not None and this_rank[0] is None:
        raise err
    bad = [g for g in got if g is not None and g[0] is not None]
    if not bad:
        return            # only other ranks' bugs: their abort ends this rank
    messages = list(dict.fromkeys(m for _, m in bad))      # distinct, in rank order
    e = err if err is not None else _user_error_class(bad[0][0])("; ".join(messages))
    e.agreed, e.messages = True, messages
    raise e


def leave_together(comm, timeout_s: float = 10.0) -> None:
    """Every rank of ``comm`` arrives here before any leaves (a non-blocking barrier, given up
    after ``timeout_s``): mpirun ends the job when the first rank exits with a non-zero status,
    which must not cut rank 0 off before its message is out."""
    req = comm.Ibarrier()
    end = time.monotonic() + timeout_s
    while not req.Test() and time.monotonic() < end:
        time.sleep(0.005)


def abort_on_exception(fn, *args, **kwargs):
    """Run fn; if it raises on this rank, print the traceback tagged with the rank and abort
    every rank of the job (MPI_Abort) so nobody waits forever in a collective. An error every
    rank raised alike (``agreed``: a failed collective phase, see ``parallel.agree``) is printed
    once, by rank 0, and every rank exits with status 2."""
    try:
        return fn(*args, **kwargs)
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - we re-raise or abort
        try:
            from mpi4py import MPI

            size, rank = MPI.COMM_WORLD.Get_size(), MPI.COMM_WORLD.Get_rank()
        except Exception:  # pragma: no cover
            size, rank = 1, 0
        if size == 1:
            raise
        if getattr(e, "agreed", False):   # every rank raised the same error: say it once, exit
            if rank == 0:
                kind = getattr(e, "kind", None) or user_error_kind(e) or "error"
                for msg in getattr(e, "messages", None) or [str(e)]:
                    sys.stderr.write(f"hpcdqn train: {kind} error: {msg}\n")
                sys.stderr.flush()
            sys.stdout.flush()
            leave(2)
            leave_together(MPI.COMM_WORLD)
            raise SystemExit(2) from None
        if is_user_error(e):   # a clear message, no traceback: the input is wrong, not the code
            sys.stderr.write(f"hpcdqn train: {user_error_kind(e)} error (rank {rank}/{size}): {e}\n")
            sys.stderr.flush()
            MPI.COMM_WORLD.Abort(2)
        tb = traceback.format_exc()
        tag = f"[hpcdqn rank {rank}/{size}]"
        sys.stderr.write("".join(f"{tag} {line}\n" for line in tb.rstrip().splitlines()))
        sys.stderr.write(f"{tag} aborting all {size} ranks because rank {rank} raised "
                         f"{type(e).__name__}\n")
        sys.stderr.flush()
        sys.stdout.flush()
        MPI.COMM_WORLD.Abort(130 if isinstance(e, KeyboardInterrupt) else 1)
