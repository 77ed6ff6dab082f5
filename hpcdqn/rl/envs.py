"""Environments: any gymnasium id, vectorized, seeded; Atari with the standard preprocessing."""

from __future__ import annotations

import contextlib
import functools
import importlib
import multiprocessing
import os

import gymnasium as gym
import numpy as np

from hpcdqn.rl.atari import AtariOptions, AtariPreprocess
from hpcdqn.rl import minatar
from hpcdqn.rl.envstate import capture_env, restore_env


NO_MPI_INIT = "MPI4PY_RC_INITIALIZE"


class EnvError(ValueError):
    """The environment id is unknown or its spaces do not fit DQN."""


def is_atari(env_id: str) -> bool:
    return env_id.startswith("ALE/") or "NoFrameskip" in env_id


def make_env(env_id: str, atari: AtariOptions | None = None, index: int | None = None,
             render_mode=None) -> gym.Env:
    """One environment; Atari ids get ``AtariPreprocess`` and a frame stack (``atari``: the
    options, default the config's). ``index``: the env's place in an async vector env, which
    wraps it in ``StateAccess`` (checkpoints reach its state through that)."""
    if is_atari(env_id):
        try:
            import ale_py

            gym.register_envs(ale_py)
        except ImportError as e:
            raise RuntimeError(
                f"env_id={env_id!r} needs ale-py: pip install 'hpcdqn[atari]' (ale-py)") from e
        if "-ram" in env_id:
            raise EnvError(f"env_id={env_id!r}: RAM observations do not go through the Atari "
                           "preprocessing; use the screen id (e.g. ALE/Pong-v5)")
        opts = atari or AtariOptions.from_config()
        # the unwrapped ALE env: AtariPreprocess drives the emulator and the frame limit itself
        raw = gym.make(env_id, render_mode=render_mode, **opts.make_kwargs()).unwrapped
        env = gym.wrappers.FrameStackObservation(AtariPreprocess(raw, opts), opts.frame_stack)
    elif minatar.is_minatar(env_id):
        env = minatar.make(env_id, render_mode)     # (C, 10, 10) uint8 observations
    else:
        env = gym.make(env_id, render_mode=render_mode)
    return env if index is None else StateAccess(env, index)


def env_thunk(env_id: str, render_mode=None, atari: AtariOptions | None = None,
              index: int | None = None):
    """A picklable function making one environment, as vector envs take them."""
    return functools.partial(make_env, env_id, atari, index, render_mode)


class StateAccess(gym.Wrapper):
    """The outermost layer of an async vector env's sub-env: captures and restores the state of
    the env below it (``rl.envstate``), called in the worker through ``AsyncVectorEnv.call``."""

    def __init__(self, env: gym.Env, index: int):
        super().__init__(env)
        self.index = index

    def capture_env_state(self) -> dict:
        return capture_env(self.env)

    def restore_env_state(self, states: list) -> list[str]:
        return restore_env(self.env, states[self.index])


class SyncVectorEnv(gym.vector.SyncVectorEnv):
    """gymnasium's ``SyncVectorEnv`` with a leaner ``step`` for same-step autoreset and a Box
    observation space (what hpcdqn uses): the same sub-env calls (``step``, then ``reset()`` on an
    episode end) and the same returns, ``info['final_obs']`` included, minus gymnasium's generic
    per-step work (space dispatch to split actions and stack observations, a deepcopy, merging
    empty info dicts): ~2x less overhead per CartPole step. The lean step keeps its results in
    buffers of its own (``step_obs``, ``step_rewards``, ...; a checkpoint captures them) and
    leaves gymnasium's internal state to gymnasium. Anything else goes to gymnasium's ``step``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lean = (self.autoreset_mode == gym.vector.AutoresetMode.SAME_STEP
                     and isinstance(self.single_observation_space, gym.spaces.Box))
        space, n = self.single_observation_space, self.num_envs
        self.step_obs = np.zeros((n, *space.shape), dtype=space.dtype) if self.lean else None
        self.step_rewards = np.zeros(n, dtype=np.float64)
        self.step_terminations = np.zeros(n, dtype=np.bool_)
        self.step_truncations = np.zeros(n, dtype=np.bool_)

    def step(self, actions):
        if not self.lean:
            return super().step(actions)
        infos = {}
        obs_buf, rew, term, trunc = (self.step_obs, self.step_rewards, self.step_terminations,
                                     self.step_truncations)
        for i, env in enumerate(self.envs):
            obs, rew[i], term[i], trunc[i], info = env.step(actions[i])
            if term[i] or trunc[i]:
                infos = self._add_info(infos, {"final_obs": obs, "final_info": info}, i)
                obs, info = env.reset()
            if info:
                infos = self._add_info(infos, info, i)
            obs_buf[i] = obs
        return (obs_buf.copy() if self.copy else obs_buf, rew.copy(), term.copy(), trunc.copy(),
                infos)

    def capture_env_states(self) -> list[dict]:
        return [capture_env(e) for e in self.envs]

    def restore_env_states(self, states: list) -> list[str]:
        return [w for e, st in zip(self.envs, states) for w in restore_env(e, st)]


def start_method() -> str:
    """How async sub-envs start: ``forkserver`` (``spawn`` where it is missing), never a bare
    ``fork``: forking a process that has initialised MPI is unsafe with the UCX/verbs transports
    of real clusters."""
    methods = multiprocessing.get_all_start_methods()
    return "forkserver" if "forkserver" in methods else "spawn"


@contextlib.contextmanager
def worker_environment():
    """The environment async sub-env processes start with: ``MPI4PY_RC_INITIALIZE=false``, so a
    worker that imports mpi4py (re-importing the main script, as ``spawn`` and ``forkserver``
    do) never calls MPI_Init, and without the launcher's ``PMIX_*`` variables (gymnasium drops
    ``OMPI_*`` and ``PMI_*``)."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("PMIX_") or k == NO_MPI_INIT}
    for k in saved:
        del os.environ[k]
    os.environ[NO_MPI_INIT] = "false"
    try:
        yield
    finally:
        del os.environ[NO_MPI_INIT]
        os.environ.update(saved)


