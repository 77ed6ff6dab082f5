"""What a run keeps on disk. Checkpoints: one HDF5 file written by every rank at once; exact
resume; reshard; validation. And the files made from a run: the final model and exports.

- ``errors``: ``CheckpointError`` and its kinds (corrupt, mismatch/incompatible, transient,
  I/O, run directory busy), raised by every store module, and their agreement over the ranks
  (``agree``, ``agree_write``: ``parallel.agree`` with these kinds);
- ``bounds``: metadata typed and bounded before use, the format's major/minor rule;
- ``schema``: what a checkpoint file contains (format, dataset names, the plan of parts);
- ``codec``: per-rank state as JSON (arrays, RNGs, env states; no pickle), part checksums;
- ``mpiio``: the I/O protocol (parallel or serial), writeback pacing, the in-memory HDF5
  image (``SparseImage``), MPI-IO hints and ROMIO (for MPI-IO users);
- ``storage``: the interface between planning and bytes: a backend (``write``, ``open``) and
  the ``Source`` every reader sees (datasets by name, attributes), never an ``h5py.File``;
- ``writer``: ``write_checkpoint`` (collective), ``write_parts``, the HDF5 backends
  (``ParallelHDF5``, ``SerialHDF5``);
- ``reader``: reading, validation (``verify``), a stage's and a shard's ``state_dict``;
- ``reshard``: the reshard rules, loading the replay into another layout;
- ``rundir``: a run directory's checkpoints (names, ``candidates``, ``resolve``, ``set_aside``),
  ``resume_config``, ``truncate_metrics``; its lock (one job per directory), ``check_fresh``;
- ``checkpointer``: ``Checkpointer``, what the training loop calls (schedule, save, resume):
  it collects the parts' ``state_dict()`` and hands them back with ``load_state_dict()``;
- ``modelfile``: the final model file (``model.h5``); ``export``: a replay as a Minari dataset.
"""

from __future__ import annotations

from hpcdqn.store.checkpointer import Checkpointer
from hpcdqn.store.codec import crc
from hpcdqn.store.errors import (CheckpointCorrupt, CheckpointError, CheckpointIncompatible,
                                 CheckpointIOError, CheckpointMismatch, CheckpointTransient,
                                 RunDirBusy)
from hpcdqn.store.mpiio import SERIAL_ENV, io_mode
from hpcdqn.store.reader import read_meta, verify
from hpcdqn.store.rundir import (candidates, checkpoint_dir, resolve, resume_config,
                                 truncate_metrics, warn)
from hpcdqn.store.schema import FORMAT, PARAM_GROUPS, REPLAY_ROWS
from hpcdqn.store.writer import write_checkpoint

__all__ = ["FORMAT", "PARAM_GROUPS", "REPLAY_ROWS", "SERIAL_ENV",
           "CheckpointCorrupt", "CheckpointError", "CheckpointIOError", "CheckpointIncompatible",
           "CheckpointMismatch", "CheckpointTransient", "RunDirBusy", "Checkpointer", "candidates", "checkpoint_dir", "crc", "io_mode",
           "read_meta", "resolve", "resume_config", "truncate_metrics", "verify", "warn",
           "write_checkpoint"]
