"""The final model file (``model.h5``): the online network's flat parameters plus JSON attributes
(config, observation shape/dtype, action count). Arrays and JSON only: no pickle, so loading an
untrusted file cannot run code.

A pipelined run writes it with its stages together (``write_model_slices``): parallel HDF5
(``mpio``), each stage its own range of the flat vector, so no rank ever holds the whole
network; without parallel h5py the stages write their ranges one after another (rank 0 creates
the file). Loading checks the stored size against the config's network before allocating."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from hpcdqn import __version__
from hpcdqn.parallel.flat import FlatModule
from hpcdqn.rl.networks import meta_layers, num_params
from hpcdqn.store.mpiio import io_mode, mpi_info

FORMAT = "hpcdqn-model-1"


def _attrs(f, cfg: dict, obs_shape, obs_dtype, n_actions: int) -> None:
    f.attrs["format"] = FORMAT
    f.attrs["version"] = __version__
    f.attrs["config"] = json.dumps(cfg)
    f.attrs["obs_shape"] = json.dumps(list(obs_shape))
    f.attrs["obs_dtype"] = np.dtype(obs_dtype).str
    f.attrs["n_actions"] = int(n_actions)


def save_model(path: Path, flat: np.ndarray, cfg: dict, obs_shape, obs_dtype, n_actions: int) -> None:
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    with h5py.File(tmp, "w") as f:
        _attrs(f, cfg, obs_shape, obs_dtype, n_actions)
        f.create_dataset("online", data=np.asarray(flat, dtype=np.float32))
    tmp.replace(path)


def write_model_slices(path: Path, mine: np.ndarray, lo: int, total: int, comm, cfg: dict,
                       obs_shape, obs_dtype, n_actions: int) -> str:
    """Collective over ``comm`` (one replica's stages, rank 0 = the first stage): write the model
    file, each rank its slice ``[lo, lo + len(mine))`` of the ``total`` flat parameters. Returns
    the I/O mode used. Errors are agreed: every rank raises if one failed."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    mine = np.ascontiguousarray(mine, dtype=np.float32)
    mode, err = io_mode(), None
    try:
        if mode == "parallel":
            with h5py.File(tmp, "w", driver="mpio", comm=comm, info=mpi_info()) as f:
                _attrs(f, cfg, obs_shape, obs_dtype, n_actions)
                ds = f.create_dataset("online", shape=(total,), dtype=np.float32)
                ds[lo:lo + mine.size] = mine
        else:
            for turn in range(comm.Get_size()):        # one stage after another
                if turn == comm.Get_rank():
                    with h5py.File(tmp, "w" if turn == 0 else "r+") as f:
                        if turn == 0:
                            _attrs(f, cfg, obs_shape, obs_dtype, n_actions)
                            f.create_dataset("online", shape=(total,), dtype=np.float32)
                        f["online"][lo:lo + mine.size] = mine
                comm.Barrier()
    except Exception as e:  # noqa: BLE001 - agreed below, then raised on every rank
        err = f"rank {comm.Get_rank()}: {type(e).__name__}: {e}"
    errs = [e for e in comm.allgather(err) if e]
    if errs:
        raise OSError(f"writing the model file {path} failed: " + "; ".join(errs))
    if comm.Get_rank() == 0:
        tmp.replace(path)
    comm.Barrier()
    return mode


def model_size(path: Path) -> tuple[int, int]:
    """(parameters stored, the run's pp) without reading the parameters."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file '{path}' does not exist (did the run finish?)")
    with h5py.File(path, "r") as f:
        if f.attrs.get("format") != FORMAT or "online" not in f or len(f["online"].shape) != 1:
            raise ValueError(f"'{path}' is not an hpcdqn model file (format={f.attrs.get('format')!r})")
        return int(f["online"].shape[0]), int(json.loads(f.attrs["config"]).get("pp", 1))


def load_model(path: Path, device="cpu"):
    """Returns (FlatModule with the trained parameters, cfg, obs_shape, n_actions)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file '{path}' does not exist (did the run finish?)")
    with h5py.File(path, "r") as f:
        if f.attrs.get("format") != FORMAT:
            raise ValueError(f"'{path}' is not an hpcdqn model file (format={f.attrs.get('format')!r})")
        cfg = json.loads(f.attrs["config"])
        obs_shape = tuple(json.loads(f.attrs["obs_shape"]))
        n_actions = int(f.attrs["n_actions"])
        layers = meta_layers(obs_shape, n_actions, cfg["network"]["hidden"], cfg["network"]["dueling"])
        n = sum(num_params(m) for m in layers)
        ds = f["online"]
        if ds.shape != (n,) or ds.dtype != np.float32:   # checked before allocating that much
            raise ValueError(f"'{path}': {ds.shape} {ds.dtype} parameters stored, the network in "
                             f"its config has ({n},) float32")
        net = FlatModule(layers, device, grad=False)   # (meta layers: only the flat buffer)
        if net.flat.device.type == "cpu":
            ds.read_direct(net.flat.data.numpy())
        else:
            net.load_flat_(ds[...])
    return net, cfg, obs_shape, n_actions
