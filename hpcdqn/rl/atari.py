"""Atari preprocessing of the DQN literature (Mnih et al. 2015; Machado et al. 2018) as one
gymnasium wrapper that drives the Arcade Learning Environment directly.

``AtariPreprocess`` does what Stable-Baselines3's ``AtariWrapper`` does with six wrappers
(NoopReset, MaxAndSkip, EpisodicLife, FireReset, WarpFrame, ClipReward), in the same order and
with the same random draws, so for the same seed and actions it gives the same observations,
rewards and episode ends (``tests/rl/test_atari_vs_sb3.py`` checks that step by step). It calls
``ale.act`` per frame and fetches the screen only for the last two frames of a step (SB3 goes
through ``AtariEnv.step``, which copies the screen and builds an info dict every frame).

Deliberate differences from SB3 (each tested):

- A step whose episode ends *before its last frame* observes the last frame it emulated; SB3
  max-pools stale buffers from earlier steps there ("the observation on the done frame doesn't
  matter" - it does for a truncation, whose next state is bootstrapped).
- Sticky actions are Machado et al.'s, as ALE defines ``repeat_action_probability``: at every
  emulator frame the previous frame's action is repeated with that probability, and a reset
  makes it NOOP. hpcdqn draws them from its own generator (seeded by ``reset(seed=...)``) and
  keeps the held action itself, because ALE's ``cloneState`` leaves out ALE's held action, so a
  checkpoint could not resume ALE's stickiness exactly. SB3's ``StickyActionEnv`` repeats per
  agent step instead.
- Frame stacking (``FrameStackObservation`` in ``envs``) pads a new episode with its first frame;
  SB3's ``VecFrameStack`` pads with zeros.

Training-only parts (``episodic_life``, ``clip_reward``) are switched off for evaluation by
``AtariOptions.from_config(..., training=False)``. Whatever the options, a step that ends the
game itself (not a lost life) reports its raw score and agent steps in
``info['game_return']`` / ``info['game_length']`` (``rollout`` logs those as episodes).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import gymnasium as gym
import numpy as np

from hpcdqn.config import defaults

NOOP, FIRE = 0, 1   # action indices: every ALE game's action 0 is NOOP; FIRE is 1 where present
STICKY_STREAM = 0x5717   # reset(seed=s) seeds the sticky-action generator with [s, STICKY_STREAM]


@dataclass(frozen=True)
class AtariOptions:
    """The ``[atari]`` config section (see ``config.SCHEMA`` for each key's meaning)."""
    noop_max: int
    frame_skip: int
    max_pool: bool
    screen_size: int
    frame_stack: int
    episodic_life: bool
    clip_reward: bool
    fire_reset: bool
    sticky_actions: float
    full_action_space: bool
    max_frames: int

    @classmethod
    def from_config(cls, section: dict | None = None, training: bool = True) -> "AtariOptions":
        """Options from an ``[atari]`` section (missing keys: defaults). ``training=False``: the
        evaluation protocol, full games and raw rewards (no episodic life, no reward clipping)."""
        names = {f.name for f in fields(cls)}
        opts = cls(**{k: v for k, v in {**defaults()["atari"], **(section or {})}.items()
                      if k in names})
        return opts if training else replace(opts, episodic_life=False, clip_reward=False)

    def make_kwargs(self) -> dict:
        """``gym.make`` keywords of the raw ALE env: no frame skip and no sticky actions of its
        own (``AtariPreprocess`` does both)."""
        return {"frameskip": 1, "repeat_action_probability": 0.0,
                "full_action_space": self.full_action_space,
                "max_num_frames_per_episode": self.max_frames}


class AtariPreprocess(gym.Wrapper):
    """Noop starts, frame skip with max-pooling, episodic life, fire reset, grayscale + resize
    and reward clipping over an unwrapped ALE ``AtariEnv`` (made with ``make_kwargs``). The
    methods mirror SB3's wrapper layers: ``_frame`` (one emulator frame), ``_noop_reset``
    (NoopResetEnv), ``_skip_step`` (MaxAndSkipEnv), ``_life_step``/``_life_reset``
    (EpisodicLifeEnv), ``_fire_reset`` (FireResetEnv); ``step``/``reset`` add WarpFrame and
    ClipRewardEnv."""

    transient_attrs = ("screens",)   # scratch buffers: not part of a checkpoint's env state

    def __init__(self, env: gym.Env, opts: AtariOptions):
        super().__init__(env)
        import cv2

        cv2.ocl.setUseOpenCL(False)
        cv2.setNumThreads(1)     # one core per rank or worker: no OpenCV thread pool on top
        self.cv2 = cv2
        raw = env.unwrapped
        self.ale = raw.ale
        self.action_set = (self.ale.getLegalActionSet() if opts.full_action_space
                           else self.ale.getMinimalActionSet())
        meanings = raw.get_action_meanings()
        if meanings[NOOP] != "NOOP":
            raise ValueError(f"{raw.spec.id if raw.spec else raw}: action 0 is {meanings[0]}, not NOOP")
        self.noop_max, self.skip, self.pool = opts.noop_max, opts.frame_skip, opts.max_pool
        self.size, self.episodic, self.clip = opts.screen_size, opts.episodic_life, opts.clip_reward
        # SB3 presses FIRE where "FIRE" is an action (it asserts FIRE is action 1 then)
        self.fire = opts.fire_reset and "FIRE" in meanings
        if self.fire and (meanings[FIRE] != "FIRE" or len(meanings) < 3):
            raise ValueError(f"fire reset needs FIRE as action 1 and 3+ actions, got {meanings}")
        h, w = self.ale.getScreenDims()
        self.screens = np.zeros((3, h, w, 3), np.uint8)   # the step's last two frames + their max
        self.last, self.pooled = 1, False                 # which screen is the observation
        self.lives, self.was_real_done = 0, True          # EpisodicLifeEnv's state
        self.score, self.steps = 0.0, 0                   # the game's raw return and agent steps
        self.sticky, self.held = opts.sticky_actions, NOOP    # sticky actions: the held action
        self.sticky_rng = np.random.default_rng()
        self.observation_space = gym.spaces.Box(0, 255, (self.size, self.size), np.uint8)

    # -- the layers, innermost first ----------------------------------------------------------
    def _frame(self, action: int) -> tuple[float, bool, bool]:
        """One emulator frame (``AtariEnv.step`` with frameskip 1); with sticky actions the
        held action again with probability ``sticky``."""
        if self.sticky > 0.0 and self.sticky_rng.random() < self.sticky:
            action = self.held
        self.held = action
        r = self.ale.act(self.action_set[action])
        self.score += r
        return float(r), self.ale.game_over(with_truncation=False), self.ale.game_truncated()

    def _game_reset(self, seed=None, options=None) -> None:
        self.env.reset(seed=seed, options=options)
        self.score, self.steps, self.held = 0.0, 0, NOOP

    def _noop_reset(self, seed=None, options=None) -> None:
        """Reset the game, then 1..noop_max no-op frames drawn from the env's own generator."""
        self._game_reset(seed, options)
        if self.noop_max > 0:
            for _ in range(int(self.env.unwrapped.np_random.integers(1, self.noop_max + 1))):
                _, term, trunc = self._frame(NOOP)
                if term or trunc:
                    self._game_reset(seed, options)
        self.ale.getScreenRGB(self.screens[1])
        self.last, self.pooled = 1, False

    def _skip_step(self, action: int) -> tuple[float, bool, bool]:
        """The action for ``frame_skip`` frames (fewer if the episode ends), rewards summed; the
        last two frames' screens kept for the observation."""
        a, skip, total = action, self.skip, 0.0
        term = trunc = False
        i = 0
        for i in range(skip):
            r, term, trunc = self._frame(a)
            total += r
            if i >= skip - 2:
                self.ale.getScreenRGB(self.screens[i - skip + 2])
            if term or trunc:
                break
        if i < skip - 2:                         # ended early: observe the frame it ended on
            self.ale.getScreenRGB(self.screens[1])
        self.last = 0 if i == skip - 2 else 1
        self.pooled = self.pool and skip > 1 and i == skip - 1
        return total, term, trunc

    def _life_step(self, action: int) -> tuple[float, bool, bool]:
        r, term, trunc = self._skip_step(action)
        if not self.episodic:
            return r, term, trunc
        self.was_real_done = term or trunc
        lives = self.ale.lives()
        if 0 < lives < self.lives:               # a lost life ends the episode for learning
            term = True
        self.lives = lives
        return r, term, trunc

    def _life_reset(self, seed=None, options=None) -> None:
        if not self.episodic or self.was_real_done:
            self._noop_reset(seed, options)
        else:                                    # a lost life: the game goes on after a no-op
            _, term, trunc = self._skip_step(NOOP)
            if term or trunc:
                self._noop_reset(seed, options)
        if self.episodic:
            self.lives = self.ale.lives()

    def _fire_reset(self, seed=None, options=None) -> None:
        self._life_reset(seed, options)
        if not self.fire:
            return
        for action in (FIRE, 2):
            _, term, trunc = self._life_step(action)
            if term or trunc:
                self._life_reset(seed, options)

    # -- gymnasium API ------------------------------------------------------------------------
    def observation(self) -> np.ndarray:
        """The current screen(s) as one grayscale ``size x size`` uint8 frame."""
        s = self.screens
        frame = np.maximum(s[0], s[1], out=s[2]) if self.pooled else s[self.last]
        gray = self.cv2.cvtColor(frame, self.cv2.COLOR_RGB2GRAY)
        return self.cv2.resize(gray, (self.size, self.size), interpolation=self.cv2.INTER_AREA)

    def reset(self, *, seed=None, options=None):
        if seed is not None:
            self.sticky_rng = np.random.default_rng([seed, STICKY_STREAM])
        self._fire_reset(seed, options)
        return self.observation(), {}

    def step(self, action):
        r, term, trunc = self._life_step(int(action))
        self.steps += 1
        info = {}
        if self.ale.game_over():                 # the game itself ended (or was truncated)
            info = {"game_return": self.score, "game_length": self.steps}
        return self.observation(), (float(np.sign(r)) if self.clip else r), term, trunc, info
