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

Streamed: per shard only the small per-cell fields (actions, rewards, flags, ``ep_step``) are
read whole; observations are read and written ``CHUNK_BYTES`` at a time, so the memory an export
needs does not grow with the shard's observations. A frame-stacked replay's observations are
rebuilt from the episode's initial stack and frames (the last k of ``initial ++ frames``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

from hpcdqn.rl.framereplay import start_index
from hpcdqn.store.errors import CheckpointCorrupt
from hpcdqn.store.reader import open_checkpoint, read_dataset, read_meta
from hpcdqn.store.rundir import resolve
from hpcdqn.store.schema import CELL_ROWS, frame_stack, replay_specs

MINARI_FORMAT_VERSION = "0.5.4"


CHUNK_BYTES = 32 * 2**20       # observations read and written at a time


@dataclass
class Episode:
    actions: np.ndarray
    rewards: np.ndarray
    terminations: np.ndarray
    truncations: np.ndarray
    observations: Callable        # () -> chunks [c, *obs_shape] in order, N + 1 in all


def _runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """Consecutive ring rows as [start, stop) slices."""
    cut = np.nonzero(np.diff(rows) != 1)[0] + 1
    return [(int(r[0]), int(r[-1]) + 1) for r in np.split(rows, cut)]


class ShardReader:
    """One replay shard of a checkpoint: its per-cell fields in ring order, observations on
    demand (whole observations as stored, or rebuilt from frames)."""

    def __init__(self, f, path, meta, q: int, pos: int, filled: int):
        lay = meta["layout"]
        self.f, self.path, self.q = f, path, q
        self.rows, self.k = lay["rows"], frame_stack(lay)
        shape = tuple(meta["env"]["obs_shape"])
        step = int(np.prod(shape)) * np.dtype(meta["env"]["obs_dtype"]).itemsize
        self.chunk = max(1, CHUNK_BYTES // max(1, step))
        self.order = (np.arange(filled) + (pos if filled == self.rows else 0)) % self.rows
        sl = slice(q * self.rows, (q + 1) * self.rows)
        self.cells = {k: np.asarray(read_dataset(f, path, f"replay/{k}", sl))[self.order]
                      for k in CELL_ROWS}
        if self.k:
            steps = np.asarray(read_dataset(f, path, "replay/ep_step", sl))[self.order]
            self.is_start = steps == 0
            try:
                self.seq = start_index(steps, self.k, min(filled, self.rows - self.k))
            except ValueError as e:
                raise CheckpointCorrupt(f"checkpoint '{path}': replay shard {q}: {e}") from None
            spec = [s for s in replay_specs(lay, meta["env"]) if s.name == "replay/starts"][0]
            self.starts_at = spec.parts[q][1]

    def _read(self, name: str, rows: np.ndarray, e: int) -> np.ndarray:
        base = self.q * self.rows
        return np.concatenate([read_dataset(self.f, self.path, f"replay/{name}",
                                            (slice(base + a, base + b), e))
                               for a, b in _runs(rows)])

    def episode(self, e: int, t0: int, t1: int) -> Episode:
        """The episode in ring times [t0, t1) of env column e."""
        c = {k: v[t0:t1, e] for k, v in self.cells.items()}
        return Episode(c["actions"], c["rewards"], c["terminated"], c["truncated"],
                       lambda: self._observations(e, t0, t1))

    def _observations(self, e: int, t0: int, t1: int):
        rows, n = self.order[t0:t1], t1 - t0
        if not self.k:
            for m0 in range(0, n, self.chunk):
                yield self._read("obs", rows[m0:m0 + self.chunk], e)
            yield self._read("next_obs", rows[-1:], e)
            return
        s = int(self.seq[t0, e])
        if s < 0 or not self.is_start[t0, e]:
            raise CheckpointCorrupt(f"checkpoint '{self.path}': replay shard {self.q}: an episode's "
                                    "initial stack is not in the file")
        init = read_dataset(self.f, self.path, "replay/starts", slice(self.starts_at + s,
                                                                      self.starts_at + s + 1))[0]
        k = self.k
        for m0 in range(0, n + 1, self.chunk):       # observation m: (init ++ frames)[m:m + k]
            m1 = min(n + 1, m0 + self.chunk)
            lo, hi = max(0, m0 - k), m1 - 1          # the frames it needs
            seq = [init[m0:]] if m0 < k else []
            if hi > lo:
                seq.append(self._read("frames", rows[lo:hi], e))
            seq = np.concatenate(seq)
            win = np.lib.stride_tricks.sliding_window_view(seq, k, axis=0)   # [.., *frame, k]
            yield np.ascontiguousarray(np.moveaxis(win, -1, 1)[:m1 - m0])


def episodes_from_checkpoint(path):
    """Yield an ``Episode`` per complete episode of the replay (observations streamed)."""
    meta = read_meta(path)
    lay = meta["layout"]
    rows, E, dp = lay["rows"], lay["num_envs"], lay["dp"]
    with open_checkpoint(path) as f:
        pos = np.asarray(read_dataset(f, path, "replay/pos"))
        filled = np.asarray(read_dataset(f, path, "replay/filled"))
        for q in range(dp):
            n, p = int(filled[q]), int(pos[q])
            if not (0 <= n <= rows and 0 <= p < rows):
                raise CheckpointCorrupt(f"checkpoint '{path}': replay shard {q} has pos {p}, "
                                        f"filled {n} outside its {rows} rows")
            shard = ShardReader(f, path, meta, q, p, n)
            for e in range(E):
                ends = np.nonzero(shard.cells["terminated"][:, e] | shard.cells["truncated"][:, e])[0]
                start = 0
                for i, end in enumerate(ends):
                    if not (i == 0 and n == rows):      # a wrapped ring lost that one's start
                        yield shard.episode(e, start, end + 1)
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
        for ep in episodes_from_checkpoint(path):
            n = len(ep.actions)
            g = f.create_group(f"episode_{n_eps}")
            g.attrs["id"] = n_eps
            g.attrs["total_steps"] = n
            ds = g.create_dataset("observations", shape=(n + 1,) + tuple(meta["env"]["obs_shape"]),
                                  dtype=np.dtype(meta["env"]["obs_dtype"]))
            at = 0
            for chunk in ep.observations():
                ds[at:at + len(chunk)] = chunk
                at += len(chunk)
            g.create_dataset("actions", data=ep.actions.astype(np.int64))
            g.create_dataset("rewards", data=ep.rewards.astype(np.float64))
            g.create_dataset("terminations", data=ep.terminations.astype(bool))
            g.create_dataset("truncations", data=ep.truncations.astype(bool))
            n_eps += 1
            n_steps += n
            returns.append(float(ep.rewards.astype(np.float64).sum()))
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
