"""Metadata checked and bounded before use: a checkpoint's root attributes are typed, range
checked and compared with the dataset shapes before any plan or buffer is sized from them, so a
crafted file (``layout.dp=1e9``, a huge declared shape) is refused in microseconds and bytes,
not after gigabytes of allocation. Also the format's major/minor rule."""

from __future__ import annotations

import numpy as np

from hpcdqn.store.errors import CheckpointCorrupt, CheckpointIncompatible
from hpcdqn.store.schema import FORMAT_MAJOR, FORMAT_NAME

MAX_RANKS = 1 << 20                 # world, dp, pp
MAX_ENVS = 1 << 20                  # num_envs per rank
MAX_ROWS = 1 << 40                  # replay rows per shard
MAX_LAYERS = 4096
MAX_PARAMS = 1 << 40                # per layer
MAX_OBS_DIMS, MAX_OBS_DIM = 8, 1 << 24
MAX_ACTIONS = 1 << 20
MAX_STACK = 255                     # frames per observation (FrameReplay's ep_step is uint8)


def format_version(fmt, path) -> tuple[int, int]:
    """(major, minor) of a file's ``format`` attribute; a newer major is refused."""
    fmt = fmt.decode() if isinstance(fmt, bytes) else fmt
    if not isinstance(fmt, str) or not fmt.startswith(FORMAT_NAME + "-"):
        raise CheckpointCorrupt(f"checkpoint '{path}': not an hpcdqn checkpoint (attribute "
                                f"'format' = {fmt!r}, expected '{FORMAT_NAME}-MAJOR[.MINOR]')")
    major, _, minor = fmt[len(FORMAT_NAME) + 1:].partition(".")
    if not major.isdigit() or not (minor == "" or minor.isdigit()):
        raise CheckpointCorrupt(f"checkpoint '{path}': attribute 'format' = {fmt!r} is malformed")
    if int(major) > FORMAT_MAJOR:
        raise CheckpointIncompatible(
            f"checkpoint '{path}' has format {fmt}, newer than this hpcdqn reads (major "
            f"{FORMAT_MAJOR}); upgrade hpcdqn to load it (the file is left as it is)")
    return int(major), int(minor or 0)


def _int(path, where, v, lo, hi) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise CheckpointCorrupt(f"checkpoint '{path}': {where} = {v!r} is not an integer in "
                                f"[{lo}, {hi}]")
    return v


def check_meta(meta: dict, path) -> None:
    """Types and ranges of layout, env, layer_sizes and counters (raises CheckpointCorrupt)."""
    lay, env, sizes, c = meta["layout"], meta["env"], meta["layer_sizes"], meta["counters"]
    for name, v in (("layout", lay), ("env", env), ("counters", c)):
        if not isinstance(v, dict):
            raise CheckpointCorrupt(f"checkpoint '{path}': root attribute '{name}' is not an object")
    for k in ("world", "dp", "pp"):
        _int(path, f"layout.{k}", lay.get(k), 1, MAX_RANKS)
    if lay["dp"] * lay["pp"] != lay["world"]:
        raise CheckpointCorrupt(f"checkpoint '{path}': layout dp={lay['dp']} x pp={lay['pp']} "
                                f"!= world={lay['world']}")
    _int(path, "layout.num_envs", lay.get("num_envs"), 1, MAX_ENVS)
    _int(path, "layout.rows", lay.get("rows"), 1, MAX_ROWS)
    if not isinstance(lay.get("prioritized"), bool):
        raise CheckpointCorrupt(f"checkpoint '{path}': layout.prioritized is not a boolean")
    for k, hi in (("transitions", MAX_ROWS), ("actors", MAX_RANKS), ("actor_envs", MAX_ENVS),
                  ("send_every", MAX_ROWS)):      # a run with actor ranks (absent: 0)
        _int(path, f"layout.{k}", lay.get(k, 0), 0, hi)
    if lay.get("transitions") and (lay["num_envs"] != 1 or lay.get("frame_stack", 0)):
        raise CheckpointCorrupt(f"checkpoint '{path}': layout.transitions with num_envs = "
                                f"{lay['num_envs']} or frame_stack (a replay of finished "
                                "transitions has one column of whole observations)")
    if not isinstance(sizes, list) or not 1 <= len(sizes) <= MAX_LAYERS:
        raise CheckpointCorrupt(f"checkpoint '{path}': layer_sizes is not a list of 1..{MAX_LAYERS}")
    for i, n in enumerate(sizes):
        _int(path, f"layer_sizes[{i}]", n, 0, MAX_PARAMS)
    _check_stages(lay, sum(sizes), path)
    _check_env(env, path)
    _check_frames(lay, env, path)
    for k in ("env_steps", "iteration_next", "updates", "episodes"):
        if k in c:
            _int(path, f"counters.{k}", c[k], 0, 1 << 62)
    _int(path, "counters.env_steps", c.get("env_steps"), 0, 1 << 62)


