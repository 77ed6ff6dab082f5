"""What the training loop calls: ``Checkpointer`` owns the schedule, save and resume of a run.

Same layout: everything that affects the future is restored, so the resumed run is bitwise
equal to an uninterrupted one (what is captured of the environments: see ``codec``). Another
layout: see ``reshard`` for the rules.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from hpcdqn.parallel.agree import Local
from hpcdqn.parallel.layout import replay_per_replica
from hpcdqn.rl.framereplay import ring_rows
from hpcdqn.store.codec import decode, encode, env_state, restore_env_state
from hpcdqn.store.errors import (CheckpointCorrupt, CheckpointError, CheckpointMismatch,
                                 CheckpointTransient, agree)
from hpcdqn.store.mpiio import SERIAL_ENV, io_mode
from hpcdqn.store.reader import (check_compatible, load_learner, load_rank_state, load_replay_same,
                                 open_checkpoint, read_meta, verify)
from hpcdqn.store.reshard import load_replay_reshard
from hpcdqn.store.rundir import SET_ASIDE, candidates, set_aside, warn
from hpcdqn.store.schema import PARAM_GROUPS, frame_stack, layer_parts, layer_sizes, replay_rows
from hpcdqn.store.writer import write_checkpoint


class Checkpointer:
    """Owns the schedule and the save/resume of one training run (collective calls)."""

    def __init__(self, run_dir, cfg: dict, grid, layers, env_info: dict, learner, replay, env,
                 frame_stack: int = 0):
        """``frame_stack``: frames per observation where the replay stores each frame once
        (``rl.framereplay``; every rank passes the same, later pipeline stages too)."""
        self.run_dir, self.cfg, self.grid = Path(run_dir), cfg, grid
        self.comm = grid.comm
        self.learner, self.replay, self.env = learner, replay, env
        self.env_info = env_info
        self.sizes = layer_sizes(layers)
        ranges = learner.param_ranges         # every stage's, known on every rank
        self.layout = {"world": grid.world, "dp": grid.dp, "pp": grid.pp,
                       "num_envs": cfg["num_envs"],
                       "rows": replay.rows if replay is not None else
                       _rows_for(cfg, grid.dp, frame_stack),
                       "stage_params": [list(ranges[s]) for s in range(grid.pp)],
                       "prioritized": bool(cfg["replay"]["prioritized"]),
                       "frame_stack": int(frame_stack)}
        self.every = int(cfg["checkpoint_every"])
        self.minutes = float(cfg.get("checkpoint_minutes", 0.0))
        self.last_save = time.monotonic()
        self.clock_due = False
        self.keep_last = int(cfg["keep_last"])
        self.stalls: list[float] = []
        self.mode = self.comm.bcast(io_mode() if grid.is_root else None, root=0)  # one protocol
        if self.mode == "serial" and grid.is_root:
            why = f"{SERIAL_ENV}=1" if h5py.get_config().mpi else "h5py was built without MPI"
            warn(f"checkpoints are written through rank 0 ({why}); parallel HDF5 is faster")

    # -- schedule ---------------------------------------------------------------------------------
    def due(self, steps_before: int, steps_after: int) -> bool:
        return self.clock_due or (self.every > 0 and
                                  steps_after // self.every > steps_before // self.every)

    def poll_clock(self) -> None:
        """Collective (at log points): rank 0's clock decides whether ``checkpoint_minutes``
        passed since the last checkpoint (or the start); every rank gets the same answer."""
        if self.minutes <= 0:
            return
        due = time.monotonic() - self.last_save >= self.minutes * 60 if self.grid.is_root else None
        self.clock_due = bool(self.comm.bcast(due, root=0))

    # -- save ---------------------------------------------------------------------------------
    def save(self, counters: dict, loop: dict) -> dict:
        """Collective. ``loop``: this rank's loop state (rng, obs, ep_ret, ep_len, window)."""
        g, learner, replay = self.grid, self.learner, self.replay
        t0 = time.perf_counter()
        mine = {}
        lo, hi = learner.param_range()
        if g.dp_rank == 0:
            flats = learner.state_arrays()
            for key, grp in PARAM_GROUPS:
                off = 0
                for i, a, b in layer_parts(self.sizes, lo, hi):
                    mine[f"{grp}/{i}"] = np.ascontiguousarray(flats[key][off:off + b - a], np.float32)
                    off += b - a
        scalars = learner.state_scalars()
        state = {"torch_rng": encode(torch.get_rng_state()), "window": loop.get("window"),
                 "learner": scalars}
        if torch.cuda.is_available() and str(getattr(learner, "device", "cpu")).startswith("cuda"):
            state["cuda_rng"] = encode(torch.cuda.get_rng_state())
        if replay is not None:
            mine.update(replay_parts(replay, self.layout))
            state.update(acting_rng=encode(loop["rng"]), replay_rng=encode(replay.rng),
                         obs=encode(np.asarray(loop["obs"])), ep_ret=encode(loop["ep_ret"]),
                         ep_len=encode(loop["ep_len"]), env=env_state(self.env))
        layout = self.layout
        if frame_stack(layout):    # collective: every shard's count of initial stacks
            held = self.comm.allgather(len(replay.starts) if replay is not None else 0)
            layout = dict(layout, replay_starts=held[::g.pp])
        counters = dict(counters, **scalars, checkpoints=len(self.stalls) + 1)
        raw = json.dumps(state).encode()
        out = write_checkpoint(self.run_dir, self.comm, layout, self.env_info, self.sizes,
                               self.cfg, counters, mine, raw, self.keep_last, self.mode)
        out["seconds"] = time.perf_counter() - t0
        self.stalls.append(out["seconds"])
        self.last_save, self.clock_due = time.monotonic(), False
        return out

    def summary(self) -> dict:
        s = self.stalls
        return {"checkpoints": len(s), "checkpoint_stall_s_total": round(sum(s), 4),
                "checkpoint_stall_s_max": round(max(s), 4) if s else 0.0}

    # -- resume -------------------------------------------------------------------------------
    def resume(self, run_dir) -> dict:
        """Collective: load the newest valid checkpoint of ``run_dir`` into the learner, replay
        and envs; returns the loop state ({counters, rng, obs, ep_ret, ep_len, window, path,
        exact, warnings}). Every step's outcome is agreed over the ranks, then by kind: a
        corrupt file is set aside (``rundir.set_aside``) and an older one tried; an incompatible
        one (other env, impossible reshard, newer format) or a transient I/O failure is refused
        with the reason and the file left untouched; any other error: the next older one is
        tried, the file left untouched."""
        comm, root = self.comm, self.grid.is_root
        cands = comm.bcast(candidates(run_dir) if root else None, root=0)
        errors = []
        for c in cands:
            try:
                verify(c, comm)
                meta = read_meta(c, comm)
                check_compatible(meta, c, self.env_info, self.sizes)   # same meta everywhere
                st = self._load_agreed(c, meta)
            except (CheckpointMismatch, CheckpointTransient) as e:
                e.agreed = True
                raise
            except CheckpointError as e:
                corrupt = isinstance(e, CheckpointCorrupt)
                if root:
                    kept = set_aside(c, str(e)) if corrupt else None
                    warn(f"{e}; trying an older checkpoint"
                         + (f" (set aside as {kept.name}, recorded in {SET_ASIDE})" if kept else ""))
                errors.append(str(e))
                comm.Barrier()
                continue
            st["path"] = str(c)
            return st
        e = CheckpointError(f"cannot resume '{run_dir}': no valid checkpoint"
                            + "".join(f"\n  {e}" for e in errors))
        e.agreed = True
        raise e

    def _load_agreed(self, path, meta) -> dict:
        st = None
        with Local() as loc:   # any other exception (a malformed rank state): generic, not corrupt
            st = self._load(path, meta)
        agree(self.comm, "read", path, loc.err, keep_kind=True)
        return st

    def _load(self, path, meta) -> dict:
        g, learner, replay, cfg = self.grid, self.learner, self.replay, self.cfg
        old, new = meta["layout"], self.layout
        c = meta["counters"]
        same_layout = _same(old, new, ("world", "dp", "pp", "num_envs", "rows", "prioritized",
                                        "frame_stack"))
        out = {"counters": c, "exact": same_layout, "warnings": [], "rng": None, "obs": None,
               "ep_ret": None, "ep_len": None, "window": None}
        with open_checkpoint(path) as f:
            load_learner(f, path, meta, learner)
            if replay is not None:
                same_replay = _same(old, new, ("dp", "num_envs", "rows", "prioritized",
                                               "frame_stack"))
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


def _rows_for(cfg: dict, dp: int, k: int) -> int:
    """Rows of each replica's replay ring (``dqn.buffer_size`` is the global capacity)."""
    return ring_rows(replay_per_replica(cfg, dp), cfg["num_envs"], cfg["dqn"]["n_step"], k)


def _same(old: dict, new: dict, keys) -> bool:
    return all(frame_stack(old) == frame_stack(new) if k == "frame_stack" else old[k] == new[k]
               for k in keys)


def replay_parts(replay, layout: dict) -> dict:
    """This rank's replay shard as the checkpoint's datasets (views, no copies)."""
    mine = {f"replay/{k}": getattr(replay, k) for k in replay_rows(layout)}
    if replay.prioritized:
        leaves = replay.tree.tree[replay.tree.leaves:replay.tree.leaves + replay.cells]
        mine["replay/priorities"] = leaves.reshape(replay.rows, replay.num_envs)
    if frame_stack(layout):
        mine["replay/starts"] = replay.starts.held()
    mine["replay/pos"] = np.array([replay.pos], np.int64)
    mine["replay/filled"] = np.array([replay.filled], np.int64)
    mine["replay/max_priority"] = np.array([replay.max_priority], np.float64)
    return mine
