"""What a checkpoint file contains: its format, dataset names, the plan of datasets and parts.

File format ``hpcdqn-checkpoint-2.0`` (arrays and JSON attributes only, no pickle)::

    /                          attrs: format, version, io_mode, config, layout, env, layer_sizes,
                                      counters (all JSON), attrs_crc32 (CRC-32 over the others;
                                      since 1.1; files of format 1 (1.0) have none and still load)
    params/online/<i>          float32 [n_i]   layer i of the whole network (global layer index)
    params/target/<i>          float32 [n_i]
    adam/exp_avg/<i>           float32 [n_i]
    adam/exp_avg_sq/<i>        float32 [n_i]
    replay/obs, replay/next_obs  [dp * rows, num_envs, *obs_shape]   (contiguous when written
                               in parallel: a shard is one byte range; chunked by the serial path)
                               -- or, where layout.frame_stack = k > 0 (2.0; observations
                               (k, *frame) stacked by the env, ``rl.framereplay``):
    replay/frames              [dp * rows, num_envs, *frame]  newest frame of each next observation
    replay/ep_step             uint8 [dp * rows, num_envs]    step in the episode, saturated at k
    replay/starts              [sum(layout.replay_starts), k, *frame]  each shard's initial stacks
                               of the episodes that start in its ring, oldest first
    replay/actions (int64), rewards (float32), terminated, truncated (bool)  [dp * rows, num_envs]
    replay/priorities          float64 [dp * rows, num_envs]  (prioritized replay only: leaf values)
    replay/pos, replay/filled  int64 [dp];  replay/max_priority float64 [dp]
    rank_state                 uint8 [world, maxlen]: one UTF-8 JSON document per world rank
                               (numpy/torch RNG states, env states, current obs, episode
                               accumulators, metric window); rank_state_len int64 [world]

Every dataset is cut along axis 0 into *parts*, each written by one rank (a replay shard by
its data-parallel rank, a layer by replica 0 of the stage that holds it -- or one slice per stage
where a stage boundary falls inside the layer, see ``hpcdqn/parallel/partition.py`` -- row r of
rank_state by world rank r). Each dataset carries ``parts`` ([[start, stop], ...]) and ``crc32``
(one CRC-32 per part) attributes; validation re-reads every part and compares.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hpcdqn.rl.framereplay import FrameReplay
from hpcdqn.rl.networks import num_params
from hpcdqn.rl.replay import ReplayBuffer

FORMAT_NAME = "hpcdqn-checkpoint"
# 1.1: adds the root attribute ``attrs_crc32``; 2.0: frame-stacked replay (replay/frames, ...),
# which a 1.x reader cannot load (so it refuses the file instead of setting it aside)
FORMAT_MAJOR, FORMAT_MINOR = 2, 0
FORMAT = f"{FORMAT_NAME}-{FORMAT_MAJOR}.{FORMAT_MINOR}"   # files of 1.0 were "hpcdqn-checkpoint-1"
CKPT_DIR = "checkpoints"
LATEST = "latest"
PIECE_BYTES = 256 * 2**20                 # largest single write/read call per rank
CHUNK_BYTES = 8 * 2**20                   # target chunk size of the replay datasets
CELL_ROWS = ReplayBuffer.CELL_ROWS
REPLAY_ROWS = ReplayBuffer.OBS_ROWS + CELL_ROWS          # whole observations (ReplayBuffer)
FRAME_ROWS = FrameReplay.OBS_ROWS + CELL_ROWS            # frame-stacked (FrameReplay)
# a stage's flat vectors and the dataset group each is stored in (one dataset per layer)
PARAM_GROUPS = (("online", "params/online"), ("target", "params/target"),
                ("exp_avg", "adam/exp_avg"), ("exp_avg_sq", "adam/exp_avg_sq"))
LEARNER_COUNTERS = ("updates", "adam_step", "lr")      # a learner's scalars, kept in ``counters``


# ---------------------------------------------------------------------------------------------
# network <-> per-layer arrays
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
    dp, pp, world = layout["dp"], layout["pp"], layout["world"]
    specs = []
    parts = {i: [] for i in range(len(sizes))}
    for s, (lo, hi) in enumerate(stage_params(layout, sizes)):
        for i, a, b in layer_parts(sizes, lo, hi):
            parts[i].append((s, a, b))        # s: world rank of (dp_rank 0, stage s)
    for _, grp in PARAM_GROUPS:
        for i, n in enumerate(sizes):
            specs.append(Spec(f"{grp}/{i}", (n,), np.dtype(np.float32), parts[i]))
    specs += replay_specs(layout, env)
    per = [(q * pp, q, q + 1) for q in range(dp)]
    specs.append(Spec("replay/pos", (dp,), np.dtype(np.int64), per))
    specs.append(Spec("replay/filled", (dp,), np.dtype(np.int64), per))
    specs.append(Spec("replay/max_priority", (dp,), np.dtype(np.float64), per))
    ranks = [(r, r, r + 1) for r in range(world)]
    specs.append(Spec("rank_state", (world, state_maxlen), np.dtype(np.uint8), ranks))
    specs.append(Spec("rank_state_len", (world,), np.dtype(np.int64), ranks))
    return specs


def frame_stack(layout: dict) -> int:
    """Frames stacked per observation where the replay stores each frame once; 0: whole
    observations (files before 2.0 have no ``frame_stack``)."""
    return int(layout.get("frame_stack", 0))


def replay_rows(layout: dict) -> tuple:
    """The per-cell replay datasets of a layout (shape [dp * rows, num_envs, ...]); a replay of
    finished n-step transitions (``transitions``: the n of a run with actor ranks, one column)
    also keeps each transition's ``discounts``."""
    if layout.get("transitions"):
        return REPLAY_ROWS + ("discounts",)
    return FRAME_ROWS if frame_stack(layout) else REPLAY_ROWS


