"""The training loop: env -> replay -> batch -> (pipeline) -> loss -> allreduce -> optimizer.

Every data-parallel replica runs this loop in lockstep: it steps its own vector envs, fills its
own replay shard and trains on its own minibatches; the learner averages gradients across
replicas, so all replicas apply the same update. ``total_steps`` counts env steps over all
replicas; ``batch_size``, ``buffer_size``, ``learning_starts`` and ``train_frequency`` are per
replica (so the global batch is ``dp * batch_size``).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt_mod
from . import config as config_mod
from .dqn import DQNLearner, epsilon_at, linear_schedule
from .envs import final_next_obs, make_vector_env
from .evaluate import evaluate
from .grid import RankGrid, mpi
from .lifecycle import agree_signal, install_signal_handlers
from .metrics import MetricsLogger
from .memory import keep_freed_memory
from .modelfile import save_model
from .networks import build_layers
from .replay import ReplayBuffer


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise config_mod.ConfigError(f"device={name!r} but torch sees no CUDA device; use device=cpu")
    return name


def make_run_dir(cfg: dict, comm) -> Path:
    """Rank 0 names and creates the run directory; everyone gets the same path."""
    path = None
    if comm.Get_rank() == 0:
        if cfg["run_dir"]:
            path = cfg["run_dir"]
        else:
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            job = os.environ.get("SLURM_JOB_ID")
            name = f"{cfg['env_id'].replace('/', '_')}__s{cfg['seed']}__{job or stamp}"
            path = str(Path("runs") / name)
        Path(path).mkdir(parents=True, exist_ok=True)
    path = comm.bcast(path, root=0)
    return Path(path)


def build_learner(grid: RankGrid, layers, cfg: dict, device: str):
    if grid.pp == 1:
        return DQNLearner(layers, cfg, grid.dp_comm, device)
    from .pipeline import PipelineLearner

    return PipelineLearner(layers, cfg, grid, device)


def train(cfg: dict, comm=None, quiet: bool = False, resume: str | None = None) -> dict:
    """Train; with ``resume`` (a run directory) continue from its newest valid checkpoint."""
    MPI = mpi()
    comm = comm if comm is not None else MPI.COMM_WORLD
    grid = RankGrid(comm, cfg["pp"])
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    # Adam's second moments decay into denormal floats, which make CPU sqrt ~30x slower.
    torch.set_flush_denormal(True)
    keep_freed_memory()     # reuse freed blocks instead of fresh kernel pages each step (memory.py)
    device = resolve_device(cfg["device"])
    install_signal_handlers()
    d = cfg["dqn"]
    run_dir = make_run_dir(cfg, comm)
    root = grid.is_root
    if root:
        (run_dir / "config.toml").write_text(config_mod.to_toml(cfg))
        (run_dir / "layout.json").write_text(json.dumps(grid.describe()))

    # -- seeding: parameters from `seed` (and broadcast anyway); envs/replay per replica ---------
    env_seed = cfg["seed"] + 1000 * grid.dp_rank
    torch.manual_seed(cfg["seed"])
    rng = np.random.default_rng([cfg["seed"], grid.dp_rank, 17])

    has_envs = grid.is_first_stage
    env = make_vector_env(cfg["env_id"], cfg["num_envs"], env_seed, cfg["vector"])
    obs_space, n_actions = env.single_observation_space, int(env.single_action_space.n)
    if not has_envs:
        env.close()
    layers = build_layers(obs_space.shape, n_actions, cfg["network"]["hidden"],
                          cfg["network"]["dueling"], seed=cfg["seed"])
    learner = build_learner(grid, layers, cfg, device)
    # online + target + Adam moments held by each stage (replica 0's stages are world ranks 0..pp-1)
    stage_bytes = comm.allgather(learner.parameter_bytes())[:grid.pp]
    if root and grid.pp > 1 and not quiet:
        print("hpcdqn: pipeline stages (online + target + Adam bytes): " + "; ".join(
            f"{i}: {held} ({stage_bytes[i] / 1e6:.1f} MB)"
            for i, held in enumerate(learner.stage_contents)),
              file=sys.stderr, flush=True)
    replay = ReplayBuffer(d["buffer_size"], cfg["num_envs"], obs_space.shape, obs_space.dtype,
                          n_step=d["n_step"], gamma=d["gamma"],
                          prioritized=cfg["replay"]["prioritized"], alpha=cfg["replay"]["alpha"],
                          priority_eps=cfg["replay"]["priority_eps"], seed=env_seed + 7) \
        if has_envs else None

    E, dp = cfg["num_envs"], grid.dp
    steps_per_iter = E * dp                                   # global env steps per vector step
    n_iters = math.ceil(cfg["total_steps"] / steps_per_iter)
    train_every, learn_start = config_mod.training_grid(cfg)
    log_every = max(1, cfg["log"]["every"] // steps_per_iter)
    n_phases = max(1, n_iters // train_every - learn_start // train_every)
    total_updates = n_phases * d["gradient_steps"]
    check_every = cfg["parallel"]["check_every"]

    obs = env.reset(seed=env_seed)[0] if has_envs else None
    ep_ret = np.zeros(E)
    ep_len = np.zeros(E, dtype=np.int64)
    window = {"ret": 0.0, "len": 0.0, "n": 0, "loss": 0.0, "q": 0.0, "nl": 0}
    episodes_total = 0
    eps = d["epsilon_start"]
    # -- checkpoints: schedule, and resume (replay, RNGs, envs, learner, loop counters) ----------
    env_info = {"env_id": cfg["env_id"], "obs_shape": list(obs_space.shape),
                "obs_dtype": np.dtype(obs_space.dtype).str, "n_actions": n_actions}
    ckpt = ckpt_mod.Checkpointer(run_dir, cfg, grid, layers, env_info, learner, replay,
                                 env if has_envs else None)
    start_it, wall0 = 0, 0.0
    if resume:
        st = ckpt.resume(resume)
        c = st["counters"]
        start_it = c["iteration_next"] if st["exact"] else round(c["env_steps"] / steps_per_iter)
        episodes_total, wall0 = int(c["episodes"]), float(c["wall_s"])
        window = {k: type(v)(st["window"].get(k, 0)) for k, v in window.items()} \
            if st["window"] else {k: type(v)(0) for k, v in window.items()}
        if has_envs:
            rng, obs, ep_ret, ep_len = st["rng"], st["obs"], st["ep_ret"], st["ep_len"]
        if root:
            ckpt_mod.truncate_metrics(run_dir, int(c["env_steps"]))
            how = "exactly" if st["exact"] else "resharded (not bitwise)"
            for w in st["warnings"]:
                ckpt_mod.warn(w)
            print(f"hpcdqn: resumed {how} from {st['path']} at env step {c['env_steps']}",
                  file=sys.stderr, flush=True)
    log = MetricsLogger(run_dir, root, cfg["log"]["tensorboard"], cfg["log"]["progress"] and not quiet,
                        n_iters * steps_per_iter, append=bool(resume))
    t0 = time.perf_counter() - wall0
    stopped_by = 0
    stop_after = cfg["stop_after"]
    it = start_it - 1
    shown_steps = start_it * steps_per_iter
    log.progress(shown_steps)
    for it in range(start_it, n_iters):
        global_step = it * steps_per_iter
        # -- act --------------------------------------------------------------------------------
        eps = epsilon_at(d, cfg["total_steps"], global_step, grid.dp_rank, dp, d["epsilon_ladder"])
        if d["uniform_warmup"] and it < learn_start:
            eps = 1.0                                  # uniform actions until learning starts
        if has_envs:
            explore = rng.random(E) < eps
            actions = rng.integers(0, n_actions, E)
            if not explore.all() or grid.pp > 1:
                greedy = learner.greedy(obs)
                actions = np.where(explore, actions, greedy)
        else:
            learner.greedy(None)   # middle/last stages take part in the pipelined forward
        if has_envs:
            next_obs, rewards, term, trunc, infos = env.step(actions)
            done = np.logical_or(term, trunc)
            replay.add(obs, actions, rewards,
                       final_next_obs(next_obs, done, infos), term, trunc)
            ep_ret += rewards
            ep_len += 1
            if done.any():
                for i in np.nonzero(done)[0]:
                    window["ret"] += ep_ret[i]
                    window["len"] += ep_len[i]
                    window["n"] += 1
                ep_ret[done] = 0.0
                ep_len[done] = 0
            obs = next_obs
        # -- learn ------------------------------------------------------------------------------
        # after vector steps train_every, 2 train_every, ... once past learning_starts (as SB3)
        if it >= learn_start and (it + 1) % train_every == 0:
            frac = learner.updates / max(1, total_updates)
            lr = linear_schedule(d["lr"], d["lr"] * d["lr_final_fraction"], 1.0, frac)
            learner.set_lr(lr)
            beta = linear_schedule(cfg["replay"]["beta_start"], cfg["replay"]["beta_end"], 1.0, frac)
            uniform = has_envs and not replay.prioritized
            batches = replay.sample_many(d["gradient_steps"], d["batch_size"], beta) if uniform else None
            q_next = learner.phase_targets(batches) if uniform else None
            for k in range(d["gradient_steps"]):
                if has_envs:
                    batch = batches[k] if uniform else replay.sample(d["batch_size"], beta)
                else:
                    batch = None
                out = learner.update(batch) if q_next is None else learner.update(batch, q_next[k])
                if has_envs and replay.prioritized:
                    replay.update_priorities(batch.indices, out["td_abs"])
                if out.get("loss") is not None:
                    window["loss"] += out["loss"]
                    window["q"] += out["q"]
                    window["nl"] += 1
                if check_every and learner.updates % check_every == 0:
                    learner.check_consistency()
        # -- log, agree on signals ----------------------------------------------------------------
        if (it + 1) % log_every == 0 or it == n_iters - 1:
            steps_done = (it + 1) * steps_per_iter
            w = _reduce_window(window, comm)
            episodes_total += int(w["n"])
            wall = time.perf_counter() - t0
            row = {"env_steps": steps_done, "updates": learner.updates, "episodes": episodes_total,
                   "episodic_return": w["ret"] / w["n"] if w["n"] else float("nan"),
                   "episodic_length": w["len"] / w["n"] if w["n"] else float("nan"),
                   "loss": w["loss"] / w["nl"] if w["nl"] else float("nan"),
                   "mean_q": w["q"] / w["nl"] if w["nl"] else float("nan"),
                   "epsilon": eps, "lr": learner.opt.param_groups[0]["lr"],
                   "sps": steps_done / wall, "ups": learner.updates / wall,
                   "allreduce_share": learner.sync_seconds() / wall, "wall_s": wall}
            log.log(row)
            log.progress(steps_done - shown_steps,
                         {"ret": f"{row['episodic_return']:.1f}", "eps": f"{eps:.2f}"})
            shown_steps = steps_done
            for k in window:
                window[k] = 0.0 if isinstance(window[k], float) else 0
            stopped_by = agree_signal(comm)
        # -- checkpoint: every checkpoint_every env steps, on a stop, and at the end ----------
        steps_done = (it + 1) * steps_per_iter
        stopping = bool(stopped_by) or (stop_after and steps_done >= stop_after)
        if cfg["checkpoint"] and (ckpt.due(it * steps_per_iter, steps_done) or stopping
                                  or it == n_iters - 1):
            loop = {"rng": rng, "obs": obs, "ep_ret": ep_ret, "ep_len": ep_len, "window": window}
            counters = {"iteration_next": it + 1, "env_steps": steps_done, "episodes": episodes_total,
                        "epsilon": eps, "wall_s": time.perf_counter() - t0}
            info = ckpt.save(counters, loop)
            if root and not quiet:
                log.note(f"hpcdqn: checkpoint {info['path']} ({info['bytes'] / 1e6:.1f} MB) stalled "
                         f"training {info['seconds']:.3f} s")
        if stopping:
            break
    wall = time.perf_counter() - t0
    log.close()
    if has_envs:
        env.close()
    env_steps = (it + 1) * steps_per_iter
    stopped_early = env_steps < n_iters * steps_per_iter

    # -- final model and evaluation ---------------------------------------------------------------
    flat = learner.gather_online()          # full parameter vector on world rank 0
    if root:
        save_model(run_dir / "model.h5", flat, cfg, obs_space.shape, obs_space.dtype, n_actions)
    summary = {"env_steps": env_steps, "updates": learner.updates, "wall_s": round(wall, 3),
               "sps": round(env_steps / wall, 1), "ups": round(learner.updates / wall, 1),
               "allreduce_share": round(learner.sync_seconds() / wall, 4),
               "world": grid.world, "dp": grid.dp, "pp": grid.pp, "run_dir": str(run_dir),
               "parameter_bytes_per_stage": stage_bytes}
    summary.update(ckpt.summary(), checkpoint_io=ckpt.mode)
    if stopped_by:
        summary["stopped_by_signal"] = int(stopped_by)
    elif stopped_early:
        summary["stopped_after"] = env_steps
    if cfg["eval"]["episodes"] and not stopped_early:
        res = learner.evaluate(lambda policy: evaluate(
            policy, cfg["env_id"], cfg["eval"]["episodes"], cfg["eval"]["num_envs"],
            cfg["seed"] + 10_000_000, cfg["eval"]["epsilon"], cfg["vector"]))
        summary.update({k: round(v, 3) if isinstance(v, float) else v for k, v in (res or {}).items()})
    summary = comm.bcast(summary if root else None, root=0)
    if root:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if not stopped_by:   # on a signal, time is short (mpirun's kill grace, Slurm's KillWait)
            from .plots import plot_learning_curve

            plot_learning_curve(run_dir)
    grid.free()
    return summary


def _reduce_window(window: dict, comm) -> dict:
    keys = sorted(window)
    v = np.array([float(window[k]) for k in keys], dtype=np.float64)
    if comm.Get_size() > 1:
        MPI = mpi()
        comm.Allreduce(MPI.IN_PLACE, v, op=MPI.SUM)
    return dict(zip(keys, v))
