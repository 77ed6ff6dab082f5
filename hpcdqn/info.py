"""`hpcdqn info`: what this installation can do."""

from __future__ import annotations

import platform


def collect() -> dict:
    import gymnasium
    import h5py
    import numpy
    import torch
    from mpi4py import MPI

    from hpcdqn import __version__

    thread_levels = {MPI.THREAD_SINGLE: "single", MPI.THREAD_FUNNELED: "funneled",
                     MPI.THREAD_SERIALIZED: "serialized", MPI.THREAD_MULTIPLE: "multiple"}
    cuda = torch.cuda.is_available()
    from hpcdqn.store import io_mode

    h5mpi = bool(h5py.get_config().mpi)
    return {
        "hpcdqn": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "gymnasium": gymnasium.__version__,
        "mpi4py": __import__("mpi4py").__version__,
        "h5py": h5py.__version__,
        "mpi_library": MPI.Get_library_version().strip().splitlines()[0],
        "mpi_standard": "%d.%d" % MPI.Get_version(),
        "mpi_thread_level": thread_levels.get(MPI.Query_thread(), str(MPI.Query_thread())),
        "hdf5": h5py.version.hdf5_version,
        "h5py_mpi": h5mpi,
        "checkpoint_io": "parallel (per-rank pwrite of its own slabs)" if io_mode() == "parallel"
        else "serial through rank 0",
        "world_size": MPI.COMM_WORLD.Get_size(),
        "rank": MPI.COMM_WORLD.Get_rank(),
        "torch_device": f"cuda ({torch.cuda.get_device_name(0)})" if cuda else "cpu",
        "cuda_devices": torch.cuda.device_count() if cuda else 0,
        "torch_threads": torch.get_num_threads(),
    }
