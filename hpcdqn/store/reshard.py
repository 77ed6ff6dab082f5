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
  returns never run across streams. Priorities move with their transitions. The new shard is
  filled through the replay's own ``add``, a bounded chunk of rows at a time, from transitions
  with whole observations (``StreamSource``: read as stored, or rebuilt from a frame-stacked
  replay's frames and initial stacks), so any replay layout loads into any other; a stream's
  first transition in a piece starts a new episode there, with its observation as the initial
  stack.
- Per-rank state: new data-parallel rank r continues old rank r's environments, acting RNG and
  replay RNG when r < dp_old and num_envs is unchanged; otherwise its environments start
  fresh (seeded from the run seed, the rank and the env step). The metric window of all old
  ranks goes to new rank 0.

The layers are read by ``reader.load_learner`` (any layout), the per-rank state is handed out by
``Checkpointer``; this module plans and performs the replay redistribution.
"""

from __future__ import annotations

import numpy as np

from hpcdqn.rl.framereplay import stacks, start_index
from hpcdqn.store.errors import CheckpointCorrupt, CheckpointIncompatible
from hpcdqn.store.reader import read_dataset
from hpcdqn.store.schema import CELL_ROWS, frame_stack, replay_specs


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


CHUNK_BYTES = 64 * 2**20       # observations assembled at a time for the new shard


class StreamSource:
    """An old checkpoint's replay, one env stream at a time: the transitions (whole observations
    and next observations, actions, rewards, flags, priorities) of kept-time ranges, where kept
    time t of a stream is its (filled - L + t)-th row, oldest first."""

    def __init__(self, f, path, meta, pos: int, filled: int, L: int, prio: bool):
        lay = meta["layout"]
        self.f, self.path = f, path
        self.E, self.rows, self.k = lay["num_envs"], lay["rows"], frame_stack(lay)
        self.pos, self.filled, self.L = pos, filled, L
        self.names = list(CELL_ROWS) + (["discounts"] if lay.get("transitions") else []) + \
            (["priorities"] if prio else [])
        self.seqs = {}                   # shard -> initial-stack index of each cell, ring order
        if self.k:
            starts = [s for s in replay_specs(lay, meta["env"]) if s.name == "replay/starts"][0]
            self.starts_at = [a for _, a, _ in starts.parts]

    def column(self, name: str, q: int, e: int, t0: int, t1: int) -> np.ndarray:
        parts = [read_dataset(self.f, self.path, f"replay/{name}",
                              (slice(q * self.rows + r0, q * self.rows + r1), e))
                 for r0, r1 in ring_rows(t0, t1, self.filled, self.pos, self.rows, self.L)]
        return np.concatenate(parts)

    def read(self, stream: int, t0: int, t1: int) -> dict:
        q, e = divmod(stream, self.E)
        out = {k: self.column(k, q, e, t0, t1) for k in self.names}
        if not self.k:
            out["obs"] = self.column("obs", q, e, t0, t1)
            out["next_obs"] = self.column("next_obs", q, e, t0, t1)
            return out
        h = min(self.k, self.filled - self.L + t0)      # earlier rows this stream has
        frames = self.column("frames", q, e, t0 - h, t1)[:, None]
        steps = self.column("ep_step", q, e, t0, t1)
        at = self.filled - self.L
        seq = self._seqs(q)[at + t0:at + t1, e]
        rows, envs = h + np.arange(t1 - t0), np.zeros(t1 - t0, np.int64)
        initial = self._initial(q, seq)
        out["obs"] = stacks(frames, rows, envs, steps, self.k, 0, initial)
        out["next_obs"] = stacks(frames, rows, envs, steps, self.k, 1, initial)
        return out

    def _seqs(self, q: int) -> np.ndarray:
        if q not in self.seqs:
            steps = self.column("ep_step", q, slice(None), self.L - self.filled, self.L)
            try:
                self.seqs = {q: start_index(steps, self.k, min(self.filled, self.rows - self.k))}
            except ValueError as e:
                raise CheckpointCorrupt(f"checkpoint '{self.path}': replay shard {q}: {e}") from None
        return self.seqs[q]

    def _initial(self, q: int, seq: np.ndarray):
        def get(b):
            want = seq[b]
            if (want < 0).any():
                raise CheckpointCorrupt(f"checkpoint '{self.path}': replay shard {q}: a "
                                        "transition's initial stack is not in the file")
            uniq, inv = np.unique(want, return_inverse=True)
            got = read_dataset(self.f, self.path, "replay/starts",
                               [int(self.starts_at[q] + u) for u in uniq])
            return got[inv]
        return get


def piece_rows(src: StreamSource, segs: list, i0: int, i1: int) -> dict:
    """Transitions [i0, i1) of one new column's piece (its segments of old streams, in order);
    the last transition of every segment truncated (unless terminated)."""
    out, at = [], 0
    for k, t0, t1 in segs:
        a, b = max(i0, at), min(i1, at + t1 - t0)
        if a < b:
            part = src.read(k, t0 + a - at, t0 + b - at)
            if b == at + t1 - t0:          # this stream ends here
                part["truncated"][-1] |= ~part["terminated"][-1]
            out.append(part)
        at += t1 - t0
    return {k: np.concatenate([p[k] for p in out]) for k in out[0]}


def load_replay_reshard(f, path, meta, replay, dp_rank: int, S_n: int) -> None:
    lay = meta["layout"]
    E_o, rows_o, dp_o = lay["num_envs"], lay["rows"], lay["dp"]
    pos_all = np.asarray(read_dataset(f, path, "replay/pos"))
    filled_all = np.asarray(read_dataset(f, path, "replay/filled"))
    if len(set(filled_all.tolist())) != 1 or len(set(pos_all.tolist())) != 1:
        raise CheckpointCorrupt(f"checkpoint '{path}': replay shards disagree on pos/filled "
                              f"({pos_all.tolist()}, {filled_all.tolist()})")
    filled, pos = int(filled_all[0]), int(pos_all[0])
    if not (0 <= filled <= rows_o and 0 <= pos < rows_o):
        raise CheckpointCorrupt(f"checkpoint '{path}': replay pos {pos}, filled {filled} outside "
                                f"its {rows_o} rows")
    E_n = replay.num_envs
    S_o = dp_o * E_o
    finished = hasattr(replay, "discounts")     # a replay of finished n-step transitions
    if lay.get("transitions", 0) > 1 and not finished:
        raise CheckpointIncompatible(
            f"cannot resume checkpoint '{path}' with actors=0: its replay holds finished "
            f"{lay['transitions']}-step transitions (written with actor ranks), which cannot be "
            "split back into env steps; resume it with actors > 0 (any count), or train with "
            "dqn.n_step=1 for runs that change between the modes (the file is left as it is)")
    L, M, pieces = reshard_plan(S_o, min(filled, rows_o - frame_stack(lay)), S_n, replay.window)
    if M < replay.n_step + 1:
        raise CheckpointIncompatible(
            f"cannot reshard checkpoint '{path}': its replay holds {filled} transitions in each of "
            f"{S_o} env streams, too few for {S_n} new streams of at least {replay.n_step + 1} (resume it on its own layout, "
            f"dp={dp_o} num_envs={E_o}; the file is left as it is)")
    prio = lay["prioritized"] and replay.prioritized
    src = StreamSource(f, path, meta, pos, filled, L, prio)
    mine = [pieces[dp_rank * E_n + e] for e in range(E_n)]
    obs_bytes = int(np.prod(meta["env"]["obs_shape"])) * np.dtype(meta["env"]["obs_dtype"]).itemsize
    chunk = max(1, CHUNK_BYTES // (2 * E_n * max(1, obs_bytes)))
    pr = np.zeros((M, E_n), np.float64)
    for i0 in range(0, M, chunk):
        i1 = min(M, i0 + chunk)
        cols = [piece_rows(src, segs, i0, i1) for segs in mine]
        new = {k: np.stack([c[k] for c in cols], axis=1) for k in cols[0]}
        for r in range(i1 - i0):
            extra = {"discounts": new["discounts"][r]} if finished and "discounts" in new else {}
            replay.add(new["obs"][r], new["actions"][r], new["rewards"][r], new["next_obs"][r],
                       new["terminated"][r], new["truncated"][r], **extra)
        if prio:
            pr[i0:i1] = new["priorities"]
    if replay.prioritized:
        mp = float(np.max(read_dataset(f, path, "replay/max_priority"))) if prio else 1.0
        full = np.zeros((replay.rows, E_n), np.float64)     # rows past M: empty
        full[:M] = np.where(pr > 0, pr, mp)
        if replay.n_step > 1:
            full[M - (replay.n_step - 1):M] = 0.0
        if finished:        # (raw steps in: the last n - 1 made no transition)
            full[replay.filled:] = 0.0
        replay.load_state_dict({"priorities": full, "max_priority": mp})
