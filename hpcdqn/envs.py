"""Environments: any gymnasium id, vectorized, seeded; Atari with the standard preprocessing."""

from __future__ import annotations

import gymnasium as gym
import numpy as np


class EnvError(ValueError):
    """The environment id is unknown or its spaces do not fit DQN."""


def is_atari(env_id: str) -> bool:
    return env_id.startswith("ALE/") or "NoFrameskip" in env_id


def _make_one(env_id: str, render_mode=None):
    def thunk():
        if is_atari(env_id):
            try:
                import ale_py

                gym.register_envs(ale_py)
            except ImportError as e:
                raise RuntimeError(
                    f"env_id={env_id!r} needs ale-py: pip install 'hpcdqn[atari]' (ale-py)") from e
            # Standard DQN preprocessing: frame skip 4 (max-pooled), grayscale, 84x84,
            # noop starts, stack of 4. ALE's own frameskip is turned off so the wrapper does it.
            env = gym.make(env_id, frameskip=1, repeat_action_probability=0.0, render_mode=render_mode)
            env = gym.wrappers.AtariPreprocessing(env, noop_max=30, frame_skip=4, screen_size=84,
                                                  terminal_on_life_loss=False, grayscale_obs=True,
                                                  scale_obs=False)
            env = gym.wrappers.FrameStackObservation(env, 4)
            return env
        return gym.make(env_id, render_mode=render_mode)

    return thunk


def make_vector_env(env_id: str, num_envs: int, seed: int, kind: str = "sync") -> gym.vector.VectorEnv:
    """A seeded vector env with *same-step* autoreset: when an episode ends, ``step`` returns the
    reset observation and puts the true final observation in ``info['final_obs']``."""
    try:
        gym.spec(env_id)
    except gym.error.Error as e:
        if not is_atari(env_id):
            raise EnvError(f"env_id={env_id!r} is not a registered gymnasium environment: {e}") from None
    fns = [_make_one(env_id) for _ in range(num_envs)]
    mode = gym.vector.AutoresetMode.SAME_STEP
    if kind == "async":
        venv = gym.vector.AsyncVectorEnv(fns, autoreset_mode=mode)
    else:
        venv = gym.vector.SyncVectorEnv(fns, autoreset_mode=mode)
    if not isinstance(venv.single_action_space, gym.spaces.Discrete):
        venv.close()
        raise EnvError(f"env_id={env_id!r} has action space {venv.single_action_space}; "
                       "DQN needs a Discrete action space")
    if not isinstance(venv.single_observation_space, gym.spaces.Box):
        venv.close()
        raise EnvError(f"env_id={env_id!r} has observation space {venv.single_observation_space}; "
                       "hpcdqn needs a Box (array) observation space (wrap it, e.g. one-hot)")
    venv.action_space.seed(seed)
    venv.reset(seed=seed)
    return venv


def final_next_obs(next_obs: np.ndarray, terminated, truncated, infos: dict) -> np.ndarray:
    """The true next observation of each env: the final one where an episode just ended."""
    done = np.logical_or(terminated, truncated)
    if not done.any():
        return next_obs
    real = next_obs.copy()
    final = infos["final_obs"]
    for i in np.nonzero(done)[0]:
        real[i] = final[i]
    return real
