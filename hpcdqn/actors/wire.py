"""The actor-learner messages: one contiguous ``uint8`` buffer each, an int64 header and the
arrays' bytes after it (sent with the buffer interface, ``comm.Isend([buf, MPI.BYTE])``: no
pickle). A receiver learns the size from a probe, checks it against the largest message the
run can send before allocating, and checks the header against the size before reading.

Actor -> learner (``TAG_DATA``): ``DATA`` (steps, per-step transition counts, the finished
n-step transitions, the episodes that ended) or ``DONE`` (the actor's time split and counts,
its last message). Learner -> actor (``TAG_CTRL``, one tag so they arrive in order):
``WEIGHTS`` (the online network's flat parameters and the update count they are from),
``PROGRESS`` (iterations the learner has finished: the rate limit) and ``STOP``.

Checkpoints (``learner.FedTrainer.checkpoint``): the learner sends ``CKPT``; the actor answers
on ``TAG_DATA`` (after the data it already sent, which MPI keeps in order) with ``STATE``, its
state as one JSON document (``store.codec``'s encoding of arrays and RNGs: no pickle). On resume
the learner sends each actor ``RESTORE`` (that state, or where to start afresh) before anything
else. Both are bounded by ``max_state_bytes`` on receipt.
"""

from __future__ import annotations

import json

import numpy as np

MAGIC = 0x48504351          # "HPCQ"
TAG_DATA, TAG_CTRL = 7301, 7302
DATA, DONE, STATE, FRAMES = 1, 2, 3, 4   # FRAMES: image envs' raw steps (``actors.frames``)
WEIGHTS, PROGRESS, STOP, CKPT, RESTORE = 11, 12, 13, 14, 15
STATE_BYTES = 64 << 20      # an actor's state message, beside its network's parameters
HEADER = 6                  # int64 words of every header
ACTOR_STATS = ("env_s", "inference_s", "send_s", "wait_s", "wall_s", "env_steps",
               "transitions_sent", "messages_sent", "weights_received", "episodes")


class WireError(RuntimeError):
    """A message that is not what the protocol allows (size, magic, counts)."""


def pack(header: list[int], *arrays) -> np.ndarray:
    """One contiguous byte buffer: the int64 header (padded to ``HEADER`` words), then arrays."""
    head = np.zeros(HEADER, np.int64)
    head[:len(header)] = header
    parts = [head.view(np.uint8)] + [np.ascontiguousarray(a).reshape(-1).view(np.uint8)
                                     for a in arrays]
    return np.concatenate(parts)


def header(buf: np.ndarray, kinds: tuple) -> np.ndarray:
    """The header of ``buf``; ``WireError`` if it is too short or not one of ``kinds``."""
    if buf.nbytes < HEADER * 8:
        raise WireError(f"message of {buf.nbytes} bytes is shorter than its header")
    head = buf[:HEADER * 8].view(np.int64)
    if head[0] != MAGIC or head[1] not in kinds:
        raise WireError(f"message with magic {head[0]:#x}, kind {head[1]}: not an hpcdqn "
                        f"actor message of kinds {kinds}")
    return head


