"""Atari env throughput: hpcdqn's Pong vector env against its peers, random actions, no learning.

    python benchmarks/atari_envs.py [--env ALE/Pong-v5] [--steps 8000] [--repeats 3]
                                    [--out benchmarks/results/atari_envs.json]

Every side runs in this one process pinned to one core (``sched_setaffinity``), OpenCV on one
thread, with the same preprocessing (noop starts 30, frame skip 4 with max-pooling, 84x84
grayscale, episodic life, reward clipping, fire reset, stack of 4), ``--steps`` env steps each
after a warm-up, sides interleaved ``--repeats`` times (medians reported):

- ``hpcdqn``: ``make_vector_env(..., "sync")`` (``AtariPreprocess`` + ``FrameStackObservation``)
- ``hpcdqn_previous``: the chain hpcdqn used before (gymnasium's ``AtariPreprocessing`` without
  episodic life/clipping/fire reset, ``FrameStackObservation``) in the same lean sync vector env
- ``sb3``: Stable-Baselines3's ``AtariWrapper`` in ``DummyVecEnv`` + ``VecFrameStack(4)`` (what
  ``make_atari_env`` builds)
- ``envpool`` (when importable; it is not a dependency): ``envpool.make(..., num_threads=1)``
  with the same options, plus how many of its observations equal hpcdqn's for the same actions.

Writes one JSON (env steps/s per side and num_envs, ratios to hpcdqn, and a cProfile of
hpcdqn's 8-env step: where the time goes) to ``--out`` and prints it. Timings on a shared
machine are noisy: re-run on a quiet one.
"""

import argparse
import cProfile
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def hpcdqn_env(env_id, n, seed):
    from hpcdqn.rl.envs import make_vector_env

    return make_vector_env(env_id, n, seed, "sync")


