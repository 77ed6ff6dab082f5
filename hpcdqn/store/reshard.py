"""Loading a checkpoint into another layout: the reshard rules and the replay redistribution.

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

The layers are read by ``reader.load_learner`` (any layout), the per-rank state is handed out by
``Checkpointer``; this module plans and performs the replay redistribution.
"""

from __future__ import annotations

import numpy as np

from hpcdqn.store.errors import CheckpointCorrupt, CheckpointIncompatible
from hpcdqn.store.reader import read_dataset
from hpcdqn.store.schema import REPLAY_ROWS


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


def ring_rows(t0: int, t1: int, filled: int, pos: int, rows: int, L: int) -> list[tuple[int, int]]:
    """Ring row ranges holding kept-time indices [t0, t1) of a stream (newest L of filled)."""
    oldest = pos if filled == rows else 0
    a = (oldest + (filled - L) + t0) % rows
    n = t1 - t0
    if a + n <= rows:
        return [(a, a + n)]
    return [(a, rows), (0, n - (rows - a))]


def load_replay_reshard(f, path, meta, replay, dp_rank: int, S_n: int) -> None:
    lay = meta["layout"]
    E_o, rows_o, dp_o = lay["num_envs"], lay["rows"], lay["dp"]
    pos_all = np.asarray(read_dataset(f, path, "replay/pos"))
    filled_all = np.asarray(read_dataset(f, path, "replay/filled"))
    if len(set(filled_all.tolist())) != 1 or len(set(pos_all.tolist())) != 1:
        raise CheckpointCorrupt(f"checkpoint '{path}': replay shards disagree on pos/filled "
                              f"({pos_all.tolist()}, {filled_all.tolist()})")
    filled, pos = int(filled_all[0]), int(pos_all[0])
    E_n, rows_n = replay.num_envs, replay.rows
    S_o = dp_o * E_o
    L, M, pieces = reshard_plan(S_o, filled, S_n, rows_n)
    if M < replay.n_step + 1:
        raise CheckpointIncompatible(
            f"cannot reshard checkpoint '{path}': its replay holds {filled} transitions in each of "
            f"{S_o} env streams, too few for {S_n} new streams of at least {replay.n_step + 1} (resume it on its own layout, "
            f"dp={dp_o} num_envs={E_o}; the file is left as it is)")
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
            for r0, r1 in ring_rows(t0, t1, filled, pos, rows_o, L):
                n = r1 - r0
                for name in names:
                    new[name][at:at + n, e] = read_dataset(
                        f, path, f"replay/{name}", (slice(q * rows_o + r0, q * rows_o + r1), eo))
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
        mp = float(np.max(read_dataset(f, path, "replay/max_priority"))) if prio else 1.0
        pr = new["priorities"] if prio else np.full((M, E_n), mp)
        pr = np.where(pr > 0, pr, mp)
        if replay.n_step > 1:
            pr[M - (replay.n_step - 1):] = 0.0
        idx = (np.arange(M)[:, None] * E_n + np.arange(E_n)[None]).reshape(-1)
        replay.tree.set(idx, pr.reshape(-1))
        replay.max_priority = mp
