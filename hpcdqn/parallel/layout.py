"""The run's layout, resolved once: who does what on which rank, and the figures that follow.

``RunLayout.resolve(cfg, world, rank)`` validates, in this one place, everything the layout
decides before a byte is allocated: the degrees (``world = dp x pp``), this rank's
coordinates and its *role*, the env-step ``Schedule`` for ``dp`` replicas (``rl.schedule``),
the replay each replica holds and the per-rank memory cap's override. ``place`` adds the
network (``rl.networks`` on the meta device: nothing is allocated) and its pipeline stage
bounds once the observation and action spaces are known. ``hpcdqn train`` builds one at set-up
and hands it down (memory plan, learner, replay, model file); ``hpcdqn plan`` builds the same
one for any world size and prints it. The checkpointer and the model-file loader size and cut
through ``replay_per_replica`` and ``stage_bounds`` here.

Roles: with ``actors=0`` every rank is ``env+learner`` (a replica's first stage steps its envs
and holds its replay shard; every stage learns its share of the network). With ``actors=N`` the
world is ``dp x pp`` learner ranks (world ranks ``0 .. dp*pp - 1``: rank 0 stays the one that
writes files) and then N ``actor`` ranks; actor ``i`` feeds replica ``i mod dp`` (its first
stage, which holds the replica's replay shard)
(``hpcdqn.actors``). A layout names the role of every rank (``roles``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from hpcdqn.config import ConfigError
from hpcdqn.parallel.grid import LayoutError, dp_degree
from hpcdqn.parallel.partition import cut_into_stages, describe, layer_offsets, param_ranges
from hpcdqn.rl.networks import network_layers
from hpcdqn.rl.schedule import Schedule
from hpcdqn.sysinfo import parse_bytes


class Role(str, enum.Enum):
    """What a rank does in the run."""
    ENV_LEARNER = "env+learner"     # steps its replica's envs (first stages), learns its stage
    LEARNER = "learner"             # holds a replay shard fed by actors, learns (actors > 0)
    ACTOR = "actor"                 # steps envs with a local copy of the network, sends transitions


def check_actors(cfg: dict, world: int) -> int:
    """The learner ranks of ``cfg`` on ``world`` ranks (``world - actors``); ``LayoutError`` /
    ``ConfigError`` naming the numbers and the fix where actor ranks cannot work."""
    n, pp = cfg["actors"], cfg["pp"]
    if not n:
        return world
    learners = world - n
    if learners < 1:
        raise LayoutError(f"actors={n} needs at least one learner rank besides the actors, but "
                          f"the world has {world} ranks: launch mpirun -n {n + pp} or more "
                          f"(world = actors + dp x pp) or lower actors")
    if learners % pp:
        raise LayoutError(f"actors={n} on {world} ranks leaves {learners} learner ranks, not a "
                          f"multiple of pp={pp}: launch mpirun -n {n + pp * max(1, learners // pp)} "
                          f"(world = actors + dp x pp)")
    return learners


def stage_bounds(layers, pp: int, network: dict) -> list:
    """Stages as boundary pairs for ``pp`` stages of ``layers`` (``network``: the config's
    ``[network]`` section: ``cuts``, ``split_layers``); ``PartitionError`` if it cannot split."""
    if pp == 1:
        return [((0, 0), (len(layers), 0))]
    return cut_into_stages(layers, pp, network["cuts"], network["split_layers"])


def replay_per_replica(cfg: dict, dp: int) -> int:
    """Transitions each replica's replay shard holds (``dqn.buffer_size`` is the global capacity)."""
    return cfg["dqn"]["buffer_size"] // dp