def previous_env(env_id, n, seed):
    import gymnasium as gym

    from hpcdqn.rl.envs import SyncVectorEnv

    def make():
        env = gym.make(env_id, frameskip=1, repeat_action_probability=0.0)
        env = gym.wrappers.AtariPreprocessing(env, noop_max=30, frame_skip=4, screen_size=84,
                                              terminal_on_life_loss=False, grayscale_obs=True)
        return gym.wrappers.FrameStackObservation(env, 4)

    venv = SyncVectorEnv([make for _ in range(n)],
                         autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    venv.reset(seed=seed)
    return venv


class SB3Vec:
    """SB3's vector env behind gymnasium's step signature (obs, rew, term, trunc, info)."""

    def __init__(self, env_id, n, seed):
        import gymnasium as gym
        from stable_baselines3.common.atari_wrappers import AtariWrapper
        from stable_baselines3.common.vec_env import DummyVecEnv, VecFrameStack

        def make():
            return AtariWrapper(gym.make(env_id, frameskip=1, repeat_action_probability=0.0))

        self.venv = VecFrameStack(DummyVecEnv([make for _ in range(n)]), 4, "first")
        self.venv.seed(seed)
        self.venv.reset()

    def step(self, actions):
        obs, rew, done, infos = self.venv.step(actions)
        return obs, rew, done, done, infos

    def close(self):
        self.venv.close()


class EnvPoolVec:
    def __init__(self, env_id, n, seed):
        import envpool

        task = env_id.split("/")[-1]
        self.venv = envpool.make(task, env_type="gymnasium", num_envs=n, batch_size=n,
                                 num_threads=1, seed=seed, noop_max=30, frame_skip=4,
                                 episodic_life=True, reward_clip=True, use_fire_reset=True,
                                 stack_num=4, img_height=84, img_width=84, gray_scale=True,
                                 repeat_action_probability=0.0, max_episode_steps=27000)
        self.venv.reset()

    def step(self, actions):
        return self.venv.step(actions)

    def close(self):
        self.venv.close()


SIDES = {"hpcdqn": hpcdqn_env, "hpcdqn_previous": previous_env, "sb3": SB3Vec,
         "envpool": EnvPoolVec}


def steps_per_s(venv, n, steps, rng, n_actions) -> float:
    acts = rng.integers(0, n_actions, (steps // n + 50, n))
    for a in acts[:50]:                                   # warm-up
        venv.step(a)
    t = time.perf_counter()
    for a in acts[50:]:
        venv.step(a)
    return (len(acts) - 50) * n / (time.perf_counter() - t)


def profile(env_id, steps) -> dict:
    """Where hpcdqn's 8-env step spends its time: the top functions by own time."""
    venv = hpcdqn_env(env_id, 8, 0)
    acts = np.random.default_rng(0).integers(0, venv.single_action_space.n, (steps // 8, 8))
    pr = cProfile.Profile()
    pr.enable()
    for a in acts:
        venv.step(a)
    pr.disable()
    venv.close()
    st = pstats.Stats(pr)
    total = sum(v[2] for v in st.stats.values())
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:10]
    return {"total_s": round(total, 3), "us_per_env_step": round(1e6 * total / len(acts) / 8, 1),
            "top_own_time": [{"function": f"{Path(k[0]).name}:{k[2]}", "calls": v[1],
                              "share": round(v[2] / total, 3)} for k, v in rows]}


def envpool_agreement(env_id, steps=200) -> dict:
    """How many of EnvPool's observations equal hpcdqn's for the same actions (one env, no noop
    randomness on either side: hpcdqn noop_max=1 is exactly one no-op frame)."""
    import envpool

    from hpcdqn.rl.atari import AtariOptions
    from hpcdqn.rl.envs import make_env

    ep = envpool.make(env_id.split("/")[-1], env_type="gymnasium", num_envs=1, batch_size=1,
                      num_threads=1, seed=0, noop_max=1)
    ours = make_env(env_id, AtariOptions.from_config({"noop_max": 1}))
    ep.reset()
    ours.reset(seed=0)
    same = 0
    for a in np.random.default_rng(0).integers(0, ours.action_space.n, steps):
        x, *_ = ep.step(np.array([a]))
        y, *_ = ours.step(a)
        same += int(np.array_equal(x[0][-1], y[-1]))
    return {"steps": steps, "equal_observations": same}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env", default="ALE/Pong-v5")
    p.add_argument("--steps", type=int, default=8000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--num-envs", default="1,8")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "atari_envs.json"))
    a = p.parse_args()
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    import cv2

    cv2.setNumThreads(1)
    sides = dict(SIDES)
    try:
        import envpool  # noqa: F401
    except Exception as e:  # noqa: BLE001 - optional peer
        sides.pop("envpool")
        envpool_note = f"not importable: {e!r}"
    else:
        envpool_note = "importable"
    probe = hpcdqn_env(a.env, 1, 0)
    n_actions = int(probe.single_action_space.n)
    probe.close()
    counts = [int(x) for x in a.num_envs.split(",")]
    samples = {(s, n): [] for s in sides for n in counts}
    for _ in range(a.repeats):
        for n in counts:
            for side, make in sides.items():
                venv = make(a.env, n, 0)
                rng = np.random.default_rng(0)
                samples[(side, n)].append(steps_per_s(venv, n, a.steps, rng, n_actions))
                venv.close()
    res = {f"{s}_envs{n}": round(statistics.median(v), 1) for (s, n), v in samples.items()}
    ratios = {f"{s}_envs{n}_over_hpcdqn": round(res[f"{s}_envs{n}"] / res[f"hpcdqn_envs{n}"], 3)
              for (s, n) in samples if s != "hpcdqn"}
    out = {"benchmark": "atari_envs", "env": a.env, "core": core, "steps": a.steps,
           "repeats": a.repeats, "env_steps_per_s": res, "ratios": ratios,
           "envpool": envpool_note, "profile_hpcdqn_envs8": profile(a.env, a.steps)}
    if "envpool" in sides:
        out["envpool_agreement"] = envpool_agreement(a.env)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
