"""The rank grid: the one place that knows the parallel layout.

``world = dp x pp``. Ranks are laid out stage-fastest, ``rank = dp_rank * pp + pp_rank``, so the
stages of one replica are neighbours (same node under block placement: pipeline traffic, the
heavy point-to-point, stays on-node; only gradient allreduces cross nodes).

- ``dp_comm``: the ranks holding the *same stage* in every replica; gradients are allreduced here.
- ``pp_comm``: the stages of *one replica*; activations and gradients flow here.

Everything else asks this object (``grid.dp``, ``grid.is_first_stage``, ...); nobody else calls
``Split`` or assumes ``COMM_WORLD``.

Nodes: ``Split_type(COMM_TYPE_SHARED)`` groups the ranks that share memory (one node each);
the grid records ``nodes``, ``ranks_per_node``, each rank's ``local_rank`` (its place on its
node, used for the GPU choice, :func:`choose_device`) and warns, once on rank 0, when a
replica's pipeline stages span nodes (cyclic placement puts them apart).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

_warned: set = set()


class LayoutError(ValueError):
    """The requested parallel layout cannot work on this world."""


def mpi():
    from mpi4py import MPI

    return MPI


def spanning_replicas(node_of: list, pp: int) -> list[int]:
    """The dp ranks whose ``pp`` stages (world ranks ``dp_rank * pp + s``) sit on more than one
    node, given ``node_of[world rank]`` (any hashable node id)."""
    if pp < 1 or len(node_of) % pp:
        raise LayoutError(f"{len(node_of)} ranks cannot hold replicas of pp={pp} stages")
    return [r for r in range(len(node_of) // pp)
            if len(set(node_of[r * pp:(r + 1) * pp])) > 1]


def span_warning(node_of: list, pp: int) -> str | None:
    """The warning text when some replica's pipeline stages span nodes; None when none does."""
    bad = spanning_replicas(node_of, pp)
    if not bad:
        return None
    shown = ", ".join(map(str, bad[:8])) + (" ..." if len(bad) > 8 else "")
    return (f"hpcdqn: warning: the pipeline stages of {len(bad)} replica(s) (dp_rank {shown}) "
            f"span nodes, so activations cross the network every micro-batch; launch with block "
            f"placement (ranks of one replica adjacent on one node, e.g. mpirun --map-by core, "
            f"srun --distribution=block) and a multiple of pp={pp} ranks per node")


def dp_degree(world: int, pp: int) -> int:
    """The data-parallel degree of ``world`` ranks in pipelines of ``pp`` stages; ``LayoutError``
    naming the fix where they do not divide (the one check of the degrees: ``RankGrid`` and
    ``parallel.layout.RunLayout`` both ask it)."""
    if pp < 1:
        raise LayoutError(f"pp={pp}: the number of pipeline stages must be >= 1")
    if world % pp:
        raise LayoutError(
            f"world size {world} is not divisible by pp={pp}: launch a multiple of "
            f"{pp} ranks (e.g. mpirun -n {pp * max(1, world // pp)}) "
            f"or choose pp among {[d for d in range(1, world + 1) if world % d == 0]}")
    return world // pp


def choose_device(requested: str, local_rank: int, visible: int) -> str:
    """The torch device for a rank: ``cpu`` stays; ``cuda``/``auto`` with GPUs visible become
    ``cuda:<local_rank % visible>`` (``cuda:0`` when one device is visible, as under
    ``--gpus-per-task=1`` or a one-entry ``CUDA_VISIBLE_DEVICES``); an explicit ``cuda:N`` stays."""
    if local_rank < 0 or visible < 0:
        raise ValueError(f"local_rank={local_rank}, visible={visible}: must be >= 0")
    if requested == "cpu" or (requested == "auto" and visible == 0):
        return "cpu"
    if requested.startswith("cuda:"):
        return requested
    if requested not in ("cuda", "auto"):
        raise ValueError(f"device={requested!r}: use cpu, cuda, cuda:N or auto")
    if visible == 0:
        raise ValueError(f"device={requested!r} but no CUDA device is visible; use device=cpu")
    return f"cuda:{local_rank % visible}"


@dataclass
class RankGrid:
    comm: object = None
    pp: int = 1
    node_color: int | None = None   # tests: fake nodes by this color instead of shared memory
    world: int = field(init=False)
    rank: int = field(init=False)
    dp: int = field(init=False)
    dp_rank: int = field(init=False)
    pp_rank: int = field(init=False)

    def __post_init__(self):
        MPI = mpi()
        if self.comm is None:
            self.comm = MPI.COMM_WORLD
        self.world = self.comm.Get_size()
        self.rank = self.comm.Get_rank()
        self.dp = dp_degree(self.world, self.pp)
        self.dp_rank, self.pp_rank = divmod(self.rank, self.pp)
        self.dp_comm = self.comm.Split(color=self.pp_rank, key=self.dp_rank)
        self.pp_comm = self.comm.Split(color=self.dp_rank, key=self.pp_rank)
        self.find_nodes()

    def find_nodes(self) -> None:
        """Collective: ``node_comm``, ``local_rank``, ``node_of`` (node index per rank),
        ``nodes``, ``ranks_per_node``; warns (rank 0, once) when stages span nodes."""
        MPI = mpi()
        if self.node_color is None:
            self.node_comm = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        else:
            self.node_comm = self.comm.Split(color=self.node_color, key=self.rank)
        self.local_rank = self.node_comm.Get_rank()
        leader = self.node_comm.bcast(self.rank, root=0)
        leaders = self.comm.allgather(leader)
        index = {x: i for i, x in enumerate(sorted(set(leaders)))}   # linear at any rank count
        self.node_of = [index[x] for x in leaders]
        self.nodes = len(index)
        self.ranks_per_node = [0] * self.nodes
        for n in self.node_of:
            self.ranks_per_node[n] += 1
        msg = span_warning(self.node_of, self.pp)
        if msg and self.is_root and msg not in _warned:
            _warned.add(msg)
            print(msg, file=sys.stderr, flush=True)

    # -- questions everyone else asks -------------------------------------------------------
    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_root(self) -> bool:
        """Rank 0 of the world: prints, logs, shows the progress bar."""
        return self.rank == 0

    @property
    def prev_stage(self) -> int | None:
        return self.pp_rank - 1 if self.pp_rank > 0 else None

    @property
    def next_stage(self) -> int | None:
        return self.pp_rank + 1 if self.pp_rank < self.pp - 1 else None

    def describe(self) -> dict:
        return {"world": self.world, "dp": self.dp, "pp": self.pp, "nodes": self.nodes,
                "ranks_per_node": self.ranks_per_node}

    def __repr__(self) -> str:
        return (f"RankGrid(world={self.world}, dp={self.dp}, pp={self.pp}, rank={self.rank}, "
                f"dp_rank={self.dp_rank}, pp_rank={self.pp_rank}, local_rank={self.local_rank}, "
                f"nodes={self.nodes})")

    def free(self) -> None:
        for c in (self.dp_comm, self.pp_comm, self.node_comm):
            try:
                c.Free()
            except Exception:
                pass
