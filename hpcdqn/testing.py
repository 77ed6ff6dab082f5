"""The test hooks, in one place: environment variables that make a real run fail, stall or
pause at a chosen point, so the tests can drive real ranks into the faults they check. Unset
(as in every real run), each hook is a dictionary look-up that does nothing.

- ``HPCDQN_TEST_FAULT=PHASE:RANK:ERRNO[:COUNT][@ENV_STEPS][,...]``: ``fault(PHASE, rank, path)``
  raises ``OSError(ERRNO)`` on that rank (COUNT times, default every time; only for checkpoints
  at or after ENV_STEPS, see ``set_steps``). ERRNO is a name (ENOSPC, EIO, EDQUOT) or a number;
- ``HPCDQN_TEST_STALL=PHASE:RANK[@N]``: RANK stops itself (SIGSTOP) at its N-th gate (default
  the first) of the watchdog phase PHASE (``stall``);
- ``HPCDQN_TEST_CKPT_SLEEP=SECONDS[@MIN_ENV_STEPS]``: a checkpoint waits SECONDS before its
  rename (``checkpoint_sleep``): a window in which a kill -9 hits a half-done checkpoint.

Imports nothing of hpcdqn: every room may call it.
"""

from __future__ import annotations

import errno as errno_mod
import os
import signal
import sys
import time

FAULT_ENV = "HPCDQN_TEST_FAULT"
STALL_ENV = "HPCDQN_TEST_STALL"
CKPT_SLEEP_ENV = "HPCDQN_TEST_CKPT_SLEEP"
_fired: dict[str, int] = {}
_steps = {"now": 0}


def set_steps(env_steps: int) -> None:
    """The env steps of the checkpoint being written (``fault``'s ``@ENV_STEPS``)."""
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
    """Raise the OSError that ``HPCDQN_TEST_FAULT`` asks for at this phase and rank."""
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


def stall(phase: str, rank: int, nth: int) -> None:
    """Stop this process (SIGSTOP) where ``HPCDQN_TEST_STALL`` names this phase, rank and gate."""
    spec = os.environ.get(STALL_ENV, "")
    for item in filter(None, (x.strip() for x in spec.split(","))):
        body, _, at = item.partition("@")
        ph, _, r = body.rpartition(":")
        if ph == phase and int(r) == rank and nth == int(at or 1):
            print(f"hpcdqn: test stall: rank {rank} stops itself (SIGSTOP) in phase '{phase}' "
                  f"t={time.time():.3f}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)


def checkpoint_sleep(env_steps: int) -> float:
    """Seconds a checkpoint at ``env_steps`` waits before its rename (``HPCDQN_TEST_CKPT_SLEEP``)."""
    v = os.environ.get(CKPT_SLEEP_ENV, "")
    if not v:
        return 0.0
    secs, _, at = v.partition("@")
    return float(secs) if env_steps >= int(at or 0) else 0.0
