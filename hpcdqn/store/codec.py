"""Encoding of per-rank state as JSON (no pickle): arrays, RNGs, env states; part checksums.

Environment state is captured generically: the plain attributes (numbers, strings, arrays,
numpy Generators, lists/tuples/deques of those) of the vector env, of every wrapper and of the
unwrapped env (CartPole: ``state``, ``steps_beyond_terminated``, ``np_random``; TimeLimit:
``_elapsed_steps``), plus ALE's ``cloneState`` when present. Envs whose state lives elsewhere
(an ``async`` vector env's subprocesses, C extensions without a state API) are re-seeded
instead, with a warning.
"""

from __future__ import annotations

import base64
import collections
import math
import zlib

import numpy as np
import torch

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
    _restore_attrs(venv, st["vector"], problems)
    for e, es in zip(venv.envs, st["envs"]):
        chain = _chain(e)
        if [type(x).__name__ for x in chain] != es["chain"]:
            problems.append(f"wrapper chain changed ({es['chain']} -> "
                            f"{[type(x).__name__ for x in chain]}); env re-seeded")
            continue
        for obj, attrs in zip(chain, es["attrs"]):
            _restore_attrs(obj, attrs, problems)
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


def _restore_attrs(obj, attrs: dict, problems: list) -> None:
    """Allow-list: only the attributes the live object has now as plain captured data (what
    ``_plain_attrs`` would capture from it); anything else named in the file (a method, a
    module, an unknown name) is not set, with a warning."""
    allowed = _plain_attrs(obj)
    for k, v in attrs.items():
        if k not in allowed:
            problems.append(f"attribute {k!r} of {type(obj).__name__} in the checkpoint is not "
                            "restorable state; ignored")
            continue
        try:
            setattr(obj, k, decode(v, getattr(obj, k, None)))
        except AttributeError:   # read-only property
            pass


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
