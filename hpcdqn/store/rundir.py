"""A run directory's checkpoints: their names, the newest valid one, resuming a run's config,
trimming its metrics; the warnings the store prints."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hpcdqn.store.errors import CheckpointError
from hpcdqn.store.reader import read_meta, verify
from hpcdqn.store.schema import CKPT_DIR, LATEST


# config keys that may change on resume without breaking bitwise equality
RUN_CONTROL_KEYS = {"run_dir", "stop_after", "pp", "micro_batches", "schedule", "checkpoint_every",
                    "keep_last", "threads", "device", "vector", "network.cuts",
                    "network.split_layers"}
RUN_CONTROL_PREFIXES = ("log.", "eval.", "parallel.")


def checkpoint_dir(run_dir) -> Path:
    return Path(run_dir) / CKPT_DIR


def ckpt_name(env_steps: int) -> str:
    return f"ckpt-{env_steps:012d}.h5"


def candidates(run_dir) -> list[Path]:
    """Checkpoints of a run, the ``latest`` one first, then the others newest first."""
    d = checkpoint_dir(run_dir)
    files = sorted(d.glob("ckpt-*.h5"), reverse=True)
    latest = d / LATEST
    if latest.is_file():
        name = latest.read_text().strip()
        if (d / name).is_file():
            files = [d / name] + [p for p in files if p.name != name]
    return files


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


def truncate_metrics(run_dir, env_steps: int) -> None:
    """Drop metric rows logged after the checkpoint we resume from (they will be redone)."""
    import csv

    p = Path(run_dir) / "metrics.csv"
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
