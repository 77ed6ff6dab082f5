"""hpcdqn vs Stable-Baselines3 DQN on MinAtar Breakout: env steps/s while learning and the return
at equal frames, side by side, one torch thread each, interleaved repeats.

    python benchmarks/minatar.py [--frames 100000] [--repeats 3] [--game Breakout]
                                 [--lock FILE] [--out benchmarks/results/minatar_vs_sb3.json]

Same env, network and hyperparameters on both sides: ``MinAtar/<Game>-v0`` (all 6 actions,
sticky actions 0.1, difficulty ramping; observations as (C, 10, 10) uint8 through hpcdqn's
``MinAtarObservation`` on both sides), the MinAtar paper's CNN (Conv 16x3x3 stride 1 -> ReLU ->
FC 128 -> ReLU -> Linear(A); SB3: a custom features extractor + ``net_arch=[]``), the paper's
DQN: batch 32, replay 100k, one update per frame after 5000 uniform-random frames, target synced
every 1000 frames, centred RMSprop (lr 2.5e-4, alpha 0.95, eps 0.01), Huber loss, gamma 0.99,
no double DQN, 1-step, no gradient clipping (SB3 always clips: its max_grad_norm is set to
1e10). Exploration: epsilon 1 -> 0.1 linearly over the first 100k frames counted from frame 0
on both sides (SB3 cannot start the anneal after its warm-up, as the paper and
``configs/minatar_*.toml`` do: ``dqn.exploration_after_warmup=false`` here for equality).

Each run is a fresh process, ``torch.set_num_threads(1)`` (hpcdqn: ``threads=1``); the sides
alternate within each repeat, each run optionally under ``flock FILE`` so no other locked job
shares the machine. Measured per run: env steps/s while learning (frames from the end of the
warm-up to the end over the wall time in between: hpcdqn from its metrics rows, SB3 from a
callback's clock) and the mean return of the last 100 training episodes (hpcdqn: the newest
metrics rows holding >= 100 episodes). Replay memory: each side's replay filled with the same
100k real transitions in its own process, RSS growth per transition. The JSON also records
the load average before and after each run, the commit and the machine's cores.
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
# this file's folder comes first on sys.path when it runs as a script, and its name would hide
# the minatar package: take the folder off
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
HP = dict(lr=2.5e-4, batch=32, buffer=100_000, learning_starts=5000, train_freq=1,
          gradient_steps=1, target=1000, gamma=0.99, exploration_steps=100_000, final_eps=0.1,
          rmsprop_alpha=0.95, rmsprop_eps=0.01, centered=True, hidden=128)


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def commit() -> str:
    r = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def hpcdqn_args(game: str, frames: int, seed: int, run_dir: str) -> list[str]:
    h = HP
    return ["train", "--config", str(ROOT / "configs" / "minatar_breakout.toml"),
            f"env_id=MinAtar/{game}-v0", f"total_steps={frames}", f"seed={seed}",
            f"dqn.lr={h['lr']}", f"dqn.batch_size={h['batch']}", f"dqn.buffer_size={h['buffer']}",
            f"dqn.learning_starts={h['learning_starts']}", f"dqn.train_frequency={h['train_freq']}",
            f"dqn.gradient_steps={h['gradient_steps']}", f"dqn.target_update_every={h['target']}",
            f"dqn.exploration_steps={h['exploration_steps']}", "dqn.exploration_after_warmup=false",
            f"dqn.epsilon_end={h['final_eps']}", "threads=1", "num_envs=1", "eval.episodes=0",
            "checkpoint=false", "log.every=1000", "log.progress=false", "log.tensorboard=false",
            f"run_dir={run_dir}", "overwrite=true"]


def last_episodes_return(table: list[dict], at_least: int = 100) -> float | None:
    """The mean training return of the episodes in the newest metrics rows that hold at least
    ``at_least`` episodes (each row: the mean over the episodes that ended since the last row;
    its ``episodes`` column counts them cumulatively): the paper's "final 100 episodes", to the
    granularity of the log rows."""
    total = n = 0.0
    prev = [0] + [int(r["episodes"]) for r in table[:-1]]
    for r, before in zip(reversed(table), reversed(prev)):
        k = int(r["episodes"]) - before
        if k > 0:
            total += k * float(r["episodic_return"])
            n += k
        if n >= at_least:
            break
    return total / n if n else None


def locked(cmd: list[str], lock: str | None) -> list[str]:
    return ["flock", lock, *cmd] if lock else cmd


def one_hpcdqn(game: str, frames: int, seed: int, lock: str | None, dp: int = 1) -> dict:
    """One hpcdqn run; ``dp`` > 1: ``mpirun -n dp`` with the same global frames (strong scaling:
    the default sqrt_lr rule, batch 32 per replica, 1/dp of the updates)."""
    run = tempfile.mkdtemp(prefix="hpcdqn-minatar-")
    cmd = [sys.executable, "-m", "hpcdqn.cli", *hpcdqn_args(game, frames, seed, run)]
    if dp > 1:
        cmd = ["mpirun", "-n", str(dp), *cmd]
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", PYTHONPATH=str(ROOT))
    load0 = loadavg()
    r = subprocess.run(locked(cmd, lock), capture_output=True, text=True, env=env, timeout=7200)
    if r.returncode:
        raise SystemExit(r.stderr[-4000:])
    s = json.loads((Path(run) / "summary.json").read_text())
    with open(Path(run) / "metrics.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    rows = [(int(x["env_steps"]), float(x["wall_s"])) for x in table]
    starts = HP["learning_starts"]
    e0, t0 = next((e, w) for e, w in rows if e >= starts)
    e1, t1 = rows[-1]
    shutil.rmtree(run, ignore_errors=True)
    return {"side": "hpcdqn" if dp == 1 else f"hpcdqn dp={dp}", "seed": seed, "env_steps": s["env_steps"], "updates": s["updates"],
            "learning_sps": (e1 - e0) / (t1 - t0), "wall_s": s["wall_s"],
            "return_last_100": last_episodes_return(table),
            "loadavg_before": load0, "loadavg_after": loadavg()}


def sb3_extractor():
    import torch
    from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

    class MinAtarCNN(BaseFeaturesExtractor):
        """The MinAtar paper's trunk: Conv 16x3x3 stride 1 -> ReLU -> FC 128 -> ReLU."""

        def __init__(self, observation_space, features_dim: int = HP["hidden"]):
            super().__init__(observation_space, features_dim)
            c, h, w = observation_space.shape
            self.net = torch.nn.Sequential(
                torch.nn.Conv2d(c, 16, 3, stride=1), torch.nn.ReLU(), torch.nn.Flatten(),
                torch.nn.Linear(16 * (h - 2) * (w - 2), features_dim), torch.nn.ReLU())

        def forward(self, x):
            return self.net(x.float())

    return MinAtarCNN


