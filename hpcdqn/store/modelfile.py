"""The final model file (``model.h5``): the online network's flat parameters plus JSON attributes
(config, observation shape/dtype, action count). Arrays and JSON only: no pickle, so loading an
untrusted file cannot run code."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from hpcdqn import __version__
from hpcdqn.parallel.flat import FlatModule
from hpcdqn.rl.networks import build_layers

FORMAT = "hpcdqn-model-1"


def save_model(path: Path, flat: np.ndarray, cfg: dict, obs_shape, obs_dtype, n_actions: int) -> None:
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    with h5py.File(tmp, "w") as f:
        f.attrs["format"] = FORMAT
        f.attrs["version"] = __version__
        f.attrs["config"] = json.dumps(cfg)
        f.attrs["obs_shape"] = json.dumps(list(obs_shape))
        f.attrs["obs_dtype"] = np.dtype(obs_dtype).str
        f.attrs["n_actions"] = int(n_actions)
        f.create_dataset("online", data=np.asarray(flat, dtype=np.float32))
    tmp.replace(path)


MAX_DIM, MAX_WIDTHS, MAX_PARAMS = 1 << 20, 64, 1 << 33


def _declared(f, path) -> tuple:
    """The file's declared network, typed and bounded (raises ValueError)."""
    try:
        cfg = json.loads(f.attrs["config"])
        obs_shape = tuple(json.loads(f.attrs["obs_shape"]))
        n_actions = int(f.attrs["n_actions"])
        hidden, dueling = cfg["network"]["hidden"], cfg["network"]["dueling"]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"'{path}': its attributes are missing or malformed ({type(e).__name__}: "
                         f"{e})") from None
    ok = (1 <= len(obs_shape) <= 3 and all(isinstance(d, int) and 1 <= d <= MAX_DIM for d in obs_shape)
          and 1 <= n_actions <= MAX_DIM and isinstance(hidden, list) and len(hidden) <= MAX_WIDTHS
          and all(isinstance(w, int) and not isinstance(w, bool) and 1 <= w <= MAX_DIM for w in hidden)
          and isinstance(dueling, bool))
    if not ok:
        raise ValueError(f"'{path}': declared network out of bounds (obs_shape={obs_shape}, "
                         f"n_actions={n_actions}, hidden={hidden}, dueling={dueling})")
    return cfg, obs_shape, n_actions, hidden, dueling


def _expected_params(obs_shape, n_actions, hidden, dueling) -> int:
    """The declared network's parameter count, built on the meta device (nothing allocated)."""
    import torch

    with torch.device("meta"):
        layers = build_layers(obs_shape, n_actions, hidden, dueling)
    return sum(int(p.numel()) for m in layers for p in m.parameters())


def load_model(path: Path, device="cpu"):
    """Returns (FlatModule with the trained parameters, cfg, obs_shape, n_actions). Every size
    is checked before anything is allocated: the declared network's parameter count (computed
    without allocating) against the stored dataset's shape and its bytes on disk."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file '{path}' does not exist (did the run finish?)")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"'{path}' cannot be opened (truncated or not an HDF5 file): {e}") from None
    with f:
        if f.attrs.get("format") != FORMAT:
            raise ValueError(f"'{path}' is not an hpcdqn model file (format={f.attrs.get('format')!r})")
        cfg, obs_shape, n_actions, hidden, dueling = _declared(f, path)
        n = _expected_params(obs_shape, n_actions, hidden, dueling)
        ds = f.get("online")
        if not isinstance(ds, h5py.Dataset) or ds.dtype != np.float32 or ds.shape != (n,):
            raise ValueError(f"'{path}': dataset 'online' is {getattr(ds, 'shape', None)} "
                             f"{getattr(ds, 'dtype', None)}; the network in its config has {n} "
                             "float32 parameters")
        if n > MAX_PARAMS or ds.id.get_storage_size() < 4 * n:
            raise ValueError(f"'{path}': dataset 'online' declares {n} parameters but holds "
                             f"{ds.id.get_storage_size()} bytes on disk")
        try:
            flat = np.asarray(ds[...])
        except (OSError, RuntimeError) as e:
            raise ValueError(f"'{path}': dataset 'online' cannot be read: {e}") from None
    if not np.isfinite(flat).all():
        raise ValueError(f"'{path}': {int((~np.isfinite(flat)).sum())} parameters are NaN or "
                         "infinite (a diverged run?)")
    layers = build_layers(obs_shape, n_actions, hidden, dueling)
    net = FlatModule(layers, device)
    net.load_flat_(flat)
    return net, cfg, obs_shape, n_actions
