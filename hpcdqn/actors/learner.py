"""The learner side of an actor-learner run, and the entry point that gives each rank its role.

``FedTrainer`` is ``train.Trainer`` on the learners' own communicator (every learner collective:
gradient allreduce, agreement, metrics, model file, watchdog) whose replica is fed by its
actors instead of its own envs: ``act`` takes this iteration's env step of every actor (in the
fixed actor order, waiting for it: *learners wait for data*), ``store`` inserts the n-step
transitions into the replay shard (image envs: the actors' raw frames into the sync run's
replay class, ``actors.frames``), ``learn`` is the sync learner's and then publishes the
weights every ``actor.publish_every`` updates (non-blocking sends); ``PROGRESS`` messages let
the actors run ahead by at most ``actor.max_ahead`` iterations (default: one training phase;
*actors wait for learners*).
At the end it tells its actors to stop, drains their last messages and their time splits, and
``summary.json`` says every rank's role and time split.

Checkpoints: at the same points as sync mode (``checkpoint_every``, ``checkpoint_minutes``, an
agreed signal, the end) each first stage asks its actors for their state (``CKPT``), queues the
data they sent before it (MPI keeps one sender's messages in order), and the checkpoint keeps,
per actor, its state, the iteration it sends next and the steps sent but not inserted yet (the
messages as received), in the learner's own rank state; with an image env also the frame
feed's last observation and started flag of every env (``FrameFeed.state_dict``). Nothing is
lost or counted twice: the actor's state is at exactly the iteration its sent data ends. On
resume with the same layout each actor gets its state back (``RESTORE``), the queue is rebuilt
(and the frame feed's state restored); on another layout
(another ``actors``, ``dp`` or ``pp``, or from a sync run) the replay is resharded and the
actors start afresh, their environments re-seeded (a message says so).
"""

from __future__ import annotations

import copy
import sys
import time
from collections import deque

import numpy as np

from hpcdqn.actors.actor import Actor, max_ahead
from hpcdqn.actors.channel import Inbox, Outbox, PeerTimeout
from hpcdqn.actors.frames import FrameFeed, sends_frames
from hpcdqn.actors.nstep import TransitionReplay
from hpcdqn.actors.wire import (CKPT, DATA, DONE, FRAMES, PROGRESS, RESTORE, STATE, STOP, TAG_CTRL, TAG_DATA,
                                WEIGHTS, Layout, WireError, max_state_bytes, pack_ctrl, pack_json)
from hpcdqn.config import ConfigError
from hpcdqn.metrics import ROLES_CSV, write_roles_csv
from hpcdqn.parallel import watchdog
from hpcdqn.parallel.agree import Local
from hpcdqn.parallel.grid import mpi
from hpcdqn.parallel.layout import Role, RunLayout
from hpcdqn.parallel.lifecycle import agree_user_errors
from hpcdqn.rl.framereplay import planned_episode_steps
from hpcdqn.store import Checkpointer, warn
from hpcdqn.store.codec import decode, encode
from hpcdqn.store.errors import CheckpointCorrupt, agree_write
from hpcdqn.train import Trainer, configure_process

KEYS = ("obs", "actions", "returns", "next_obs", "discounts")


class TimedReplay(TransitionReplay):
    """``TransitionReplay`` that counts the seconds spent sampling (the learner's time split)."""
    sample_s = 0.0

    def sample(self, batch_size: int, beta: float = 0.4):
        t = time.perf_counter()
        out = super().sample(batch_size, beta)
        self.sample_s += time.perf_counter() - t
        return out


