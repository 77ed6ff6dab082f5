"""Writing a checkpoint: the plan's parts from every rank into one file, then published.

Writing (``h5py`` with MPI): all ranks open the file with the ``mpio`` driver, create every
dataset collectively (same shapes and attributes on every rank), then write their parts with
collective I/O (ranks without a part join with an empty selection). Without parallel h5py
(or with ``HPCDQN_H5_SERIAL=1``) the same file is written by rank 0, the others sending their
parts to it. Either way the file is written as ``<name>.tmp``, flushed, closed and fsynced;
after a barrier rank 0 renames it into place (atomic), fsyncs the directory, and only then
rewrites the ``latest`` pointer (tmp + ``os.replace``) and removes checkpoints beyond
``keep_last``. A kill during a write leaves a ``.tmp`` file that nobody loads.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import h5py
import numpy as np

from hpcdqn import __version__
from hpcdqn.store.codec import crc
from hpcdqn.store.mpiio import Writeback, fsync_path, io_mode, mpi_info
from hpcdqn.store.rundir import checkpoint_dir, ckpt_name
from hpcdqn.store.schema import FORMAT, LATEST, plan, rows_per_piece

TEST_SLEEP_ENV = "HPCDQN_TEST_CKPT_SLEEP"  # test hook: "SECONDS[@ENV_STEPS]" sleep before the rename

# Parallel writes go out in 32 MiB pieces, each one's writeback started as soon as it is written
# (``Writeback``): on the test VM 32 MiB pieces with a 64 MiB window ran at 2.5-3 GB/s (~dd)
# where 256 MiB pieces with a 256-1024 MiB window ran at 1.1-1.7 GB/s (page cache churn).
WRITE_PIECE_BYTES = 32 * 2**20


def write_checkpoint(run_dir, comm, layout: dict, env: dict, sizes: list[int], cfg: dict,
                     counters: dict, mine: dict, rank_json: bytes, keep_last: int,
                     mode: str | None = None) -> dict:
    """Collective over ``comm`` (the world). ``mine``: {dataset name: array} of the parts this
    rank owns (replay shard rows, its layers, ...). Returns {'path', 'seconds', 'bytes'}."""
    t0 = time.perf_counter()
    mode = mode or io_mode()
    rank = comm.Get_rank()
    d = checkpoint_dir(run_dir)
    if rank == 0:
        d.mkdir(parents=True, exist_ok=True)
        for stale in d.glob("*.tmp"):
            stale.unlink(missing_ok=True)
    counters = comm.bcast(counters if rank == 0 else None, root=0)
    final = d / ckpt_name(int(counters["env_steps"]))
    tmp = d / (final.name + ".tmp")

    lengths = comm.allgather(len(rank_json))
    maxlen = max(1, max(lengths))
    buf = np.zeros(maxlen, np.uint8)
    buf[:len(rank_json)] = np.frombuffer(rank_json, np.uint8)
    mine = dict(mine)
    mine["rank_state"] = buf[None]
    mine["rank_state_len"] = np.array([len(rank_json)], np.int64)
    specs = plan(layout, env, sizes, maxlen)
    # every part's checksum, known everywhere (attributes are written collectively)
    my_crcs = {}
    for s in specs:
        for j, (own, a, b) in enumerate(s.parts):
            if own == rank:
                arr = mine.get(s.name)
                if arr is None:
                    raise RuntimeError(f"rank {rank} owns a part of '{s.name}' but has no data for it")
                arr = np.ascontiguousarray(arr, dtype=s.dtype)
                if arr.shape != (b - a,) + tuple(s.shape[1:]):
                    raise RuntimeError(f"'{s.name}': rank {rank} has shape {arr.shape}, the plan "
                                       f"expects {(b - a,) + tuple(s.shape[1:])}")
                mine[s.name] = arr
                my_crcs[(s.name, j)] = crc(arr)
    crcs = {}
    for part in comm.allgather(my_crcs):
        crcs.update(part)
    root_attrs = {"format": FORMAT, "version": __version__, "io_mode": mode,
                  "config": json.dumps(cfg), "layout": json.dumps(layout), "env": json.dumps(env),
                  "layer_sizes": json.dumps(sizes), "counters": json.dumps(counters)}
    nbytes = sum(int(np.prod(s.shape, dtype=np.int64)) * s.dtype.itemsize for s in specs)

    if mode == "parallel":
        _write_parallel(tmp, comm, specs, mine, crcs, root_attrs)
    else:
        _write_serial(tmp, comm, specs, mine, crcs, root_attrs)
    sleep = _test_sleep(int(counters["env_steps"]))
    if sleep > 0:
        time.sleep(sleep)     # test hook: a window in which a kill -9 hits a half-done checkpoint
    comm.Barrier()            # every rank's data is in the (closed, fsynced) file
    if rank == 0:
        _publish(d, tmp, final, keep_last)
    comm.Barrier()
    return {"path": str(final), "seconds": time.perf_counter() - t0, "bytes": nbytes}


def _publish(d: Path, tmp: Path, final: Path, keep_last: int) -> None:
    """Rank 0, once every rank's data is in ``tmp``: rename it into place, then point ``latest``
    at it and prune."""
    os.replace(tmp, final)
    fsync_path(d)
    ptr = d / (LATEST + ".tmp")
    with open(ptr, "w") as fh:
        fh.write(final.name + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(ptr, d / LATEST)
    fsync_path(d)
    # prune in write order (not name order: after a fallback resume, names can repeat or
    # run backwards), never the checkpoint just written
    written = sorted(d.glob("ckpt-*.h5"), key=lambda p: p.stat().st_mtime_ns)
    for old in written[:-keep_last]:
        if old != final:
            old.unlink(missing_ok=True)


def _test_sleep(env_steps: int) -> float:
    """``HPCDQN_TEST_CKPT_SLEEP=SECONDS[@MIN_ENV_STEPS]`` (tests only)."""
    v = os.environ.get(TEST_SLEEP_ENV, "")
    if not v:
        return 0.0
    secs, _, at = v.partition("@")
    return float(secs) if env_steps >= int(at or 0) else 0.0


def _create_all(f, specs, crcs, root_attrs, fill_never=True, contiguous=False):
    """``contiguous``: ignore the specs' chunk shapes (parallel writer): a rank's shard is then
    one contiguous byte range of the file, written with plain large writes, and its file offset
    is known (``Writeback`` streams exactly that range to disk)."""
    for k, v in root_attrs.items():
        f.attrs[k] = v
    for s in specs:
        kw = {}
        if s.chunks is not None and s.shape[0] > 0 and not contiguous:
            kw["chunks"] = s.chunks
        if fill_never:
            kw["fill_time"] = "never"   # every byte is written by its owner: no fill pass
        ds = f.create_dataset(s.name, shape=s.shape, dtype=s.dtype, **kw)
        ds.attrs["parts"] = json.dumps([[a, b] for _, a, b in s.parts])
        ds.attrs["crc32"] = json.dumps([crcs.get((s.name, j), 0) for j in range(len(s.parts))])


def _file_kwargs():
    return {"libver": ("earliest", "v110")}


def _write_parallel(tmp, comm, specs, mine, crcs, root_attrs):
    from h5py import h5fd, h5p, h5s

    rank = comm.Get_rank()
    kw = _file_kwargs()
    kw["info"] = mpi_info()
    try:
        f = h5py.File(tmp, "w", driver="mpio", comm=comm, alignment_threshold=2**20,
                      alignment_interval=2**20, **kw)
    except TypeError:  # pragma: no cover - old h5py
        f = h5py.File(tmp, "w", driver="mpio", comm=comm, **kw)
    flusher = None
    try:
        _create_all(f, specs, crcs, root_attrs, contiguous=True)
        dxpl = h5p.create(h5p.DATASET_XFER)
        dxpl.set_dxpl_mpio(h5fd.MPIO_COLLECTIVE)
        flusher = Writeback(tmp)
        for s in specs:
            if int(np.prod(s.shape, dtype=np.int64)) == 0:
                continue
            ds = f[s.name].id
            base = ds.get_offset()      # file offset of row 0 (contiguous layout), or None
            rowbytes = int(np.prod(s.shape[1:], dtype=np.int64)) * s.dtype.itemsize
            rpp = rows_per_piece(s, WRITE_PIECE_BYTES)
            n_pieces = max(math.ceil((b - a) / rpp) for _, a, b in s.parts)
            my = [(a, b) for own, a, b in s.parts if own == rank]
            arr = mine.get(s.name) if my else None
            start = my[0][0] if my else 0
            dummy = np.zeros((1,) + tuple(s.shape[1:]), s.dtype)
            for p in range(n_pieces):
                fs = ds.get_space()
                if arr is not None and p * rpp < len(arr):
                    piece = np.ascontiguousarray(arr[p * rpp:(p + 1) * rpp])
                    fs.select_hyperslab((start + p * rpp,) + (0,) * (len(s.shape) - 1), piece.shape)
                    ms = h5s.create_simple(piece.shape)
                    ds.write(ms, fs, piece, dxpl=dxpl)
                    flusher.wrote(piece.nbytes, None if base is None else
                                  base + (start + p * rpp) * rowbytes)
                else:
                    fs.select_none()
                    ms = h5s.create_simple(dummy.shape)
                    ms.select_none()
                    ds.write(ms, fs, dummy, dxpl=dxpl)
        f.flush()             # MPI_File_sync
    finally:
        f.close()
        if flusher is not None:
            flusher.close()
    if rank == 0:
        fsync_path(tmp)


def _write_serial(tmp, comm, specs, mine, crcs, root_attrs):
    """Rank 0 writes everything; the owners send their parts in plan order."""
    from mpi4py import MPI

    rank = comm.Get_rank()
    f = h5py.File(tmp, "w", **_file_kwargs()) if rank == 0 else None
    try:
        if f is not None:
            _create_all(f, specs, crcs, root_attrs, fill_never=False)
        for s in specs:
            if int(np.prod(s.shape, dtype=np.int64)) == 0:
                continue
            rpp = rows_per_piece(s)
            for own, a, b in s.parts:
                if rank != own and rank != 0:
                    continue
                arr = mine.get(s.name) if rank == own else None
                for p0 in range(0, b - a, rpp):
                    p1 = min(b - a, p0 + rpp)
                    if rank == own == 0:
                        f[s.name][a + p0:a + p1] = arr[p0:p1]
                    elif rank == own:
                        piece = np.ascontiguousarray(arr[p0:p1])
                        comm.Send([piece.reshape(-1).view(np.uint8), MPI.BYTE], dest=0, tag=7)
                    else:
                        piece = np.empty((p1 - p0,) + tuple(s.shape[1:]), s.dtype)
                        comm.Recv([piece.reshape(-1).view(np.uint8), MPI.BYTE], source=own, tag=7)
                        f[s.name][a + p0:a + p1] = piece
        if f is not None:
            f.flush()
    finally:
        if f is not None:
            f.close()
    if rank == 0:
        fsync_path(tmp)
