"""Reading and validating a checkpoint, and loading it into a run of the same layout.

Reading: each rank opens the file read-only with the default driver and reads what it needs
(independent reads: a bad file found by one rank cannot leave the others stuck in a
collective); the outcome is agreed with an allreduce.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from hpcdqn.store.codec import crc
from hpcdqn.store.errors import CheckpointError, CheckpointMismatch
from hpcdqn.store.schema import (FORMAT, PARAM_GROUPS, REPLAY_ROWS, Spec, layer_parts, plan,
                                 rows_per_piece)


# ---------------------------------------------------------------------------------------------
# reading and validation
# ---------------------------------------------------------------------------------------------
def open_checkpoint(path) -> h5py.File:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise CheckpointError(f"checkpoint '{path}' cannot be opened (truncated or not an HDF5 "
                              f"file): {e}") from None


def read_meta(path) -> dict:
    """Root attributes, JSON-decoded. Raises CheckpointError."""
    with open_checkpoint(path) as f:
        return _meta(f, path)


def _meta(f, path) -> dict:
    fmt = f.attrs.get("format")
    if fmt != FORMAT:
        raise CheckpointError(f"checkpoint '{path}': not an hpcdqn checkpoint "
                              f"(attribute 'format' = {fmt!r}, expected {FORMAT!r})")
    out = {}
    for k in ("config", "layout", "env", "layer_sizes", "counters"):
        if k not in f.attrs:
            raise CheckpointError(f"checkpoint '{path}': root attribute '{k}' is missing")
        try:
            out[k] = json.loads(f.attrs[k])
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint '{path}': root attribute '{k}' is not valid JSON: {e}") from None
    out["version"] = str(f.attrs.get("version", "?"))
    out["io_mode"] = str(f.attrs.get("io_mode", "?"))
    return out


def _dset(f, path, name) -> h5py.Dataset:
    if name not in f:
        raise CheckpointError(f"checkpoint '{path}': dataset '{name}' is missing")
    ds = f[name]
    if not isinstance(ds, h5py.Dataset):
        raise CheckpointError(f"checkpoint '{path}': '{name}' is not a dataset")
    return ds


def read_dataset(f, path, name, sel=slice(None)) -> np.ndarray:
    ds = _dset(f, path, name)
    try:
        return ds[sel]
    except (OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"checkpoint '{path}': dataset '{name}' cannot be read: {e}") from None


def _units(meta: dict, f, path) -> list[tuple[Spec, int]]:
    maxlen = _dset(f, path, "rank_state").shape[1]
    specs = plan(meta["layout"], meta["env"], meta["layer_sizes"], maxlen)
    return [(s, j) for s in specs for j in range(len(s.parts))]


def verify_part(f, path, spec: Spec, j: int) -> None:
    ds = _dset(f, path, spec.name)
    if tuple(ds.shape) != tuple(spec.shape) or ds.dtype != spec.dtype:
        raise CheckpointError(f"checkpoint '{path}': dataset '{spec.name}' has shape {ds.shape} "
                              f"{ds.dtype}, expected {spec.shape} {spec.dtype}")
    try:
        stored = json.loads(ds.attrs["crc32"])[j]
    except (KeyError, ValueError, IndexError, TypeError):
        raise CheckpointError(f"checkpoint '{path}': dataset '{spec.name}' has no valid crc32 "
                              "attribute") from None
    _, a, b = spec.parts[j]
    got, rpp = 0, rows_per_piece(spec)
    for p in range(a, b, rpp):
        got = crc(np.asarray(read_dataset(f, path, spec.name, slice(p, min(b, p + rpp))), spec.dtype), got)
    if got != stored:
        where = f" rows [{a}, {b})" if len(spec.parts) > 1 else ""
        raise CheckpointError(f"checkpoint '{path}': dataset '{spec.name}'{where}: checksum mismatch "
                              f"(stored crc32 {stored:#010x}, data {got:#010x}); the file is corrupted")


def verify(path, comm=None) -> None:
    """Check every dataset part against its CRC. With ``comm``: the parts are spread over the
    ranks and the verdict agreed (collective); raises CheckpointError on every rank."""
    rank, world = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)
    err = None
    try:
        with open_checkpoint(path) as f:
            meta = _meta(f, path)
            units = _units(meta, f, path)
            for u, (spec, j) in enumerate(units):
                if u % world == rank:
                    verify_part(f, path, spec, j)
    except CheckpointError as e:
        err = str(e)
    except Exception as e:  # noqa: BLE001 - h5py raises many kinds on a damaged file
        err = f"checkpoint '{path}': {type(e).__name__}: {e}"
    if comm is not None and world > 1:
        errs = [e for e in comm.allgather(err) if e]
        err = errs[0] if errs else None
    if err:
        raise CheckpointError(err)


# ---------------------------------------------------------------------------------------------
# loading into a run
# ---------------------------------------------------------------------------------------------
def check_compatible(meta: dict, path, env: dict, sizes: list[int]) -> None:
    old = meta["env"]
    same = (old["env_id"] == env["env_id"] and list(old["obs_shape"]) == list(env["obs_shape"])
            and np.dtype(old["obs_dtype"]) == np.dtype(env["obs_dtype"])
            and int(old["n_actions"]) == int(env["n_actions"]))
    if not same:
        raise CheckpointMismatch(
            f"checkpoint '{path}' was written for env_id={old['env_id']!r} (observation shape "
            f"{tuple(old['obs_shape'])} {old['obs_dtype']}, {old['n_actions']} actions); this run "
            f"has env_id={env['env_id']!r} (observation shape {tuple(env['obs_shape'])} "
            f"{env['obs_dtype']}, {env['n_actions']} actions)")
    if list(meta["layer_sizes"]) != list(sizes):
        raise CheckpointMismatch(
            f"checkpoint '{path}': its network has per-layer parameter counts "
            f"{meta['layer_sizes']}, this run's network has {sizes} (network.hidden or "
            "network.dueling changed?)")


def load_rank_state(f, path, r: int) -> dict:
    n = int(read_dataset(f, path, "rank_state_len", slice(r, r + 1))[0])
    raw = read_dataset(f, path, "rank_state", (slice(r, r + 1), slice(0, n)))[0].tobytes()
    try:
        return json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"checkpoint '{path}': dataset 'rank_state' row {r} is not JSON: {e}") from None


def load_learner(f, path, meta, learner) -> None:
    """This stage's slice of every parameter/Adam vector, whatever layout wrote them."""
    lo, hi = learner.param_range()
    flats = {}
    for key, grp in PARAM_GROUPS:
        parts = [np.asarray(read_dataset(f, path, f"{grp}/{i}", slice(a, b)), np.float32)
                 for i, a, b in layer_parts(meta["layer_sizes"], lo, hi)]
        flats[key] = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        if flats[key].size != hi - lo:
            raise CheckpointMismatch(f"checkpoint '{path}': parameters [{lo}, {hi}) hold "
                                     f"{flats[key].size} values, this stage has {hi - lo}")
    c = meta["counters"]
    learner.load_state(flats, {"updates": c["updates"], "adam_step": c["adam_step"], "lr": c["lr"]})


def load_replay_same(f, path, meta, replay, q: int) -> None:
    lay = meta["layout"]
    rows = lay["rows"]
    sl = slice(q * rows, (q + 1) * rows)
    for k in REPLAY_ROWS:
        ds = _dset(f, path, f"replay/{k}")
        try:
            ds.read_direct(getattr(replay, k), np.s_[sl])
        except (OSError, RuntimeError, ValueError, TypeError) as e:
            raise CheckpointError(f"checkpoint '{path}': dataset 'replay/{k}' cannot be read: {e}") from None
    replay.pos = int(read_dataset(f, path, "replay/pos", slice(q, q + 1))[0])
    replay.filled = int(read_dataset(f, path, "replay/filled", slice(q, q + 1))[0])
    if replay.prioritized:
        pr = np.asarray(read_dataset(f, path, "replay/priorities", sl), np.float64).reshape(-1)
        replay.tree.tree[:] = 0.0
        replay.tree.set(np.arange(pr.size), pr)
        replay.max_priority = float(read_dataset(f, path, "replay/max_priority", slice(q, q + 1))[0])
