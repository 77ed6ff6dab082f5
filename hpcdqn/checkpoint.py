"""Checkpoints: one HDF5 file written by every rank at once; exact resume; reshard; validation.

File format ``hpcdqn-checkpoint-1`` (arrays and JSON attributes only, no pickle)::

    /                          attrs: format, version, io_mode, config, layout, env, layer_sizes,
                                      counters (all JSON)
    params/online/<i>          float32 [n_i]   layer i of the whole network (global layer index)
    params/target/<i>          float32 [n_i]
    adam/exp_avg/<i>           float32 [n_i]
    adam/exp_avg_sq/<i>        float32 [n_i]
    replay/obs, replay/next_obs  [dp * rows, num_envs, *obs_shape]   (contiguous when written
                               in parallel: a shard is one byte range; chunked by the serial path)
    replay/actions (int64), rewards (float32), terminated, truncated (bool)  [dp * rows, num_envs]
    replay/priorities          float64 [dp * rows, num_envs]  (prioritized replay only: leaf values)
    replay/pos, replay/filled  int64 [dp];  replay/max_priority float64 [dp]
    rank_state                 uint8 [world, maxlen]: one UTF-8 JSON document per world rank
                               (numpy/torch RNG states, env states, current obs, episode
                               accumulators, metric window); rank_state_len int64 [world]

Every dataset is cut along axis 0 into *parts*, each written by one rank (a replay shard by
its data-parallel rank, a layer by replica 0 of the stage that holds it -- or one slice per stage
where a stage boundary falls inside the layer, see ``partition.py`` -- row r of rank_state by
world rank r). Each dataset carries ``parts`` ([[start, stop], ...]) and ``crc32`` (one CRC-32
per part) attributes; validation re-reads every part and compares.

Writing (``h5py`` with MPI): all ranks open the file with the ``mpio`` driver, create every
dataset collectively (same shapes and attributes on every rank), then write their parts with
collective I/O (ranks without a part join with an empty selection). Without parallel h5py
(or with ``HPCDQN_H5_SERIAL=1``) the same file is written by rank 0, the others sending their
parts to it. Either way the file is written as ``<name>.tmp``, flushed, closed and fsynced;
after a barrier rank 0 renames it into place (atomic), fsyncs the directory, and only then
rewrites the ``latest`` pointer (tmp + ``os.replace``) and removes checkpoints beyond
``keep_last``. A kill during a write leaves a ``.tmp`` file that nobody loads.

Reading: each rank opens the file read-only with the default driver and reads what it needs
(independent reads: a bad file found by one rank cannot leave the others stuck in a
collective); the outcome is agreed with an allreduce.

Reshard rules (a checkpoint loads into another layout):

- Layers: layer i is stored on its own; a stage holds one contiguous range [lo, hi) of the
  flattened network's parameters (``param_range``: whole layers, and row slices of a layer cut
  by a stage boundary) and reads exactly that range from the layers it overlaps.
- Replay: the old replay is ``S_old = dp_old * num_envs_old`` env *streams* (one per column of
  a shard, in time order). Each stream keeps its newest ``L = min(filled, S_new * rows_new //
  S_old)`` transitions; the streams are concatenated in stream order (shard 0 env 0, shard 0
  env 1, ..., shard 1 env 0, ...) and cut into ``S_new`` equal consecutive pieces of
  ``M = min(rows_new, S_old * L // S_new)`` transitions (the oldest remainder of the
  concatenation is dropped). New rank r, env e gets piece ``r * num_envs_new + e``. Where a
  stream ends inside a piece, and at the end of every piece, the last transition is marked
  *truncated* (unless terminated): it bootstraps from its own true next observation, so n-step
  returns never run across streams. Priorities move with their transitions.
- Per-rank state: new data-parallel rank r continues old rank r's environments, acting RNG and
  replay RNG when r < dp_old and num_envs is unchanged; otherwise its environments start
  fresh (seeded from the run seed, the rank and the env step). The metric window of all old
  ranks goes to new rank 0.

Same layout: everything that affects the future is restored, so the resumed run is bitwise
equal to an uninterrupted one. Environment state is captured generically: the plain
attributes (numbers, strings, arrays, numpy Generators, lists/tuples/deques of those) of the
vector env, of every wrapper and of the unwrapped env (CartPole: ``state``,
``steps_beyond_terminated``, ``np_random``; TimeLimit: ``_elapsed_steps``), plus ALE's
``cloneState`` when present. Envs whose state lives elsewhere (an ``async`` vector env's
subprocesses, C extensions without a state API) are re-seeded instead, with a warning.
"""

from __future__ import annotations

import base64
import collections
import json
import math
import os
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from . import __version__
from .networks import num_params
from .replay import ReplayBuffer

FORMAT = "hpcdqn-checkpoint-1"
SERIAL_ENV = "HPCDQN_H5_SERIAL"          # "1": write through rank 0 even with parallel h5py
TEST_SLEEP_ENV = "HPCDQN_TEST_CKPT_SLEEP"  # test hook: "SECONDS[@ENV_STEPS]" sleep before the rename
CKPT_DIR = "checkpoints"
LATEST = "latest"
PIECE_BYTES = 256 * 2**20                 # largest single write/read call per rank
CHUNK_BYTES = 8 * 2**20                   # target chunk size of the replay datasets
REPLAY_ROWS = ("obs", "next_obs", "actions", "rewards", "terminated", "truncated")
# a stage's flat vectors and the dataset group each is stored in (one dataset per layer)
PARAM_GROUPS = (("online", "params/online"), ("target", "params/target"),
                ("exp_avg", "adam/exp_avg"), ("exp_avg_sq", "adam/exp_avg_sq"))

# config keys that may change on resume without breaking bitwise equality
RUN_CONTROL_KEYS = {"run_dir", "stop_after", "pp", "micro_batches", "schedule", "checkpoint_every",
                    "keep_last", "threads", "device", "vector", "network.cuts",
                    "network.split_layers"}
RUN_CONTROL_PREFIXES = ("log.", "eval.", "parallel.")


class CheckpointError(ValueError):
    """A checkpoint is unreadable, corrupted, or does not fit this run."""


class CheckpointMismatch(CheckpointError):
    """The checkpoint is valid but belongs to another environment / network."""


def io_mode() -> str:
    """'parallel' (mpio, collective) or 'serial' (through rank 0)."""
    if os.environ.get(SERIAL_ENV, "") not in ("", "0") or not h5py.get_config().mpi:
        return "serial"
    return "parallel"


