"""Replay on Atari Pong: the frame-stacked replay (each frame stored once, ``rl.framereplay``)
side by side with whole stacks (``ReplayBuffer``, obs and next_obs as given). One JSON document.

    python benchmarks/replay.py [--transitions 100000] [--num-envs 8] [--repeats 5]
                                [--before DIR] [--out benchmarks/results/replay.json]

Each layout runs in its own process, fed the same real Pong transitions: ``ALE/Pong-v5``
through ``rl.envs.make_vector_env`` (frameskip=1 + AtariPreprocessing + FrameStackObservation(4),
same-step autoreset), seeded random actions, the replay settings of configs/atari_pong.toml
(prioritized, n_step 3, gamma 0.99, buffer 100k).

- ``rss_per_transition``: VmRSS growth (``/proc/self/status``) from just before the buffer is
  built to when it holds ``--transitions`` transitions, divided by them; ``hwm_per_transition``
  the same for VmHWM (the peak). ``nbytes``: the buffer's own count; ``planned``: what the
  memory planner (``learner.budget``) reserves for it.
- ``add_us``: mean time of one ``add`` (one vector step of ``--num-envs`` envs).
- ``sample_ms``: ``sample(32)`` (n_step 3) on the full buffer, prioritized (the config) and
  uniform, median over ``--repeats`` rounds of 500 calls.
- ``--before DIR``: also run the whole-stack layout with the code in DIR (a checkout of the
  commit before the frame-stacked replay: ``git worktree add DIR dc4f9f6``), as ``stacks_before``.

Ratios: ``frames`` over ``stacks`` (and over ``stacks_before``). Timings on a busy machine are
noisy: re-run on a quiet one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def worker(layout: str, n: int, num_envs: int, repeats: int) -> dict:
    import numpy as np

    from hpcdqn.rl.envs import final_next_obs, make_vector_env
    from hpcdqn.rl.replay import ReplayBuffer

    env = make_vector_env("ALE/Pong-v5", num_envs, seed=1)
    obs = env.reset(seed=1)[0]
    kw = dict(n_step=3, gamma=0.99, prioritized=True, alpha=0.6, seed=0)
    rss0, hwm0 = status_kb("VmRSS"), status_kb("VmHWM")
    if layout == "frames":
        from hpcdqn.rl.framereplay import make_replay, replay_nbytes

        buf = make_replay(n, num_envs, obs.shape[1:], obs.dtype, 4, **kw)
        planned = replay_nbytes(n, num_envs, obs.shape[1:], obs.dtype, 3, True, 4)
    else:
        buf = ReplayBuffer(n, num_envs, obs.shape[1:], obs.dtype, **kw)
        planned = ReplayBuffer.nbytes_for(n, num_envs, obs.shape[1:], obs.dtype, 3, True)
    rng = np.random.default_rng(0)
    t_add, episodes = 0.0, 0
    for _ in range(n // num_envs):
        a = rng.integers(0, 6, num_envs)
        nxt, r, term, trunc, info = env.step(a)
        real = final_next_obs(nxt, term | trunc, info)
        t = time.perf_counter()
        buf.add(obs, a, r, real, term, trunc)
        t_add += time.perf_counter() - t
        episodes += int((term | trunc).sum())
        obs = nxt
    rss, hwm = status_kb("VmRSS"), status_kb("VmHWM")
    stored = len(buf)
    out = {"layout": layout, "transitions": stored, "episodes_ended": episodes,
           "rss_growth_bytes": rss - rss0, "rss_per_transition": round((rss - rss0) / stored, 1),
           "hwm_per_transition": round((hwm - hwm0) / stored, 1), "nbytes": buf.nbytes,
           "nbytes_per_transition": round(buf.nbytes / stored, 1), "planned": planned,
           "add_us": round(1e6 * t_add / (n // num_envs), 1)}
    out["sample_ms"] = {}
    for mode in ("prioritized", "uniform"):
        tree = buf.tree
        if mode == "uniform":
            buf.tree = None
        rounds = []
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(500):
                buf.sample(32, 0.4)
            rounds.append((time.perf_counter() - t) / 500 * 1e3)
        buf.tree = tree
        out["sample_ms"][mode] = round(statistics.median(rounds), 4)
    env.close()
    return out


def run(layout: str, args, code: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(code), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, __file__, "--worker", layout, "--transitions",
                        str(args.transitions), "--num-envs", str(args.num_envs), "--repeats",
                        str(args.repeats)], capture_output=True, text=True, env=env, cwd=code,
                       timeout=3600)
    if r.returncode:
        raise SystemExit(f"{layout} worker failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--transitions", type=int, default=100_000)
    ap.add_argument("--num-envs", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--before", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "replay.json")
    ap.add_argument("--worker", default=None)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.transitions, args.num_envs, args.repeats)))
        return
    res = {"frames": run("frames", args, ROOT), "stacks": run("stacks", args, ROOT)}
    if args.before:
        res["stacks_before"] = run("stacks", args, args.before.resolve())
    f = res["frames"]
    for other in [k for k in res if k != "frames"]:
        o = res[other]
        res[f"frames_vs_{other}"] = {
            "rss": round(f["rss_per_transition"] / o["rss_per_transition"], 4),
            **{f"sample_{m}": round(f["sample_ms"][m] / o["sample_ms"][m], 3)
               for m in f["sample_ms"]}}
    res["target_rss_per_transition_le_7500"] = f["rss_per_transition"] <= 7500
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
