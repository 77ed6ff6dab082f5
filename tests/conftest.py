"""Shared test set-up: tests/ on sys.path (for mpi_util and slurm_cluster), whichever
subfolder a test lives in; and the markers every test gets from what its module uses:

- ``mpi``: the module launches real ``mpirun`` jobs (``mpi_util.run_mpi`` / ``hpcdqn``);
- ``slurm``: it starts a real Slurm cluster (``slurm_cluster``, ``netns_slurm``);
- ``atari``: it needs ale-py (Atari games).

So ``pytest -m "not mpi"`` runs the one-process tests, ``pytest -m "not slurm"`` leaves the
clusters out, ``pytest -m atari`` runs the Atari tests alone; plain ``pytest`` runs them all.
"""
from functools import lru_cache
from pathlib import Path

import pytest

MARKS = {
    "mpi": ("run_mpi(", "hpcdqn(", "mpirun_cmd(", "nodes.run_mpi("),
    "slurm": ("slurm_cluster_fixture", "netns_slurm_fixture"),
    "atari": ("ale_py",),
}


@lru_cache(maxsize=None)
def _marks_of(path: str) -> tuple:
    src = Path(path).read_text()
    return tuple(m for m, words in MARKS.items() if any(w in src for w in words))


def pytest_collection_modifyitems(config, items):
    for item in items:
        for mark in _marks_of(str(item.path)):
            item.add_marker(getattr(pytest.mark, mark))
