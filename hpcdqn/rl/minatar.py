"""MinAtar (Young & Tian 2019): five miniature Atari games on a 10 x 10 x C boolean grid.

``minatar`` (PyPI) defines the gymnasium ids ``MinAtar/<Game>-v0`` (all 6 actions, the paper's
protocol) and ``MinAtar/<Game>-v1`` (the game's minimal action set) in
``minatar.gym.register_envs``, but its wheel declares no ``gymnasium.envs`` entry point, so
gymnasium never calls it: ``register()`` here does, once, for ids that are not registered yet.
Sticky actions (0.1) and difficulty ramping are minatar's defaults, as in the paper.

``MinAtarObservation`` turns each observation from (10, 10, C) bool (channels last) into
(C, 10, 10) uint8 in {0, 1}: channels first as the CNNs take them, one byte per cell in replay
and checkpoints (no float copy anywhere).
"""

from __future__ import annotations

import logging
import warnings

import gymnasium as gym
import numpy as np

GAMES = ("asterix", "breakout", "freeway", "seaquest", "space_invaders")
PREFIX = "MinAtar/"


def is_minatar(env_id: str) -> bool:
    return env_id.startswith(PREFIX)


def register() -> None:
    """Register the ``MinAtar/*`` ids with gymnasium (minatar's own ``register_envs``) unless
    they are already; an error naming the package when minatar is missing."""
    if "MinAtar/Breakout-v0" in gym.registry:
        return
    try:
        # minatar logs a warning at import when seaborn/matplotlib rendering is unavailable;
        # hpcdqn never renders MinAtar, so that warning is noise
        level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)
        try:
            import minatar.gym as mgym
        finally:
            logging.getLogger().setLevel(level)
    except ImportError as e:
        raise RuntimeError("MinAtar ids need the minatar package: "
                           "pip install --no-deps minatar==1.0.15") from e
    mgym.register_envs()


class MinAtarObservation(gym.ObservationWrapper):
    """(10, 10, C) bool -> (C, 10, 10) uint8 {0, 1}."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        h, w, c = env.observation_space.shape
        self.observation_space = gym.spaces.Box(0, 1, shape=(c, h, w), dtype=np.uint8)

    def observation(self, observation):
        return np.ascontiguousarray(np.moveaxis(np.asarray(observation, np.uint8), -1, 0))


def make(env_id: str, render_mode=None) -> gym.Env:
    register()
    with warnings.catch_warnings():   # "-v0 is out of date": v0 (all 6 actions) is the protocol
        warnings.filterwarnings("ignore", message=".*is out of date.*")
        return MinAtarObservation(gym.make(env_id, render_mode=render_mode))
