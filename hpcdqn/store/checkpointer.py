"""What the training loop calls: ``Checkpointer`` owns the schedule, save and resume of a run.

It collects each part's ``state_dict()`` (the learner, the replay, the rollout, the loop's
metric window) and plans where each piece goes in the file (``schema``: per-layer and per-shard
datasets, the rank's JSON row); on resume it reads those pieces back (``reader``, ``reshard``)
and hands each part its ``load_state_dict()``. It never takes a part apart. The bytes go
through a storage backend (``storage``; default the HDF5 one of the run's I/O mode).

Same layout: everything that affects the future is restored, so the resumed run is bitwise
equal to an uninterrupted one (what is captured of the environments: see ``codec``). Another
layout: see ``reshard`` for the rules; a replica with no state to continue is re-seeded by its
own parts (``Rollout.reseed``, ``ReplayBuffer.reseed``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from hpcdqn.parallel.agree import Local
from hpcdqn.parallel.layout import replay_per_replica
from hpcdqn.rl.framereplay import ring_rows
from hpcdqn.store.codec import decode, decode_env, encode, encode_env
from hpcdqn.store.errors import (CheckpointCorrupt, CheckpointError, CheckpointMismatch,
                                 CheckpointTransient, agree)
from hpcdqn.store.mpiio import io_mode, serial_reason
from hpcdqn.store.reader import (check_compatible, load_rank_state, open_source, read_learner,
                                 read_meta, read_replay_shard, verify)
from hpcdqn.store.reshard import load_replay_reshard
from hpcdqn.store.rundir import SET_ASIDE, candidates, set_aside, warn
from hpcdqn.store.schema import (LEARNER_COUNTERS, PARAM_GROUPS, frame_stack, layer_parts,
                                 layer_sizes, replay_rows)
from hpcdqn.store.writer import storage_for, write_checkpoint


class Checkpointer:
    """Owns the schedule and the save/resume of one training run (collective calls)."""

    def __init__(self, run_dir, cfg: dict, grid, layers, env_info: dict, learner, replay, rollout,
                 frame_stack: int = 0, storage=None, transitions: int = 0, columns: int = 0):
        """``replay``, ``rollout``: this rank's (None on the ranks that do not act);
        ``frame_stack``: frames per observation where the replay stores each frame once
        (``rl.framereplay``; every rank passes the same, later pipeline stages too);
        ``storage``: the backend (``storage.Storage``; default: the HDF5 one of the I/O mode);
        ``transitions``: the n of a replay of finished n-step transitions (learners fed by
        actor ranks, ``cfg['actors']`` > 0: one column, no rollout; the actors' states come in
        ``save``'s ``extra``)."""
        self.run_dir, self.cfg, self.grid = Path(run_dir), cfg, grid
        self.comm = grid.comm
        self.learner, self.replay, self.rollout = learner, replay, rollout
        self.env_info = env_info
        self.sizes = layer_sizes(layers)
        ranges = learner.param_ranges         # every stage's, known on every rank
        self.layout = {"world": grid.world, "dp": grid.dp, "pp": grid.pp,
                       "num_envs": 1 if transitions else columns or cfg["num_envs"],
                       "rows": replay.rows if replay is not None else
                       _rows_for(cfg, grid.dp, frame_stack, transitions, columns),
                       "stage_params": [list(ranges[s]) for s in range(grid.pp)],
                       "prioritized": bool(cfg["replay"]["prioritized"]),
                       "frame_stack": int(frame_stack)}
        if cfg.get("actors"):     # (only then: a sync run's file is as before)
            self.layout.update(({"transitions": int(transitions)} if transitions else {}),
                               actors=int(cfg["actors"]),
                               actor_envs=int(cfg["num_envs"]),
                               send_every=int(cfg["actor"]["send_every"]))
        self.every = int(cfg["checkpoint_every"])
        self.minutes = float(cfg.get("checkpoint_minutes", 0.0))
        self.last_save = time.monotonic()
        self.clock_due = False
        self.keep_last = int(cfg["keep_last"])
        self.stalls: list[float] = []
        self.mode = self.comm.bcast(io_mode() if grid.is_root else None, root=0)  # one protocol
        if self.mode == "serial" and grid.is_root:
            warn(f"checkpoints are written through rank 0 ({serial_reason()}); parallel HDF5 "
                 "is faster")
        self.storage = storage or storage_for(self.mode)

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
    def save(self, counters: dict, window: dict | None, extra: dict | None = None) -> dict:
        """Collective. ``counters``: the loop's (the same on every rank); ``window``: this
        rank's metric window (the loop's own state); ``extra``: more of this rank's state
        (JSON-able: a learner's actors' states), given back by ``resume`` as ``rank``."""
        t0 = time.perf_counter()
        out = write_checkpoint(self.run_dir, self.comm, **self.collect(counters, window, extra),
                               keep_last=self.keep_last, mode=self.mode, storage=self.storage)
        out["seconds"] = time.perf_counter() - t0
        self.stalls.append(out["seconds"])
        self.last_save, self.clock_due = time.monotonic(), False
        return out

    def collect(self, counters: dict, window: dict | None, extra: dict | None = None) -> dict:
        """Collective (the replay shards' start counts): every part's ``state_dict()``, planned
        as this rank's datasets and JSON row: the arguments of ``writer.write_parts`` after
        ``storage``, ``target`` and ``comm``."""
        g = self.grid
        # the arrays only where replica 0 writes them (a GPU stage's copy costs elsewhere)
        learner = self.learner.state_dict() if g.dp_rank == 0 else self.learner.state_scalars()
        mine = self.learner_parts(learner) if g.dp_rank == 0 else {}
        scalars = {k: learner[k] for k in LEARNER_COUNTERS}
        state = {"torch_rng": encode(torch.get_rng_state()), "window": window, "learner": scalars}
        if torch.cuda.is_available() and str(getattr(self.learner, "device", "cpu")).startswith("cuda"):
            state["cuda_rng"] = encode(torch.cuda.get_rng_state())
        layout = self.layout
        replay = self.replay.state_dict() if self.replay is not None else None
        if replay is not None:
            mine.update(replay_parts(replay, layout))
            state.update(self.acting_state(replay))
        state.update(extra or {})
        if frame_stack(layout):    # collective: every shard's count of initial stacks
            held = self.comm.allgather(len(replay["starts"]) if replay is not None else 0)
            layout = dict(layout, replay_starts=held[::g.pp])
        counters = dict(counters, **scalars, checkpoints=len(self.stalls) + 1)
        return {"layout": layout, "env": self.env_info, "sizes": self.sizes, "cfg": self.cfg,
                "counters": counters, "mine": mine, "rank_json": json.dumps(state).encode()}

    def acting_state(self, replay: dict) -> dict:
        """The replay's sampling RNG and the rollout's state (JSON-able; a learner fed by
        actors has no rollout: its actors' states come as ``save``'s ``extra``)."""
        if self.rollout is None:
            return {"replay_rng": encode(replay["rng"])}
        acting = self.rollout.state_dict()
        return {"acting_rng": encode(acting["rng"]), "replay_rng": encode(replay["rng"]),
                "obs": encode(np.asarray(acting["obs"])), "ep_ret": encode(acting["ep_ret"]),
                "ep_len": encode(acting["ep_len"]), "env": encode_env(acting["env"])}

    def learner_parts(self, sd: dict) -> dict:
        """This stage's flat vectors (a learner's ``state_dict``) cut into the per-layer
        datasets they overlap."""
        lo, hi = self.learner.param_range()
        mine = {}
        for key, grp in PARAM_GROUPS:
            off = 0
            for i, a, b in layer_parts(self.sizes, lo, hi):
                mine[f"{grp}/{i}"] = np.ascontiguousarray(sd[key][off:off + b - a], np.float32)
                off += b - a
        return mine

    def summary(self) -> dict:
        s = self.stalls
        return {"checkpoints": len(s), "checkpoint_stall_s_total": round(sum(s), 4),
                "checkpoint_stall_s_max": round(max(s), 4) if s else 0.0}

    # -- resume -------------------------------------------------------------------------------
    def resume(self, run_dir) -> dict:
        """Collective: load the newest valid checkpoint of ``run_dir`` into the learner, replay
        and rollout (``load``); returns the loop's state ({counters, window, path, exact,
        warnings}). Every step's outcome is agreed over the ranks, then by kind: a
        corrupt file is set aside (``rundir.set_aside``) and an older one tried; an incompatible
        one (other env, impossible reshard, newer format) or a transient I/O failure is refused
        with the reason and the file left untouched; any other error: the next older one is
        tried, the file left untouched."""
        comm, root = self.comm, self.grid.is_root
        cands = comm.bcast(candidates(run_dir) if root else None, root=0)
        errors = []
        for c in cands:
            try:
                st = self.load(c)
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

    def load(self, target) -> dict:
        """Collective: verify ``target`` (a name of ``self.storage``: a checkpoint file), check
        it fits this run and load it into the parts; returns the loop's state ({counters,
        window, exact, warnings}). Raises the agreed ``CheckpointError`` on every rank."""
        verify(target, self.comm, self.storage)
        meta = read_meta(target, self.comm, self.storage)
        check_compatible(meta, target, self.env_info, self.sizes)   # same meta everywhere
        st = None
        with Local() as loc:   # any other exception (a malformed rank state): generic, not corrupt
            st = self._load(target, meta)
        agree(self.comm, "read", target, loc.err, keep_kind=True)
        return st

    def _load(self, path, meta) -> dict:
        g, old = self.grid, meta["layout"]
        same_layout = _same(old, self.layout, ("world", "dp", "pp", "num_envs", "rows",
                                               "prioritized", "frame_stack", "transitions",
                                               "actors", "actor_envs", "send_every"))
        out = {"counters": meta["counters"], "exact": same_layout, "warnings": [], "window": None,
               "rank": None}
        with open_source(path, self.storage) as f:
            self.learner.load_state_dict(read_learner(f, path, meta, *self.learner.param_range()))
            if self.replay is not None:
                self._load_replay(f, path, meta)
            # torch RNG: same world rank if it existed
            mine = load_rank_state(f, path, g.rank) if g.rank < old["world"] else None
            if mine is not None:
                torch.set_rng_state(decode(mine["torch_rng"]))
                if "cuda_rng" in mine and torch.cuda.is_available():
                    torch.cuda.set_rng_state(decode(mine["cuda_rng"]))
            out["window"] = mine.get("window") if same_layout else \
                self._windows(f, path, old) if g.rank == 0 else None
            if self.replay is not None:
                self._load_acting(f, path, meta, mine, out)
            if same_layout:
                out["rank"] = mine
        return out

    def _load_replay(self, f, path, meta) -> None:
        old, new, q = meta["layout"], self.layout, self.grid.dp_rank
        if _same(old, new, ("dp", "num_envs", "rows", "prioritized", "frame_stack", "transitions")):
            sd = read_replay_shard(f, path, meta, q, self.replay.state_dict())
            try:
                self.replay.load_state_dict(sd)
            except ValueError as e:
                raise CheckpointCorrupt(f"checkpoint '{path}': replay shard {q}: {e}") from None
        else:
            load_replay_reshard(f, path, meta, self.replay, q, self.grid.dp * self.replay.num_envs)

    @staticmethod
    def _windows(f, path, old: dict) -> dict | None:
        """The metric windows of all old ranks, added (a resharded resume: new rank 0's)."""
        tot = None
        for r in range(old["world"]):
            w = load_rank_state(f, path, r).get("window") or {}
            tot = dict(w) if tot is None else {k: tot.get(k, 0) + v for k, v in w.items()}
        return tot

    def _load_acting(self, f, path, meta, mine, out: dict) -> None:
        """The rollout and the replay's RNG: from the old first-stage rank of the same replica,
        if any; else re-seeded (from the run seed, the replica and the env step)."""
        g, old = self.grid, meta["layout"]
        src = g.dp_rank * old["pp"] if (g.dp_rank < old["dp"] and _same(
            old, self.layout, ("num_envs", "transitions"))) else None
        if src is None:
            out["exact"] = False
            seed = [self.cfg["seed"], g.dp_rank, int(meta["counters"]["env_steps"])]
            if self.rollout is not None:
                self.rollout.reseed(seed)
            self.replay.reseed(seed)
            return
        s = mine if src == g.rank else load_rank_state(f, path, src)
        if self.rollout is None:        # a learner fed by actors: its sampling RNG
            self.replay.load_state_dict({"rng": decode(s["replay_rng"], self.replay.rng)})
            return
        acting = {"rng": decode(s["acting_rng"]), "obs": decode(s["obs"]),
                  "ep_ret": decode(s["ep_ret"]), "ep_len": decode(s["ep_len"])}
        self.replay.load_state_dict({"rng": decode(s["replay_rng"], self.replay.rng)})
        out["warnings"] += self.rollout.load_state_dict(dict(acting, env=decode_env(s["env"])))
        if out["warnings"]:
            out["exact"] = False


def _rows_for(cfg: dict, dp: int, k: int, transitions: int = 0, columns: int = 0) -> int:
    """Rows of each replica's replay ring (``dqn.buffer_size`` is the global capacity; a ring
    of finished transitions: one column, no n-step margin; ``columns``: see ``Checkpointer``)."""
    if transitions:
        return ring_rows(replay_per_replica(cfg, dp), 1, 1, 0)
    return ring_rows(replay_per_replica(cfg, dp), columns or cfg["num_envs"], cfg["dqn"]["n_step"], k)


def _same(old: dict, new: dict, keys) -> bool:
    """``old`` and ``new`` layouts agree on ``keys`` (the actor keys absent: 0)."""
    return all(frame_stack(old) == frame_stack(new) if k == "frame_stack" else
               old.get(k, 0) == new.get(k, 0) for k in keys)


def replay_parts(sd: dict, layout: dict) -> dict:
    """A replay shard's ``state_dict`` as the checkpoint's datasets (views, no copies)."""
    mine = {f"replay/{k}": sd[k] for k in replay_rows(layout)}
    if "priorities" in sd:
        mine["replay/priorities"] = sd["priorities"]
    if frame_stack(layout):
        mine["replay/starts"] = sd["starts"]
    mine["replay/pos"] = np.array([sd["pos"]], np.int64)
    mine["replay/filled"] = np.array([sd["filled"]], np.int64)
    mine["replay/max_priority"] = np.array([sd["max_priority"]], np.float64)
    return mine
