"""A run directory's checkpoints: their names, the newest valid one, resuming a run's config,
trimming its metrics; the warnings the store prints."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from hpcdqn.store.errors import CheckpointError
from hpcdqn.store.reader import read_meta, verify
from hpcdqn.store.schema import CKPT_DIR, LATEST


# config keys that may change on resume without breaking bitwise equality
RUN_CONTROL_KEYS = {"run_dir", "stop_after", "pp", "micro_batches", "schedule", "checkpoint_every",
                    "checkpoint_minutes", "overwrite", "keep_last", "threads", "device", "vector", "network.cuts",
                    "network.split_layers"}
RUN_CONTROL_PREFIXES = ("log.", "eval.", "parallel.", "watchdog.")


def checkpoint_dir(run_dir) -> Path:
    return Path(run_dir) / CKPT_DIR


def ckpt_name(env_steps: int) -> str:
    return f"ckpt-{env_steps:012d}.h5"


CKPT_RE = re.compile(r"ckpt-\d{12}\.h5")
SET_ASIDE = "set_aside.jsonl"        # one JSON line per checkpoint set aside by a resume


def candidates(run_dir) -> list[Path]:
    """Checkpoints of a run, the ``latest`` one first, then the others newest first. Only plain
    files named like a checkpoint directly inside the checkpoint directory: ``latest`` naming
    anything else (a path outside, a symlink) is ignored with a warning."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir() or d.is_symlink():
        return []
    files = sorted((p for p in d.iterdir() if CKPT_RE.fullmatch(p.name) and not p.is_symlink()
                    and p.is_file()), reverse=True)
    latest = d / LATEST
    if latest.is_file() and not latest.is_symlink():
        try:
            name = latest.read_text(errors="replace")[:256].strip()
        except OSError:
            name = ""
        if name in {p.name for p in files}:
            files = [d / name] + [p for p in files if p.name != name]
        elif name:
            warn(f"'{latest}' names {name!r}, not a checkpoint of this run directory; ignored")
    return files