# ---------------------------------------------------------------------------------------------
# JSON encoding of arrays, RNGs and env states (no pickle)
# ---------------------------------------------------------------------------------------------
_PLAIN = (type(None), bool, int, float, str)


def encode(x):
    """A JSON-able form of numbers, strings, arrays, numpy Generators and containers of those.
    Returns ``_SKIP`` for anything else."""
    if isinstance(x, _PLAIN):
        if isinstance(x, float) and not math.isfinite(x):
            return {"__float__": repr(x)}
        return x
    if isinstance(x, np.generic):
        return {"__np__": x.dtype.str, "v": encode(x.item())}
    if isinstance(x, np.ndarray):
        if x.dtype.hasobject:
            return _SKIP
        a = np.ascontiguousarray(x)
        return {"__nd__": a.dtype.str, "shape": list(a.shape),
                "b64": base64.b64encode(a.tobytes()).decode()}
    if isinstance(x, np.random.Generator):
        return {"__rng__": x.bit_generator.state}
    if isinstance(x, torch.Tensor):
        return {"__torch__": encode(x.detach().cpu().numpy())}
    if isinstance(x, (list, tuple, collections.deque)):
        items = [encode(v) for v in x]
        if any(v is _SKIP for v in items):
            return _SKIP
        if isinstance(x, list):
            return {"__list__": items}
        if isinstance(x, tuple):
            return {"__tuple__": items}
        return {"__deque__": items, "maxlen": x.maxlen}
    if isinstance(x, dict) and all(isinstance(k, str) for k in x):
        out = {k: encode(v) for k, v in x.items()}
        if any(v is _SKIP for v in out.values()):
            return _SKIP
        return {"__dict__": out}
    return _SKIP


class _Skip:
    pass


_SKIP = _Skip()


def decode(x, into=None):
    """Inverse of ``encode``. ``into``: the current value, updated in place where possible
    (numpy Generators keep their identity; arrays of the same shape are copied into)."""
    if not isinstance(x, dict):
        return x
    if "__float__" in x:
        return float(x["__float__"])
    if "__np__" in x:
        return np.dtype(x["__np__"]).type(decode(x["v"]))
    if "__nd__" in x:
        a = np.frombuffer(base64.b64decode(x["b64"]), dtype=np.dtype(x["__nd__"])).reshape(x["shape"])
        if isinstance(into, np.ndarray) and into.shape == a.shape and into.dtype == a.dtype \
                and into.flags.writeable:
            into[...] = a
            return into
        return a.copy()
    if "__rng__" in x:
        st = x["__rng__"]
        if isinstance(into, np.random.Generator) and \
                type(into.bit_generator).__name__ == st["bit_generator"]:
            into.bit_generator.state = st
            return into
        if st["bit_generator"] not in ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64"):
            raise CheckpointError(f"unknown numpy bit generator {st['bit_generator']!r} in checkpoint")
        g = np.random.Generator(getattr(np.random, st["bit_generator"])())
        g.bit_generator.state = st
        return g
    if "__torch__" in x:
        return torch.from_numpy(decode(x["__torch__"]))
    if "__list__" in x:
        return [decode(v) for v in x["__list__"]]
    if "__tuple__" in x:
        return tuple(decode(v) for v in x["__tuple__"])
    if "__deque__" in x:
        return collections.deque((decode(v) for v in x["__deque__"]), maxlen=x["maxlen"])
    if "__dict__" in x:
        return {k: decode(v) for k, v in x["__dict__"].items()}
    return x


_ENV_SKIP = {"env", "env_fns", "envs", "metadata", "spec", "_saved_kwargs", "render_mode",
             "screen", "clock", "_cached_spec", "_metadata", "observation_space", "action_space",
             "single_observation_space", "single_action_space", "_action_space",
             "_observation_space", "ale", "viewer", "window"}


def _plain_attrs(obj) -> dict:
    out = {}
    for k, v in vars(obj).items():
        if k in _ENV_SKIP:
            continue
        e = encode(v)
        if e is not _SKIP:
            out[k] = e
    return out


def _chain(env):
    """The env, its wrappers, down to the unwrapped env."""
    layers = [env]
    while hasattr(layers[-1], "env") and layers[-1].env is not layers[-1]:
        layers.append(layers[-1].env)
    return layers


def env_state(venv) -> dict:
    """Everything we can capture of a gymnasium vector env, as JSON-able data."""
    if not hasattr(venv, "envs"):
        return {"supported": False, "why": f"{type(venv).__name__} keeps its envs in subprocesses"}
    out = {"supported": True, "vector": _plain_attrs(venv), "envs": []}
    for e in venv.envs:
        chain = _chain(e)
        st = {"chain": [type(x).__name__ for x in chain], "attrs": [_plain_attrs(x) for x in chain]}
        ale = getattr(chain[-1], "ale", None)
        if ale is not None:
            try:
                s = ale.cloneState(include_rng=True)
                st["ale"] = encode(np.frombuffer(s.serialize() if hasattr(s, "serialize")
                                                 else bytes(s), dtype=np.uint8))
            except Exception as ex:  # pragma: no cover - needs ale-py
                st["ale_error"] = repr(ex)
        out["envs"].append(st)
    return out


def restore_env_state(venv, st: dict) -> list[str]:
    """Put a captured state back; returns warnings (empty when the restore is complete)."""
    if not st.get("supported"):
        return [f"environment state was not captured ({st.get('why', 'unsupported')}); "
                "environments were re-seeded instead"]
    if not hasattr(venv, "envs") or len(venv.envs) != len(st["envs"]):
        return ["vector env kind or size changed; environments were re-seeded instead"]
    problems = []
    for k, v in st["vector"].items():
        setattr(venv, k, decode(v, getattr(venv, k, None)))
    for e, es in zip(venv.envs, st["envs"]):
        chain = _chain(e)
        if [type(x).__name__ for x in chain] != es["chain"]:
            problems.append(f"wrapper chain changed ({es['chain']} -> "
                            f"{[type(x).__name__ for x in chain]}); env re-seeded")
            continue
        for obj, attrs in zip(chain, es["attrs"]):
            for k, v in attrs.items():
                try:
                    setattr(obj, k, decode(v, getattr(obj, k, None)))
                except AttributeError:   # read-only property
                    pass
        if "ale" in es:  # pragma: no cover - needs ale-py
            try:
                import ale_py

                raw = decode(es["ale"]).tobytes()
                chain[-1].ale.restoreState(ale_py.ALEState(raw) if hasattr(ale_py, "ALEState") else raw)
            except Exception as ex:
                problems.append(f"ALE state not restored: {ex!r}")
        if "ale_error" in es:  # pragma: no cover
            problems.append(f"ALE state was not captured: {es['ale_error']}")
    return problems