class AsyncVectorEnv(gym.vector.AsyncVectorEnv):
    """gymnasium's ``AsyncVectorEnv``, each sub-env in its own process started by
    ``start_method()``, with the sub-envs' state reachable for checkpoints (``StateAccess``)."""

    def capture_env_states(self) -> list[dict]:
        return list(self.call("capture_env_state"))

    def restore_env_states(self, states: list) -> list[str]:
        return [w for ws in self.call("restore_env_state", list(states)) for w in ws]


def make_vector_env(env_id: str, num_envs: int, seed: int, kind: str = "sync",
                    atari: dict | None = None, training: bool = True) -> gym.vector.VectorEnv:
    """A seeded vector env with *same-step* autoreset: when an episode ends, ``step`` returns the
    reset observation and puts the true final observation in ``info['final_obs']``. ``atari``:
    the config's ``[atari]`` section (Atari ids); ``training=False`` leaves out the training-only
    preprocessing (episodic life, reward clipping), as evaluation needs."""
    try:
        if ":" in env_id:            # "module:Env-v0": the module registers the env on import
            mod, _, env_id_only = env_id.partition(":")
            importlib.import_module(mod)
            gym.spec(env_id_only)
        else:
            if minatar.is_minatar(env_id):
                minatar.register()
            gym.spec(env_id)
    except (gym.error.Error, ImportError) as e:
        if not is_atari(env_id):
            raise EnvError(f"env_id={env_id!r} is not a registered gymnasium environment: {e}") from None
    opts = AtariOptions.from_config(atari, training) if is_atari(env_id) else None
    mode = gym.vector.AutoresetMode.SAME_STEP
    if kind == "async":
        fns = [env_thunk(env_id, atari=opts, index=i) for i in range(num_envs)]
        with worker_environment():
            venv = AsyncVectorEnv(fns, autoreset_mode=mode, context=start_method())
    else:
        venv = SyncVectorEnv([env_thunk(env_id, atari=opts) for _ in range(num_envs)],
                             autoreset_mode=mode)
    if not isinstance(venv.single_action_space, gym.spaces.Discrete):
        venv.close()
        raise EnvError(f"env_id={env_id!r} has action space {venv.single_action_space}; "
                       "DQN needs a Discrete action space")
    if not isinstance(venv.single_observation_space, gym.spaces.Box):
        venv.close()
        raise EnvError(f"env_id={env_id!r} has observation space {venv.single_observation_space}; "
                       "hpcdqn needs a Box (array) observation space (wrap it, e.g. one-hot)")
    venv.reports_games = opts is not None     # Atari: info['game_return'] at each game's end
    venv.action_space.seed(seed)
    venv.reset(seed=seed)
    return venv


def final_next_obs(next_obs: np.ndarray, done: np.ndarray, infos: dict) -> np.ndarray:
    """The true next observation of each env: the final one where an episode just ended
    (``done``: terminated or truncated)."""
    if not done.any():
        return next_obs
    real = next_obs.copy()
    final = infos["final_obs"]
    for i in np.nonzero(done)[0]:
        real[i] = final[i]
    return real


def frame_stack(venv) -> int:
    """Frames each observation stacks on axis 0 (gymnasium's FrameStackObservation in the
    envs' wrappers: its ``stack_size``), 0 if none: what the replay needs to store each frame
    once (``rl.framereplay``). The one place the trainer and the planner learn it from."""
    try:
        k = int(venv.get_attr("stack_size")[0])
    except (AttributeError, TypeError, ValueError, IndexError):
        return 0
    shape = venv.single_observation_space.shape
    return k if len(shape) >= 2 and shape[0] == k else 0