class FedTrainer(Trainer):
    """A learner rank: ``Trainer``'s loop on ``comm`` (the learners), fed by its actors over
    ``world``."""

    def __init__(self, cfg: dict, comm, world, layout, quiet=False, mem_per_rank=None, resume=None):
        super().__init__(cfg, comm, quiet, resume, mem_per_rank, layout=layout)
        MPI, ac, lay = mpi(), cfg["actor"], self.layout
        self.world, self.ac = world, ac
        self.feeders = [] if lay.pp_rank else lay.actors_of(lay.dp_rank)   # first stages
        self.feed, seed = None, cfg["seed"] + 1000 * lay.dp_rank + 7
        frames = sends_frames(self.obs_space.shape, self.frame_stack)
        if frames:      # image envs: raw frames into the sync replay class
            self.frames_checkpoints_need_even_actors(cfg, resume)
            self.feed = FrameFeed(self.obs_space, self.frame_stack, self.n_actions,
                                  len(self.feeders), cfg["num_envs"], ac["send_every"])
            rep = cfg["replay"]
            self.replay = None if lay.pp_rank else self.feed.make_replay(
                lay.replay_per_replica, seed, cfg["dqn"], rep, planned_episode_steps(rep))
        else:
            self.replay = None if lay.pp_rank else TimedReplay(
                lay.replay_per_replica, self.obs_space.shape, self.obs_space.dtype,
                prioritized=cfg["replay"]["prioritized"], alpha=cfg["replay"]["alpha"],
                priority_eps=cfg["replay"]["priority_eps"], seed=seed,
                raw_steps=(cfg["dqn"]["n_step"], cfg["dqn"]["gamma"]))
        self.ckpt = Checkpointer(  # (image envs: one column per env of each of the replica's actors)
            self.run_dir, cfg, self.grid, list(lay.layers), self.env_info, self.learner, self.replay,
            None, self.frame_stack if frames else 0, transitions=0 if frames else cfg["dqn"]["n_step"],
            columns=cfg["num_envs"] * (lay.actors // lay.dp) if frames else 0)
        # the checkpoint/resume deadlines with the replay shard built here (collective)
        self.watchdog.deadlines = watchdog.deadlines(cfg["watchdog"]["deadline_s"], self.ckpt_bytes())
        self.wire = self.feed.wire if self.feed else Layout(
            self.obs_space.shape, self.obs_space.dtype, cfg["num_envs"], ac["send_every"])
        self.inbox = Inbox(world, MPI, self.wire.max_bytes, ac["timeout_s"])
        self.out = Outbox(world, MPI)
        self.queues = {a: deque() for a in self.feeders}
        self.expect = {a: 0 for a in self.feeders}      # the next iteration each actor sends
        self.times = {"receive_insert_s": 0.0, "wait_data_s": 0.0, "learn_s": 0.0}
        self.progress_every = max(1, max_ahead(cfg, self.clock) // 2)
        self.roles = {}
        self.restored = False       # the actors continue from a checkpoint's states
        self.state_limit = max_state_bytes(lay.param_ranges[-1][1])

    def frames_checkpoints_need_even_actors(self, cfg: dict, resume) -> None:
        """Collective over the learners: a checkpoint of an image env's replay shards needs the
        same columns in every shard (``actors`` a multiple of ``dp``): an agreed ``ConfigError``
        where asked to checkpoint or resume otherwise; else no checkpoint at the end either."""
        lay = self.layout
        if lay.actors % lay.dp == 0:
            return
        with Local() as loc:
            if resume or cfg["checkpoint_every"] or cfg["stop_after"]:
                raise ConfigError(
                    f"actors={lay.actors} with an image env ({cfg['env_id']}) and dp={lay.dp}: "
                    "checkpoints and --resume need actors to be a multiple of dp (every replay "
                    "shard the same env columns); set actors to a multiple of dp, or "
                    "checkpoint_every=0 and stop_after=0")
        agree_user_errors(self.comm, loc.err)
        self.cfg["checkpoint"] = False

    # -- the actors' side of the loop ---------------------------------------------------------------
    def online_params(self):
        """Collective over the replica's stages: the whole online network on its first stage
        (layer order; None on the other stages)."""
        mine = self.learner.online.numpy_data()
        if self.layout.pp == 1:
            return mine
        MPI = mpi()
        sizes = [hi - lo for lo, hi in self.layout.param_ranges]
        displs = [lo for lo, _ in self.layout.param_ranges]
        full = np.empty(self.layout.param_ranges[-1][1], np.float32) if not self.layout.pp_rank else None
        self.grid.pp_comm.Gatherv([np.ascontiguousarray(mine, np.float32), MPI.FLOAT],
                                  [full, (sizes, displs), MPI.FLOAT] if full is not None else None,
                                  root=0)
        return full

    def publish(self) -> None:
        """Collective over the replica's stages: the online network to every actor of this
        replica (non-blocking sends from its first stage)."""
        params = self.online_params()
        if not self.feeders:
            return
        buf = pack_ctrl(WEIGHTS, self.learner.updates, params)
        for a in self.feeders:
            self.out.send(buf, a, TAG_CTRL)

    def receive(self, a: int) -> None:
        """Wait for actor ``a``'s next message and queue its steps."""
        t = time.perf_counter()
        buf = self.inbox.wait(a, TAG_DATA, f"actor {a}")
        self.times["wait_data_s"] += time.perf_counter() - t
        self.queue(a, buf, self.wire.unpack(buf))

    def queue(self, a: int, buf, msg: dict, k: int = 0, off: int = 0) -> None:
        """Queue actor ``a``'s data message (``buf`` unpacked), from its step ``k`` (transition
        ``off``) on."""
        if msg["kind"] not in (DATA, FRAMES) or msg["first"] != self.expect[a]:
            raise WireError(f"actor {a} sent kind {msg['kind']} from iteration "
                            f"{msg.get('first')} where iteration {self.expect[a]} was due")
        self.expect[a] += len(msg["counts"])
        self.queues[a].append([msg, k, off, buf])

    def next_step(self, a: int) -> tuple[dict, list]:
        """Actor ``a``'s transitions of its next env step, and the episodes its message ended."""
        q = self.queues[a]
        if not q:
            self.receive(a)
        entry = q[0]
        msg, k, off, _ = entry
        n = int(msg["counts"][k])
        tr = FrameFeed.step(msg, k, off, n) if self.feed else \
            {key: msg[key][off:off + n] for key in KEYS}
        episodes = msg["episodes"] if k == 0 else ()
        entry[1], entry[2] = k + 1, off + n
        if k + 1 == len(msg["counts"]):
            q.popleft()
        return tr, episodes

    def act(self, eps: float):
        """This iteration's env step of every actor feeding this replica, in actor order (on
        its first stage; None on the others)."""
        if self.replay is None:
            return None
        t, wait0 = time.perf_counter(), self.times["wait_data_s"]
        steps = [self.next_step(a) for a in self.feeders]
        self.times["receive_insert_s"] += time.perf_counter() - t - (self.times["wait_data_s"] - wait0)
        return steps

    def store(self, steps) -> None:
        """Insert the actors' transitions into the replay shard; tell them how far we are."""
        if steps is None:
            return
        t, w = time.perf_counter(), self.state.window
        if self.feed is not None and steps:
            self.feed.insert(self.replay, [tr for tr, _ in steps])
        for tr, episodes in steps:
            if self.feed is None:
                self.replay.add_transitions(tr)
            for ret, length in episodes:
                w.add_episode(float(ret), int(length))
        it = self.state.iteration
        if it % self.progress_every == 0:
            for a in self.feeders:
                self.out.send(pack_ctrl(PROGRESS, it), a, TAG_CTRL)
        self.times["receive_insert_s"] += time.perf_counter() - t

    def learn(self) -> None:
        """The sync learner's phase, then the weights to the actors every ``publish_every``."""
        before, t = self.learner.updates, time.perf_counter()
        super().learn()
        self.times["learn_s"] += time.perf_counter() - t      # sampling and updates
        k = self.ac["publish_every"]
        if self.learner.updates // k > before // k:
            self.publish()

    def run(self) -> dict:
        if not self.restored:
            self.publish()      # the initial weights (those of the update count reached)
        return super().run()

    # -- checkpoints --------------------------------------------------------------------------------
    def rank_extra(self) -> dict | None:
        """Each of this replica's actors' state, the iteration it sends next and the steps it
        sent that are not inserted yet (``CKPT``, then its data up to ``STATE``)."""
        if not self.feeders:
            return None
        for a in self.feeders:
            self.out.send(pack_ctrl(CKPT, self.state.iteration), a, TAG_CTRL)
        got = {}
        for a in self.feeders:
            while (msg := self.wire.unpack(buf := self.inbox.wait(
                    a, TAG_DATA, f"actor {a}", self.state_limit)))["kind"] != STATE:
                self.queue(a, buf, msg)
            st = msg["state"]
            if not isinstance(st, dict) or st.get("it") != self.expect[a]:
                raise WireError(f"actor {a} sent its state at iteration "
                                f"{st.get('it') if isinstance(st, dict) else st} after its data "
                                f"up to iteration {self.expect[a]}")
            got[str(a)] = {"state": st, "expect": self.expect[a],
                           "pending": [{"buf": encode(e[3]), "k": e[1], "off": e[2]}
                                       for e in self.queues[a]]}
        return {"actors": got, **({"frames": self.feed.state_dict()} if self.feed else {})}

    def restore_extra(self, st: dict) -> None:
        """Give every actor of this replica its state back (``RESTORE``) and rebuild the queue
        of what it had sent; on another layout, tell it where to start afresh."""
        self.restored = bool(st["exact"])       # (the same on every learner: the layouts')
        saved = (st["rank"] or {}).get("actors") or {}
        if self.restored and self.feed is not None and self.feeders:
            try:
                self.feed.load_state_dict((st["rank"] or {}).get("frames"))
            except ValueError as e:
                raise CheckpointCorrupt(f"checkpoint '{st['path']}': {e}") from None
        it, steps = self.state.iteration, int(st["counters"]["env_steps"])
        for a in self.feeders:
            if not self.restored:
                mine = {"fresh": True, "it": it, "progress": it, "updates": self.learner.updates,
                        "seed": [self.cfg["seed"], a, steps]}
                self.expect[a] = it
            else:
                if str(a) not in saved:
                    raise CheckpointCorrupt(f"checkpoint '{st['path']}' has no state of actor {a}")
                entry = saved[str(a)]
                self.expect[a], mine = int(entry["expect"]) - self.pending_steps(entry), entry["state"]
                for p in entry["pending"]:
                    buf = np.ascontiguousarray(decode(p["buf"]), np.uint8)
                    self.queue(a, buf, self.wire.unpack(buf), int(p["k"]), int(p["off"]))
            self.out.send(pack_json(RESTORE, mine), a, TAG_CTRL)
        if not self.restored and self.grid.is_root:
            warn(f"the checkpoint's layout differs from this run's (actors={self.layout.actors}, "
                 f"dp={self.layout.dp}, pp={self.layout.pp}): the replay was resharded and the "
                 f"actors start afresh at env step {steps}, their environments re-seeded from "
                 "(seed, actor rank, env step); the run is not bitwise an uninterrupted one")

    def pending_steps(self, entry: dict) -> int:
        """Iterations the pending messages of a saved actor entry hold (whole messages)."""
        return sum(len(self.wire.unpack(np.ascontiguousarray(decode(p["buf"]), np.uint8))["counts"])
                   for p in entry["pending"])

    # -- the end ------------------------------------------------------------------------------------
    def stop_actors(self) -> dict:
        """Tell this replica's actors to stop (with the signal that stopped a checkpointed run:
        their exit status), drain their messages up to ``DONE``; their figures."""
        sig = self.state.stopped_by if self.ckpt.stalls else 0
        for a in self.feeders:
            self.out.send(pack_ctrl(STOP, sig), a, TAG_CTRL)
        stats = {}
        for a in self.feeders:
            while a not in stats:
                msg = self.wire.unpack(self.inbox.wait(a, TAG_DATA, f"actor {a}"))
                if msg["kind"] == DONE:
                    stats[a] = msg["stats"]
        self.out.wait_all(self.ac["timeout_s"], "the actors")
        return stats

    def finish(self) -> dict:
        actors = self.stop_actors()
        rep = self.replay
        mine = {"rank": self.layout.rank, "role": Role.LEARNER.value, **self.times,
                "wall_s": time.perf_counter() - self.t_leg,
                "sample_s": rep.sample_s if rep else 0.0, "inserted": rep.inserted if rep else 0,
                "sampled": self.learner.updates * self.clock.batch_per_replica if rep else 0,
                **{f"{k}_s": v for k, v in self.learner.time_split_seconds().items()}}
        rows = [mine] + [{"rank": a, "role": Role.ACTOR.value, "learner": self.layout.rank,
                          **{k: round(v, 4) for k, v in s.items()}} for a, s in actors.items()]
        every = self.comm.allgather(rows)
        self.roles = sorted((r for rs in every for r in rs), key=lambda r: r["rank"])
        with Local() as loc:
            if self.root:
                write_roles_csv(self.run_dir, self.roles)
        agree_write(self.comm, ROLES_CSV, self.run_dir / ROLES_CSV, loc.err)
        return super().finish()

    def role_summary(self) -> dict:
        """``summary.json``'s role figures: every rank's role and time split."""
        learners = [r for r in self.roles if r["role"] == Role.LEARNER.value]
        inserted, sampled = sum(r["inserted"] for r in learners), sum(r["sampled"] for r in learners)
        return {"roles": [Role(r["role"]).value for r in self.roles], "ranks": self.roles,
                "job_ranks": self.layout.world, "actors": self.layout.actors, "lockstep": self.ac["lockstep"],
                "replay_ratio_achieved": round(sampled / max(1, inserted), 4),
                "replay_ratio_configured": round(self.clock.replay_ratio, 4)}


def run_role(cfg: dict, quiet: bool = False, mem_per_rank: str | None = None,
             resume: str | None = None) -> dict:
    """Collective over the world: resolve the layout (errors agreed by every rank), split the
    learners off into their own communicator and run this rank's role (``resume``: a run
    directory to continue from); every rank returns once the learners wrote the run's files."""
    MPI = mpi()
    world = MPI.COMM_WORLD
    cfg = copy.deepcopy(cfg)
    with Local() as loc:
        layout = RunLayout.resolve(cfg, world.Get_size(), world.Get_rank(), mem_per_rank)
    agree_user_errors(world, loc.err)
    learner = layout.role is Role.LEARNER
    comm = world.Split(color=0 if learner else 1, key=world.Get_rank())
    try:
        if not learner:
            configure_process({**cfg, "device": "cpu"})
            return wait_for_learners(world, Actor(cfg, layout, world).run(resumed=bool(resume)))
        trainer = FedTrainer(cfg, comm, world, layout, quiet, mem_per_rank, resume)
        if resume:
            trainer.resume(resume)
        return wait_for_learners(world, trainer.run())
    except PeerTimeout as e:       # a silent peer: one line, then the whole job ends
        print(f"hpcdqn train: error (rank {world.Get_rank()}, {layout.role.value}): {e}",
              file=sys.stderr, flush=True)
        world.Abort(1)
    except Exception as e:
        if not getattr(e, "agreed", False):
            raise               # abort_on_exception: its traceback, then MPI_Abort of the world
        if world.Get_rank() == 0:   # every learner raised it: once, then the whole job ends
            for m in getattr(e, "messages", None) or [str(e)]:
                print(f"hpcdqn train: {getattr(e, 'kind', None) or 'error'} error: {m}",
                      file=sys.stderr, flush=True)
        world.Abort(2)


def wait_for_learners(world, summary: dict) -> dict:
    """Collective over the world (a non-blocking barrier, polled with naps: waiting actors take
    no CPU from the learners' last work): no rank leaves, with an exit status that may end the
    job (a checkpointed signal's), before the learners wrote the run's files."""
    req = world.Ibarrier()
    while not req.Test():
        time.sleep(0.005)
    return summary