# ---------------------------------------------------------------------------------------------
# learner <-> per-layer arrays
# ---------------------------------------------------------------------------------------------
def layer_sizes(layers) -> list[int]:
    return [num_params(m) for m in layers]


def layer_parts(sizes: list[int], lo: int, hi: int) -> list[tuple[int, int, int]]:
    """The layers overlapping the flat range [lo, hi): (layer, start, stop) within each layer's
    own vector. A stage cut inside a layer holds a slice of it (partition.LinearPiece)."""
    out, off = [], 0
    for i, n in enumerate(sizes):
        a, b = max(off, lo), min(off + n, hi)
        if b > a:
            out.append((i, a - off, b - off))
        off += n
    return out


def learner_flats(learner) -> dict:
    """{'online'|'target'|'exp_avg'|'exp_avg_sq': this stage's flat float32 vector}."""
    st = learner.opt.state.get(learner.online.flat, {})
    flat = {"online": learner.online.numpy_data(), "target": learner.target.numpy_data()}
    if st:
        flat["exp_avg"] = st["exp_avg"].detach().cpu().numpy()
        flat["exp_avg_sq"] = st["exp_avg_sq"].detach().cpu().numpy()
    else:
        flat["exp_avg"] = flat["exp_avg_sq"] = np.zeros(learner.online.numel, np.float32)
    return flat


def learner_scalars(learner) -> dict:
    st = learner.opt.state.get(learner.online.flat, {})
    return {"updates": int(learner.updates),
            "adam_step": float(st["step"]) if st else 0.0,
            "lr": float(learner.opt.param_groups[0]["lr"])}


def learner_load(learner, flats: dict, scalars: dict) -> None:
    """Load flat (this stage's) online/target/Adam arrays and counters into a learner."""
    arrays = {"online": flats["online"], "target": flats["target"]}
    if scalars["adam_step"] > 0:
        arrays.update(adam_exp_avg=flats["exp_avg"], adam_exp_avg_sq=flats["exp_avg_sq"],
                      adam_step=np.array([scalars["adam_step"]]))
    learner.load_state_arrays(arrays)
    learner.updates = int(scalars["updates"])
    for g in learner.opt.param_groups:
        g["lr"] = scalars["lr"]


# ---------------------------------------------------------------------------------------------
# the dataset plan: names, shapes, parts and their owners (identical on every rank)
# ---------------------------------------------------------------------------------------------
@dataclass
class Spec:
    name: str
    shape: tuple
    dtype: np.dtype
    parts: list            # [(owner_world_rank, start, stop)]
    chunks: tuple | None = None