@dataclass(frozen=True)
class RunLayout:
    """One run on ``world`` ranks, seen from ``rank`` (identical on every rank but for that)."""
    world: int
    dp: int
    pp: int
    rank: int
    dp_rank: int
    pp_rank: int
    roles: tuple            # Role of every world rank
    schedule: Schedule      # the env-step clock for dp replicas
    replay_per_replica: int  # transitions in each replica's shard (on its first stage)
    mem_per_rank: str | None = None   # --mem-per-rank (None: HPCDQN_MEM_PER_RANK, Slurm, MemTotal)
    layers: tuple = ()      # the whole network on the meta device (``place``)
    stages: tuple = ()      # per stage: (start boundary, stop boundary)
    param_ranges: tuple = ()    # per stage: [lo, hi) of the flat parameter vector
    stage_contents: tuple = ()  # per stage: what it holds, for people
    actors: int = 0         # actor ranks (world ranks learners .. world - 1)

    @classmethod
    def resolve(cls, cfg: dict, world: int, rank: int = 0,
                mem_per_rank: str | None = None) -> "RunLayout":
        """The layout of ``cfg`` on ``world`` ranks; ``LayoutError`` / ``ConfigError`` naming
        the key and the fix where it cannot work."""
        pp, actors = cfg["pp"], cfg["actors"]
        learners = check_actors(cfg, world)
        dp = dp_degree(learners, pp)
        if mem_per_rank:
            parse_bytes(mem_per_rank)       # a bad size stops here, before anything is built
        dp_rank, pp_rank = divmod(rank, pp) if rank < learners else ((rank - learners) % dp, 0)
        roles = (Role.LEARNER,) * learners + (Role.ACTOR,) * actors if actors else \
            (Role.ENV_LEARNER,) * world
        return cls(world=world, dp=dp, pp=pp, rank=rank, dp_rank=dp_rank, pp_rank=pp_rank,
                   roles=roles, schedule=Schedule.resolve(cfg, dp, actors),
                   replay_per_replica=replay_per_replica(cfg, dp), mem_per_rank=mem_per_rank,
                   actors=actors)

    def place(self, network: dict, obs_shape: tuple, n_actions: int) -> "RunLayout":
        """This layout with its network (``network``: the config's ``[network]`` section), built
        by ``rl.networks`` on the meta device, and that network's pipeline stages;
        ``PartitionError`` where the split cannot be made."""
        layers = network_layers(network, obs_shape, n_actions)
        stages = stage_bounds(layers, self.pp, network)
        if self.pp == 1:
            ranges, contents = [(0, layer_offsets(layers)[-1])], [f"layers [0, {len(layers)})"]
        else:
            ranges, contents = param_ranges(layers, stages), describe(stages)
        return replace(self, layers=tuple(layers), stages=tuple(stages),
                       param_ranges=tuple(ranges), stage_contents=tuple(contents))

    # -- questions about this rank ----------------------------------------------------------------
    @property
    def role(self) -> Role:
        return self.roles[self.rank]

    @property
    def steps_envs(self) -> bool:
        """Whether this rank steps envs and holds a replay shard (its replica's first stage)."""
        return self.role is Role.ENV_LEARNER and self.pp_rank == 0

    @property
    def replay_here(self) -> int:
        """Transitions of replay this rank holds."""
        holds = self.steps_envs or self.role is Role.LEARNER
        return self.replay_per_replica if holds else 0

    @property
    def learners(self) -> int:
        """Learner ranks (world ranks ``0 .. learners - 1``)."""
        return self.world - self.actors

    @property
    def actor_index(self) -> int:
        """This actor's index ``i`` (0 .. actors - 1); it feeds replica ``i mod dp``."""
        return self.rank - self.learners

    @property
    def feeds(self) -> int:
        """An actor's learner: the world rank of its replica's first stage."""
        return self.dp_rank * self.pp

    def actors_of(self, dp_rank: int) -> list[int]:
        """World ranks of the actors that feed replica ``dp_rank``, in the fixed order a
        learner inserts their transitions (lockstep)."""
        return [self.learners + i for i in range(self.actors) if i % self.dp == dp_rank]

    # -- for people -------------------------------------------------------------------------------
    def describe_roles(self) -> str:
        """The ranks of every role, e.g. ``roles: env+learner: ranks 0-3 (envs on 0, 2)``."""
        parts = []
        for role in dict.fromkeys(self.roles):
            ranks = [r for r, x in enumerate(self.roles) if x is role]
            firsts = [r for r in ranks if r % self.pp == 0] if role is not Role.ACTOR else []
            what = "envs and replay" if role is Role.ENV_LEARNER else "replay"
            span = f"{ranks[0]}-{ranks[-1]}" if len(ranks) > 1 else f"{ranks[0]}"
            parts.append(f"{role.value}: ranks {span}" + (
                f" ({what} on first stages {_short(firsts)})" if self.pp > 1 and firsts else "")
                + (f" (actor i feeds learner replica i mod {self.dp})" if role is Role.ACTOR else ""))
        return "roles: " + "; ".join(parts)

    def as_dict(self) -> dict:
        """The layout's figures (``hpcdqn plan --json``)."""
        return {"world": self.world, "dp": self.dp, "pp": self.pp, "actors": self.actors,
                "roles": [r.value for r in self.roles],
                "replay_per_replica": self.replay_per_replica,
                "stages": [list(map(list, s)) for s in self.stages],
                "param_ranges": [list(r) for r in self.param_ranges]}


def _short(ranks: list[int]) -> str:
    shown = ", ".join(map(str, ranks[:8]))
    return shown + (" ..." if len(ranks) > 8 else "")
