"""hpcdqn's Atari preprocessing against Stable-Baselines3's AtariWrapper, step for step on the real
ALE: the same seed and actions give the same observations, rewards, terminations and
truncations. The deliberate differences (see hpcdqn/rl/atari.py) are checked for what they are:

- a step whose episode ends before its last frame observes the frame it ended on (SB3 max-pools
  stale buffers there): checked against the emulator's screen instead of SB3's observation;
- sticky actions are Machado et al.'s (per emulator frame, hpcdqn's generator): compared with SB3
  over a plainly written per-frame sticky layer (SB3's own StickyActionEnv repeats per agent
  step);
- fire_reset=false has no SB3 switch: compared with SB3's wrapper layers composed without
  FireResetEnv;
- frame stacking pads with the reset frame (SB3's VecFrameStack pads with zeros).
"""
import gymnasium as gym
import numpy as np
import pytest

ale_py = pytest.importorskip("ale_py", reason="ale-py not installed (./quickstart.sh installs it)")
sb3 = pytest.importorskip("stable_baselines3.common.atari_wrappers",
                          reason="stable-baselines3 not installed")
cv2 = pytest.importorskip("cv2")

from hpcdqn.rl.atari import STICKY_STREAM, AtariOptions  # noqa: E402
from hpcdqn.rl.envs import make_env  # noqa: E402

gym.register_envs(ale_py)


class FrameSticky(gym.Wrapper):
    """Reference sticky actions on a frameskip-1 ALE env: each frame keeps the held action with
    probability p (ALE's rule), NOOP after a reset, the generator seeded like hpcdqn's."""

    def __init__(self, env, p):
        super().__init__(env)
        self.p, self.rng, self.held = p, np.random.default_rng(), 0

    def reset(self, *, seed=None, options=None):
        if seed is not None:
            self.rng = np.random.default_rng([seed, STICKY_STREAM])
        self.held = 0
        return self.env.reset(seed=seed, options=options)

    def step(self, action):
        if self.rng.random() >= self.p:
            self.held = action
        return self.env.step(self.held)


def sb3_env(env_id: str, o: AtariOptions):
    """SB3's preprocessing for options ``o``: its AtariWrapper where it has the switches, else
    its wrapper layers in AtariWrapper's order."""
    env = gym.make(env_id, **o.make_kwargs())
    env = FrameSticky(env, o.sticky_actions) if o.sticky_actions else env
    if o.fire_reset and o.max_pool:
        return sb3.AtariWrapper(env, noop_max=o.noop_max, frame_skip=o.frame_skip,
                                screen_size=o.screen_size, terminal_on_life_loss=o.episodic_life,
                                clip_reward=o.clip_reward)
    assert o.max_pool
    env = sb3.MaxAndSkipEnv(sb3.NoopResetEnv(env, o.noop_max) if o.noop_max else env, o.frame_skip)
    env = sb3.EpisodicLifeEnv(env) if o.episodic_life else env
    env = sb3.WarpFrame(env, o.screen_size, o.screen_size)
    return sb3.ClipRewardEnv(env) if o.clip_reward else env


def warp(screen: np.ndarray, size: int) -> np.ndarray:
    return cv2.resize(cv2.cvtColor(screen, cv2.COLOR_RGB2GRAY), (size, size),
                      interpolation=cv2.INTER_AREA)


def compare(env_id: str, steps: int, seed: int, **options) -> dict:
    o = AtariOptions.from_config(options)
    ours, ref = make_env(env_id, o), sb3_env(env_id, o)
    pre = ours.env                                  # AtariPreprocess (below the frame stack)
    acts = np.random.default_rng(seed).integers(0, ours.action_space.n, steps)
    stack, _ = ours.reset(seed=seed)
    ref_obs, _ = ref.reset(seed=seed)
    assert (stack == stack[-1]).all(), "a new episode's stack is padded with its first frame"
    n = {"equal": 0, "early_end": 0, "lives_lost": 0, "games": 0, "truncated": 0, "resets": 1}
    for t, a in enumerate(acts):
        stack, r, term, trunc, info = ours.step(a)
        ref_obs, ref_r, ref_term, ref_trunc, _ = ref.step(a)
        assert (r, term, trunc) == (ref_r, ref_term, ref_trunc), f"step {t}"
        if pre.pooled or not (term or trunc) or not o.max_pool:
            np.testing.assert_array_equal(stack[-1], ref_obs[..., 0], err_msg=f"step {t}")
            n["equal"] += 1
        else:     # ended before the step's last frame: the frame it ended on (SB3: stale max)
            np.testing.assert_array_equal(stack[-1], warp(pre.ale.getScreenRGB(), o.screen_size))
            n["early_end"] += 1
        n["games"] += "game_return" in info
        n["truncated"] += bool(trunc)
        n["lives_lost"] += bool(term and not pre.ale.game_over())
        if term or trunc:
            stack, _ = ours.reset()
            ref_obs, _ = ref.reset()
            np.testing.assert_array_equal(stack[-1], ref_obs[..., 0], err_msg=f"reset after {t}")
            assert (stack == stack[-1]).all()
            n["resets"] += 1
    ours.close()
    ref.close()
    return n


def test_breakout_training_protocol():
    """Nature/SB3 defaults: noop starts, skip 4 + max-pool, episodic life, FIRE after resets
    and lost lives, reward clipping."""
    n = compare("ALE/Breakout-v5", 2500, seed=3)
    assert n["lives_lost"] >= 20 and n["games"] >= 4 and n["equal"] >= 2400, n


def test_pong_training_protocol():
    n = compare("ALE/Pong-v5", 2500, seed=5)
    assert n["games"] >= 2 and n["equal"] >= 2400, n


def test_breakout_evaluation_protocol_raw_scores():
    """Evaluation: full games (no episodic life) with raw rewards."""
    o = AtariOptions.from_config(training=False)
    assert not o.episodic_life and not o.clip_reward
    n = compare("ALE/Breakout-v5", 1500, seed=7, episodic_life=False, clip_reward=False)
    assert n["lives_lost"] == 0 and n["games"] >= 2, n


def test_sticky_full_actions_no_fire_truncation():
    """Machado et al.: sticky actions 0.25 (per emulator frame), the full action set, no fire
    reset; a short frame limit makes truncations, some in the middle of a step."""
    n = compare("ALE/Pong-v5", 2000, seed=11, sticky_actions=0.25, full_action_space=True,
                fire_reset=False, max_frames=1000)
    assert n["truncated"] >= 5 and n["early_end"] >= 2, n


def test_frame_stack_keeps_last_k_frames():
    env = make_env("ALE/Pong-v5", AtariOptions.from_config({"frame_stack": 3}))
    stack, _ = env.reset(seed=0)
    frames = [stack[-1]] * 3
    for a in np.random.default_rng(0).integers(0, 6, 40):
        stack, *_ = env.step(a)
        frames = frames[1:] + [stack[-1]]
        assert stack.shape == (3, 84, 84) and stack.dtype == np.uint8
        np.testing.assert_array_equal(stack, np.stack(frames))
    env.close()
