"""Greedy evaluation: each of ``num_envs`` envs plays the same number of episodes, so short
episodes are not over-counted (the bias of "take the first N episodes that finish"). Atari envs
are made without the training-only preprocessing: episodes are full games (no episodic life)
and returns raw game scores (no reward clipping)."""

from __future__ import annotations

import numpy as np

from hpcdqn.config import EnvConfig
from hpcdqn.rl.envs import make_vector_env


def evaluate_run(policy, env: EnvConfig, episodes: int, num_envs: int, seed: int, epsilon: float,
                 env_id: str | None = None, vector: str | None = None) -> dict:
    """Greedy episodes of a run, in envs made as it trained (``env``, ``config.env_config``):
    its env id and its ``[atari]`` preprocessing (the training-only parts left out). The one way
    periodic, final and ``hpcdqn eval`` evaluations make their envs; ``env_id`` and ``vector``
    default to the run's."""
    return evaluate(policy, env_id or env.env_id, episodes, num_envs, seed, epsilon,
                    vector or env.vector, env.atari)


def evaluate(policy, env_id: str, episodes: int, num_envs: int, seed: int,
             epsilon: float = 0.0, vector: str = "sync", atari: dict | None = None) -> dict:
    num_envs = min(num_envs, episodes)
    per_env = episodes // num_envs
    env = make_vector_env(env_id, num_envs, seed, vector, atari, training=False)
    rng = np.random.default_rng(seed)
    try:
        obs, _ = env.reset(seed=seed)
        ret = np.zeros(num_envs)
        length = np.zeros(num_envs, dtype=np.int64)
        done_count = np.zeros(num_envs, dtype=np.int64)
        returns, lengths = [], []
        n_actions = env.single_action_space.n
        while (done_count < per_env).any():
            actions = policy(obs)
            if epsilon > 0:
                explore = rng.random(num_envs) < epsilon
                actions = np.where(explore, rng.integers(0, n_actions, num_envs), actions)
            obs, r, term, trunc, _ = env.step(actions)
            ret += r
            length += 1
            for i in np.nonzero(np.logical_or(term, trunc))[0]:
                if done_count[i] < per_env:
                    returns.append(float(ret[i]))
                    lengths.append(int(length[i]))
                    done_count[i] += 1
                ret[i] = 0.0
                length[i] = 0
    finally:
        env.close()
    returns_a = np.array(returns)
    return {"eval_episodes": len(returns), "eval_return_mean": float(returns_a.mean()),
            "eval_return_std": float(returns_a.std()), "eval_return_min": float(returns_a.min()),
            "eval_length_mean": float(np.mean(lengths))}
