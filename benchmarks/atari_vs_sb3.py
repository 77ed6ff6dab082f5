"""hpcdqn vs Stable-Baselines3 DQN on Pong: env steps/s while learning and replay memory, side by
side in one run, one thread each; and hpcdqn on 2 ranks (weak scaling) against 1.

    python benchmarks/atari_vs_sb3.py [--steps 25000] [--learning-starts 5000] [--repeats 1]

Identical hyperparameters on both sides (rl-baselines3-zoo's Atari DQN, at a short length): the
Nature CNN, plain DQN (no double, no dueling, 1-step, uniform replay), batch 32, one update every
4 env steps, buffer 100k transitions, Adam lr 1e-4, target synced every 1000 env steps, Huber
loss, grad-norm clip 10, epsilon 1 -> 0.01 over 10% of the run, uniform actions before
``learning_starts``; one env, the standard preprocessing (noop starts, frame skip 4 with max over
the last two frames, 84x84 grayscale, stack 4, episodic life, reward clipping, fire reset).
SB3: ``make_atari_env("PongNoFrameskip-v4")`` + ``VecFrameStack(4)``, ``DQN("CnnPolicy",
optimize_memory_usage=False)`` (its default; it stores obs and next_obs, full stacks). hpcdqn:
``hpcdqn train --config configs/atari_pong.toml`` with the same values (its replay stores each
frame once). ``tests/rl/test_atari_vs_sb3.py`` checks the two preprocessings step for step.

Each run is a fresh process with ``torch.set_num_threads(1)`` (hpcdqn: ``threads=1``), one core
of work each, run one after the other. Measured:
- env steps/s while learning: env steps from ``learning_starts`` to the end over the wall time
  between them (hpcdqn: its metrics rows; SB3: a callback's clock);
- replay memory: RSS growth per stored transition while learning, (RSS at the end - RSS at
  ``learning_starts``) / the env steps in between, from ``/proc/self/status`` VmRSS (hpcdqn: its
  metrics rows' ``rss_mb``, rank 0; SB3: a callback). Both replays are preallocated and their
  pages touched as they fill (SB3 ``np.zeros``, hpcdqn the same), so this slope is what one more
  transition costs; fixed costs (network, optimizer, interpreter) cancel. Peak RSS is reported too.
- weak scaling: ``mpirun -n 2 hpcdqn train`` with the same work per rank (``scaling.rule=sqrt_lr``:
  batch 32 per replica, one update of the global batch 64 every 8 global env steps, i.e. every 4
  of each replica's; twice the global steps, buffer and warm-up), global env steps/s against one
  rank's. 2 ranks on this machine's 2 cores.
Prints one JSON object and writes it to benchmarks/results/atari_vs_sb3.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HP = dict(lr=1e-4, batch=32, buffer=100_000, train_freq=4, gradient_steps=1, target=1000,
          gamma=0.99, exploration_fraction=0.1, final_eps=0.01, max_grad_norm=10)


def rss_bytes(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def hpcdqn_args(steps: int, starts: int, run_dir: str, dp: int = 1) -> list[str]:
    h = HP
    return ["train", "--config", str(ROOT / "configs" / "atari_pong.toml"),
            f"total_steps={steps * dp}", f"dqn.learning_starts={starts * dp}",
            f"dqn.buffer_size={h['buffer'] * dp}", f"dqn.batch_size={h['batch']}",
            f"dqn.train_frequency={h['train_freq']}", f"dqn.gradient_steps={h['gradient_steps']}",
            f"dqn.target_update_every={h['target']}", f"dqn.lr={h['lr']}", "dqn.lr_final_fraction=1.0",
            "dqn.double=false", "dqn.n_step=1", "network.dueling=false", "replay.prioritized=false",
            f"dqn.gamma={h['gamma']}", f"dqn.max_grad_norm={h['max_grad_norm']}",
            f"dqn.exploration_fraction={h['exploration_fraction']}", f"dqn.epsilon_end={h['final_eps']}",
            "dqn.uniform_warmup=true", "scaling.rule=sqrt_lr", "num_envs=1", "threads=1", "seed=1",
            "eval.episodes=0", "checkpoint=false", "log.every=1000", "log.progress=false",
            "log.tensorboard=false", f"run_dir={run_dir}", "overwrite=true"]


def one_hpcdqn(steps: int, starts: int, dp: int = 1) -> dict:
    run = tempfile.mkdtemp(prefix="hpcdqn-atari-")
    cmd = [sys.executable, "-m", "hpcdqn.cli", *hpcdqn_args(steps, starts, run, dp)]
    if dp > 1:
        cmd = ["mpirun", "-n", str(dp), "--bind-to", "core"] + cmd
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", PYTHONPATH=str(ROOT))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if r.returncode:
        raise SystemExit(r.stderr[-4000:])
    s = json.loads((Path(run) / "summary.json").read_text())
    with open(Path(run) / "metrics.csv", newline="") as fh:
        rows = [(int(x["env_steps"]), float(x["wall_s"]), float(x["rss_mb"]) * 2**20)
                for x in csv.DictReader(fh)]
    t0, rss0 = next((w, m) for e, w, m in rows if e >= starts * dp)   # the row at learning_starts
    e1, t1, rss1 = rows[-1]
    mem = s["memory_per_rank"]
    shutil.rmtree(run, ignore_errors=True)
    return {"side": f"hpcdqn dp={dp}", "env_steps": s["env_steps"], "updates": s["updates"],
            "learning_sps": (e1 - starts * dp) / (t1 - t0), "wall_s": s["wall_s"],
            "rss_growth_bytes": rss1 - rss0, "rss_growth_per_transition": (rss1 - rss0) / (steps - starts),
            "peak_rss": max(m["peak_rss"] for m in mem),
            "compute_share": s.get("time_split", {}).get("shares", {}).get("compute")}


def one_sb3(steps: int, starts: int) -> dict:
    """Runs in its own process (``--one sb3``)."""
    import gymnasium as gym
    import torch
    from stable_baselines3 import DQN
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_atari_env
    from stable_baselines3.common.vec_env import VecFrameStack

    import ale_py
    gym.register_envs(ale_py)
    torch.set_num_threads(1)
    h = HP
    env = VecFrameStack(make_atari_env("PongNoFrameskip-v4", n_envs=1, seed=1), 4)
    model = DQN("CnnPolicy", env, learning_rate=h["lr"], buffer_size=h["buffer"],
                learning_starts=starts, batch_size=h["batch"], train_freq=h["train_freq"],
                gradient_steps=h["gradient_steps"], target_update_interval=h["target"],
                gamma=h["gamma"], exploration_fraction=h["exploration_fraction"],
                exploration_final_eps=h["final_eps"], max_grad_norm=h["max_grad_norm"],
                optimize_memory_usage=False, seed=1, device="cpu", verbose=0)

    class Clock(BaseCallback):
        t_start = rss_start = None

        def _on_step(self) -> bool:
            if self.num_timesteps == starts:
                self.t_start, self.rss_start = time.perf_counter(), rss_bytes("VmRSS")
            return True

    clock = Clock()
    model.learn(steps, callback=clock)
    t_end = time.perf_counter()
    growth = rss_bytes("VmRSS") - clock.rss_start
    return {"side": "sb3", "env_steps": int(model.num_timesteps), "updates": int(model._n_updates),
            "learning_sps": (steps - starts) / (t_end - clock.t_start),
            "rss_growth_bytes": growth, "rss_growth_per_transition": growth / (steps - starts),
            "peak_rss": rss_bytes("VmHWM")}


def sb3_in_process(steps: int, starts: int) -> dict:
    r = subprocess.run([sys.executable, __file__, "--one", "sb3", "--steps", str(steps),
                        "--learning-starts", str(starts)], capture_output=True, text=True,
                       timeout=3600)
    if r.returncode:
        raise SystemExit(r.stderr[-4000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else 0.5 * (xs[len(xs) // 2 - 1] + xs[len(xs) // 2])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=25_000, help="env steps per rank")
    ap.add_argument("--learning-starts", type=int, default=5_000, help="per rank")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--one", choices=["sb3"], help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "atari_vs_sb3.json"))
    a = ap.parse_args()
    if a.one == "sb3":
        print(json.dumps(one_sb3(a.steps, a.learning_starts)))
        return
    runs = []
    for _ in range(a.repeats):          # the sides alternate within each repeat
        runs.append(sb3_in_process(a.steps, a.learning_starts))
        runs.append(one_hpcdqn(a.steps, a.learning_starts, 1))
        runs.append(one_hpcdqn(a.steps, a.learning_starts, 2))
        print(json.dumps(runs[-3:]), file=sys.stderr, flush=True)
    side = {k: [r for r in runs if r["side"] == k] for k in ("sb3", "hpcdqn dp=1", "hpcdqn dp=2")}
    med = {k: {m: median([r[m] for r in v]) for m in ("learning_sps", "rss_growth_per_transition")}
           for k, v in side.items()}
    out = {"benchmark": "atari_vs_sb3", "env": "Pong (ALE), SB3 AtariWrapper protocol",
           "steps_per_rank": a.steps, "learning_starts_per_rank": a.learning_starts,
           "threads_per_process": 1, "cores": os.cpu_count(), "hyperparameters": HP,
           "runs": runs, "median": med,
           "ratio_learning_sps_hpcdqn_vs_sb3": round(
               med["hpcdqn dp=1"]["learning_sps"] / med["sb3"]["learning_sps"], 3),
           "ratio_replay_memory_hpcdqn_vs_sb3": round(
               med["hpcdqn dp=1"]["rss_growth_per_transition"]
               / med["sb3"]["rss_growth_per_transition"], 3),
           "weak_scaling_2_ranks_vs_1": round(
               med["hpcdqn dp=2"]["learning_sps"] / med["hpcdqn dp=1"]["learning_sps"], 3),
           "targets": {"sps_ratio_at_least": 1.5, "memory_ratio_at_most": 0.3,
                       "weak_scaling_at_least": 1.8}}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
