"""Reading and validating a checkpoint, and loading it into a run of the same layout.

Reading: each rank opens the file read-only with the default driver and reads what it needs
(independent reads: a bad file found by one rank cannot leave the others stuck in a
collective); the outcome is agreed with an allreduce.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from hpcdqn import __version__
from hpcdqn.parallel.agree import TRANSIENT_ERRNOS, Local, describe, os_errno
from hpcdqn.store.bounds import check_meta, check_shapes, format_version
from hpcdqn.store.codec import ATTRS_CRC, attrs_crc, crc
from hpcdqn.store.errors import (CheckpointCorrupt, CheckpointError, CheckpointMismatch,
                                 CheckpointTransient, agree)
from hpcdqn.store.schema import (LEARNER_COUNTERS, PARAM_GROUPS, Spec, frame_stack, layer_parts, plan,
                                 replay_rows, replay_specs, rows_per_piece)
from hpcdqn.store.storage import Dataset, H5Source
from hpcdqn.testing import fault


# ---------------------------------------------------------------------------------------------
# reading and validation
# ---------------------------------------------------------------------------------------------
RETRIES = 4                     # transient I/O errors: attempts after the first
RETRY_BASE_S = 0.2              # backoff 0.2, 0.4, 0.8, 1.6 s


def open_checkpoint(path) -> H5Source:
    """Open read-only (the HDF5 backends' ``Source``); a transient I/O error (EIO, EAGAIN, ESTALE, ...) is retried with backoff,
    then raised as ``CheckpointTransient`` (the file is not blamed)."""
    path = Path(path)
    for attempt in range(RETRIES + 1):
        try:
            return _open_once(path)
        except OSError as e:
            if e.errno not in TRANSIENT_ERRNOS:
                raise
            if attempt == RETRIES:
                raise CheckpointTransient(
                    f"checkpoint '{path}' could not be read: {describe(e)} after {RETRIES + 1} "
                    "attempts; the file was left as it is (retry when the file system "
                    "recovers)") from None
            time.sleep(RETRY_BASE_S * 2 ** attempt)
    raise AssertionError("unreachable")


def _open_once(path: Path) -> H5Source:
    if not path.is_file() or path.is_symlink():
        what = "is a symbolic link (refused)" if path.is_symlink() else "does not exist"
        raise CheckpointCorrupt(f"checkpoint '{path}' {what}")
    fault("open", _rank(), path)
    try:
        return H5Source(path)
    except OSError as e:
        if e.errno in TRANSIENT_ERRNOS:
            raise
        _not_the_file(e, path)
        raise CheckpointCorrupt(f"checkpoint '{path}' cannot be opened (truncated or not an HDF5 "
                                f"file): {e}") from None


def _not_the_file(e: BaseException, path) -> None:
    """A read that failed with a system error (an errno: EIO, ENOSPC, EACCES, ..., also where
    HDF5 only wrote it into its message) says nothing about the file's contents: raise
    ``CheckpointTransient`` (refused, the file left as it is, never set aside as corrupt)."""
    code = os_errno(e)
    if code:
        raise CheckpointTransient(
            f"checkpoint '{path}' could not be read: {describe(OSError(code, os.strerror(code)), path)}; "
            "the file was left as it is (retry when the file system recovers)") from None


def _rank() -> int:
    import sys

    if "mpi4py.MPI" not in sys.modules:
        return 0
    return sys.modules["mpi4py.MPI"].COMM_WORLD.Get_rank()


def open_source(path, storage=None):
    """``path`` opened as a ``storage.Source``: by ``storage`` (a backend), else as an HDF5
    checkpoint file (``open_checkpoint``)."""
    return open_checkpoint(path) if storage is None else storage.open(path)


def read_meta(path, comm=None, storage=None) -> dict:
    """Root attributes, JSON-decoded, typed and bounded. With ``comm``: read on every rank and
    the outcome agreed (collective; the same error kind raised everywhere)."""
    err, meta = None, None
    with Local() as loc:
        with open_source(path, storage) as f:
            meta = _meta(f, path)
    err = loc.err
    if comm is not None:
        agree(comm, "read", path, err, keep_kind=True)
    elif err is not None:
        raise err
    return meta


_warned_versions: set = set()


def _meta(f, path) -> dict:
    major, minor = format_version(f.attrs.get("format"), path)
    out = {}
    for k in ("config", "layout", "env", "layer_sizes", "counters"):
        if k not in f.attrs:
            raise CheckpointCorrupt(f"checkpoint '{path}': root attribute '{k}' is missing")
        try:
            out[k] = json.loads(f.attrs[k])
        except (TypeError, ValueError) as e:
            raise CheckpointCorrupt(f"checkpoint '{path}': root attribute '{k}' is not valid "
                                    f"JSON: {e}") from None
    stored = f.attrs.get(ATTRS_CRC)
    if stored is not None or (major, minor) >= (1, 1):
        got = attrs_crc({k: f.attrs[k] for k in f.attrs.keys()})
        if stored is None or int(stored) != got:
            raise CheckpointCorrupt(f"checkpoint '{path}': the root attributes do not match their "
                                    f"checksum (stored {stored}, computed {got}); the file was "
                                    "altered or damaged")
    check_meta(out, path)
    out["version"] = str(f.attrs.get("version", "?"))
    out["io_mode"] = str(f.attrs.get("io_mode", "?"))
    out["format"] = (major, minor)
    if out["version"] != __version__ and out["version"] not in _warned_versions and _rank() == 0:
        _warned_versions.add(out["version"])
        print(f"hpcdqn: warning: checkpoint '{path}' was written by hpcdqn {out['version']}, "
              f"this is {__version__}", file=sys.stderr, flush=True)
    return out


def _dset(f, path, name) -> Dataset:
    """``f``: a ``storage.Source``."""
    if not f.has(name):
        raise CheckpointCorrupt(f"checkpoint '{path}': dataset '{name}' is missing")
    ds = f.dataset(name)
    if ds is None:
        raise CheckpointCorrupt(f"checkpoint '{path}': '{name}' is not a dataset")
    return ds


def read_dataset(f, path, name, sel=slice(None)) -> np.ndarray:
    ds = _dset(f, path, name)
    try:
        return ds.read(sel)
    except (OSError, RuntimeError, ValueError) as e:
        if isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS:
            raise CheckpointTransient(f"checkpoint '{path}': dataset '{name}': {describe(e)}") from None
        _not_the_file(e, path)
        raise CheckpointCorrupt(f"checkpoint '{path}': dataset '{name}' cannot be read: {e}") from None


def _units(meta: dict, f, path) -> list[tuple[Spec, int]]:
    check_shapes(meta, f, path)        # before the plan is sized from the layout
    maxlen = _dset(f, path, "rank_state").shape[1]
    specs = plan(meta["layout"], meta["env"], meta["layer_sizes"], maxlen)
    return [(s, j) for s in specs for j in range(len(s.parts))]


def verify_part(f, path, spec: Spec, j: int) -> None:
    ds = _dset(f, path, spec.name)
    if tuple(ds.shape) != tuple(spec.shape) or ds.dtype != spec.dtype:
        raise CheckpointCorrupt(f"checkpoint '{path}': dataset '{spec.name}' has shape {ds.shape} "
                              f"{ds.dtype}, expected {spec.shape} {spec.dtype}")
    try:
        stored = json.loads(ds.attrs["crc32"])[j]
    except (KeyError, ValueError, IndexError, TypeError):
        raise CheckpointCorrupt(f"checkpoint '{path}': dataset '{spec.name}' has no valid crc32 "
                              "attribute") from None
    _, a, b = spec.parts[j]
    got, rpp = 0, rows_per_piece(spec)
    for p in range(a, b, rpp):
        got = crc(np.asarray(read_dataset(f, path, spec.name, slice(p, min(b, p + rpp))), spec.dtype), got)
    if got != stored:
        where = f" rows [{a}, {b})" if len(spec.parts) > 1 else ""
        raise CheckpointCorrupt(f"checkpoint '{path}': dataset '{spec.name}'{where}: checksum mismatch "
                              f"(stored crc32 {stored:#010x}, data {got:#010x}); the file is corrupted")


def verify(path, comm=None, storage=None) -> None:
    """Check every dataset part against its CRC. With ``comm``: the parts are spread over the
    ranks and the verdict agreed (collective); raises the agreed kind of CheckpointError
    (corrupt, incompatible, transient) on every rank."""
    rank, world = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)
    with Local() as loc:
        try:
            with open_source(path, storage) as f:
                meta = _meta(f, path)
                units = _units(meta, f, path)
                for u, (spec, j) in enumerate(units):
                    if u % world == rank:
                        verify_part(f, path, spec, j)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - h5py raises many kinds on a damaged file
            _not_the_file(e, path)
            raise CheckpointCorrupt(f"checkpoint '{path}': {type(e).__name__}: {e}") from None
    if comm is not None and world > 1:
        agree(comm, "verify", path, loc.err, keep_kind=True)
    elif loc.err is not None:
        raise loc.err


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
        raise CheckpointCorrupt(f"checkpoint '{path}': dataset 'rank_state' row {r} is not JSON: {e}") from None


def read_learner(f, path, meta, lo: int, hi: int) -> dict:
    """A stage's ``state_dict`` (``StageLearner``): its slice [lo, hi) of every parameter/Adam
    vector, whatever layout wrote them, and the learner's counters."""
    flats = {}
    for key, grp in PARAM_GROUPS:
        parts = [np.asarray(read_dataset(f, path, f"{grp}/{i}", slice(a, b)), np.float32)
                 for i, a, b in layer_parts(meta["layer_sizes"], lo, hi)]
        flats[key] = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        if flats[key].size != hi - lo:
            raise CheckpointMismatch(f"checkpoint '{path}': parameters [{lo}, {hi}) hold "
                                     f"{flats[key].size} values, this stage has {hi - lo}")
    bad = int((~np.isfinite(flats["online"])).sum())
    if bad:      # valid bytes (the checksums match) of a diverged run: not corrupt, not loaded
        raise CheckpointError(f"checkpoint '{path}': {bad} online parameters are NaN or infinite "
                              "(the run diverged before this checkpoint?)")
    c = meta["counters"]
    return {**flats, **{k: c[k] for k in LEARNER_COUNTERS}}


def read_replay_shard(f, path, meta, q: int, into: dict) -> dict:
    """Replay shard ``q`` as a replay's ``state_dict``: the per-cell arrays read in place into
    ``into``'s (a ``state_dict`` of a replay of the same layout), the rest read fresh."""
    lay = meta["layout"]
    rows = lay["rows"]
    sl = slice(q * rows, (q + 1) * rows)
    sd = {}
    for k in replay_rows(lay):
        ds = _dset(f, path, f"replay/{k}")
        try:
            ds.read_into(into[k], sl)
        except (OSError, RuntimeError, ValueError, TypeError) as e:
            raise CheckpointCorrupt(f"checkpoint '{path}': dataset 'replay/{k}' cannot be read: {e}") from None
        sd[k] = into[k]
    for k in ("pos", "filled"):
        sd[k] = int(read_dataset(f, path, f"replay/{k}", slice(q, q + 1))[0])
    if frame_stack(lay):
        _, a, b = [s for s in replay_specs(lay, meta["env"]) if s.name == "replay/starts"][0].parts[q]
        sd["starts"] = read_dataset(f, path, "replay/starts", slice(a, b))
    if "priorities" in into:
        sd["priorities"] = np.asarray(read_dataset(f, path, "replay/priorities", sl), np.float64)
        sd["max_priority"] = float(read_dataset(f, path, "replay/max_priority", slice(q, q + 1))[0])
    return sd
