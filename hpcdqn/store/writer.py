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
from hpcdqn.store.agree import Local, agree, fault, set_steps
from hpcdqn.store.codec import attrs_crc, crc
from hpcdqn.store.errors import CheckpointIOError
from hpcdqn.store.mpiio import Writeback, fsync_path, io_mode, mpi_info, stripe_bytes
from hpcdqn.store.rundir import checkpoint_dir, ckpt_name
from hpcdqn.store.schema import FORMAT, LATEST, plan, rows_per_piece

TEST_SLEEP_ENV = "HPCDQN_TEST_CKPT_SLEEP"  # test hook: "SECONDS[@ENV_STEPS]" sleep before the rename

# Parallel writes go out in 32 MiB pieces, each one's writeback started as soon as it is written
# (``Writeback``): on the test VM 32 MiB pieces with a 64 MiB window ran at 2.5-3 GB/s (~dd)
# where 256 MiB pieces with a 256-1024 MiB window ran at 1.1-1.7 GB/s (page cache churn).
WRITE_PIECE_BYTES = 32 * 2**20
FIRST_REPLAY = ("replay/obs", "replay/frames")   # where the test hook's mid-data fault strikes


def write_checkpoint(run_dir, comm, layout: dict, env: dict, sizes: list[int], cfg: dict,
                     counters: dict, mine: dict, rank_json: bytes, keep_last: int,
                     mode: str | None = None) -> dict:
    """Collective over ``comm`` (the world). ``mine``: {dataset name: array} of the parts this
    rank owns (replay shard rows, its layers, ...). Returns {'path', 'seconds', 'bytes'}.
    A failure on any rank in any phase raises the same ``CheckpointIOError`` on every rank
    (``agree``), after the temporary file is removed; the previous checkpoint is untouched."""
    t0 = time.perf_counter()
    mode = mode or io_mode()
    rank = comm.Get_rank()
    d = checkpoint_dir(run_dir)
    counters = comm.bcast(counters if rank == 0 else None, root=0)
    set_steps(int(counters["env_steps"]))
    final = d / ckpt_name(int(counters["env_steps"]))
    tmp = d / (final.name + ".tmp")
    with Local() as loc:
        if rank == 0:
            d.mkdir(parents=True, exist_ok=True)
            for stale in d.glob("*.tmp"):      # ours: the run directory is locked (rundir.Lock)
                stale.unlink(missing_ok=True)
    agree(comm, "create", tmp, loc.err)
    with Local() as loc:
        mine = _prepare(rank, mine, rank_json, layout, env, sizes)
    agree(comm, "prepare", tmp, loc.err)
    maxlen = max(1, max(comm.allgather(len(rank_json))))
    specs = plan(layout, env, sizes, maxlen)
    with Local() as loc:
        my_crcs = _part_crcs(rank, specs, mine, maxlen)
    agree(comm, "prepare", tmp, loc.err)
    crcs = {}
    for part in comm.allgather(my_crcs):
        crcs.update(part)
    root_attrs = {"format": FORMAT, "version": __version__, "io_mode": mode,
                  "config": json.dumps(cfg), "layout": json.dumps(layout), "env": json.dumps(env),
                  "layer_sizes": json.dumps(sizes), "counters": json.dumps(counters)}
    root_attrs["attrs_crc32"] = attrs_crc(root_attrs)
    nbytes = sum(int(np.prod(s.shape, dtype=np.int64)) * s.dtype.itemsize for s in specs)

    if mode == "parallel":
        _write_parallel(tmp, comm, specs, mine, crcs, root_attrs)
    else:
        _write_serial(tmp, comm, specs, mine, crcs, root_attrs)
    sleep = _test_sleep(int(counters["env_steps"]))
    if sleep > 0:
        time.sleep(sleep)     # test hook: a window in which a kill -9 hits a half-done checkpoint
    with Local() as loc:      # every rank's data is in the (closed, fsynced) file
        fault("rename", rank, final)
    _agree_or_discard(comm, "rename", tmp, loc.err)
    with Local() as loc:
        if rank == 0:
            _publish(d, tmp, final, keep_last)
    _agree_or_discard(comm, "rename", tmp, loc.err)
    return {"path": str(final), "seconds": time.perf_counter() - t0, "bytes": nbytes}


