"""Acting: one replica's vector environments and the state acting carries from step to step
(the acting RNG, the current observations, running episode returns and lengths)."""

from __future__ import annotations

import numpy as np

from hpcdqn.rl.envs import final_next_obs
from hpcdqn.rl.envstate import capture_vector, restore_vector
from hpcdqn.rl.replay import ReplayBuffer


class Rollout:
    def __init__(self, env, rng: np.random.Generator, obs: np.ndarray):
        self.env, self.rng, self.obs = env, rng, obs
        self.num_envs = int(env.num_envs)
        self.n_actions = int(env.single_action_space.n)
        self.ep_ret = np.zeros(self.num_envs)
        self.ep_len = np.zeros(self.num_envs, dtype=np.int64)
        # Atari: episodes for the log are whole games with their raw scores (from the env's
        # info), whatever episodic life and reward clipping made of them for learning
        self.games = bool(getattr(env, "reports_games", False))

    def explore(self, eps: float) -> tuple[np.ndarray, np.ndarray]:
        """Which envs explore at this step (``eps``-greedy) and their uniform random actions."""
        explore = self.rng.random(self.num_envs) < eps
        return explore, self.rng.integers(0, self.n_actions, self.num_envs)

    @staticmethod
    def choose(explore: np.ndarray, random_actions: np.ndarray, greedy) -> np.ndarray:
        return random_actions if greedy is None else np.where(explore, random_actions, greedy)

    def step(self, actions: np.ndarray, replay: ReplayBuffer) -> list[tuple[float, int]]:
        """Step the envs, store the transitions; returns (return, length) of every episode that
        ended at this step, in env order (Atari: of every game, its raw score)."""
        next_obs, rewards, term, trunc, infos = self.env.step(actions)
        done = np.logical_or(term, trunc)
        replay.add(self.obs, actions, rewards, final_next_obs(next_obs, done, infos), term, trunc)
        self.ep_ret += rewards
        self.ep_len += 1
        ended = []
        if done.any():
            ended = self.games_ended(infos) if self.games else \
                [(self.ep_ret[i], self.ep_len[i]) for i in np.nonzero(done)[0]]
            self.ep_ret[done] = 0.0
            self.ep_len[done] = 0
        self.obs = next_obs
        return ended

    @staticmethod
    def games_ended(infos: dict) -> list[tuple[float, int]]:
        fin = infos.get("final_info", {})
        if "game_return" not in fin:
            return []
        return [(float(fin["game_return"][i]), int(fin["game_length"][i]))
                for i in np.nonzero(fin["_game_return"])[0]]

    # -- state (what a checkpoint keeps of acting) ------------------------------------------------
    def state_dict(self) -> dict:
        """The acting RNG, the current observations, the running episode returns and lengths,
        and the environments (``envstate.capture_vector``: plain values, by reference; encode
        them before stepping on)."""
        return {"rng": self.rng, "obs": self.obs, "ep_ret": self.ep_ret, "ep_len": self.ep_len,
                "env": capture_vector(self.env)}

    def load_state_dict(self, st: dict) -> list[str]:
        """Continue from a ``state_dict``; returns warnings (empty when the environments were
        restored exactly)."""
        self.rng, self.obs, self.ep_ret, self.ep_len = st["rng"], st["obs"], st["ep_ret"], st["ep_len"]
        return restore_vector(self.env, st["env"])

    def reseed(self, seed: list[int]) -> None:
        """Start afresh from ``seed`` (a list of ints: the run seed, the replica, the env step;
        a resharded resume that has no state to continue): the environments reset, the acting
        RNG new, no episode running."""
        env_seed = int(np.random.SeedSequence(seed).generate_state(1)[0] % 2**31)
        self.obs = self.env.reset(seed=env_seed)[0]
        self.rng = np.random.default_rng(seed + [17])
        self.ep_ret = np.zeros(self.num_envs)
        self.ep_len = np.zeros(self.num_envs, dtype=np.int64)

    def close(self) -> None:
        self.env.close()