class Layout:
    """Sizes of one run's data messages (identical on actors and learners)."""

    def __init__(self, obs_shape: tuple, obs_dtype, num_envs: int, max_steps: int):
        self.obs_shape, self.obs_dtype = tuple(obs_shape), np.dtype(obs_dtype)
        self.obs_bytes = int(np.prod(obs_shape)) * self.obs_dtype.itemsize
        self.num_envs, self.max_steps = num_envs, max_steps

    def transition_bytes(self, n: int, episodes: int, steps: int) -> int:
        return (HEADER + steps) * 8 + n * (2 * self.obs_bytes + 8 + 4 + 4) + episodes * 16

    @property
    def max_bytes(self) -> int:
        """The largest message an actor of this run sends."""
        n = self.max_steps * self.num_envs
        return max(self.transition_bytes(n, n, self.max_steps),
                   (HEADER + len(ACTOR_STATS)) * 8)

    def pack_data(self, first_it: int, counts: list[int], tr: list[dict], eps: list) -> np.ndarray:
        cat = (lambda k, dt: np.concatenate([t[k] for t in tr]).astype(dt, copy=False) if tr
               else np.zeros((0,), dt))
        obs = np.concatenate([t["obs"] for t in tr]) if tr else np.zeros((0,) + self.obs_shape)
        nxt = np.concatenate([t["next_obs"] for t in tr]) if tr else obs
        ep = np.array(eps, np.float64).reshape(-1, 2)
        return pack([MAGIC, DATA, len(counts), int(sum(counts)), len(ep), first_it],
                    np.array(counts, np.int64), obs.astype(self.obs_dtype, copy=False),
                    nxt.astype(self.obs_dtype, copy=False), cat("actions", np.int64),
                    cat("returns", np.float32), cat("discounts", np.float32), ep)

    def unpack(self, buf: np.ndarray) -> dict:
        """A data or done message as arrays (views of ``buf``); ``WireError`` if inconsistent."""
        head = header(buf, (DATA, DONE, STATE))
        if head[1] == STATE:
            return {"kind": STATE, "state": unpack_json(buf, head)}
        if head[1] == DONE:
            if buf.nbytes != (HEADER + len(ACTOR_STATS)) * 8:
                raise WireError(f"done message of {buf.nbytes} bytes")
            return {"kind": DONE, "stats": dict(zip(ACTOR_STATS, buf[HEADER * 8:].view(np.float64)))}
        steps, n, n_ep, first = (int(x) for x in head[2:6])
        if not (0 < steps <= self.max_steps and 0 <= n <= steps * self.num_envs
                and 0 <= n_ep <= steps * self.num_envs):
            raise WireError(f"data message claims {steps} steps, {n} transitions, {n_ep} episodes")
        if buf.nbytes != self.transition_bytes(n, n_ep, steps):
            raise WireError(f"data message of {buf.nbytes} bytes, its header says "
                            f"{self.transition_bytes(n, n_ep, steps)}")
        out, off = {"kind": DATA, "first": first}, HEADER * 8
        for key, dt, shape in (("counts", np.int64, (steps,)),
                               ("obs", self.obs_dtype, (n,) + self.obs_shape),
                               ("next_obs", self.obs_dtype, (n,) + self.obs_shape),
                               ("actions", np.int64, (n,)), ("returns", np.float32, (n,)),
                               ("discounts", np.float32, (n,)), ("episodes", np.float64, (n_ep, 2))):
            size = int(np.prod(shape)) * np.dtype(dt).itemsize
            out[key] = buf[off:off + size].view(dt).reshape(shape)
            off += size
        if out["counts"].min() < 0 or int(out["counts"].sum()) != n:
            raise WireError(f"data message's per-step counts do not add up to {n}")
        return out


def pack_done(stats: dict) -> np.ndarray:
    return pack([MAGIC, DONE], np.array([float(stats[k]) for k in ACTOR_STATS], np.float64))


def pack_ctrl(kind: int, value: int, params: np.ndarray | None = None) -> np.ndarray:
    p = np.zeros(0, np.float32) if params is None else np.asarray(params, np.float32)
    return pack([MAGIC, kind, int(value), p.size], p)


def pack_json(kind: int, obj) -> np.ndarray:
    """A ``STATE`` or ``RESTORE`` message: ``obj`` (JSON-able) as UTF-8 JSON."""
    raw = json.dumps(obj).encode()
    return pack([MAGIC, kind, 0, len(raw)], np.frombuffer(raw, np.uint8))


def unpack_json(buf: np.ndarray, head: np.ndarray):
    n = int(head[3])
    if n < 0 or buf.nbytes != HEADER * 8 + n:
        raise WireError(f"state message of {buf.nbytes} bytes, its header says {n} after the header")
    try:
        return json.loads(buf[HEADER * 8:].tobytes().decode())
    except (UnicodeDecodeError, ValueError) as e:
        raise WireError(f"state message is not JSON: {e}") from None


def max_state_bytes(n_params: int) -> int:
    """The largest ``STATE``/``RESTORE`` message a receiver accepts (the parameters in base64
    and the rest: environments, n-step window, data not yet inserted)."""
    return STATE_BYTES + 2 * 4 * n_params


def unpack_ctrl(buf: np.ndarray, n_params: int) -> tuple[int, int, np.ndarray | None]:
    """(kind, value, parameters or None) of a learner message (``RESTORE``: its JSON document
    in place of the parameters); ``WireError`` if inconsistent."""
    head = header(buf, (WEIGHTS, PROGRESS, STOP, CKPT, RESTORE))
    kind, value, n = int(head[1]), int(head[2]), int(head[3])
    if kind == RESTORE:
        return kind, value, unpack_json(buf, head)
    want = n_params if kind == WEIGHTS else 0
    if n != want or buf.nbytes != HEADER * 8 + 4 * n:
        raise WireError(f"learner message of kind {kind} with {n} parameters in {buf.nbytes} "
                        f"bytes (expected {want})")
    return kind, value, (buf[HEADER * 8:].view(np.float32) if kind == WEIGHTS else None)


def max_ctrl_bytes(n_params: int) -> int:
    return HEADER * 8 + 4 * n_params


def recv_bytes(comm, MPI, status, limit: int) -> np.ndarray:
    """Receive the message ``status`` (from a probe) describes into a fresh buffer, after
    checking its size against ``limit``."""
    size = status.Get_count(MPI.BYTE)
    if size > limit:
        raise WireError(f"message of {size} bytes from rank {status.Get_source()} exceeds the "
                        f"{limit} bytes this run's messages can have")
    buf = np.empty(size, np.uint8)
    comm.Recv([buf, MPI.BYTE], source=status.Get_source(), tag=status.Get_tag())
    return buf