def _prepare(rank, mine, rank_json, layout, env, sizes) -> dict:
    mine = dict(mine)
    buf = np.frombuffer(rank_json, np.uint8)
    mine["rank_state"] = buf[None]
    mine["rank_state_len"] = np.array([len(rank_json)], np.int64)
    return mine


def _part_crcs(rank, specs, mine, maxlen) -> dict:
    """Every part this rank owns, checked against the plan (in place) and checksummed."""
    row = np.zeros(maxlen, np.uint8)
    row[:mine["rank_state"].shape[1]] = mine["rank_state"][0]
    mine["rank_state"] = row[None]
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
    return my_crcs


def _agree_or_discard(comm, phase, tmp, err, f=None, flusher=None) -> None:
    """``agree``; on a failure anywhere every rank is here: the open file is closed together,
    the temporary removed (rank 0), then the agreed error raised."""
    try:
        agree(comm, phase, tmp, err)
    except CheckpointIOError:
        with Local():
            if flusher is not None:
                flusher.close()
        with Local():
            if f is not None and f.id.valid:
                f.close()
        if comm.Get_rank() == 0:
            with Local():
                Path(tmp).unlink(missing_ok=True)
        raise


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


def _open_parallel(tmp, comm):
    kw = _file_kwargs()
    kw["info"] = mpi_info(Path(tmp).parent)
    align = stripe_bytes(Path(tmp).parent)   # each shard starts on a stripe boundary
    try:
        return h5py.File(tmp, "w", driver="mpio", comm=comm, alignment_threshold=2**20,
                         alignment_interval=align, **kw)
    except TypeError:  # pragma: no cover - old h5py
        return h5py.File(tmp, "w", driver="mpio", comm=comm, **kw)


def _write_parallel(tmp, comm, specs, mine, crcs, root_attrs):
    """Phases open (per-rank checks before the collective MPI_File_open), create, mid-data,
    flush, close, each agreed. A fault is injected *after* the
    collective call of its phase returns (as a real ENOSPC/EIO is reported by one rank's
    MPI-IO write or sync), never instead of it."""
    rank = comm.Get_rank()
    f = flusher = None
    with Local() as loc:      # MPI_File_open is collective: every rank checks first, agreed
        precheck_open(tmp, _my_bytes(rank, specs))
        fault("open", rank, tmp)
    _agree_or_discard(comm, "open", tmp, loc.err)
    with Local() as loc:
        f = _open_parallel(tmp, comm)
        _create_all(f, specs, crcs, root_attrs, contiguous=True)
        flusher = Writeback(tmp)
        fault("create", rank, tmp)
    _agree_or_discard(comm, "create", tmp, loc.err, f, flusher)
    wrote = _write_parallel_data(f, comm, specs, mine, tmp, flusher)
    with Local() as loc:
        f.flush()             # MPI_File_sync (collective)
        fault("flush", rank, tmp)
    _agree_or_discard(comm, "flush", tmp, loc.err, f, flusher)
    with Local() as loc:
        f.close()             # collective
        flusher.close()
        fault("close", rank, tmp)
        if rank == 0 or wrote:
            fsync_path(tmp)   # every rank that wrote (its file system client's dirty data)
    _agree_or_discard(comm, "close", tmp, loc.err, None, flusher)


def _my_bytes(rank, specs) -> int:
    return sum((b - a) * int(np.prod(s.shape[1:], dtype=np.int64)) * s.dtype.itemsize
               for s in specs for own, a, b in s.parts if own == rank)


def precheck_open(path, nbytes: int) -> None:
    """This rank's checks before the collective open of ``path`` for writing: the directory
    exists and is writable, the name is not taken by a non-file, and the file system has room
    for this rank's ``nbytes``. Raises OSError (with errno) so ``agree`` can name it."""
    import errno

    path = Path(path)
    d = path.parent
    if not d.is_dir():
        raise OSError(errno.ENOENT, "checkpoint directory does not exist", str(d))
    if not os.access(d, os.W_OK | os.X_OK):
        raise OSError(errno.EACCES, "checkpoint directory is not writable", str(d))
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise OSError(errno.EEXIST, "exists and is not a regular file", str(path))
    st = os.statvfs(d)
    free = st.f_bavail * st.f_frsize
    if nbytes > free:
        raise OSError(errno.ENOSPC, f"{nbytes} bytes to write, {free} free", str(d))


