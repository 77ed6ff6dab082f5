"""The final model file (``model.h5``): the online network's flat parameters plus JSON attributes
(config, observation shape/dtype, action count). Arrays and JSON only: no pickle, so loading an
untrusted file cannot run code.

A pipelined run writes it with its stages together (``write_model_slices``): rank 0 creates
the file, each stage then writes its own range of the flat vector at the dataset's offset, so
no rank ever holds the whole network. Loading checks the stored size against the config's network before allocating."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import torch

from hpcdqn import __version__
from hpcdqn.parallel.flat import FlatModule
from hpcdqn.parallel.layout import stage_bounds
from hpcdqn.parallel.partition import param_ranges, stage_modules
from hpcdqn.rl.networks import KINDS, network_layers, num_params
from hpcdqn.store.mpiio import h5_image

FORMAT = "hpcdqn-model-1"


def _attrs(f, cfg: dict, obs_shape, obs_dtype, n_actions: int) -> None:
    f.attrs["format"] = FORMAT
    f.attrs["version"] = __version__
    f.attrs["config"] = json.dumps(cfg)
    f.attrs["obs_shape"] = json.dumps(list(obs_shape))
    f.attrs["obs_dtype"] = np.dtype(obs_dtype).str
    f.attrs["n_actions"] = int(n_actions)


def save_model(path: Path, flat: np.ndarray, cfg: dict, obs_shape, obs_dtype, n_actions: int) -> None:
    """One process writes the whole model file: the file created with the dataset's space
    allocated (HDF5 builds only the metadata in memory), then the parameters ``pwrite`` straight
    from ``flat`` (no copy of the network: a file image of it would double the peak)."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    flat = np.ascontiguousarray(flat, dtype=np.float32)
    offset = _create_model(tmp, flat.size, cfg, obs_shape, obs_dtype, n_actions)
    _pwrite_synced(tmp, flat, offset)
    tmp.replace(path)


def _pwrite_synced(tmp: Path, data: np.ndarray, at: int) -> None:
    """``data``'s bytes into ``tmp`` at byte ``at``, then fsync."""
    fd = os.open(tmp, os.O_WRONLY)
    try:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], at + done)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_model_slices(path: Path, stage_flat: np.ndarray, lo: int, total: int, comm, cfg: dict,
                       obs_shape, obs_dtype, n_actions: int) -> str:
    """Collective over ``comm`` (one replica's stages, rank 0 = the first stage): write the model
    file, each rank its slice ``[lo, lo + len(stage_flat))`` of the ``total`` flat parameters.
    Rank 0 creates the file (the dataset's space allocated, its offset broadcast), then every rank
    ``pwrite``s its slice and fsyncs (no collective I/O call: one rank's failed write cannot
    leave the others in a collective). Returns the I/O mode used. Errors are agreed: every rank
    raises the same ``RunFileError`` if one failed."""
    from hpcdqn.parallel.agree import Local
    from hpcdqn.store.errors import agree_write

    path = Path(path)
    tmp = path.with_suffix(".tmp")
    stage_flat = np.ascontiguousarray(stage_flat, dtype=np.float32)
    offset = None
    with Local() as loc:
        if comm.Get_rank() == 0:
            offset = _create_model(tmp, total, cfg, obs_shape, obs_dtype, n_actions)
    agree_write(comm, "the model file", tmp, loc.err)
    offset = comm.bcast(offset, root=0)
    with Local() as loc:
        _pwrite_synced(tmp, stage_flat, offset + lo * 4)
    if isinstance(loc.err, OSError) and loc.err.filename is None:
        loc.err.filename = str(tmp)
    agree_write(comm, "the model file", tmp, loc.err)
    with Local() as loc:
        if comm.Get_rank() == 0:
            tmp.replace(path)
    agree_write(comm, "the model file", path, loc.err)
    return "parallel"


def write_run_model(path: Path, grid, flat: np.ndarray, lo: int, total: int, cfg: dict,
                    obs_shape, obs_dtype, n_actions: int) -> None:
    """Collective over ``grid.comm`` (the world): a run's ``model.h5``. At pp=1 rank 0 writes
    the whole network; pipelined, replica 0's stages write their own slices together (no rank
    gathers the whole network; ``flat``: this stage's parameters, ``[lo, lo + len(flat))`` of
    ``total``). The outcome is agreed over the world (a barrier too)."""
    from hpcdqn.parallel.agree import Local
    from hpcdqn.store.errors import agree_write

    args = (cfg, obs_shape, obs_dtype, n_actions)
    with Local() as loc:
        if grid.pp == 1:
            if grid.is_root:
                save_model(path, flat, *args)
        elif grid.dp_rank == 0:
            write_model_slices(path, flat, lo, total, grid.pp_comm, *args)
    agree_write(grid.comm, "model.h5", path, loc.err)


def _create_model(tmp: Path, total: int, cfg, obs_shape, obs_dtype, n_actions) -> int:
    from h5py import h5d, h5p

    def fill(f, hold):
        _attrs(f, cfg, obs_shape, obs_dtype, n_actions)
        dcpl = h5p.create(h5p.DATASET_CREATE)
        dcpl.set_alloc_time(h5d.ALLOC_TIME_EARLY)
        dcpl.set_fill_time(h5d.FILL_TIME_NEVER)
        hold.append(f.create_dataset("online", shape=(total,), dtype=np.float32, dcpl=dcpl))
        return int(hold[-1].id.get_offset())

    offset, fd = h5_image(tmp, fill)
    os.close(fd)
    return offset