def replay_specs(layout: dict, env: dict) -> list[Spec]:
    dp, pp, E, rows = layout["dp"], layout["pp"], layout["num_envs"], layout["rows"]
    obs_shape, obs_dtype = tuple(env["obs_shape"]), np.dtype(env["obs_dtype"])
    shard = [(q * pp, q * rows, (q + 1) * rows) for q in range(dp)]
    tails = {"obs": obs_shape, "next_obs": obs_shape, "frames": obs_shape[1:]}
    row_dt = {"obs": obs_dtype, "next_obs": obs_dtype, "frames": obs_dtype,
              "ep_step": np.dtype(np.uint8), "actions": np.dtype(np.int64),
              "rewards": np.dtype(np.float32), "terminated": np.dtype(bool),
              "truncated": np.dtype(bool), "priorities": np.dtype(np.float64),
              "discounts": np.dtype(np.float32)}
    names = list(replay_rows(layout)) + (["priorities"] if layout["prioritized"] else [])
    specs = []
    for k in names:
        tail = (E,) + tails.get(k, ())
        dt = row_dt[k]
        specs.append(Spec(f"replay/{k}", (dp * rows,) + tail, dt, shard,
                          _chunks_for(dp * rows, rows, tail, dt.itemsize)))
    if frame_stack(layout):
        counts = [int(n) for n in layout["replay_starts"]]
        off = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).tolist()
        total, stack_bytes = off[-1], int(np.prod(obs_shape, dtype=np.int64)) * obs_dtype.itemsize
        chunks = (max(1, min(total, CHUNK_BYTES // max(1, stack_bytes))),) + obs_shape
        specs.append(Spec("replay/starts", (total,) + obs_shape, obs_dtype,
                          [(q * pp, off[q], off[q + 1]) for q in range(dp)], chunks))
    return specs


def stage_params(layout: dict, sizes: list[int]) -> list[list[int]]:
    """Each stage's flat parameter range; layouts that only name layer ranges are converted."""
    if "stage_params" in layout:
        return [list(r) for r in layout["stage_params"]]
    off = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).tolist()
    return [[off[a], off[b]] for a, b in layout["stage_ranges"]]


def rows_per_piece(spec: Spec, piece_bytes: int = PIECE_BYTES) -> int:
    rowbytes = max(1, int(np.prod(spec.shape[1:], dtype=np.int64)) * spec.dtype.itemsize)
    return max(1, piece_bytes // rowbytes)