def _chunks_for(rows_total: int, rows_per_shard: int, row_shape: tuple, itemsize: int):
    rowbytes = max(1, int(np.prod(row_shape, dtype=np.int64)) * itemsize)
    target = max(1, CHUNK_BYTES // rowbytes)
    best = 1
    for d in range(1, int(math.isqrt(rows_per_shard)) + 1):
        if rows_per_shard % d == 0:
            for c in (d, rows_per_shard // d):
                if c <= 2 * target:
                    best = max(best, c)
    c = best if best * 8 >= target else min(target, rows_total)
    return (max(1, min(c, rows_total)),) + tuple(row_shape)


def plan(layout: dict, env: dict, sizes: list[int], state_maxlen: int) -> list[Spec]:
    dp, pp, world, E, rows = (layout["dp"], layout["pp"], layout["world"], layout["num_envs"],
                              layout["rows"])
    specs = []
    parts = {i: [] for i in range(len(sizes))}
    for s, (lo, hi) in enumerate(stage_params(layout, sizes)):
        for i, a, b in layer_parts(sizes, lo, hi):
            parts[i].append((s, a, b))        # s: world rank of (dp_rank 0, stage s)
    for _, grp in PARAM_GROUPS:
        for i, n in enumerate(sizes):
            specs.append(Spec(f"{grp}/{i}", (n,), np.dtype(np.float32), parts[i]))
    obs_shape, obs_dtype = tuple(env["obs_shape"]), np.dtype(env["obs_dtype"])
    shard = [(q * pp, q * rows, (q + 1) * rows) for q in range(dp)]
    row_dt = {"obs": obs_dtype, "next_obs": obs_dtype, "actions": np.dtype(np.int64),
              "rewards": np.dtype(np.float32), "terminated": np.dtype(bool),
              "truncated": np.dtype(bool), "priorities": np.dtype(np.float64)}
    names = list(REPLAY_ROWS) + (["priorities"] if layout["prioritized"] else [])
    for k in names:
        tail = (E,) + (obs_shape if k in ("obs", "next_obs") else ())
        dt = row_dt[k]
        specs.append(Spec(f"replay/{k}", (dp * rows,) + tail, dt, shard,
                          _chunks_for(dp * rows, rows, tail, dt.itemsize)))
    per = [(q * pp, q, q + 1) for q in range(dp)]
    specs.append(Spec("replay/pos", (dp,), np.dtype(np.int64), per))
    specs.append(Spec("replay/filled", (dp,), np.dtype(np.int64), per))
    specs.append(Spec("replay/max_priority", (dp,), np.dtype(np.float64), per))
    ranks = [(r, r, r + 1) for r in range(world)]
    specs.append(Spec("rank_state", (world, state_maxlen), np.dtype(np.uint8), ranks))
    specs.append(Spec("rank_state_len", (world,), np.dtype(np.int64), ranks))
    return specs


def stage_params(layout: dict, sizes: list[int]) -> list[list[int]]:
    """Each stage's flat parameter range; layouts that only name layer ranges are converted."""
    if "stage_params" in layout:
        return [list(r) for r in layout["stage_params"]]
    off = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).tolist()
    return [[off[a], off[b]] for a, b in layout["stage_ranges"]]


def _crc(a: np.ndarray, value: int = 0) -> int:
    a = np.ascontiguousarray(a)
    return zlib.crc32(memoryview(a.reshape(-1).view(np.uint8)), value) & 0xFFFFFFFF


# Parallel writes go out in 32 MiB pieces, each one's writeback started as soon as it is written
# (``_Writeback``): on the test VM 32 MiB pieces with a 64 MiB window ran at 2.5-3 GB/s (~dd)
# where 256 MiB pieces with a 256-1024 MiB window ran at 1.1-1.7 GB/s (page cache churn).
WRITE_PIECE_BYTES = 32 * 2**20


def _rows_per_piece(spec: Spec, piece_bytes: int = PIECE_BYTES) -> int:
    rowbytes = max(1, int(np.prod(spec.shape[1:], dtype=np.int64)) * spec.dtype.itemsize)
    return max(1, piece_bytes // rowbytes)


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_dir(run_dir) -> Path:
    return Path(run_dir) / CKPT_DIR


def _ckpt_name(env_steps: int) -> str:
    return f"ckpt-{env_steps:012d}.h5"


def write_checkpoint(run_dir, comm, layout: dict, env: dict, sizes: list[int], cfg: dict,
                     counters: dict, mine: dict, rank_json: bytes, keep_last: int,
                     mode: str | None = None) -> dict:
    """Collective over ``comm`` (the world). ``mine``: {dataset name: array} of the parts this
    rank owns (replay shard rows, its layers, ...). Returns {'path', 'seconds', 'bytes'}."""
    t0 = time.perf_counter()
    mode = mode or io_mode()
    rank = comm.Get_rank()
    d = checkpoint_dir(run_dir)
    if rank == 0:
        d.mkdir(parents=True, exist_ok=True)
        for stale in d.glob("*.tmp"):
            stale.unlink(missing_ok=True)
    counters = comm.bcast(counters if rank == 0 else None, root=0)
    final = d / _ckpt_name(int(counters["env_steps"]))
    tmp = d / (final.name + ".tmp")

    lengths = comm.allgather(len(rank_json))
    maxlen = max(1, max(lengths))
    buf = np.zeros(maxlen, np.uint8)
    buf[:len(rank_json)] = np.frombuffer(rank_json, np.uint8)
    mine = dict(mine)
    mine["rank_state"] = buf[None]
    mine["rank_state_len"] = np.array([len(rank_json)], np.int64)
    specs = plan(layout, env, sizes, maxlen)
    # every part's checksum, known everywhere (attributes are written collectively)
    my_crcs = {}
    for s in specs:
        for j, (own, a, b) in enumerate(s.parts):
            if own == rank:
                arr = mine.get(s.name)
                if arr is None:
                    raise RuntimeError(f"rank {rank} owns a part of '{s.name}' but has no data for it")
                arr = np.ascontiguousarray(arr, dtype=s.dtype)
                if arr.shape != (b - a,) + tuple(s.shape[1:]):
                    raise RuntimeError(f"'{s.name}': rank {rank} has shape {arr.shape}, the plan "
                                       f"expects {(b - a,) + tuple(s.shape[1:])}")
                mine[s.name] = arr
                my_crcs[(s.name, j)] = _crc(arr)
    crcs = {}
    for part in comm.allgather(my_crcs):
        crcs.update(part)
    root_attrs = {"format": FORMAT, "version": __version__, "io_mode": mode,
                  "config": json.dumps(cfg), "layout": json.dumps(layout), "env": json.dumps(env),
                  "layer_sizes": json.dumps(sizes), "counters": json.dumps(counters)}
    nbytes = sum(int(np.prod(s.shape, dtype=np.int64)) * s.dtype.itemsize for s in specs)

    if mode == "parallel":
        _write_parallel(tmp, comm, specs, mine, crcs, root_attrs)
    else:
        _write_serial(tmp, comm, specs, mine, crcs, root_attrs)
    sleep = _test_sleep(int(counters["env_steps"]))
    if sleep > 0:
        time.sleep(sleep)     # test hook: a window in which a kill -9 hits a half-done checkpoint
    comm.Barrier()            # every rank's data is in the (closed, fsynced) file
    if rank == 0:
        os.replace(tmp, final)
        _fsync_path(d)
        ptr = d / (LATEST + ".tmp")
        with open(ptr, "w") as fh:
            fh.write(final.name + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(ptr, d / LATEST)
        _fsync_path(d)
        # prune in write order (not name order: after a fallback resume, names can repeat or
        # run backwards), never the checkpoint just written
        written = sorted(d.glob("ckpt-*.h5"), key=lambda p: p.stat().st_mtime_ns)
        for old in written[:-keep_last]:
            if old != final:
                old.unlink(missing_ok=True)
    comm.Barrier()
    return {"path": str(final), "seconds": time.perf_counter() - t0, "bytes": nbytes}


def _test_sleep(env_steps: int) -> float:
    """``HPCDQN_TEST_CKPT_SLEEP=SECONDS[@MIN_ENV_STEPS]`` (tests only)."""
    v = os.environ.get(TEST_SLEEP_ENV, "")
    if not v:
        return 0.0
    secs, _, at = v.partition("@")
    return float(secs) if env_steps >= int(at or 0) else 0.0


def _create_all(f, specs, crcs, root_attrs, fill_never=True, contiguous=False):
    """``contiguous``: ignore the specs' chunk shapes (parallel writer): a rank's shard is then
    one contiguous byte range of the file, written with plain large writes, and its file offset
    is known (``_Writeback`` streams exactly that range to disk)."""
    for k, v in root_attrs.items():
        f.attrs[k] = v
    for s in specs:
        kw = {}
        if s.chunks is not None and s.shape[0] > 0 and not contiguous:
            kw["chunks"] = s.chunks
        if fill_never:
            kw["fill_time"] = "never"   # every byte is written by its owner: no fill pass
        ds = f.create_dataset(s.name, shape=s.shape, dtype=s.dtype, **kw)
        ds.attrs["parts"] = json.dumps([[a, b] for _, a, b in s.parts])
        ds.attrs["crc32"] = json.dumps([crcs.get((s.name, j), 0) for j in range(len(s.parts))])


def _file_kwargs():
    return {"libver": ("earliest", "v110")}


HINTS_ENV = "HPCDQN_MPIIO_HINTS"
# Each rank writes a few large contiguous blocks, so MPI-IO's two-phase collective buffering
# (aggregating through 16 MiB buffers) only adds copies: measured 0.7 vs 1.8 GB/s on one disk.
# Collective calls stay collective; only the aggregation step is skipped. Override with
# HPCDQN_MPIIO_HINTS="key=value,..." ("" for the MPI library's defaults).
DEFAULT_HINTS = "romio_cb_write=disable,collective_buffering=false"


IO_COMPONENT_ENV = "OMPI_MCA_io"


def _prefer_romio(MPI) -> None:
    """Open MPI 4.x: make MPI-IO use ROMIO instead of the default OMPIO, unless the user chose
    (``OMPI_MCA_io`` set, any value, e.g. ``OMPI_MCA_io=ompio`` to keep OMPIO).

    Measured on one local ext4 disk, the whole ``write_checkpoint`` (5.6 GB replay, 2 ranks):
    ROMIO 1.75 GB/s vs OMPIO 1.1 GB/s; 48 MB replay, 2 ranks: 0.04 s vs 0.45 s (OMPIO spends
    ~80 ms per file open and is slow in the collective writes). Open MPI opens its ``io``
    framework, and reads this variable, at the first MPI_File_open, not at MPI_Init, so setting
    it here (before the first checkpoint file is opened) takes effect. Only set when a ROMIO
    component is seen next to the loaded Open MPI components (naming a missing one makes every
    MPI_File_open fail); otherwise nothing changes."""
    if IO_COMPONENT_ENV in os.environ or "Open MPI" not in MPI.Get_library_version():
        return
    try:
        with open("/proc/self/maps") as fh:
            dirs = {os.path.dirname(x.split()[-1]) for x in fh if "/mca_" in x and ".so" in x}
    except OSError:
        return
    names = sorted({p.name[len("mca_io_"):].split(".")[0] for d in dirs
                    for p in Path(d).glob("mca_io_romio*.so")})
    if names:
        os.environ[IO_COMPONENT_ENV] = names[-1]


def _mpi_info():
    from mpi4py import MPI

    _prefer_romio(MPI)
    text = os.environ.get(HINTS_ENV, DEFAULT_HINTS)
    info = MPI.Info.Create()
    for item in filter(None, (x.strip() for x in text.split(","))):
        k, _, v = item.partition("=")
        info.Set(k.strip(), v.strip())
    return info


def _write_parallel(tmp, comm, specs, mine, crcs, root_attrs):
    from h5py import h5fd, h5p, h5s

    rank = comm.Get_rank()
    kw = _file_kwargs()
    kw["info"] = _mpi_info()
    try:
        f = h5py.File(tmp, "w", driver="mpio", comm=comm, alignment_threshold=2**20,
                      alignment_interval=2**20, **kw)
    except TypeError:  # pragma: no cover - old h5py
        f = h5py.File(tmp, "w", driver="mpio", comm=comm, **kw)
    flusher = None
    try:
        _create_all(f, specs, crcs, root_attrs, contiguous=True)
        dxpl = h5p.create(h5p.DATASET_XFER)
        dxpl.set_dxpl_mpio(h5fd.MPIO_COLLECTIVE)
        flusher = _Writeback(tmp)
        for s in specs:
            if int(np.prod(s.shape, dtype=np.int64)) == 0:
                continue
            ds = f[s.name].id
            base = ds.get_offset()      # file offset of row 0 (contiguous layout), or None
            rowbytes = int(np.prod(s.shape[1:], dtype=np.int64)) * s.dtype.itemsize
            rpp = _rows_per_piece(s, WRITE_PIECE_BYTES)
            n_pieces = max(math.ceil((b - a) / rpp) for _, a, b in s.parts)
            my = [(a, b) for own, a, b in s.parts if own == rank]
            arr = mine.get(s.name) if my else None
            start = my[0][0] if my else 0
            dummy = np.zeros((1,) + tuple(s.shape[1:]), s.dtype)
            for p in range(n_pieces):
                fs = ds.get_space()
                if arr is not None and p * rpp < len(arr):
                    piece = np.ascontiguousarray(arr[p * rpp:(p + 1) * rpp])
                    fs.select_hyperslab((start + p * rpp,) + (0,) * (len(s.shape) - 1), piece.shape)
                    ms = h5s.create_simple(piece.shape)
                    ds.write(ms, fs, piece, dxpl=dxpl)
                    flusher.wrote(piece.nbytes, None if base is None else
                                  base + (start + p * rpp) * rowbytes)
                else:
                    fs.select_none()
                    ms = h5s.create_simple(dummy.shape)
                    ms.select_none()
                    ds.write(ms, fs, dummy, dxpl=dxpl)
        f.flush()             # MPI_File_sync
    finally:
        f.close()
        if flusher is not None:
            flusher.close()
    if rank == 0:
        _fsync_path(tmp)


class _Writeback:
    """Stream big checkpoints to disk while writing, keeping at most ``HPCDQN_CKPT_WRITEBACK_MB``
    (default 64; 0: off) of this rank's freshly written data in the page cache.

    Without it a multi-GB write piles up dirty pages next to a multi-GB replay in memory, and
    this VM's disk then runs at 0.3-0.45 GB/s instead of 2-3 GB/s (measured with plain
    writes, with ``sync_file_range(WRITE)`` alone, and with a blocking fdatasync every 512 MB:
    0.9-1.2 GB/s, since nothing is written while it waits). So, where the byte range of each
    piece is known (contiguous datasets) and Linux's ``sync_file_range`` is available, it is
    pipelined like ``dd oflag=nocache`` does: start the writeback of the piece just written
    (asynchronous), then wait for the *older* pieces beyond the window and drop their
    now-clean pages (``posix_fadvise(DONTNEED)``) -- the disk never idles while we copy the
    next piece. Durability still comes from MPI_File_sync + fsync at the end; this only paces
    the page cache. Otherwise (no range, no ``sync_file_range``): fdatasync the whole file and
    drop its pages after every window's worth of data."""

    _sfr = False               # libc.sync_file_range, resolved once (None: unavailable)
    WAIT_BEFORE, WRITE, WAIT_AFTER = 1, 2, 4

    def __init__(self, path):
        self.every = int(float(os.environ.get("HPCDQN_CKPT_WRITEBACK_MB", "64")) * 2**20)
        self.fd = os.open(path, os.O_RDONLY) if self.every > 0 else None
        self.pending = 0           # whole-file fallback: bytes since the last fdatasync
        self.ranges = collections.deque()   # (offset, nbytes) started, not yet waited for
        self.queued = 0

    @classmethod
    def _libc_sfr(cls):
        if cls._sfr is False:
            cls._sfr = None
            if sys.platform.startswith("linux"):
                import ctypes

                from .memory import libc

                fn = getattr(libc(), "sync_file_range", None)
                if fn is not None:
                    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
                    fn.restype = ctypes.c_int
                    cls._sfr = fn
        return cls._sfr

    def wrote(self, n: int, offset: int | None = None) -> None:
        if self.fd is None or n <= 0:
            return
        sfr = self._libc_sfr() if offset is not None else None
        if sfr is None or sfr(self.fd, offset, n, self.WRITE) != 0:
            self.pending += n
            if self.pending >= self.every:
                os.fdatasync(self.fd)
                os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
                self.pending = 0
            return
        self.ranges.append((offset, n))
        self.queued += n
        while len(self.ranges) > 1 and self.queued - self.ranges[0][1] >= self.every:
            self._retire(sfr)

    def _retire(self, sfr) -> None:
        off, n = self.ranges.popleft()
        self.queued -= n
        sfr(self.fd, off, n, self.WAIT_BEFORE | self.WRITE | self.WAIT_AFTER)
        os.posix_fadvise(self.fd, off, n, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        if self.fd is not None:
            sfr = self._libc_sfr() if self.ranges else None
            while self.ranges:
                self._retire(sfr)
            os.close(self.fd)
            self.fd = None


def _write_serial(tmp, comm, specs, mine, crcs, root_attrs):
    """Rank 0 writes everything; the owners send their parts in plan order."""
    from mpi4py import MPI

    rank = comm.Get_rank()
    f = h5py.File(tmp, "w", **_file_kwargs()) if rank == 0 else None
    try:
        if f is not None:
            _create_all(f, specs, crcs, root_attrs, fill_never=False)
        for s in specs:
            if int(np.prod(s.shape, dtype=np.int64)) == 0:
                continue
            rpp = _rows_per_piece(s)
            for own, a, b in s.parts:
                if rank != own and rank != 0:
                    continue
                arr = mine.get(s.name) if rank == own else None
                for p0 in range(0, b - a, rpp):
                    p1 = min(b - a, p0 + rpp)
                    if rank == own == 0:
                        f[s.name][a + p0:a + p1] = arr[p0:p1]
                    elif rank == own:
                        piece = np.ascontiguousarray(arr[p0:p1])
                        comm.Send([piece.reshape(-1).view(np.uint8), MPI.BYTE], dest=0, tag=7)
                    else:
                        piece = np.empty((p1 - p0,) + tuple(s.shape[1:]), s.dtype)
                        comm.Recv([piece.reshape(-1).view(np.uint8), MPI.BYTE], source=own, tag=7)
                        f[s.name][a + p0:a + p1] = piece
        if f is not None:
            f.flush()
    finally:
        if f is not None:
            f.close()
    if rank == 0:
        _fsync_path(tmp)


# ---------------------------------------------------------------------------------------------
# reading and validation
# ---------------------------------------------------------------------------------------------
def _open(path) -> h5py.File:
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
    with _open(path) as f:
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


def _read(f, path, name, sel=slice(None)) -> np.ndarray:
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
    crc, rpp = 0, _rows_per_piece(spec)
    for p in range(a, b, rpp):
        crc = _crc(np.asarray(_read(f, path, spec.name, slice(p, min(b, p + rpp))), spec.dtype), crc)
    if crc != stored:
        where = f" rows [{a}, {b})" if len(spec.parts) > 1 else ""
        raise CheckpointError(f"checkpoint '{path}': dataset '{spec.name}'{where}: checksum mismatch "
                              f"(stored crc32 {stored:#010x}, data {crc:#010x}); the file is corrupted")


def verify(path, comm=None) -> None:
    """Check every dataset part against its CRC. With ``comm``: the parts are spread over the
    ranks and the verdict agreed (collective); raises CheckpointError on every rank."""
    rank, world = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)
    err = None
    try:
        with _open(path) as f:
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


# ---------------------------------------------------------------------------------------------
# replay reshard
# ---------------------------------------------------------------------------------------------
def reshard_plan(S_old: int, filled: int, S_new: int, rows_new: int) -> tuple[int, int, list]:
    """Returns (L, M, pieces): each old stream keeps its newest L transitions; new column j gets
    ``pieces[j]`` = [(old_stream, t0, t1), ...] (time indices into the kept L, oldest first),
    M transitions in all."""
    L = min(filled, (S_new * rows_new) // S_old)
    T = S_old * L
    M = min(rows_new, T // S_new)
    D = T - S_new * M
    pieces = []
    for j in range(S_new):
        lo, hi = D + j * M, D + (j + 1) * M
        segs = []
        k = lo // L if L else 0
        while L and lo < hi:
            end = min(hi, (k + 1) * L)
            segs.append((k, lo - k * L, end - k * L))
            lo, k = end, k + 1
        pieces.append(segs)
    return L, M, pieces


def _ring_rows(t0: int, t1: int, filled: int, pos: int, rows: int, L: int) -> list[tuple[int, int]]:
    """Ring row ranges holding kept-time indices [t0, t1) of a stream (newest L of filled)."""
    oldest = pos if filled == rows else 0
    a = (oldest + (filled - L) + t0) % rows
    n = t1 - t0
    if a + n <= rows:
        return [(a, a + n)]
    return [(a, rows), (0, n - (rows - a))]


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
    n = int(_read(f, path, "rank_state_len", slice(r, r + 1))[0])
    raw = _read(f, path, "rank_state", (slice(r, r + 1), slice(0, n)))[0].tobytes()
    try:
        return json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"checkpoint '{path}': dataset 'rank_state' row {r} is not JSON: {e}") from None


def load_learner(f, path, meta, learner) -> None:
    """This stage's slice of every parameter/Adam vector, whatever layout wrote them."""
    lo, hi = learner.param_range()
    flats = {}
    for key, grp in PARAM_GROUPS:
        parts = [np.asarray(_read(f, path, f"{grp}/{i}", slice(a, b)), np.float32)
                 for i, a, b in layer_parts(meta["layer_sizes"], lo, hi)]
        flats[key] = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        if flats[key].size != learner.online.numel:
            raise CheckpointMismatch(f"checkpoint '{path}': parameters [{lo}, {hi}) hold "
                                     f"{flats[key].size} values, this stage has {learner.online.numel}")
    c = meta["counters"]
    learner_load(learner, flats, {"updates": c["updates"], "adam_step": c["adam_step"], "lr": c["lr"]})


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
    replay.pos = int(_read(f, path, "replay/pos", slice(q, q + 1))[0])
    replay.filled = int(_read(f, path, "replay/filled", slice(q, q + 1))[0])
    if replay.prioritized:
        pr = np.asarray(_read(f, path, "replay/priorities", sl), np.float64).reshape(-1)
        replay.tree.tree[:] = 0.0
        replay.tree.set(np.arange(pr.size), pr)
        replay.max_priority = float(_read(f, path, "replay/max_priority", slice(q, q + 1))[0])


def load_replay_reshard(f, path, meta, replay, dp_rank: int, S_n: int) -> None:
    lay = meta["layout"]
    E_o, rows_o, dp_o = lay["num_envs"], lay["rows"], lay["dp"]
    pos_all = np.asarray(_read(f, path, "replay/pos"))
    filled_all = np.asarray(_read(f, path, "replay/filled"))
    if len(set(filled_all.tolist())) != 1 or len(set(pos_all.tolist())) != 1:
        raise CheckpointError(f"checkpoint '{path}': replay shards disagree on pos/filled "
                              f"({pos_all.tolist()}, {filled_all.tolist()})")
    filled, pos = int(filled_all[0]), int(pos_all[0])
    E_n, rows_n = replay.num_envs, replay.rows
    S_o = dp_o * E_o
    L, M, pieces = reshard_plan(S_o, filled, S_n, rows_n)
    if M < replay.n_step + 1:
        raise CheckpointError(
            f"cannot reshard checkpoint '{path}': its replay holds {filled} transitions in each of "
            f"{S_o} env streams, too few for {S_n} new streams of at least {replay.n_step + 1}")
    prio = lay["prioritized"] and replay.prioritized
    names = list(REPLAY_ROWS) + (["priorities"] if prio else [])
    new = {k: np.zeros((M, E_n) + getattr(replay, k).shape[2:], getattr(replay, k).dtype)
           for k in REPLAY_ROWS}
    if prio:
        new["priorities"] = np.zeros((M, E_n), np.float64)
    for e in range(E_n):
        j = dp_rank * E_n + e
        at = 0
        for k, t0, t1 in pieces[j]:
            q, eo = divmod(k, E_o)
            for r0, r1 in _ring_rows(t0, t1, filled, pos, rows_o, L):
                n = r1 - r0
                for name in names:
                    new[name][at:at + n, e] = _read(f, path, f"replay/{name}",
                                                    (slice(q * rows_o + r0, q * rows_o + r1), eo))
                at += n
            # a stream ends here: do not let n-step returns run into the next one
            end = at - 1
            if not new["terminated"][end, e]:
                new["truncated"][end, e] = True
    for k in REPLAY_ROWS:
        getattr(replay, k)[:M] = new[k]
    replay.filled = M
    replay.pos = M % replay.rows
    if replay.prioritized:
        replay.tree.tree[:] = 0.0
        mp = float(np.max(_read(f, path, "replay/max_priority"))) if prio else 1.0
        pr = new["priorities"] if prio else np.full((M, E_n), mp)
        pr = np.where(pr > 0, pr, mp)
        if replay.n_step > 1:
            pr[M - (replay.n_step - 1):] = 0.0
        idx = (np.arange(M)[:, None] * E_n + np.arange(E_n)[None]).reshape(-1)
        replay.tree.set(idx, pr.reshape(-1))
        replay.max_priority = mp


def resume_config(run_dir, overrides: list[str]) -> dict:
    """The run's config from its newest readable checkpoint, with command-line overrides
    (``run_dir`` is forced to RUN_DIR; ``stop_after`` resets unless given)."""
    from .config import _flatten, load_config, parse_overrides

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
    stored = _flatten(meta["config"])
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


# ---------------------------------------------------------------------------------------------
# what the training loop calls
# ---------------------------------------------------------------------------------------------
class Checkpointer:
    """Owns the schedule and the save/resume of one training run (collective calls)."""

    def __init__(self, run_dir, cfg: dict, grid, layers, env_info: dict, learner, replay, env):
        self.run_dir, self.cfg, self.grid = Path(run_dir), cfg, grid
        self.comm = grid.comm
        self.learner, self.replay, self.env = learner, replay, env
        self.env_info = env_info
        self.sizes = layer_sizes(layers)
        ranges = learner.param_ranges         # every stage's, known on every rank
        self.layout = {"world": grid.world, "dp": grid.dp, "pp": grid.pp,
                       "num_envs": cfg["num_envs"],
                       "rows": replay.rows if replay is not None else _rows_for(cfg),
                       "stage_params": [list(ranges[s]) for s in range(grid.pp)],
                       "prioritized": bool(cfg["replay"]["prioritized"])}
        self.every = int(cfg["checkpoint_every"])
        self.keep_last = int(cfg["keep_last"])
        self.stalls: list[float] = []
        self.mode = self.comm.bcast(io_mode() if grid.is_root else None, root=0)  # one protocol
        if self.mode == "serial" and grid.is_root:
            why = f"{SERIAL_ENV}=1" if h5py.get_config().mpi else "h5py was built without MPI"
            warn(f"checkpoints are written through rank 0 ({why}); parallel HDF5 is faster")

    # -- schedule ---------------------------------------------------------------------------------
    def due(self, steps_before: int, steps_after: int) -> bool:
        return self.every > 0 and steps_after // self.every > steps_before // self.every

    # -- save ---------------------------------------------------------------------------------
    def save(self, counters: dict, loop: dict) -> dict:
        """Collective. ``loop``: this rank's loop state (rng, obs, ep_ret, ep_len, window)."""
        g, learner, replay = self.grid, self.learner, self.replay
        t0 = time.perf_counter()
        mine = {}
        lo, hi = learner.param_range()
        if g.dp_rank == 0:
            flats = learner_flats(learner)
            for key, grp in PARAM_GROUPS:
                off = 0
                for i, a, b in layer_parts(self.sizes, lo, hi):
                    mine[f"{grp}/{i}"] = np.ascontiguousarray(flats[key][off:off + b - a], np.float32)
                    off += b - a
        scalars = learner_scalars(learner)
        state = {"torch_rng": encode(torch.get_rng_state()), "window": loop.get("window"),
                 "learner": scalars}
        if torch.cuda.is_available() and str(getattr(learner, "device", "cpu")).startswith("cuda"):
            state["cuda_rng"] = encode(torch.cuda.get_rng_state())
        if replay is not None:
            for k in REPLAY_ROWS:
                mine[f"replay/{k}"] = getattr(replay, k)
            if replay.prioritized:
                leaves = replay.tree.tree[replay.tree.leaves:replay.tree.leaves + replay.capacity]
                mine["replay/priorities"] = leaves.reshape(replay.rows, replay.num_envs)
            mine["replay/pos"] = np.array([replay.pos], np.int64)
            mine["replay/filled"] = np.array([replay.filled], np.int64)
            mine["replay/max_priority"] = np.array([replay.max_priority], np.float64)
            state.update(acting_rng=encode(loop["rng"]), replay_rng=encode(replay.rng),
                         obs=encode(np.asarray(loop["obs"])), ep_ret=encode(loop["ep_ret"]),
                         ep_len=encode(loop["ep_len"]), env=env_state(self.env))
        counters = dict(counters, **scalars, checkpoints=len(self.stalls) + 1)
        raw = json.dumps(state).encode()
        out = write_checkpoint(self.run_dir, self.comm, self.layout, self.env_info, self.sizes,
                               self.cfg, counters, mine, raw, self.keep_last, self.mode)
        out["seconds"] = time.perf_counter() - t0
        self.stalls.append(out["seconds"])
        return out

    def summary(self) -> dict:
        s = self.stalls
        return {"checkpoints": len(s), "checkpoint_stall_s_total": round(sum(s), 4),
                "checkpoint_stall_s_max": round(max(s), 4) if s else 0.0}

    # -- resume -------------------------------------------------------------------------------
    def resume(self, run_dir) -> dict:
        """Collective: load the newest valid checkpoint of ``run_dir`` into the learner, replay
        and envs; returns the loop state ({counters, rng, obs, ep_ret, ep_len, window, path,
        exact, warnings}). Falls back to older checkpoints, warning about each bad one."""
        comm, root = self.comm, self.grid.is_root
        cands = comm.bcast(candidates(run_dir) if root else None, root=0)
        errors = []
        for c in cands:
            try:
                verify(c, comm)
                meta = read_meta(c)
                check_compatible(meta, c, self.env_info, self.sizes)
                st = self._load_agreed(c, meta)
            except CheckpointMismatch:
                raise
            except CheckpointError as e:
                if root:
                    warn(f"{e}; trying an older checkpoint (kept as {c.name}.bad)")
                    try:   # set it aside: never loaded again, never pruned in place of a good one
                        os.replace(c, c.with_name(c.name + ".bad"))
                    except OSError:
                        pass
                errors.append(str(e))
                comm.Barrier()
                continue
            st["path"] = str(c)
            return st
        raise CheckpointError(f"cannot resume '{run_dir}': no valid checkpoint"
                              + "".join(f"\n  {e}" for e in errors))

    def _load_agreed(self, path, meta) -> dict:
        err, st = None, None
        try:
            st = self._load(path, meta)
        except CheckpointMismatch:
            raise
        except CheckpointError as e:
            err = str(e)
        except Exception as e:  # noqa: BLE001
            err = f"checkpoint '{path}': {type(e).__name__}: {e}"
        errs = [e for e in self.comm.allgather(err) if e]
        if errs:
            raise CheckpointError(errs[0])
        return st

    def _load(self, path, meta) -> dict:
        g, learner, replay, cfg = self.grid, self.learner, self.replay, self.cfg
        old, new = meta["layout"], self.layout
        c = meta["counters"]
        same_layout = all(old[k] == new[k] for k in ("world", "dp", "pp", "num_envs", "rows", "prioritized"))
        out = {"counters": c, "exact": same_layout, "warnings": [], "rng": None, "obs": None,
               "ep_ret": None, "ep_len": None, "window": None}
        with _open(path) as f:
            load_learner(f, path, meta, learner)
            if replay is not None:
                same_replay = all(old[k] == new[k] for k in ("dp", "num_envs", "rows", "prioritized"))
                if same_replay:
                    load_replay_same(f, path, meta, replay, g.dp_rank)
                else:
                    load_replay_reshard(f, path, meta, replay, g.dp_rank, g.dp * replay.num_envs)
            # torch RNG: same world rank if it existed
            mine = load_rank_state(f, path, g.rank) if g.rank < old["world"] else None
            if mine is not None:
                torch.set_rng_state(decode(mine["torch_rng"]))
                if "cuda_rng" in mine and torch.cuda.is_available():
                    torch.cuda.set_rng_state(decode(mine["cuda_rng"]))
            # metric window
            if same_layout:
                out["window"] = mine.get("window")
            elif g.rank == 0:
                tot = None
                for r in range(old["world"]):
                    w = load_rank_state(f, path, r).get("window") or {}
                    tot = dict(w) if tot is None else {k: tot.get(k, 0) + v for k, v in w.items()}
                out["window"] = tot
            # env + acting state: old first-stage rank of the same replica, if any
            if replay is not None:
                src = g.dp_rank * old["pp"] if (g.dp_rank < old["dp"] and
                                                old["num_envs"] == new["num_envs"]) else None
                if src is not None:
                    s = mine if src == g.rank else load_rank_state(f, path, src)
                    out["rng"] = decode(s["acting_rng"])
                    replay.rng = decode(s["replay_rng"], replay.rng)
                    out["obs"] = decode(s["obs"])
                    out["ep_ret"], out["ep_len"] = decode(s["ep_ret"]), decode(s["ep_len"])
                    out["warnings"] += restore_env_state(self.env, s["env"])
                    if out["warnings"]:
                        out["exact"] = False
                else:
                    out["exact"] = False
                    seed = [cfg["seed"], g.dp_rank, int(c["env_steps"])]
                    env_seed = int(np.random.SeedSequence(seed).generate_state(1)[0] % 2**31)
                    out["obs"] = self.env.reset(seed=env_seed)[0]
                    out["rng"] = np.random.default_rng(seed + [17])
                    replay.rng = np.random.default_rng(seed + [7])
                    out["ep_ret"] = np.zeros(cfg["num_envs"])
                    out["ep_len"] = np.zeros(cfg["num_envs"], dtype=np.int64)
        return out


def _rows_for(cfg: dict) -> int:
    d = cfg["dqn"]
    return ReplayBuffer.rows_for(d["buffer_size"], cfg["num_envs"], d["n_step"])


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