def set_aside(path: Path, reason: str) -> Path | None:
    """A corrupt checkpoint (rank 0): renamed ``<name>.bad`` in its own directory and recorded
    in ``set_aside.jsonl`` there; nothing outside the checkpoint directory is touched."""
    import json
    import socket
    import time

    path = Path(path)
    if not CKPT_RE.fullmatch(path.name) or path.is_symlink() or not path.is_file():
        return None
    bad = path.with_name(path.name + ".bad")
    try:
        os.replace(path, bad)
        with open(path.parent / SET_ASIDE, "a") as fh:
            fh.write(json.dumps({"file": path.name, "renamed_to": bad.name, "reason": reason,
                                 "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                 "host": socket.gethostname()}) + "\n")
    except OSError as e:
        warn(f"could not set aside '{path}': {e}")
        return None
    return bad


def resolve(path_or_run) -> Path:
    """A checkpoint file, or the newest valid checkpoint of a run directory (serial); either
    way verified (every checksum), so the caller reads a sound file."""
    p = Path(path_or_run)
    if p.is_file():
        verify(p)
        return p
    if not p.is_dir():
        raise CheckpointError(f"'{p}' is neither a checkpoint file nor a run directory")
    errors = []
    for c in candidates(p):
        try:
            verify(c)
            for e in errors:
                warn(e + "; using an older checkpoint")
            return c
        except CheckpointError as e:
            errors.append(str(e))
    raise CheckpointError(f"run directory '{p}' has no valid checkpoint in '{checkpoint_dir(p)}'"
                          + ("".join(f"\n  {e}" for e in errors)))


def warn(msg: str) -> None:
    print(f"hpcdqn: warning: {msg}", file=sys.stderr, flush=True)


def resume_config(run_dir, overrides: list[str]) -> dict:
    """The run's config from its newest readable checkpoint, with command-line overrides
    (``run_dir`` is forced to RUN_DIR; ``stop_after`` resets unless given)."""
    from hpcdqn.config import flatten, load_config, parse_overrides

    run_dir = Path(run_dir)
    meta, errors = None, []
    for c in candidates(run_dir):
        try:
            meta = read_meta(c)
            break
        except CheckpointError as e:
            errors.append(str(e))
    if meta is None:
        raise CheckpointError(f"cannot resume '{run_dir}': no readable checkpoint in "
                              f"'{checkpoint_dir(run_dir)}'" + "".join(f"\n  {e}" for e in errors))
    stored = flatten(meta["config"])
    stored["run_dir"] = str(run_dir)
    stored["stop_after"] = 0
    user = dict(parse_overrides(overrides))
    if "run_dir" in user and Path(user["run_dir"]) != run_dir:
        warn(f"run_dir={user['run_dir']} ignored: --resume continues in {run_dir}")
        user.pop("run_dir")
    merged = {**stored, **user}
    cfg = load_config(overrides=merged)
    changed = [k for k, v in user.items() if stored.get(k) != cfg_get(cfg, k)
               or (k in stored and stored[k] != v)]
    drift = [k for k in changed if k not in RUN_CONTROL_KEYS and not k.startswith(RUN_CONTROL_PREFIXES)]
    if drift:
        warn("resuming with changed " + ", ".join(f"{k}={cfg_get(cfg, k)!r}" for k in drift)
             + ": the run will not be identical to an uninterrupted one")
    return cfg


def cfg_get(cfg: dict, dotted: str):
    node = cfg
    for p in dotted.split("."):
        node = node[p]
    return node


def truncate_metrics(run_dir, env_steps: int, name: str = "metrics.csv") -> None:
    """Drop the rows of ``name`` (a CSV with an env_steps column) logged after the checkpoint we
    resume from (they will be redone)."""
    import csv

    p = Path(run_dir) / name
    if not p.is_file():
        return
    with open(p, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        return
    head, body = rows[0], rows[1:]
    try:
        i = head.index("env_steps")
    except ValueError:
        return
    keep = [r for r in body if r and r[i].isdigit() and int(r[i]) <= env_steps]
    tmp = p.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as fh:
        csv.writer(fh).writerows([head] + keep)
    os.replace(tmp, p)


# ---------------------------------------------------------------------------------------------
# ownership: one job per run directory
# ---------------------------------------------------------------------------------------------
LOCK = "hpcdqn.lock"


def proc_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (guards against a reused pid); None if it is gone,
    or dead and not yet reaped (a zombie: killed, it holds no files and writes nothing more)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return fields[19]


def _me() -> dict:
    import socket
    import time

    return {"job_id": os.environ.get("SLURM_JOB_ID", ""), "host": socket.gethostname(),
            "pid": os.getpid(), "pid_start": proc_start(os.getpid()),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _stale(owner: dict | None, lock: Path) -> str | None:
    """Why the lock's owner is gone (None: it may be alive)."""
    import time

    me = _me()
    if owner is None:    # unreadable: half-written by a job that died (or is writing it now)
        return "unreadable" if time.time() - lock.stat().st_mtime > 10 else None
    if owner.get("job_id") and owner.get("job_id") == me["job_id"]:
        return f"Slurm job {owner['job_id']} was requeued"
    if owner.get("host") == me["host"]:
        pid = int(owner.get("pid", -1))
        start = proc_start(pid) if pid > 0 else None
        if start is None or (owner.get("pid_start") and start != owner.get("pid_start")):
            return f"process {pid} on {me['host']} is gone"
    return None


def acquire_lock(run_dir) -> Path:
    """Rank 0: own ``run_dir`` (``hpcdqn.lock``, created exclusively, with job id, host and pid),
    taking over a stale lock; raises RunDirBusy naming the owner otherwise."""
    import json

    from hpcdqn.store.errors import RunDirBusy

    lock = Path(run_dir) / LOCK
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = json.loads(lock.read_text())
            except (OSError, ValueError):
                owner = None
            try:
                why = _stale(owner, lock)
            except OSError:          # vanished meanwhile: try again
                continue
            if why is None:
                o = owner or {}
                raise RunDirBusy(
                    f"run directory '{run_dir}' is in use by another job (Slurm job "
                    f"{o.get('job_id') or '-'}, host {o.get('host', '?')}, pid {o.get('pid', '?')}, "
                    f"since {o.get('since', '?')}); use another run_dir, or wait for that job. If it "
                    f"is gone (another node died), remove '{lock}'") from None
            warn(f"taking over the lock of '{run_dir}' ({why})")
            lock.unlink(missing_ok=True)
            continue
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(_me()) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as e:       # a half-written lock would hold the directory for 10 s
            lock.unlink(missing_ok=True)
            raise OSError(e.errno, e.strerror, str(lock)) from None
        return lock
    raise RunDirBusy(f"could not lock run directory '{run_dir}' (another job keeps taking it)")


def release_lock(lock: Path) -> None:
    """Remove the lock if it is still ours."""
    import json

    try:
        owner = json.loads(Path(lock).read_text())
    except (OSError, ValueError):
        return
    if owner.get("pid") == os.getpid() and owner.get("host") == _me()["host"]:
        Path(lock).unlink(missing_ok=True)


def check_fresh(run_dir, overwrite: bool) -> None:
    """Rank 0, a run that does not resume: refuse a directory holding checkpoints, unless
    ``overwrite`` (then they are removed, and the new run starts afresh)."""
    from hpcdqn.store.errors import RunDirBusy

    d = checkpoint_dir(run_dir)
    old = candidates(run_dir)
    if not old:
        return
    if not overwrite:
        raise RunDirBusy(
            f"run directory '{run_dir}' holds {len(old)} checkpoint(s) of an earlier run "
            f"(newest {old[0].name}); continue it with `hpcdqn train --resume {run_dir}`, start "
            "afresh there with overwrite=true (its checkpoints are deleted), or choose another "
            "run_dir")
    warn(f"overwrite=true: removing {len(old)} checkpoint(s) of the earlier run in '{d}'")
    for p in old + [d / LATEST]:
        p.unlink(missing_ok=True)