def one_sb3(game: str, frames: int, seed: int) -> dict:
    """Runs in its own process (``--one sb3``)."""
    import numpy as np
    import torch
    from stable_baselines3 import DQN
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.monitor import Monitor

    from hpcdqn.rl import minatar

    torch.set_num_threads(1)
    h = HP
    env = Monitor(minatar.make(f"MinAtar/{game}-v0"))
    model = DQN("MlpPolicy", env, learning_rate=h["lr"], buffer_size=h["buffer"],
                learning_starts=h["learning_starts"], batch_size=h["batch"],
                train_freq=h["train_freq"], gradient_steps=h["gradient_steps"],
                target_update_interval=h["target"], gamma=h["gamma"],
                exploration_fraction=h["exploration_steps"] / frames, exploration_initial_eps=1.0,
                exploration_final_eps=h["final_eps"], max_grad_norm=1e10,
                policy_kwargs=dict(features_extractor_class=sb3_extractor(), net_arch=[],
                                   normalize_images=False, optimizer_class=torch.optim.RMSprop,
                                   optimizer_kwargs=dict(alpha=h["rmsprop_alpha"],
                                                         eps=h["rmsprop_eps"],
                                                         centered=h["centered"])),
                optimize_memory_usage=False, seed=seed, device="cpu", verbose=0)

    class Clock(BaseCallback):
        t_start = None

        def _on_step(self) -> bool:
            if self.num_timesteps == h["learning_starts"]:
                self.t_start = time.perf_counter()
            return True

    clock = Clock()
    model.learn(frames, callback=clock)
    t_end = time.perf_counter()
    rets = env.get_episode_rewards()
    return {"side": "sb3", "seed": seed, "env_steps": int(model.num_timesteps),
            "updates": int(model._n_updates),
            "learning_sps": (frames - h["learning_starts"]) / (t_end - clock.t_start),
            "return_last_100": float(np.mean(rets[-100:])) if rets else None,
            "episodes": len(rets)}


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not in /proc/self/status")


