"""``hpcdqn export RUN_DIR_OR_CHECKPOINT --format minari OUT_DIR``: a checkpoint's replay as a
Minari dataset (HDF5 storage), written with h5py alone (minari itself is only needed to load it).

Layout (what ``minari`` 0.5 reads): ``OUT_DIR/data/metadata.json`` and
``OUT_DIR/data/main_data.hdf5`` with one group ``episode_<i>`` per episode holding
``observations`` [N+1, ...], ``actions`` [N], ``rewards`` [N], ``terminations`` [N],
``truncations`` [N] and the attributes ``id`` and ``total_steps``. Load it with
``minari.MinariDataset("OUT_DIR/data")``, or with ``minari.load_dataset(ID)`` when OUT_DIR is
``$MINARI_DATASETS_PATH/ID``.

Episodes come from each env stream of each replay shard, oldest first (shard 0 env 0, shard 0
env 1, ..., shard 1 env 0, ...). An episode is a run of transitions that ends with a
termination or truncation; its N+1-th observation is the true final observation. Dropped: the
leading fragment of a stream whose ring buffer has wrapped (its start was overwritten) and the
trailing fragment of every stream (the episode was still running).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import numpy as np

from hpcdqn.store.reader import open_checkpoint, read_dataset, read_meta
from hpcdqn.store.rundir import resolve
from hpcdqn.store.schema import REPLAY_ROWS

MINARI_FORMAT_VERSION = "0.5.4"


def episodes_from_checkpoint(path):
    """Yield (observations [N+1], actions, rewards, terminations, truncations) per episode."""
    meta = read_meta(path)
    lay = meta["layout"]
    rows, E, dp = lay["rows"], lay["num_envs"], lay["dp"]
    with open_checkpoint(path) as f:
        pos = np.asarray(read_dataset(f, path, "replay/pos"))
        filled = np.asarray(read_dataset(f, path, "replay/filled"))
        for q in range(dp):
            sl = slice(q * rows, (q + 1) * rows)
            data = {k: np.asarray(read_dataset(f, path, f"replay/{k}", sl)) for k in REPLAY_ROWS}
            n, p = int(filled[q]), int(pos[q])
            wrapped = n == rows
            order = (np.arange(n) + (p if wrapped else 0)) % rows
            for e in range(E):
                term = data["terminated"][order, e]
                trunc = data["truncated"][order, e]
                ends = np.nonzero(term | trunc)[0]
                start = 0
                for i, end in enumerate(ends):
                    if i == 0 and wrapped:
                        start = end + 1
                        continue
                    r = order[start:end + 1]
                    obs = np.concatenate([data["obs"][r, e], data["next_obs"][r[-1:], e]])
                    yield (obs, data["actions"][r, e], data["rewards"][r, e],
                           data["terminated"][r, e], data["truncated"][r, e])
                    start = end + 1


def _space_json(space) -> str:
    import gymnasium as gym

    if isinstance(space, gym.spaces.Discrete):
        return json.dumps({"type": "Discrete", "dtype": "int64", "start": int(space.start),
                           "n": int(space.n)})
    if isinstance(space, gym.spaces.Box):
        return json.dumps({"type": "Box", "dtype": str(space.dtype), "shape": list(space.shape),
                           "low": space.low.tolist(), "high": space.high.tolist()})
    raise ValueError(f"cannot describe space {space} for Minari")


def _spaces(env: dict, atari: dict | None = None):
    import gymnasium as gym

    spec_json = None
    try:
        from hpcdqn.rl.envs import make_vector_env

        venv = make_vector_env(env["env_id"], 1, 0, atari=atari)
        obs_space, act_space = venv.single_observation_space, venv.single_action_space
        spec = venv.envs[0].spec if hasattr(venv, "envs") else None
        venv.close()
        if spec is not None:
            try:
                spec_json = spec.to_json()
            except Exception:  # noqa: BLE001 - unserializable kwargs
                spec_json = None
    except Exception:  # noqa: BLE001 - env not installed here: describe it from the checkpoint
        dt = np.dtype(env["obs_dtype"])
        lo, hi = (0, 255) if dt == np.uint8 else (-np.inf, np.inf)
        obs_space = gym.spaces.Box(lo, hi, tuple(env["obs_shape"]), dt)
        act_space = gym.spaces.Discrete(int(env["n_actions"]))
    return obs_space, act_space, spec_json


def default_dataset_id(out_dir: Path) -> str:
    name = re.sub(r"[^-_\w]", "_", out_dir.name) or "replay"
    return f"hpcdqn/{name}" if re.search(r"-v\d+$", name) else f"hpcdqn/{name}-v0"


def export_minari(source, out_dir, dataset_id: str | None = None) -> dict:
    path = resolve(source)            # verified
    meta = read_meta(path)
    out = Path(out_dir)
    data = out / "data"
    if (data / "metadata.json").exists() or (data / "main_data.hdf5").exists():
        raise FileExistsError(f"'{data}' already holds a dataset; choose another OUT_DIR")
    dataset_id = dataset_id or default_dataset_id(out)
    obs_space, act_space, spec_json = _spaces(meta["env"], meta["config"].get("atari"))
    data.mkdir(parents=True, exist_ok=True)
    n_eps = n_steps = 0
    returns = []
    with h5py.File(data / "main_data.hdf5", "w", track_order=True) as f:
        for obs, act, rew, term, trunc in episodes_from_checkpoint(path):
            g = f.create_group(f"episode_{n_eps}")
            g.attrs["id"] = n_eps
            g.attrs["total_steps"] = len(act)
            g.create_dataset("observations", data=obs)
            g.create_dataset("actions", data=act.astype(np.int64))
            g.create_dataset("rewards", data=rew.astype(np.float64))
            g.create_dataset("terminations", data=term.astype(bool))
            g.create_dataset("truncations", data=trunc.astype(bool))
            n_eps += 1
            n_steps += len(act)
            returns.append(float(rew.astype(np.float64).sum()))
    metadata = {
        "dataset_id": dataset_id, "total_episodes": n_eps, "total_steps": n_steps,
        "data_format": "hdf5", "jpeg_encoding": False,
        "observation_space": _space_json(obs_space), "action_space": _space_json(act_space),
        "minari_version": MINARI_FORMAT_VERSION, "algorithm_name": "hpcdqn DQN replay",
        "author": ["hpcdqn"], "code_permalink": "https://github.com/hpcdqn/hpcdqn",
        "description": f"Replay buffer of an hpcdqn run exported from {Path(path).name} "
                       f"(env steps {meta['counters']['env_steps']})",
        "dataset_size": round((data / "main_data.hdf5").stat().st_size / 1e6, 1),
    }
    if spec_json is not None:
        metadata["env_spec"] = spec_json
        metadata["eval_env_spec"] = spec_json
    with open(data / "metadata.json", "w") as fh:
        json.dump(metadata, fh)
    return {"dataset_id": dataset_id, "path": str(data), "checkpoint": str(path),
            "episodes": n_eps, "steps": n_steps,
            "mean_return": round(float(np.mean(returns)), 4) if returns else None}
