"""A small scripted image env behind gymnasium's real FrameStackObservation, for replay tests.

Each frame is a pure function of (episode id, step) (``frame``), so a test can tell which
observation any stored or rebuilt stack should be. Episodes end by termination (random, from the
env's seeded RNG) or by truncation (TimeLimit). Registered as ``frame_env:FrameToy-v0`` (36x36
frames: the smallest the Nature CNN takes, stack of 4, reset padding) and
``frame_env:FrameToyZero-v0`` (zero padding, as SB3's VecFrameStack), so that ``hpcdqn train
env_id=frame_env:FrameToy-v0`` works when this directory is on PYTHONPATH.
"""

import gymnasium as gym
import numpy as np


def frame(ep: int, t: int, size: int) -> np.ndarray:
    f = np.random.default_rng([ep, t]).integers(0, 256, (size, size), dtype=np.uint8)
    f[0, :4] = np.frombuffer(np.uint32(ep).tobytes(), np.uint8)
    f[1, 0], f[1, 1] = t % 256, t // 256
    return f


def decode(f: np.ndarray) -> tuple[int, int]:
    """(episode id, step) of a frame made by ``frame``."""
    return int(np.frombuffer(f[0, :4].tobytes(), np.uint32)[0]), int(f[1, 0]) + 256 * int(f[1, 1])


class FrameToy(gym.Env):
    def __init__(self, size: int = 36, p_end: float = 0.04):
        self.size, self.p_end = size, p_end
        self.observation_space = gym.spaces.Box(0, 255, (size, size), np.uint8)
        self.action_space = gym.spaces.Discrete(3)
        self.ep, self.t = 0, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.ep = int(self.np_random.integers(1, 2**31))
        self.t = 0
        return frame(self.ep, 0, self.size), {}

    def step(self, action):
        self.t += 1
        reward = float(action == self.t % 3) - 0.1 * float(self.np_random.random())
        terminated = bool(self.np_random.random() < self.p_end)
        return frame(self.ep, self.t, self.size), reward, terminated, False, {}


def make(size: int = 36, stack: int = 4, padding: str = "reset", p_end: float = 0.04,
         render_mode=None):
    return gym.wrappers.FrameStackObservation(FrameToy(size, p_end), stack, padding_type=padding)


for _name, _pad in (("FrameToy-v0", "reset"), ("FrameToyZero-v0", "zero")):
    if _name not in gym.registry:
        gym.register(_name, entry_point=make, max_episode_steps=60, kwargs={"padding": _pad})
