"""Encoding of per-rank state as JSON (no pickle): arrays, RNGs, env states; part checksums.

Environment state is captured by ``rl.envstate`` (the plain attributes of the vector env, of
every wrapper layer and of the unwrapped env, plus ALE's emulator state), in this process for
the sync vector env and in the worker processes for the async one; this module writes it as
JSON. Envs whose state cannot be reached (a plain gymnasium vector env) are re-seeded instead,
with a warning.
"""

from __future__ import annotations

import base64
import collections
import math
import zlib

import numpy as np
import torch

from hpcdqn.rl.envstate import capture_vector, restore_vector
from hpcdqn.store.errors import CheckpointCorrupt


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
    if isinstance(x, np.random.RandomState):
        name, keys, pos, has_gauss, gauss = x.get_state()
        return {"__randomstate__": {"name": name, "keys": encode(keys), "pos": int(pos),
                                    "has_gauss": int(has_gauss), "gauss": float(gauss)}}
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
            raise CheckpointCorrupt(f"unknown numpy bit generator {st['bit_generator']!r} in checkpoint")
        g = np.random.Generator(getattr(np.random, st["bit_generator"])())
        g.bit_generator.state = st
        return g
    if "__randomstate__" in x:
        return decode_randomstate(x["__randomstate__"])
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


MT_KEYS = 624    # MT19937's state words


def decode_randomstate(st) -> np.random.RandomState:
    """A numpy ``RandomState`` from its encoded ``get_state()``, checked before use (a Mersenne
    Twister of 624 uint32 words, position in [0, 624])."""
    try:
        keys = decode(st["keys"])
        ok = (st["name"] == "MT19937" and isinstance(keys, np.ndarray) and keys.dtype == np.uint32
              and keys.shape == (MT_KEYS,) and isinstance(st["pos"], int)
              and 0 <= st["pos"] <= MT_KEYS and st["has_gauss"] in (0, 1))
        if ok:
            rs = np.random.RandomState()
            rs.set_state((st["name"], keys, st["pos"], st["has_gauss"], float(st["gauss"])))
            return rs
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointCorrupt(f"numpy RandomState in checkpoint is malformed: {e}") from None
    raise CheckpointCorrupt("numpy RandomState in checkpoint is not an MT19937 state of "
                            f"{MT_KEYS} uint32 words with a position in [0, {MT_KEYS}]")


def _encode_attrs(attrs: dict) -> dict:
    out = {k: encode(v) for k, v in attrs.items()}
    return {k: v for k, v in out.items() if v is not _SKIP}


def env_state(venv) -> dict:
    """Everything we can capture of a vector env (``rl.envstate.capture_vector``), as JSON-able
    data."""
    return encode_env(capture_vector(venv))


def encode_env(st: dict) -> dict:
    """A ``capture_vector`` state as JSON-able data (attributes that cannot be encoded left out)."""
    if not st.get("supported"):
        return dict(st)
    out = {"supported": True, "kind": st["kind"], "vector": _encode_attrs(st["vector"]), "envs": []}
    for es in st["envs"]:
        enc = {"chain": es["chain"], "attrs": [_encode_attrs(a) for a in es["attrs"]]}
        if "ale" in es:
            enc["ale"] = encode(es["ale"])
        if "ale_error" in es:
            enc["ale_error"] = es["ale_error"]
        out["envs"].append(enc)
    return out


def decode_env(st: dict) -> dict:
    """Inverse of ``encode_env`` (what ``rl.envstate.restore_vector`` takes)."""
    if not st.get("supported"):
        return dict(st)
    out = dict(st, vector={k: decode(v) for k, v in st.get("vector", {}).items()}, envs=[])
    for es in st["envs"]:
        d = {"chain": es["chain"], "attrs": [{k: decode(v) for k, v in a.items()}
                                             for a in es["attrs"]]}
        d.update({k: decode(es[k]) for k in ("ale", "ale_error") if k in es})
        out["envs"].append(d)
    return out


def restore_env_state(venv, st: dict) -> list[str]:
    """Put an ``env_state`` back; returns warnings (empty when the restore is complete)."""
    return restore_vector(venv, decode_env(st))


# ---------------------------------------------------------------------------------------------
# checksums
# ---------------------------------------------------------------------------------------------
def crc(a: np.ndarray, value: int = 0) -> int:
    a = np.ascontiguousarray(a)
    return zlib.crc32(memoryview(a.reshape(-1).view(np.uint8)), value) & 0xFFFFFFFF


ATTRS_CRC = "attrs_crc32"


def attrs_crc(attrs: dict) -> int:
    """CRC-32 over the root attributes (name and value, in name order; ``attrs_crc32`` itself
    excluded): a changed digit in ``counters`` or ``layout`` is found before it is used."""
    value = 0
    for k in sorted(attrs):
        if k == ATTRS_CRC:
            continue
        v = attrs[k]
        v = v.decode() if isinstance(v, bytes) else str(v)
        value = zlib.crc32(f"{k}={v}\n".encode(), value)
    return value & 0xFFFFFFFF