def one_memory(side: str, game: str, n: int) -> dict:
    """Runs in its own process (``--one mem-hpcdqn`` / ``--one mem-sb3``): RSS growth from just
    before the replay is made until ``n`` real transitions (random actions) filled it, per
    transition, from the OS (VmRSS). (From before it is made: hpcdqn's ``next_obs`` comes from
    ``np.zeros_like``, which touches its pages at once.)"""
    import numpy as np

    from hpcdqn.rl import minatar

    env = minatar.make(f"MinAtar/{game}-v0")
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    steps = []
    obs = env.observation(env.unwrapped.game.state())
    for _ in range(n):           # the transitions first, packed (bits), so they cost ~nothing
        a = int(rng.integers(6))
        nxt, r, term, trunc, _ = env.step(a)
        steps.append((np.packbits(obs), a, r, np.packbits(nxt), term))
        obs = env.reset()[0] if term or trunc else nxt
    shape = env.observation_space.shape
    unpack = (lambda b: np.unpackbits(b)[:int(np.prod(shape))].reshape(shape))
    if side == "hpcdqn":
        from hpcdqn.rl.replay import ReplayBuffer
        before = rss_bytes()
        rb = ReplayBuffer(n, 1, shape, np.uint8)
        for o, a, r, x, t in steps:
            rb.add(unpack(o)[None], np.array([a]), np.array([r]), unpack(x)[None], np.array([t]),
                   np.array([False]))
    else:
        import gymnasium as gym
        from stable_baselines3.common.buffers import ReplayBuffer
        before = rss_bytes()
        rb = ReplayBuffer(n, env.observation_space, gym.spaces.Discrete(6), device="cpu",
                          optimize_memory_usage=False)
        for o, a, r, x, t in steps:
            rb.add(unpack(o)[None], unpack(x)[None], np.array([a]), np.array([r]), np.array([t]),
                   [{}])
    growth = rss_bytes() - before
    return {"side": side, "transitions": n, "rss_growth_bytes": growth,
            "bytes_per_transition": growth / n, "obs_dtype": str(rb.observations.dtype
                                                               if side == "sb3" else rb.obs.dtype)}


def memory_in_process(side: str, game: str, n: int) -> dict:
    cmd = [sys.executable, __file__, "--one", f"mem-{side}", "--game", game, "--frames", str(n)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if r.returncode:
        raise SystemExit(r.stderr[-4000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def sb3_in_process(game: str, frames: int, seed: int, lock: str | None) -> dict:
    load0 = loadavg()
    cmd = [sys.executable, __file__, "--one", "sb3", "--game", game, "--frames", str(frames),
           "--seed", str(seed)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(locked(cmd, lock), capture_output=True, text=True, timeout=7200, env=env)
    if r.returncode:
        raise SystemExit(r.stderr[-4000:])
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return {**out, "loadavg_before": load0, "loadavg_after": loadavg()}


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else 0.5 * (xs[len(xs) // 2 - 1] + xs[len(xs) // 2])


def summarize(runs: list[dict], key: str) -> dict:
    xs = [r[key] for r in runs if r.get(key) is not None]
    return {"median": median(xs), "min": min(xs), "max": max(xs), "n": len(xs)} if xs else {}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--game", default="Breakout")
    ap.add_argument("--frames", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1, help="repeat i uses seed + i")
    ap.add_argument("--lock", help="run each side's run under `flock LOCK`")
    ap.add_argument("--dp2", action="store_true",
                    help="also hpcdqn on 2 ranks (mpirun -n 2, same global frames) per repeat")
    ap.add_argument("--one", choices=["sb3", "mem-hpcdqn", "mem-sb3"], help=argparse.SUPPRESS)
    ap.add_argument("--memory-transitions", type=int, default=100_000,
                    help="replay memory measurement: transitions stored (0: skip)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "minatar_vs_sb3.json"))
    a = ap.parse_args()
    if a.one == "sb3":
        print(json.dumps(one_sb3(a.game, a.frames, a.seed)))
        return
    if a.one:
        print(json.dumps(one_memory(a.one[4:], a.game, a.frames)))
        return
    memory = [memory_in_process(side, a.game, a.memory_transitions)
              for side in ("hpcdqn", "sb3")] if a.memory_transitions else []
    runs = []
    for i in range(a.repeats):              # the sides alternate within each repeat
        order = [one_hpcdqn, sb3_in_process] if i % 2 == 0 else [sb3_in_process, one_hpcdqn]
        if a.dp2:
            order.append(lambda *args: one_hpcdqn(*args, dp=2))
        for fn in order:
            runs.append(fn(a.game, a.frames, a.seed + i, a.lock))
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    sides = ("hpcdqn", "sb3") + (("hpcdqn dp=2",) if a.dp2 else ())
    side = {k: [r for r in runs if r["side"] == k] for k in sides}
    sps = {k: summarize(v, "learning_sps") for k, v in side.items()}
    out = {"benchmark": "minatar_vs_sb3", "env": f"MinAtar/{a.game}-v0", "frames": a.frames,
           "repeats": a.repeats, "threads_per_process": 1, "cores": os.cpu_count(),
           "commit": commit(), "hyperparameters": HP, "replay_memory": memory,
           "runs": runs, "learning_sps": sps,
           "return_last_100": {k: summarize(v, "return_last_100") for k, v in side.items()},
           "ratio_learning_sps_hpcdqn_vs_sb3": round(sps["hpcdqn"]["median"] / sps["sb3"]["median"], 3),
           "target": {"sps_ratio_at_least": 3.0}}
    if a.dp2:
        out["ratio_learning_sps_dp2_vs_dp1"] = round(sps["hpcdqn dp=2"]["median"]
                                                     / sps["hpcdqn"]["median"], 3)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
