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
        flat = np.asarray(f["online"][...])
    layers = build_layers(obs_shape, n_actions, cfg["network"]["hidden"], cfg["network"]["dueling"])
    net = FlatModule(layers, device)
    if net.numel != flat.size:
        raise ValueError(f"'{path}': {flat.size} parameters stored, the network in its config has {net.numel}")
    net.load_flat_(flat)
    return net, cfg, obs_shape, n_actions
