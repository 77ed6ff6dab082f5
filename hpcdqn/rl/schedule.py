"""Schedules: the run's resolved clock for a layout, and how epsilon, learning rate and PER's
beta move.

Units (the same at any rank count): ``total_steps``, ``dqn.learning_starts``,
``dqn.train_frequency``, ``dqn.target_update_every``, ``checkpoint_every``, ``stop_after``,
``log.every`` and ``eval.every`` count **global env steps** (over all data-parallel replicas);
``dqn.exploration_fraction`` is a share of ``total_steps``; ``dqn.buffer_size`` is the global
replay capacity (each replica holds ``buffer_size // dp``); ``dqn.batch_size`` is the batch of
one rank, whose meaning at ``dp > 1`` is set by ``scaling.rule`` (see ``Schedule.resolve``).

One *iteration* of the training loop is one vector-env step of every replica, i.e.
``num_envs * dp`` global env steps. ``Schedule.resolve(cfg, dp)`` turns the config into
iterations once, in one place, keeping the configured replay ratio (gradient updates x global
batch per global env step) exactly, or stops with a ``ConfigError`` that names the key and the
fix. Rank 0 prints ``describe()`` at start, ``summary.json`` records ``as_dict()`` and
``hpcdqn plan`` shows both.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from fractions import Fraction

from hpcdqn.config import ConfigError

RULES = ("global_batch", "sqrt_lr", "linear_lr")


def linear_schedule(start: float, end: float, duration: float, t: float) -> float:
    if duration <= 0:
        return end
    return start + (end - start) * min(1.0, max(0.0, t / duration))


def exploration_span(dqn: dict, total_steps: int) -> int:
    """Env steps over which epsilon anneals: ``exploration_steps``, or (0) the
    ``exploration_fraction`` of ``total_steps``."""
    return dqn.get("exploration_steps", 0) or round(dqn["exploration_fraction"] * total_steps)


def epsilon_at(dqn: dict, total_steps: int, step: int, rank: int = 0, ranks: int = 1,
               ladder: bool = False) -> float:
    """Linear epsilon-greedy schedule over ``exploration_span`` env steps, from step 0 or (with
    ``exploration_after_warmup``, the MinAtar paper) from ``learning_starts``.
    With the Ape-X ladder, replica i explores with eps^(1 + 7 i / (N - 1))."""
    if dqn.get("exploration_after_warmup"):
        step = step - dqn["learning_starts"]
    eps = linear_schedule(dqn["epsilon_start"], dqn["epsilon_end"],
                          exploration_span(dqn, total_steps), step)
    if ladder and ranks > 1:
        eps = eps ** (1.0 + 7.0 * rank / (ranks - 1))
    return eps


def phase_spacing(train_frequency: int, steps_per_iter: int) -> int:
    """Global env steps between training phases: the least common multiple of
    ``train_frequency`` and one iteration (``steps_per_iter`` env steps). That is
    ``train_frequency`` when one iteration divides it, one iteration when ``train_frequency``
    divides that, and otherwise the first iteration end that is also a ``train_frequency``
    boundary (e.g. 3 envs and ``train_frequency=2``: a phase every 2 iterations holding the
    updates of 3 periods). Never a refusal, so a ``train_frequency`` accepted at one ``dp`` is accepted at every ``dp``; the
    replay ratio stays exact (``updates_per_phase``)."""
    return math.lcm(train_frequency, steps_per_iter)


def updates_per_phase(cfg: dict, spacing: int, global_batch: int) -> tuple[int, int]:
    """(updates per phase, global env steps between phases) that keep the configured replay
    ratio (``gradient_steps x batch_size / train_frequency`` sampled transitions per env step)
    with ``global_batch`` per update. Where ``spacing`` would need a fraction p/q of an update
    (a global batch larger than the configured one, e.g. ``sqrt_lr`` at ``dp > 1``), phases
    come q times less often with p updates each: the same ratio, exactly."""
    d = cfg["dqn"]
    k = Fraction(d["gradient_steps"] * d["batch_size"] * spacing,
                 d["train_frequency"] * global_batch)
    return k.numerator, spacing * k.denominator


def warmup_iterations(dqn: dict, steps_per_iter: int) -> int:
    """Warm-up iterations: ``learning_starts`` global env steps, and at least ``n_step - 1``
    iterations. An n-step return needs ``n_step`` consecutive steps of one env, so no update can
    come before every env holds ``n_step`` of them; the first phase comes after iteration
    ``learn_start`` or later, i.e. after ``n_step`` iterations or more. The floor is the same
    rule at every ``dp`` (``n_step`` steps per env, one per iteration): a ``learning_starts``
    below it (e.g. 0, as SB3 allows) is raised to it, never refused."""
    return max(dqn["learning_starts"] // steps_per_iter, dqn["n_step"] - 1)


@dataclass(frozen=True)
class Schedule:
    """The run's clock in loop iterations, resolved for one layout (identical on every rank)."""
    dp: int
    num_envs: int
    rule: str
    steps_per_iter: int     # global env steps per iteration (num_envs * dp)
    n_iters: int
    learn_start: int        # iterations of warm-up: phases only after iterations >= this ...
    train_every: int        # ... that are train_every, 2 train_every, ... (counted from 1)
    updates_per_phase: int
    target_every: int       # global env steps between target syncs (crossing a multiple)
    log_every: int          # iterations between metric rows
    eval_every: int         # iterations between periodic greedy evaluations (0: none)
    batch_per_replica: int
    global_batch: int
    buffer_per_replica: int
    lr_scale: float         # dqn.lr is multiplied by this (after the warm-up, if any)
    lr_warmup: float        # share of the updates over which lr ramps from dqn.lr to the scale
    replay_ratio: float     # sampled transitions (updates x global batch) per global env step
    exploration_steps: int  # env steps over which epsilon anneals
    total_updates: int
    warmup_share: float     # share of the run's env steps in warm-up
    n_step: int = 1         # the warm-up is at least n_step - 1 iterations (warmup_iterations)
    actors: int = 0         # actor ranks (> 0: one iteration is one env step of every actor)

    @classmethod
    def resolve(cls, cfg: dict, dp: int, actors: int = 0) -> "Schedule":
        """The schedule of ``cfg`` on ``dp`` replicas; ``ConfigError`` naming the key and the
        fix where this layout cannot keep the configured replay ratio.

        ``scaling.rule``: ``global_batch`` keeps the global batch ``batch_size`` (each replica
        samples ``batch_size / dp``) and so the updates of one rank: the same algorithm at any
        ``dp``. ``sqrt_lr`` and ``linear_lr`` keep ``batch_size`` per replica (global batch
        ``dp x batch_size``), make ``1/dp`` of the updates (the replay ratio is kept) and scale
        ``dqn.lr`` by ``sqrt(dp)``, or by ``dp`` after a linear ramp over
        ``scaling.lr_warmup_fraction`` of the updates. ``actors`` > 0: the envs are the
        actors' (one iteration = one vector-env step of every actor), the batch rule the
        ``dp`` learners'."""
        d, sc, E = cfg["dqn"], cfg["scaling"], cfg["num_envs"]
        rule, steps_per_iter = sc["rule"], E * (actors or dp)
        batch, per_replica = d["batch_size"], d["batch_size"]
        if rule == "global_batch":
            if batch % dp:
                raise ConfigError(
                    f"dqn.batch_size={batch} is the global batch under scaling.rule=global_batch "
                    f"and must be divisible by dp={dp}; use a multiple of {dp} or "
                    "scaling.rule=sqrt_lr (per-replica batch)")
            per_replica = batch // dp
        if per_replica % cfg["micro_batches"] and cfg["pp"] > 1:
            raise ConfigError(
                f"the per-replica batch {per_replica} (dqn.batch_size={batch}, scaling.rule="
                f"{rule}, dp={dp}) must be divisible by micro_batches={cfg['micro_batches']}")
        global_batch = per_replica * dp
        spacing = phase_spacing(d["train_frequency"], steps_per_iter)
        k, spacing = updates_per_phase(cfg, spacing, global_batch)
        n_iters = math.ceil(cfg["total_steps"] / steps_per_iter)
        learn_start, every = warmup_iterations(d, steps_per_iter), spacing // steps_per_iter
        buffer = d["buffer_size"] // dp
        if buffer // E < 2 * d["n_step"]:
            raise ConfigError(
                f"dqn.buffer_size={d['buffer_size']} is the global replay capacity: at dp={dp} "
                f"each replica holds {buffer} transitions over {E} envs, too few for dqn.n_step="
                f"{d['n_step']}; raise dqn.buffer_size")
        scale = {"global_batch": 1.0, "sqrt_lr": math.sqrt(dp), "linear_lr": float(dp)}[rule]
        updates = max(0, n_iters // every - learn_start // every) * k
        return cls(dp=dp, num_envs=E, rule=rule, steps_per_iter=steps_per_iter, n_iters=n_iters,
                   learn_start=learn_start, train_every=every, updates_per_phase=k,
                   target_every=d["target_update_every"],
                   log_every=max(1, cfg["log"]["every"] // steps_per_iter),
                   eval_every=(max(1, cfg["eval"]["every"] // steps_per_iter)
                               if cfg["eval"]["every"] else 0),
                   batch_per_replica=per_replica, global_batch=global_batch,
                   buffer_per_replica=buffer, lr_scale=scale,
                   lr_warmup=sc["lr_warmup_fraction"] if rule == "linear_lr" else 0.0,
                   replay_ratio=k * global_batch / spacing,
                   exploration_steps=exploration_span(d, cfg["total_steps"]),
                   total_updates=updates,
                   warmup_share=min(learn_start, n_iters) / n_iters, n_step=d["n_step"],
                   actors=actors)

    # -- the clock --------------------------------------------------------------------------------
    def env_steps(self, iterations: int) -> int:
        return iterations * self.steps_per_iter

    def warming_up(self, it: int) -> bool:
        return it < self.learn_start

    def trains_after(self, it: int) -> bool:
        return it >= self.learn_start and (it + 1) % self.train_every == 0

    def syncs_target_after(self, it: int) -> bool:
        """Whether the env-step count crossed a multiple of ``target_every`` in iteration ``it``
        (SB3: a sync after every ``target_update_interval`` env steps, before that step's
        training phase)."""
        t = self.target_every
        return (it + 1) * self.steps_per_iter // t > it * self.steps_per_iter // t

    def logs_after(self, it: int) -> bool:
        return (it + 1) % self.log_every == 0 or it == self.n_iters - 1

    def evaluates_after(self, it: int) -> bool:
        return bool(self.eval_every) and (it + 1) % self.eval_every == 0

    def epsilon(self, cfg: dict, it: int, dp_rank: int, ranks: int | None = None) -> float:
        """This replica's (or actor's: ``dp_rank`` its index of ``ranks``) exploration at
        iteration ``it`` (1 during a uniform warm-up)."""
        d = cfg["dqn"]
        if d["uniform_warmup"] and self.warming_up(it):
            return 1.0
        return epsilon_at(d, cfg["total_steps"], self.env_steps(it), dp_rank, ranks or self.dp,
                          d["epsilon_ladder"])

    def progress(self, updates: int) -> float:
        """Share of the run's updates done: drives the lr and beta schedules."""
        return updates / max(1, self.total_updates)

    def lr(self, dqn: dict, frac: float) -> float:
        """The learning rate at progress ``frac``: ``dqn.lr`` times the rule's scale (ramped up
        over ``lr_warmup``), decayed linearly to ``lr_final_fraction`` of that at the end."""
        scale = self.lr_scale
        if self.lr_warmup > 0 and scale != 1.0:
            scale = 1.0 + (scale - 1.0) * min(1.0, frac / self.lr_warmup)
        top = dqn["lr"] * scale
        return linear_schedule(top, top * dqn["lr_final_fraction"], 1.0, frac)

    # -- for people -------------------------------------------------------------------------------
    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(replay_ratio=round(self.replay_ratio, 6), warmup_share=round(self.warmup_share, 6),
                   lr_scale=round(self.lr_scale, 6),
                   phase_env_steps=self.train_every * self.steps_per_iter,
                   updates_per_env_step=round(self.updates_per_phase
                                              / (self.train_every * self.steps_per_iter), 6),
                   env_steps_total=self.env_steps(self.n_iters),
                   warmup_env_steps=self.env_steps(min(self.learn_start, self.n_iters)))
        return out

    def describe(self) -> str:
        """Two lines for people (rank 0 prints them at start; ``hpcdqn plan`` too)."""
        steps_per_iter, phase = self.steps_per_iter, self.train_every * self.steps_per_iter
        lr = f"lr x {self.lr_scale:.4g}" + (f" after a {100 * self.lr_warmup:.0f}% ramp"
                                            if self.lr_warmup and self.lr_scale != 1 else "")
        target = f"target synced every {self.target_every} env steps"
        if self.target_every <= phase:
            target += " (once per phase, before it)"
        elif self.target_every % steps_per_iter:
            target += " (on average: syncs fall on iteration ends)"
        envs = (f"{self.num_envs} envs on each of {self.actors} actors" if self.actors
                else f"{self.num_envs} envs per replica")
        return (f"schedule (dp {self.dp}, {envs}; 1 iteration = "
                f"{steps_per_iter} global env steps): {self.n_iters} iterations; warm-up {self.learn_start} "
                f"iterations ({100 * self.warmup_share:.2f}% of the run"
                + (f"; the floor for n_step {self.n_step}: {self.n_step} steps per env before "
                   "the first update" if self.learn_start == self.n_step - 1 > 0 else "")
                + f"); {self.updates_per_phase} "
                f"updates every {self.train_every} iterations ({phase} env steps) = "
                f"{self.total_updates} updates; replay ratio {self.replay_ratio:.4g}\n"
                f"  scaling.rule {self.rule}: batch {self.batch_per_replica} per replica x "
                f"{self.dp} = global {self.global_batch}, {lr}; epsilon anneals over "
                f"{self.exploration_steps} env steps; {target}; replay "
                f"{self.buffer_per_replica} transitions per replica")