def _check_frames(lay: dict, env: dict, path) -> None:
    """A frame-stacked replay (format 2.0): the stack matches the observation shape, and each
    shard holds at most one initial stack per cell of its ring."""
    k = _int(path, "layout.frame_stack", lay.get("frame_stack", 0), 0, MAX_STACK)
    if not k:
        return
    shape = env.get("obs_shape") if isinstance(env, dict) else None
    if not isinstance(shape, list) or len(shape) < 2 or shape[0] != k:
        raise CheckpointCorrupt(f"checkpoint '{path}': layout.frame_stack = {k} does not match "
                                f"env.obs_shape = {shape!r} (k frames on axis 0)")
    counts = lay.get("replay_starts")
    if not isinstance(counts, list) or len(counts) != lay["dp"]:
        raise CheckpointCorrupt(f"checkpoint '{path}': layout.replay_starts is not a list of "
                                f"{lay['dp']} counts")
    for q, n in enumerate(counts):
        _int(path, f"layout.replay_starts[{q}]", n, 0, lay["rows"] * lay["num_envs"])


def _check_stages(lay: dict, total: int, path) -> None:
    sp = lay.get("stage_params")
    if sp is None:
        return
    if not isinstance(sp, list) or len(sp) != lay["pp"]:
        raise CheckpointCorrupt(f"checkpoint '{path}': layout.stage_params is not {lay['pp']} ranges")
    at = 0
    for i, r in enumerate(sp):
        if not (isinstance(r, list) and len(r) == 2):
            raise CheckpointCorrupt(f"checkpoint '{path}': layout.stage_params[{i}] is not a range")
        a = _int(path, f"layout.stage_params[{i}][0]", r[0], at, at)
        at = _int(path, f"layout.stage_params[{i}][1]", r[1], a, total)
    if at != total:
        raise CheckpointCorrupt(f"checkpoint '{path}': layout.stage_params cover [0, {at}), the "
                                f"network has {total} parameters")


def _check_env(env: dict, path) -> None:
    shape = env.get("obs_shape")
    if not isinstance(shape, list) or len(shape) > MAX_OBS_DIMS:
        raise CheckpointCorrupt(f"checkpoint '{path}': env.obs_shape is not a list of <= "
                                f"{MAX_OBS_DIMS} sizes")
    for i, n in enumerate(shape):
        _int(path, f"env.obs_shape[{i}]", n, 0, MAX_OBS_DIM)
    try:
        dt = np.dtype(env.get("obs_dtype"))
    except (TypeError, ValueError):
        dt = None
    if dt is None or dt.kind not in "biuf":
        raise CheckpointCorrupt(f"checkpoint '{path}': env.obs_dtype = {env.get('obs_dtype')!r} "
                                "is not a numeric dtype")
    _int(path, "env.n_actions", env.get("n_actions"), 1, MAX_ACTIONS)
    if not isinstance(env.get("env_id"), str):
        raise CheckpointCorrupt(f"checkpoint '{path}': env.env_id is not a string")


def check_shapes(meta: dict, f, path) -> None:
    """The few datasets whose shapes the layout implies, compared before ``plan`` is built
    (``f``: a ``storage.Source``)."""
    lay = meta["layout"]
    want = {"replay/pos": (lay["dp"],), "rank_state_len": (lay["world"],)}
    for name, shape in want.items():
        ds = f.dataset(name)
        if ds is None:
            raise CheckpointCorrupt(f"checkpoint '{path}': dataset '{name}' is missing")
        if tuple(ds.shape) != shape:
            raise CheckpointCorrupt(f"checkpoint '{path}': dataset '{name}' has shape {ds.shape}, "
                                    f"its layout says {shape}")
    rs = f.dataset("rank_state")
    if rs is None or len(rs.shape) != 2 or rs.shape[0] != lay["world"]:
        raise CheckpointCorrupt(f"checkpoint '{path}': dataset 'rank_state' is missing or does "
                                f"not have {lay['world']} rows")
