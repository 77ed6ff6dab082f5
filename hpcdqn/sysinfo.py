"""What the machine says about this process and its allocation: resident memory from /proc,
the memory a rank may use (``--mem-per-rank``, ``HPCDQN_MEM_PER_RANK``, the Slurm allocation,
``MemTotal``) and byte sizes for people.

The cap per rank: ``--mem-per-rank`` / ``HPCDQN_MEM_PER_RANK`` (e.g. ``6G``), else under
Slurm the allocation (``SLURM_MEM_PER_CPU`` x cpus per task, or ``SLURM_MEM_PER_NODE`` /
tasks per node; 0, Slurm's "all of the node", falls through), else the node's ``MemTotal`` /
ranks on this node. The cap is the planner's (``learner.budget``): the kernel does not enforce it.
"""

from __future__ import annotations

import os
import resource

from hpcdqn.config import ConfigError

ENV_CAP = "HPCDQN_MEM_PER_RANK"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _proc_kb(path: str, key: str) -> int | None:
    """A ``KEY:  N kB`` line of a /proc file (``/proc/self/status``, ``/proc/meminfo``)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _status_kb(key: str) -> int | None:
    return _proc_kb("/proc/self/status", key)


def peak_rss() -> int:
    """This process's peak resident set size in bytes (VmHWM; else getrusage's ru_maxrss)."""
    kb = _status_kb("VmHWM")
    return 1024 * (kb if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def current_rss() -> int:
    kb = _status_kb("VmRSS")
    return 1024 * kb if kb is not None else peak_rss()


def parse_bytes(text: str) -> int:
    """'6G', '512M', '1.5G', '1000000' -> bytes (binary units; a trailing B or iB is fine)."""
    t = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1] if t and t[-1] in "KMGT" else ""
    try:
        value = float(t[:-1] if unit else t)
    except ValueError:
        raise ConfigError(f"memory size {text!r}: use a number with an optional unit K, M, G or T "
                          "(e.g. 6G)") from None
    if not value > 0:
        raise ConfigError(f"memory size {text!r} must be > 0")
    return int(value * _UNITS[unit])


def fmt_bytes(n: float) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def cap_per_rank(local_ranks: int, override: str | None = None) -> tuple[int, str]:
    """(bytes a rank may use, where that figure comes from)."""
    if override:
        return parse_bytes(override), "--mem-per-rank"
    if os.environ.get(ENV_CAP):
        return parse_bytes(os.environ[ENV_CAP]), ENV_CAP
    per_cpu, per_node = _slurm_int("SLURM_MEM_PER_CPU"), _slurm_int("SLURM_MEM_PER_NODE")
    if per_cpu:     # (Slurm gives MB; 0 means "all of the node's memory": next rule)
        cpus = _slurm_int("SLURM_CPUS_PER_TASK") or 1
        return per_cpu * (1 << 20) * cpus, f"Slurm: SLURM_MEM_PER_CPU={per_cpu}M x {cpus} cpus per task"
    if per_node:
        tasks = _slurm_int("SLURM_NTASKS_PER_NODE") or local_ranks
        return per_node * (1 << 20) // max(1, tasks), \
            f"Slurm: SLURM_MEM_PER_NODE={per_node}M / {tasks} tasks per node"
    total = (_meminfo_kb("MemTotal") or 0) * 1024
    return total // max(1, local_ranks), f"MemTotal / {local_ranks} rank(s) on this node"


def _slurm_int(name: str) -> int | None:
    """A Slurm count from the environment (``4``, or ``4(x2)`` as SLURM_NTASKS_PER_NODE may be)."""
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        return int(text.split("(")[0])
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not a number; unset it or set {ENV_CAP} "
                          "(e.g. 6G)") from None


def _meminfo_kb(key: str) -> int | None:
    return _proc_kb("/proc/meminfo", key)
