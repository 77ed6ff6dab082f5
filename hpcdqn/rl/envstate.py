"""What a checkpoint keeps of an environment, as plain Python values (``store.codec`` writes them
as JSON): the plain attributes (numbers, strings, arrays, numpy Generators, lists/tuples/deques/
dicts of those) of every wrapper layer and of the unwrapped env (CartPole: ``state``,
``steps_beyond_terminated``, ``np_random``; TimeLimit: ``_elapsed_steps``; FrameStackObservation:
``obs_queue``), plus ALE's emulator state with its RNG (``cloneState(include_rng=True)``, which
also holds the sticky-action state). MinAtar: below its gymnasium env (``minatar.gym.BaseEnv``)
the ``game`` (``minatar.Environment``: sticky-action RNG and last action) and its ``env`` (the
game's fields: positions, timers, entity lists, brick/alien maps), with their numpy
``RandomState`` (one object shared by both, kept so on restore). A layer's ``transient_attrs``
(scratch buffers) are left out.

``capture_env``/``restore_env`` work on one sub-env wherever it lives: the sync vector env calls
them in this process, the async one in its worker processes (``envs.StateAccess``).
"""

from __future__ import annotations

import collections

import numpy as np

SKIP = {"env", "env_fns", "envs", "metadata", "spec", "_saved_kwargs", "render_mode", "screen",
        "clock", "_cached_spec", "_metadata", "observation_space", "action_space",
        "single_observation_space", "single_action_space", "_action_space", "_observation_space",
        "ale", "viewer", "window"}

_SCALARS = (type(None), bool, int, float, str, np.generic, np.random.Generator,
            np.random.RandomState)


def plain(x) -> bool:
    """Whether ``x`` is data a checkpoint can hold (what ``store.codec.encode`` encodes)."""
    if isinstance(x, _SCALARS):
        return True
    if isinstance(x, np.ndarray):
        return not x.dtype.hasobject
    if isinstance(x, (list, tuple, collections.deque)):
        return all(plain(v) for v in x)
    if isinstance(x, dict):
        return all(isinstance(k, str) and plain(v) for k, v in x.items())
    return False


def capture_attrs(obj) -> dict:
    """``obj``'s plain attributes (by reference: encode or copy them before stepping on)."""
    skip = SKIP.union(getattr(obj, "transient_attrs", ()))
    return {k: v for k, v in vars(obj).items() if k not in skip and plain(v)}


def restore_attrs(obj, attrs: dict, problems: list) -> None:
    """Allow-list: only the attributes the live object has now as plain data (what
    ``capture_attrs`` would capture from it) are set; anything else named in the file (a method,
    a module, an unknown name) is not, with a warning. Arrays of the same shape are copied into
    and numpy Generators keep their identity."""
    allowed = capture_attrs(obj)
    for k, v in attrs.items():
        if k not in allowed:
            problems.append(f"attribute {k!r} of {type(obj).__name__} in the checkpoint is not "
                            "restorable state; ignored")
            continue
        cur = allowed[k]
        try:
            if isinstance(cur, np.random.Generator) and isinstance(v, np.random.Generator) \
                    and type(cur.bit_generator) is type(v.bit_generator):
                cur.bit_generator.state = v.bit_generator.state
            elif isinstance(cur, np.random.RandomState) and isinstance(v, np.random.RandomState):
                cur.set_state(v.get_state())      # in place: objects sharing it stay shared
            elif isinstance(cur, np.ndarray) and isinstance(v, np.ndarray) and cur.shape == v.shape \
                    and cur.dtype == v.dtype and cur.flags.writeable:
                cur[...] = v
            else:
                setattr(obj, k, v)
        except AttributeError:   # read-only property
            pass


def inner(obj):
    """The layer below ``obj``: a wrapper's ``env``; MinAtar's gymnasium env's ``game`` (whose
    ``env`` is the game itself); None at the bottom."""
    nxt = getattr(obj, "env", None)
    if nxt is None and type(obj).__module__.startswith("minatar"):
        nxt = getattr(obj, "game", None)
    return None if nxt is obj else nxt


def layers(env) -> list:
    """The env, its wrappers, down to the unwrapped env (and, for MinAtar, its game objects)."""
    out = [env]
    while (nxt := inner(out[-1])) is not None:
        out.append(nxt)
    return out


def capture_env(env) -> dict:
    """One sub-env's state: {chain: layer class names, attrs: per layer, ale: emulator bytes}."""
    chain = layers(env)
    st = {"chain": [type(x).__name__ for x in chain], "attrs": [capture_attrs(x) for x in chain]}
    ale = getattr(chain[-1], "ale", None)
    if ale is not None:
        try:
            st["ale"] = np.frombuffer(ale.cloneState(include_rng=True).serialize(), np.uint8)
        except Exception as ex:  # noqa: BLE001 - an ALE without a serializable state
            st["ale_error"] = repr(ex)
    return st


def restore_env(env, st: dict) -> list[str]:
    """Put a captured state back into a freshly made env of the same kind; returns warnings
    (empty when the restore is complete)."""
    chain = layers(env)
    names = [type(x).__name__ for x in chain]
    if names != st["chain"]:
        return [f"wrapper chain changed ({st['chain']} -> {names}); env re-seeded"]
    problems: list[str] = []
    for obj, attrs in zip(chain, st["attrs"]):
        restore_attrs(obj, attrs, problems)
    if "ale" in st:
        try:
            import ale_py

            chain[-1].ale.restoreState(ale_py.ALEState(np.asarray(st["ale"], np.uint8).tobytes()))
        except Exception as ex:  # noqa: BLE001 - reported, the resume is then not exact
            problems.append(f"ALE state not restored: {ex!r}")
    if "ale_error" in st:
        problems.append(f"ALE state was not captured: {st['ale_error']}")
    return problems


def capture_vector(venv) -> dict:
    """Everything that can be captured of a vector env, as plain values (by reference: encode
    them before stepping on): {supported, kind, vector: its own attributes, envs: each sub-env's
    ``capture_env``}; {supported: False, why} where the sub-envs cannot be reached."""
    if not hasattr(venv, "capture_env_states"):
        return {"supported": False,
                "why": f"{type(venv).__name__} does not expose its sub-envs' state"}
    return {"supported": True, "kind": type(venv).__name__, "vector": capture_attrs(venv),
            "envs": venv.capture_env_states()}


def restore_vector(venv, st: dict) -> list[str]:
    """Put a ``capture_vector`` state back; returns warnings (empty when the restore is
    complete). The sub-envs' state moves between the sync and the async vector env (the vector
    env's own attributes are per-step buffers of same-step autoreset; restored when the kind is
    the same)."""
    if not st.get("supported"):
        return [f"environment state was not captured ({st.get('why', 'unsupported')}); "
                "environments were re-seeded instead"]
    if not hasattr(venv, "restore_env_states") or venv.num_envs != len(st["envs"]):
        return ["vector env kind or size changed; environments were re-seeded instead"]
    problems: list[str] = []
    if st.get("kind", "SyncVectorEnv") == type(venv).__name__:
        restore_attrs(venv, st["vector"], problems)
    return problems + venv.restore_env_states(st["envs"])
