"""Job lifecycle: an exception on any rank ends the whole job promptly with that rank's traceback;
SIGINT/SIGTERM/SIGUSR1 ask every rank to stop (or checkpoint) at the next agreed point."""

from __future__ import annotations

import signal
import sys
import traceback

import numpy as np

_stop = {"signal": 0}


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
    mine = np.array([rank_order.get(int(_stop["signal"]), 0)], dtype=np.int32)
    if comm.Get_size() > 1:
        comm.Allreduce(MPI.IN_PLACE, mine, op=MPI.MAX)
    return {v: k for k, v in rank_order.items()}[int(mine[0])]


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


def abort_on_exception(fn, *args, **kwargs):
    """Run fn; if it raises on this rank, print the traceback tagged with the rank and abort
    every rank of the job (MPI_Abort) so nobody waits forever in a collective. An error every
    rank raised alike (``agreed``: a failed collective phase, see ``store.agree``) is printed
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
                sys.stderr.write(f"hpcdqn train: {kind} error: {e}\n")
                sys.stderr.flush()
            sys.stdout.flush()
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
