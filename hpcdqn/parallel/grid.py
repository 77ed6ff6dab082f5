"""The rank grid: the one place that knows the parallel layout.

``world = dp x pp``. Ranks are laid out stage-fastest, ``rank = dp_rank * pp + pp_rank``, so the
stages of one replica are neighbours (same node under block placement: pipeline traffic, the
heavy point-to-point, stays on-node; only gradient allreduces cross nodes).

- ``dp_comm``: the ranks holding the *same stage* in every replica; gradients are allreduced here.
- ``pp_comm``: the stages of *one replica*; activations and gradients flow here.

Everything else asks this object (``grid.dp``, ``grid.is_first_stage``, ...); nobody else calls
``Split`` or assumes ``COMM_WORLD``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class LayoutError(ValueError):
    """The requested parallel layout cannot work on this world."""


def mpi():
    from mpi4py import MPI

    return MPI


@dataclass
class RankGrid:
    comm: object = None
    pp: int = 1
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
        if self.pp < 1:
            raise LayoutError(f"pp={self.pp}: the number of pipeline stages must be >= 1")
        if self.world % self.pp:
            raise LayoutError(
                f"world size {self.world} is not divisible by pp={self.pp}: launch a multiple of "
                f"{self.pp} ranks (e.g. mpirun -n {self.pp * max(1, self.world // self.pp)}) "
                f"or choose pp among {[d for d in range(1, self.world + 1) if self.world % d == 0]}")
        self.dp = self.world // self.pp
        self.dp_rank, self.pp_rank = divmod(self.rank, self.pp)
        self.dp_comm = self.comm.Split(color=self.pp_rank, key=self.dp_rank)
        self.pp_comm = self.comm.Split(color=self.dp_rank, key=self.pp_rank)

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
        return {"world": self.world, "dp": self.dp, "pp": self.pp}

    def __repr__(self) -> str:
        return (f"RankGrid(world={self.world}, dp={self.dp}, pp={self.pp}, rank={self.rank}, "
                f"dp_rank={self.dp_rank}, pp_rank={self.pp_rank})")

    def free(self) -> None:
        for c in (self.dp_comm, self.pp_comm):
            try:
                c.Free()
            except Exception:
                pass
