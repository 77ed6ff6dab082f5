"""The training loop: act -> store -> learn -> log -> checkpoint, on every rank in lockstep.

Every data-parallel replica steps its own vector envs, fills its own replay shard and trains on
its own minibatches; the learner averages gradients across replicas, so all replicas apply the
same update. Inside a replica the pipeline stages make the same learner calls as the first stage
(which holds the envs and the replay), passing ``None`` where they hold no data.
Every schedule key counts global env steps (over all replicas); the run's layout
(``parallel.layout.RunLayout``: degrees, rank roles, the env-step ``Schedule``, stage bounds,
replay per replica, the memory cap) is resolved once at set-up and handed down.

``Trainer.run`` is the algorithm; ``Trainer.__init__`` (set-up), ``Trainer.resume`` and
``Trainer.finish`` (final model, evaluation, summary) are the rest.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from hpcdqn import config as config_mod
from hpcdqn.learner import build_learner
from hpcdqn.learner.budget import check_fits, plan_memory, process_baseline
from hpcdqn.metrics import EVAL_CSV, MetricsLogger, append_eval_row, share_columns, start_lines
from hpcdqn.parallel.agree import Local, describe
from hpcdqn.parallel.grid import RankGrid, choose_device, mpi
from hpcdqn.parallel.layout import RunLayout
from hpcdqn.parallel.lifecycle import (agree_signal, agree_user_errors, install_signal_handlers,
                                      on_leave)
from hpcdqn.parallel.memory import keep_freed_memory, release_freed_memory
from hpcdqn.parallel import watchdog
from hpcdqn.rl.envs import frame_stack, make_vector_env
from hpcdqn.rl.evaluate import evaluate_run
from hpcdqn.rl.networks import resolve_kind
from hpcdqn.rl.framereplay import make_replay, planned_episode_steps
from hpcdqn.rl.rollout import Rollout
from hpcdqn.rl.schedule import linear_schedule
from hpcdqn.store import Checkpointer, truncate_metrics, warn
from hpcdqn.store.errors import agree, agree_write
from hpcdqn.store.modelfile import write_run_model
from hpcdqn.store.rundir import acquire_lock, check_fresh, release_lock
from hpcdqn.sysinfo import cap_per_rank, current_rss, peak_rss


@dataclass
class Window:
    """Sums since the last metrics row, on this rank (added over all ranks at each log point)."""
    return_sum: float = 0.0     # returns of the episodes that ended
    length_sum: float = 0.0     # their lengths
    episodes: int = 0           # how many ended
    loss_sum: float = 0.0       # losses of the updates (where this rank knows them)
    q_sum: float = 0.0          # their mean Q
    updates: int = 0            # how many

    # the names in checkpoints and in ``allreduce_window``'s result (the file format's)
    KEYS = (("ret", "return_sum", float), ("len", "length_sum", float), ("n", "episodes", int),
            ("loss", "loss_sum", float), ("q", "q_sum", float), ("nl", "updates", int))

    def add_episode(self, ret: float, length: int) -> None:
        self.return_sum += ret
        self.length_sum += length
        self.episodes += 1

    def add_update(self, loss: float, q: float) -> None:
        self.loss_sum += loss
        self.q_sum += q
        self.updates += 1

    @classmethod
    def from_dict(cls, d: dict | None) -> "Window":
        """From a checkpoint's JSON, each field in its own type (missing: 0)."""
        d = d or {}
        return cls(**{attr: tp(d.get(key, 0)) for key, attr, tp in cls.KEYS})

    def as_dict(self) -> dict:
        return {key: getattr(self, attr) for key, attr, _ in self.KEYS}