def _write_parallel_data(f, comm, specs, mine, tmp, flusher) -> bool:
    """Every piece is a collective write, agreed before the next; True if this rank wrote."""
    from h5py import h5fd, h5p, h5s

    rank = comm.Get_rank()
    dxpl = h5p.create(h5p.DATASET_XFER)
    dxpl.set_dxpl_mpio(h5fd.MPIO_COLLECTIVE)
    wrote = False
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
            with Local() as loc:
                fs = ds.get_space()
                if arr is not None and p * rpp < len(arr):
                    piece = np.ascontiguousarray(arr[p * rpp:(p + 1) * rpp])
                    fs.select_hyperslab((start + p * rpp,) + (0,) * (len(s.shape) - 1), piece.shape)
                    ms = h5s.create_simple(piece.shape)
                    ds.write(ms, fs, piece, dxpl=dxpl)
                    wrote = True
                    flusher.wrote(piece.nbytes, None if base is None else
                                  base + (start + p * rpp) * rowbytes)
                else:
                    fs.select_none()
                    ms = h5s.create_simple(dummy.shape)
                    ms.select_none()
                    ds.write(ms, fs, dummy, dxpl=dxpl)
                if s.name in FIRST_REPLAY and p == 0:
                    fault("mid-data", rank, tmp)
            _agree_or_discard(comm, "mid-data", tmp, loc.err, f, flusher)
    return wrote


def _write_serial(tmp, comm, specs, mine, crcs, root_attrs):
    """Rank 0 writes everything; the owners send their parts in plan order. Every rank walks
    every piece, agreeing before each transfer (an owner that failed sends nothing) and after
    rank 0 wrote it."""
    rank = comm.Get_rank()
    f = None
    with Local() as loc:
        if rank == 0:
            f = h5py.File(tmp, "w", **_file_kwargs())
            _create_all(f, specs, crcs, root_attrs, fill_never=False)
        fault("create", rank, tmp)
    _agree_or_discard(comm, "create", tmp, loc.err, f)
    for s in specs:
        if int(np.prod(s.shape, dtype=np.int64)) == 0:
            continue
        for own, a, b in s.parts:
            _serial_part(f, comm, s, own, a, b, mine, tmp)
    with Local() as loc:
        if f is not None:
            f.flush()
        fault("flush", rank, tmp)
    _agree_or_discard(comm, "flush", tmp, loc.err, f)
    with Local() as loc:
        if f is not None:
            f.close()
            fsync_path(tmp)
        fault("close", rank, tmp)
    _agree_or_discard(comm, "close", tmp, loc.err)


def _serial_part(f, comm, s, own, a, b, mine, tmp) -> None:
    from mpi4py import MPI

    rank = comm.Get_rank()
    rpp = rows_per_piece(s)
    arr = mine.get(s.name) if rank == own else None
    for p0 in range(0, b - a, rpp):
        p1 = min(b - a, p0 + rpp)
        piece = None
        with Local() as loc:
            if rank == own:
                piece = np.ascontiguousarray(arr[p0:p1])
            if s.name in FIRST_REPLAY and p0 == 0 and a == 0:
                fault("mid-data", rank, tmp)
        _agree_or_discard(comm, "mid-data", tmp, loc.err, f)
        if rank == own != 0:
            comm.Send([piece.reshape(-1).view(np.uint8), MPI.BYTE], dest=0, tag=7)
        elif rank == 0 != own:
            piece = np.empty((p1 - p0,) + tuple(s.shape[1:]), s.dtype)
            comm.Recv([piece.reshape(-1).view(np.uint8), MPI.BYTE], source=own, tag=7)
        with Local() as loc:
            if rank == 0:
                f[s.name][a + p0:a + p1] = piece
        _agree_or_discard(comm, "mid-data", tmp, loc.err, f)
