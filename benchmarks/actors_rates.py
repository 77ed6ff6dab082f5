"""Rates of actor ranks and learner ranks on Pong with the Nature CNN (configs/atari_pong.toml:
frame skip 4, 84x84 frames, stacks of 4; the actors send each frame once, ``hpcdqn.actors.frames``).

- ``actor_core``: one actor core (one process pinned to one CPU, ``taskset``, torch 1 thread):
  ``num_envs`` Pong envs stepped with batched greedy inference of the Nature CNN (epsilon 0.01,
  so nearly every step runs the network) and every ``actor.send_every`` steps packed into a
  FRAMES message, as an actor rank does (no MPI: the send itself is left out). Env steps/s and
  frames/s (x frame skip 4);
- ``sync_learner``: the learner with its replay full (``buffer_size = learning_starts``) and no
  actors: ``mpirun -n 1`` sync training, timing ``Trainer.learn`` (sampling and updates) only;
- ``actors_1_1``: ``mpirun -n 2 hpcdqn train actors=1`` (1 learner + 1 actor), the same config:
  the learner's updates/s over its ``learn`` time, and over ``learn`` + receiving and inserting
  the actor's frames (the ingestion overhead), and the job's env steps/s;
- ``sync_dp2``: ``mpirun -n 2 hpcdqn train`` (2 env+learner ranks), the same config and replay
  ratio: the job's env steps/s (equal cores to ``actors_1_1``).

Interleaved repeats (one of each per round), every run under ``flock /tmp/hpcdqn-cpu.lock
/tmp/prio.sh`` where those exist; median and spread; commit and load average recorded.

    python benchmarks/actors_rates.py [--repeats 3] [--out FILE]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "atari_pong.toml")
# global env steps: learning starts once the replay is full; replay ratio 8 (the config's)
COMMON = ["total_steps=6000", "dqn.learning_starts=2000", "dqn.buffer_size=2000", "eval.episodes=0",
          "checkpoint_every=0", "log.progress=false", "log.tensorboard=false", "seed=7",
          "actor.send_every=8"]
ACTOR_ENVS = (8, 16)
ACTOR_STEPS = 400


def locked(cmd: list[str]) -> list[str]:
    pre = ["flock", "/tmp/hpcdqn-cpu.lock"] if Path("/tmp/hpcdqn-cpu.lock").exists() else []
    return pre + (["/tmp/prio.sh"] if Path("/tmp/prio.sh").exists() else []) + cmd


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMPI_ALLOW_RUN_AS_ROOT": "1",
            "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMPI_MCA_rmaps_base_oversubscribe": "1"}


def mpirun(n: int, args: list[str]) -> list[str]:
    return ["mpirun", "-n", str(n), "--bind-to", "none", sys.executable, *args]


def last_json(cmd: list[str]) -> dict:
    load = Path("/proc/loadavg").read_text().split()[:3]
    r = subprocess.run(locked(cmd), capture_output=True, text=True, env=env(), timeout=900)
    if r.returncode:
        raise RuntimeError(f"{cmd}: exit {r.returncode}\n{r.stderr[-3000:]}")
    return {**json.loads(r.stdout.strip().splitlines()[-1]), "loadavg": load}


# -- the measurements (each in its own process) ---------------------------------------------------
def actor_core(num_envs: int, steps: int) -> dict:
    """One actor core's loop, in this process."""
    import numpy as np
    import torch

    from hpcdqn.actors.actor import actor_feed
    from hpcdqn.config import load_config
    from hpcdqn.parallel.flat import FlatModule
    from hpcdqn.rl.envs import make_vector_env
    from hpcdqn.rl.losses import greedy_actions, make_loss
    from hpcdqn.rl.networks import network_layers
    from hpcdqn.rl.rollout import Rollout

    torch.set_num_threads(1)
    cfg = load_config(CONFIG, [f"num_envs={num_envs}", "actor.send_every=8"])
    venv = make_vector_env(cfg["env_id"], num_envs, 5, "sync", cfg["atari"])
    space, n_act = venv.single_observation_space, int(venv.single_action_space.n)
    net = FlatModule(network_layers(cfg["network"], space.shape, n_act, seed=0, meta=False))
    loss = make_loss(cfg["dqn"], cfg["network"])
    r = Rollout(venv, np.random.default_rng(0), venv.reset(seed=5)[0])
    sink, wire = actor_feed(cfg, venv)
    split, batch, nbytes = {"env_s": 0.0, "inference_s": 0.0, "pack_s": 0.0}, [], 0
    for i in range(steps + 20):
        if i == 20:                                  # after a warm-up
            split, nbytes, t_start = dict.fromkeys(split, 0.0), 0, time.perf_counter()
        t0 = time.perf_counter()
        explore, rand = r.explore(0.01)
        with torch.no_grad():
            greedy = None if explore.all() else greedy_actions(net(torch.as_tensor(r.obs)), loss).numpy()
        t1 = time.perf_counter()
        r.step(r.choose(explore, rand, greedy), sink)
        t2 = time.perf_counter()
        batch.append(sink.done)
        if len(batch) == 8:
            nbytes += wire.pack_data(0, [num_envs] * 8, batch, []).nbytes
            batch = []
        t3 = time.perf_counter()
        split["inference_s"] += t1 - t0
        split["env_s"] += t2 - t1
        split["pack_s"] += t3 - t2
    wall = time.perf_counter() - t_start
    sps = steps * num_envs / wall
    return {"num_envs": num_envs, "env_steps": steps * num_envs, "wall_s": round(wall, 3),
            "env_steps_per_s": round(sps, 1), "frames_per_s": round(4 * sps, 1),
            "bytes_per_env_step": round(nbytes / max(1, (steps // 8) * 8 * num_envs), 1),
            **{k: round(v, 3) for k, v in split.items()}}


def sync_learner(overrides: list[str]) -> dict:
    """Sync training on one rank, ``Trainer.learn`` timed (under mpirun -n 1)."""
    from hpcdqn.config import load_config
    from hpcdqn.train import Trainer

    class Timed(Trainer):
        learn_s = 0.0

        def learn(self):
            t = time.perf_counter()
            super().learn()
            self.learn_s += time.perf_counter() - t

    tr = Timed(load_config(CONFIG, overrides), quiet=True)
    s = tr.run()
    return {"updates": s["updates"], "learn_s": round(tr.learn_s, 3), "sps": s["sps"],
            "updates_per_learn_s": round(s["updates"] / tr.learn_s, 2),
            "replay_filled": len(tr.replay), "replay_capacity": tr.replay.capacity}


def run_kind(kind: str, tmp: Path) -> dict:
    if kind == "actor_core":
        out = {}
        for e in ACTOR_ENVS:
            cmd = ["taskset", "-c", "1", sys.executable, __file__, "--actor-core", str(e)]
            out[f"envs_{e}"] = last_json(cmd)
        return out
    rd = [f"run_dir={tmp / kind}", "overwrite=true"]
    if kind == "sync_learner":
        return last_json(mpirun(1, [__file__, "--sync-learner", *COMMON, *rd]))
    if kind == "sync_dp2":
        s = last_json(mpirun(2, ["-m", "hpcdqn.cli", "train", "--config", CONFIG, *COMMON, *rd]))
        return {"sps": s["sps"], "wall_s": s["wall_s"], "updates": s["updates"],
                "replay_ratio": s["schedule"]["replay_ratio"], "loadavg": s["loadavg"]}
    s = last_json(mpirun(2, ["-m", "hpcdqn.cli", "train", "--config", CONFIG, "actors=1",
                             *COMMON, *rd]))
    ln, ac = s["ranks"][0], s["ranks"][1]
    busy = ln["learn_s"] + ln["receive_insert_s"]
    return {"sps": s["sps"], "wall_s": s["wall_s"], "updates": s["updates"],
            "replay_ratio": s["schedule"]["replay_ratio"],
            "replay_ratio_achieved": s["replay_ratio_achieved"], "loadavg": s["loadavg"],
            "learner": ln, "actor": ac,
            "updates_per_learn_s": round(s["updates"] / ln["learn_s"], 2),
            "updates_per_busy_s": round(s["updates"] / busy, 2),
            "ingestion_share_of_busy": round(ln["receive_insert_s"] / busy, 4),
            "actor_env_steps_per_busy_s": round(
                ac["env_steps"] * 4 / (ac["env_s"] + ac["inference_s"] + ac["send_s"]), 1)}


def spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def summarize(runs: dict) -> dict:
    st = {f"actor_core_envs_{e}_frames_per_s": spread([r[f"envs_{e}"]["frames_per_s"]
                                                      for r in runs["actor_core"]])
          for e in ACTOR_ENVS}
    st["sync_learner_updates_per_s"] = spread([r["updates_per_learn_s"] for r in runs["sync_learner"]])
    a = runs["actors_1_1"]
    st["fed_learner_updates_per_learn_s"] = spread([r["updates_per_learn_s"] for r in a])
    st["fed_learner_updates_per_busy_s"] = spread([r["updates_per_busy_s"] for r in a])
    st["ingestion_share_of_busy"] = spread([r["ingestion_share_of_busy"] for r in a])
    st["actors_1_1_env_steps_per_s"] = spread([r["sps"] for r in a])
    st["sync_dp2_env_steps_per_s"] = spread([r["sps"] for r in runs["sync_dp2"]])
    med = {k: v["median"] for k, v in st.items()}
    st["overhead_vs_sync_learner"] = round(
        1 - med["fed_learner_updates_per_busy_s"] / med["sync_learner_updates_per_s"], 4)
    st["actors_over_sync_dp2"] = round(med["actors_1_1_env_steps_per_s"]
                                       / med["sync_dp2_env_steps_per_s"], 3)
    return st


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/actors_rates.json"))
    ap.add_argument("--actor-core", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--sync-learner", action="store_true", help=argparse.SUPPRESS)
    a, rest = ap.parse_known_args()
    if a.actor_core:
        print(json.dumps(actor_core(a.actor_core, ACTOR_STEPS)))
        return
    if a.sync_learner:
        res = sync_learner(rest)
        from mpi4py import MPI
        if MPI.COMM_WORLD.Get_rank() == 0:
            print(json.dumps(res))
        return
    tmp = Path(tempfile.mkdtemp(prefix="hpcdqn-actors-rates-"))
    kinds = ("actor_core", "sync_learner", "actors_1_1", "sync_dp2")
    runs = {k: [] for k in kinds}
    for i in range(a.repeats):                   # interleaved: one of each per round
        for k in kinds:
            runs[k].append(run_kind(k, tmp))
            print(k, json.dumps(runs[k][-1])[:400], flush=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    res = {"benchmark": "actors_rates", "commit": commit, "cpus": os.cpu_count(),
           "config": "configs/atari_pong.toml", "overrides": COMMON, "repeats": a.repeats,
           "actor_steps": ACTOR_STEPS, "stats": summarize(runs), "runs": runs}
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res["stats"], indent=1))


if __name__ == "__main__":
    main()