@dataclass
class LoopState:
    """Where the loop stands (identical on every rank, except each rank's own ``window``)."""
    iteration: int = 0          # loop iterations done (one vector-env step of every replica)
    episodes: int = 0           # episodes finished over all replicas, as of the last log row
    wall_offset: float = 0.0    # seconds spent by earlier legs of this run (resume)
    epsilon: float = 1.0        # this replica's exploration at the last step
    stopped_by: int = 0         # the signal all ranks agreed on at the last log point (0: none)
    shown_steps: int = 0        # env steps the progress bar has shown
    window: Window = field(default_factory=Window)

    def state_dict(self, env_steps: int, wall_s: float) -> dict:
        """What a checkpoint keeps of the loop: its counters (``env_steps`` and ``wall_s`` as of
        now) and this rank's metric window."""
        return {"counters": {"iteration_next": self.iteration, "env_steps": env_steps,
                             "episodes": self.episodes, "epsilon": self.epsilon,
                             "wall_s": wall_s},
                "window": self.window.as_dict()}

    def load_state_dict(self, st: dict, steps_per_iter: int, exact: bool) -> None:
        """Continue from a checkpoint's ``counters`` and ``window``; on another layout
        (``exact`` False) the iteration is the one at the same env step."""
        c = st["counters"]
        it = c["iteration_next"] if exact else round(c["env_steps"] / steps_per_iter)
        self.iteration, self.episodes, self.wall_offset = it, int(c["episodes"]), float(c["wall_s"])
        self.shown_steps, self.window = it * steps_per_iter, Window.from_dict(st["window"])


def resolve_device(name: str, local_rank: int = 0) -> str:
    """The device of this rank: ``cuda``/``auto`` pick ``cuda:<local rank % visible devices>``."""
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if name.startswith("cuda") and not visible:
        raise config_mod.ConfigError(f"device={name!r} but torch sees no CUDA device; use device=cpu")
    return choose_device(name, local_rank, visible)


def make_run_dir(cfg: dict, comm, resume: str | None = None) -> tuple[Path, Path | None]:
    """Rank 0 names, creates and locks the run directory (one job per directory; a fresh run
    into one holding checkpoints is refused unless ``overwrite``); everyone gets the same path
    or the same error. Returns (path, the lock: rank 0 only)."""
    path = lock = None
    with Local() as loc:
        if comm.Get_rank() == 0:
            if cfg["run_dir"]:
                path = cfg["run_dir"]
            else:
                stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
                job = os.environ.get("SLURM_JOB_ID")
                name = f"{cfg['env_id'].replace('/', '_')}__s{cfg['seed']}__{job or stamp}"
                path = str(Path("runs") / name)
            Path(path).mkdir(parents=True, exist_ok=True)
            lock = acquire_lock(path)
            atexit.register(release_lock, lock)
            on_leave(lambda: release_lock(lock))     # a fast exit skips atexit
            if not resume:
                check_fresh(path, cfg["overwrite"])
    agree(comm, "start", path, loc.err, what="run directory", keep_kind=True)
    path = comm.bcast(path, root=0)
    return Path(path), lock


def allreduce_window(window: Window, comm) -> dict:
    """Collective over ``comm``: the window's sums over all ranks."""
    d = window.as_dict()
    keys = sorted(d)
    v = np.array([float(d[k]) for k in keys], dtype=np.float64)
    if comm.Get_size() > 1:
        MPI = mpi()
        comm.Allreduce(MPI.IN_PLACE, v, op=MPI.SUM)
    return dict(zip(keys, v))


def configure_process(cfg: dict, local_rank: int = 0) -> str:
    """Threads, denormals, the allocator and signal handlers for a training process; the device."""
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    # Adam's second moments decay into denormal floats, which make CPU sqrt ~30x slower.
    torch.set_flush_denormal(True)
    keep_freed_memory()     # reuse freed blocks instead of fresh kernel pages each step (memory.py)
    device = resolve_device(cfg["device"], local_rank)
    install_signal_handlers()
    return device