def model_size(path: Path) -> tuple[int, int]:
    """(parameters stored, the run's pp) without reading the parameters."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file '{path}' does not exist (did the run finish?)")
    with h5py.File(path, "r") as f:
        if f.attrs.get("format") != FORMAT or "online" not in f or len(f["online"].shape) != 1:
            raise ValueError(f"'{path}' is not an hpcdqn model file (format={f.attrs.get('format')!r})")
        return int(f["online"].shape[0]), int(json.loads(f.attrs["config"]).get("pp", 1))


MAX_DIM, MAX_WIDTHS, MAX_PARAMS = 1 << 20, 64, 1 << 33


def _declared(f, path) -> tuple:
    """The file's declared network, typed and bounded (raises ValueError)."""
    try:
        cfg = json.loads(f.attrs["config"])
        obs_shape = tuple(json.loads(f.attrs["obs_shape"]))
        n_actions = int(f.attrs["n_actions"])
        hidden, dueling = cfg["network"]["hidden"], cfg["network"]["dueling"]
        kind = cfg["network"].get("kind", "auto")     # (files from before network.kind: auto)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"'{path}': its attributes are missing or malformed ({type(e).__name__}: "
                         f"{e})") from None
    ok = (1 <= len(obs_shape) <= 3 and all(isinstance(d, int) and 1 <= d <= MAX_DIM for d in obs_shape)
          and 1 <= n_actions <= MAX_DIM and isinstance(hidden, list) and len(hidden) <= MAX_WIDTHS
          and all(isinstance(w, int) and not isinstance(w, bool) and 1 <= w <= MAX_DIM for w in hidden)
          and isinstance(dueling, bool) and kind in KINDS)
    if not ok:
        raise ValueError(f"'{path}': declared network out of bounds (obs_shape={obs_shape}, "
                         f"n_actions={n_actions}, hidden={hidden}, dueling={dueling}, kind={kind!r})")
    return cfg, obs_shape, n_actions, hidden, dueling, kind


def _checked(f, path) -> tuple:
    """(cfg, obs_shape, n_actions, meta layers, the 'online' dataset) of an open model file,
    every size checked before anything is allocated: the declared network's parameter count
    (computed without allocating) against the stored dataset's shape and its bytes on disk."""
    if f.attrs.get("format") != FORMAT:
        raise ValueError(f"'{path}' is not an hpcdqn model file (format={f.attrs.get('format')!r})")
    cfg, obs_shape, n_actions, *_ = _declared(f, path)      # (bounded: network_layers reads them)
    try:
        layers = network_layers(cfg["network"], obs_shape, n_actions)
    except ValueError as e:
        raise ValueError(f"'{path}': declared network: {e}") from None
    n = sum(num_params(m) for m in layers)
    ds = f.get("online")
    if not isinstance(ds, h5py.Dataset) or ds.dtype != np.float32 or ds.shape != (n,):
        raise ValueError(f"'{path}': dataset 'online' is {getattr(ds, 'shape', None)} "
                         f"{getattr(ds, 'dtype', None)}; the network in its config has {n} "
                         "float32 parameters")
    if n > MAX_PARAMS or ds.id.get_storage_size() < 4 * n:
        raise ValueError(f"'{path}': dataset 'online' declares {n} parameters but holds "
                         f"{ds.id.get_storage_size()} bytes on disk")
    return cfg, obs_shape, n_actions, layers, ds


def _open(path: Path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file '{path}' does not exist (did the run finish?)")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"'{path}' cannot be opened (truncated or not an HDF5 file): {e}") from None


def _read_into(net: FlatModule, ds, lo: int, hi: int, path) -> None:
    """Parameters [lo, hi) of the dataset into ``net.flat`` (on the CPU without a second copy),
    checked finite."""
    try:
        if net.flat.device.type == "cpu":
            ds.read_direct(net.flat.data.numpy(), source_sel=np.s_[lo:hi])
        else:
            net.load_flat_(ds[lo:hi])
    except (OSError, RuntimeError, TypeError) as e:
        raise ValueError(f"'{path}': dataset 'online' cannot be read: {e}") from None
    bad = int((~torch.isfinite(net.flat.data)).sum())
    if bad:
        raise ValueError(f"'{path}': {bad} parameters are NaN or infinite (a diverged run?)")


def load_model(path: Path, device="cpu"):
    """Returns (FlatModule with the trained parameters, cfg, obs_shape, n_actions); sizes are
    checked before anything is allocated (``_checked``)."""
    with _open(path) as f:
        cfg, obs_shape, n_actions, layers, ds = _checked(f, path)
        net = FlatModule(layers, device, grad=False)
        _read_into(net, ds, 0, net.numel, path)
    return net, cfg, obs_shape, n_actions


def load_model_stage(path: Path, pp: int, stage: int, device="cpu"):
    """Stage ``stage`` of ``pp`` of the trained network, cut as the run's pipeline cut it (its
    config's ``network.cuts`` / ``split_layers``): (FlatModule holding only that stage's
    parameters, cfg, obs_shape, n_actions, (lo, hi) of the flat vector). Nothing of the
    other stages is read or allocated."""
    with _open(path) as f:
        cfg, obs_shape, n_actions, layers, ds = _checked(f, path)
        net_cfg = cfg["network"]
        stages = stage_bounds(layers, pp, {"cuts": net_cfg.get("cuts"),
                                           "split_layers": net_cfg.get("split_layers", True)})
        lo, hi = param_ranges(layers, stages)[stage]
        net = FlatModule(stage_modules(layers, *stages[stage]), device, grad=False)
        if net.numel != hi - lo:
            raise ValueError(f"'{path}': stage {stage} of {pp} holds {net.numel} parameters, its "
                             f"range [{lo}, {hi}) says {hi - lo}")
        _read_into(net, ds, lo, hi, path)
    return net, cfg, obs_shape, n_actions, (lo, hi)