class Trainer:
    """One training run on this rank: set-up here, then ``resume`` (optional) and ``run``."""

    def __init__(self, cfg: dict, comm=None, quiet: bool = False, resume: str | None = None,
                 mem_per_rank: str | None = None, layout: RunLayout | None = None):
        """``mem_per_rank``: the per-rank memory cap (``--mem-per-rank``; None: the
        ``HPCDQN_MEM_PER_RANK`` environment variable, the Slurm allocation or ``MemTotal``).
        ``layout``: resolved by the caller over a larger world (actor ranks, ``hpcdqn.actors``:
        ``comm`` is then the learners' communicator); None: resolved here over ``comm``."""
        self.cfg, self.quiet = cfg, quiet
        self.comm = comm if comm is not None else mpi().COMM_WORLD
        with Local() as loc:    # the same on every rank, or the same error: agreed, exit 2
            self.layout = layout or RunLayout.resolve(cfg, self.comm.Get_size(),
                                                      self.comm.Get_rank(), mem_per_rank)
            self.grid = grid = RankGrid(self.comm, cfg["pp"])
            self.clock = self.layout.schedule     # the env-step schedule (rl.schedule)
        agree_user_errors(self.comm, loc.err)
        self.device = configure_process(cfg, grid.local_rank)
        self.run_dir, self.lock = make_run_dir(cfg, self.comm, resume)
        self.root = grid.is_root
        with Local() as loc:
            if self.root:
                (self.run_dir / "config.toml").write_text(config_mod.to_toml(cfg))
                (self.run_dir / "layout.json").write_text(json.dumps(
                    {**grid.describe(), "roles": [r.value for r in self.layout.roles]}))
                if not resume:          # (a fresh run appends its own periodic evaluations)
                    (self.run_dir / EVAL_CSV).unlink(missing_ok=True)
        agree_write(self.comm, "config.toml and layout.json", self.run_dir, loc.err)
        self.resumed = False
        self.state = LoopState(epsilon=cfg["dqn"]["epsilon_start"])
        self.synced_at = -1         # learner.updates at the last target sync (-1: unknown)
        self.eval_seconds = 0.0     # spent in periodic evaluations (left out of wall_s)
        self._build()
        self.watchdog = watchdog.Watchdog(self.comm, watchdog.deadlines(
            cfg["watchdog"]["deadline_s"], self.ckpt_bytes()))
        watchdog.install(self.watchdog)

    def _build(self) -> None:
        """Envs (first stages), network, learner, replay shard, checkpointer."""
        cfg, d, grid = self.cfg, self.cfg["dqn"], self.grid
        # seeding: parameters from `seed` (and broadcast anyway); envs/replay per replica
        env_seed = cfg["seed"] + 1000 * grid.dp_rank
        torch.manual_seed(cfg["seed"])
        rng = np.random.default_rng([cfg["seed"], grid.dp_rank, 17])
        with Local() as loc:    # an env id or its options that do not work: agreed, exit 2
            env = make_vector_env(cfg["env_id"], cfg["num_envs"], env_seed, cfg["vector"],
                                  cfg["atari"])
        agree_user_errors(self.comm, loc.err)
        self.obs_space, self.n_actions = env.single_observation_space, int(env.single_action_space.n)
        self.frame_stack = frame_stack(env)     # > 0: the replay stores each frame once
        try:                                    # the network fits these observations
            resolve_kind(self.obs_space.shape, cfg["network"]["kind"])
        except ValueError as e:
            raise config_mod.ConfigError(str(e)) from None
        if not self.layout.steps_envs:
            env.close()      # (built for its spaces: only a replica's first stage acts)
        self.learner_cfg = config_mod.learner_config(cfg)
        self.memory_plan = self.check_memory()     # stops here, on every rank, if it cannot fit
        # shapes only (meta device, the layout's): each rank allocates just its own stage, with
        # the values the whole network would get from `seed` (networks.initial_flat)
        layers = list(self.layout.layers)
        self.learner = build_learner(self.layout, grid, self.learner_cfg, self.device,
                                     seed=cfg["seed"])
        # online + target + Adam moments held by each stage (replica 0's stages are world ranks 0..pp-1)
        self.stage_bytes = self.comm.allgather(self.learner.parameter_bytes())[:grid.pp]
        self.replay = self.rollout = None
        if self.layout.steps_envs:
            self.replay = make_replay(
                self.layout.replay_per_replica, cfg["num_envs"], self.obs_space.shape,
                self.obs_space.dtype, self.frame_stack, n_step=d["n_step"], gamma=d["gamma"],
                prioritized=cfg["replay"]["prioritized"], alpha=cfg["replay"]["alpha"],
                priority_eps=cfg["replay"]["priority_eps"], seed=env_seed + 7,
                **({"episode_steps": planned_episode_steps(cfg["replay"])} if self.frame_stack else {}))
            self.rollout = Rollout(env, rng, env.reset(seed=env_seed)[0])
        self._announce()
        self.env_info = env_info = {
            "env_id": cfg["env_id"], "obs_shape": list(self.obs_space.shape),
            "obs_dtype": np.dtype(self.obs_space.dtype).str, "n_actions": self.n_actions}
        self.ckpt = Checkpointer(self.run_dir, cfg, grid, layers, env_info, self.learner,
                                 self.replay, self.rollout, self.frame_stack)
        release_freed_memory()      # start-up temporaries (the backward check's copy) leave no hole

    def check_memory(self) -> dict:
        """Collective over the world: the layout's network and stages placed, the planner's
        per-stage bytes for it, checked against the per-rank cap (``learner.budget``) before the
        network or replay is allocated; every rank takes the same decision (the largest
        baseline, the smallest cap)."""
        MPI = mpi()
        shape = self.obs_space.shape
        with Local() as loc:    # (a pipeline split this network cannot make: agreed, exit 2)
            self.layout = self.layout.place(self.cfg["network"], shape, self.n_actions)
            plan = plan_memory(self.layout, self.learner_cfg, self.cfg["replay"], self.cfg["threads"],
                               shape, self.obs_space.dtype, self.frame_stack)
        agree_user_errors(self.comm, loc.err)
        local = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        cap, source = cap_per_rank(local.Get_size(), self.layout.mem_per_rank)
        local.Free()
        cap = self.comm.allreduce(cap, op=MPI.MIN)
        # the process baseline: Python, torch (its optimizer's imports), MPI and the envs,
        # before the network and replay
        self.baseline_rss = process_baseline()
        baseline = self.comm.allreduce(self.baseline_rss, op=MPI.MAX)
        with Local() as loc:    # the same decision on every rank (the smallest cap, largest baseline)
            check_fits(plan, cap, source, baseline)
        agree_user_errors(self.comm, loc.err)
        return plan

    def ckpt_bytes(self) -> int:
        """Collective: the most checkpoint bytes any rank writes (its replay shard, its
        parameters and optimizer state), for the watchdog's checkpoint/resume deadline."""
        held = (self.replay.nbytes if self.replay is not None else 0) + \
            int(self.learner.parameter_bytes())
        return int(self.comm.allreduce(held, op=mpi().MAX))

    def memory_report(self) -> dict:
        """This rank's bytes by category (tensors it holds; activations: the planner's estimate)
        and its RSS from the OS: at start (baseline) and peak (VmHWM)."""
        g = self.grid
        cats = dict(self.learner.memory_bytes())
        cats["replay"] = self.replay.nbytes if self.replay is not None else 0
        planned = self.memory_plan["stages"][g.pp_rank]
        cats["activations_estimate"] = planned["activations"]
        return {"rank": g.rank, "dp_rank": g.dp_rank, "pp_rank": g.pp_rank, **cats,
                "baseline_rss": self.baseline_rss, "planned_rss": self.baseline_rss + planned["total"],
                "peak_rss": peak_rss()}

    def _announce(self) -> None:
        """Rank 0 says once how this job computes its updates, what each stage holds and the
        bytes by category on every rank (collective over the world: the reports are gathered)."""
        reports = self.comm.gather(self.memory_report(), root=0)
        if not self.root or self.quiet:
            return
        lay = self.layout
        for line in start_lines(self.clock.describe(), self.learner.plan.describe(),
                                lay.stage_contents, reports, lay.pp, lay.dp):
            print(line, file=sys.stderr, flush=True)

    # -- resume -----------------------------------------------------------------------------------
    def resume(self, run_dir) -> None:
        """Collective: continue from ``run_dir``'s newest valid checkpoint (replay, RNGs, envs,
        learner, loop counters): bitwise on the same layout, resharded on another."""
        with watchdog.phase("resume"):
            st = self.ckpt.resume(run_dir)
        c = st["counters"]
        self.state = LoopState(epsilon=self.state.epsilon)
        self.state.load_state_dict(st, self.clock.steps_per_iter, st["exact"])
        self.resumed = True
        self.restore_extra(st)
        release_freed_memory()      # the arrays read from the checkpoint
        if self.root:
            for name in ("metrics.csv", EVAL_CSV):
                truncate_metrics(self.run_dir, int(c["env_steps"]), name)
            for w in st["warnings"]:
                warn(w)
            how = "exactly" if st["exact"] else "resharded (not bitwise)"
            print(f"hpcdqn: resumed {how} from {st['path']} at env step {c['env_steps']}",
                  file=sys.stderr, flush=True)

    def restore_extra(self, st: dict) -> None:
        """After a resume: what ``rank_extra`` saved (``st['rank']``: this rank's state, None
        on another layout; nothing here, ``hpcdqn.actors`` hands its actors theirs)."""

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train to ``total_steps`` (or ``stop_after``, or a signal all ranks agreed on); returns
        the run's summary. Every rank makes the same collective calls in the same order."""
        s, clock, cfg = self.state, self.clock, self.cfg
        self.log = None
        with Local() as loc:
            self.log = MetricsLogger(self.run_dir, self.root, cfg["log"]["tensorboard"],
                                     cfg["log"]["progress"] and not self.quiet,
                                     clock.env_steps(clock.n_iters), append=self.resumed)
        agree_write(self.comm, "metrics.csv", self.run_dir / "metrics.csv", loc.err)
        self.t0 = time.perf_counter() - s.wall_offset
        self.t_leg = time.perf_counter()      # this process's start (the time split's window)
        self.log.progress(s.shown_steps)
        for it in range(s.iteration, clock.n_iters):
            s.iteration = it + 1
            s.epsilon = clock.epsilon(cfg, it, self.grid.dp_rank)
            actions = self.act(s.epsilon)       # collective over the replica's stages
            self.store(actions)                 # env step -> replay shard (first stages)
            if clock.syncs_target_after(it):
                self.sync_target()              # every target_update_every env steps
            if clock.trains_after(it):
                with watchdog.phase("gradient sync"):
                    self.learn()                # collective: one phase of gradient updates
            if clock.evaluates_after(it):
                with watchdog.phase("eval"):
                    self.periodic_eval()        # collective: eval.csv, time left out of wall_s
            if clock.logs_after(it):
                self.log_row()                  # collective: metrics row, agreed signals
            stopping = self.stopping()
            if cfg["checkpoint"] and (self.ckpt.due(clock.env_steps(it), clock.env_steps(it + 1))
                                      or stopping or it == clock.n_iters - 1):
                self.checkpoint()               # collective: one parallel-HDF5 file
            if stopping:
                break
        return self.finish()

    def act(self, eps: float):
        """Collective over the replica's stages: this step's actions (None without envs)."""
        r = self.rollout
        if r is None:
            self.learner.greedy(None)           # later stages take part in the pipelined forward
            return None
        explore, random_actions = r.explore(eps)
        return r.choose(explore, random_actions, self.learner.greedy(r.obs, needed=not explore.all()))

    def store(self, actions) -> None:
        """Step the envs with ``actions`` and put the transitions in the replay shard."""
        if self.rollout is None:
            return
        w = self.state.window
        for ret, length in self.rollout.step(actions, self.replay):
            w.add_episode(ret, length)

    def sync_target(self) -> None:
        """Copy (or Polyak-average) the online network into the target, on every rank (each its
        own stage); a hard copy with no update since the last one is skipped (no change)."""
        if self.cfg["dqn"]["tau"] >= 1.0 and self.learner.updates == self.synced_at:
            return
        self.learner.sync_target()
        self.synced_at = self.learner.updates

    def learn(self) -> None:
        """Collective: the schedule's updates per phase on minibatches of this replica's shard."""
        cfg, clock, learner, replay = self.cfg, self.clock, self.learner, self.replay
        frac = clock.progress(learner.updates)
        learner.set_lr(clock.lr(cfg["dqn"], frac))
        beta = linear_schedule(cfg["replay"]["beta_start"], cfg["replay"]["beta_end"], 1.0, frac)
        per = replay is not None and replay.prioritized
        n, size = clock.updates_per_phase, clock.batch_per_replica
        # uniform replay: the phase's minibatches in one draw (and their targets in one pass)
        batches = replay.sample_many(n, size, beta) if replay is not None and not per else None
        q_next = learner.phase_targets(batches)
        check_every, w = cfg["parallel"]["check_every"], self.state.window
        for k in range(n):
            batch = batches[k] if batches is not None else \
                replay.sample(size, beta) if per else None
            out = learner.update(batch, None if q_next is None else q_next[k])
            if per:
                replay.update_priorities(batch.indices, out["td_abs"])
            if out.get("loss") is not None:
                w.add_update(out["loss"], out["q"])
            if check_every and learner.updates % check_every == 0:
                learner.check_consistency()

    def log_row(self) -> None:
        """Collective over the world: one metrics row (rank 0 writes it), then agree on signals."""
        s, learner = self.state, self.learner
        steps_done = self.clock.env_steps(s.iteration)
        w = allreduce_window(s.window, self.comm)
        s.episodes += int(w["n"])
        wall = time.perf_counter() - self.t0
        mean = (lambda key, n: w[key] / w[n] if w[n] else float("nan"))
        row = {"env_steps": steps_done, "updates": learner.updates, "episodes": s.episodes,
               "episodic_return": mean("ret", "n"), "episodic_length": mean("len", "n"),
               "loss": mean("loss", "nl"), "mean_q": mean("q", "nl"),
               "epsilon": s.epsilon, "lr": learner.lr,
               "sps": steps_done / wall, "ups": learner.updates / wall,
               **share_columns(learner.time_split(time.perf_counter() - self.t_leg, self.comm)),
               "rss_mb": current_rss() / 2**20, "wall_s": wall}   # rank 0's resident memory
        with Local() as loc:
            self.log.log(row)
        agree_write(self.comm, "metrics.csv", self.run_dir / "metrics.csv", loc.err)
        self.log.progress(steps_done - s.shown_steps,
                          {"ret": f"{row['episodic_return']:.1f}", "eps": f"{s.epsilon:.2f}"})
        s.shown_steps = steps_done
        s.window = Window()
        s.stopped_by = agree_signal(self.comm)
        self.ckpt.poll_clock()                  # collective: checkpoint_minutes passed?

    def stopping(self) -> bool:
        stop_after = self.cfg["stop_after"]
        return bool(self.state.stopped_by) or bool(
            stop_after and self.clock.env_steps(self.state.iteration) >= stop_after)

    def checkpoint(self) -> None:
        """Collective over the world: everything needed to continue exactly from here."""
        s = self.state
        loop = s.state_dict(self.clock.env_steps(s.iteration), time.perf_counter() - self.t0)
        extra = self.rank_extra()
        with watchdog.phase("checkpoint"):
            info = self.ckpt.save(loop["counters"], loop["window"], extra)
        if self.root and not self.quiet:
            self.log.note(f"hpcdqn: checkpoint {info['path']} ({info['bytes'] / 1e6:.1f} MB) stalled "
                          f"training {info['seconds']:.3f} s")

    def rank_extra(self) -> dict | None:
        """More of this rank's state for a checkpoint (JSON-able; none here: ``hpcdqn.actors``
        gathers its actors' states)."""
        return None

    # -- the end ----------------------------------------------------------------------------------
    def finish(self) -> dict:
        """Collective: final model file, evaluation and summary (rank 0 writes them)."""
        cfg, learner, grid, s = self.cfg, self.learner, self.grid, self.state
        wall = time.perf_counter() - self.t0
        split = learner.time_split(time.perf_counter() - self.t_leg, self.comm)   # collective
        self.log.close()
        if self.rollout is not None:
            self.rollout.close()
        env_steps = self.clock.env_steps(s.iteration)
        stopped_early = env_steps < self.clock.env_steps(self.clock.n_iters)
        with watchdog.phase("model file"):
            self.save_model()
        memory = self.comm.allgather(self.memory_report())
        summary = {"env_steps": env_steps, "updates": learner.updates, "wall_s": round(wall, 3),
                   "sps": round(env_steps / wall, 1), "ups": round(learner.updates / wall, 1),
                   "allreduce_share": round(split["shares"]["allreduce"], 4), "time_split": split,
                   **grid.describe(), "run_dir": str(self.run_dir),
                   "parameter_bytes_per_stage": self.stage_bytes,
                   "memory_per_rank": memory,
                   "execution_plan": learner.plan.as_dict(),
                   "schedule": self.clock.as_dict(), "eval_s": round(self.eval_seconds, 3)}
        summary.update(self.ckpt.summary(), checkpoint_io=self.ckpt.mode)
        summary.update(self.role_summary())
        if s.stopped_by:
            summary["stopped_by_signal"] = int(s.stopped_by)
        elif stopped_early:
            summary["stopped_after"] = env_steps
        if cfg["eval"]["episodes"] and not stopped_early:
            summary.update(self.final_evaluation())
        summary = self.comm.bcast(summary if self.root else None, root=0)
        with Local() as loc:
            if self.root:
                (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        agree_write(self.comm, "summary.json", self.run_dir / "summary.json", loc.err)
        if self.root and not s.stopped_by:   # on a signal, time is short (kill grace, KillWait)
            from hpcdqn.plots import plot_learning_curve

            try:
                plot_learning_curve(self.run_dir)
            except OSError as e:
                warn(f"learning curve not written: {describe(e)}")
        if self.lock is not None:
            release_lock(self.lock)
        watchdog.install(None)
        grid.free()
        return summary

    def role_summary(self) -> dict:
        """``summary.json``'s figures of the ranks' roles (none here: every rank is
        ``env+learner``; ``hpcdqn.actors`` adds its own)."""
        return {}

    def save_model(self) -> None:
        """Collective over the world: ``model.h5`` (``store.modelfile.write_run_model``)."""
        lay = self.layout
        write_run_model(self.run_dir / "model.h5", self.grid, self.learner.online.numpy_data(),
                        lay.param_ranges[lay.pp_rank][0], lay.param_ranges[-1][1], self.cfg,
                        self.obs_space.shape, self.obs_space.dtype, self.n_actions)

    def evaluate(self, episodes: int, num_envs: int, seed: int) -> dict | None:
        """Collective over the replica's stages: greedy episodes of replica 0 in envs made as
        the run trained (``rl.evaluate.evaluate_run``); the result on world rank 0."""
        return self.learner.evaluate(
            lambda policy: evaluate_run(policy, config_mod.env_config(self.cfg), episodes, num_envs, seed,
                                        self.cfg["eval"]["epsilon"]))

    def periodic_eval(self) -> None:
        """Collective over the world: ``eval.every_episodes`` greedy episodes of replica 0 and a
        row of ``eval.csv`` (rank 0). Every rank waits for them in one broadcast and leaves
        their time out of its wall-clock (``wall_s``, env steps/s, time to target)."""
        ev, t = self.cfg["eval"], time.perf_counter()
        steps = self.clock.env_steps(self.state.iteration)
        res = self.evaluate(ev["every_episodes"], min(ev["num_envs"], ev["every_episodes"]),
                            self.cfg["seed"] + 20_000_000 + steps)
        spent = self.comm.bcast(time.perf_counter() - t if self.root else None, root=0)
        self.t0 += spent
        self.eval_seconds += spent
        with Local() as loc:
            if self.root:
                append_eval_row(self.run_dir, {
                    "env_steps": steps, "updates": self.learner.updates,
                    "wall_s": round(time.perf_counter() - self.t0, 4), "eval_s": round(spent, 4),
                    **{k: res[k] for k in ("eval_return_mean", "eval_return_std",
                                           "eval_episodes")}})
        agree_write(self.comm, EVAL_CSV, self.run_dir / EVAL_CSV, loc.err)

    def final_evaluation(self) -> dict:
        """Collective over the replica's stages: greedy episodes of replica 0 (results on rank 0)."""
        ev = self.cfg["eval"]
        res = self.evaluate(ev["episodes"], ev["num_envs"], self.cfg["seed"] + 10_000_000)
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in (res or {}).items()}


def train(cfg: dict, comm=None, quiet: bool = False, resume: str | None = None,
          mem_per_rank: str | None = None) -> dict:
    """Train; with ``resume`` (a run directory) continue from its newest valid checkpoint.
    ``mem_per_rank``: the per-rank memory cap (``--mem-per-rank``; see ``Trainer``)."""
    trainer = Trainer(cfg, comm, quiet, resume, mem_per_rank)
    if resume:
        trainer.resume(resume)
    return trainer.run()
