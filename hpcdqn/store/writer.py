"""Writing a checkpoint: the plan's parts from every rank into one file, then published.

Writing (parallel): rank 0 creates the file with HDF5 (every dataset contiguous, its space
allocated at creation) and broadcasts the datasets' file offsets; every rank then writes its
own parts with plain ``pwrite`` at those offsets (no MPI-IO: no I/O call is collective, so an
error inside one rank's write cannot leave the ranks in different collective calls). Without parallel h5py
(or with ``HPCDQN_H5_SERIAL=1``) the same file is written by rank 0, the others sending their
parts to it. Either way the file is written as ``<name>.tmp``, flushed, closed and fsynced;
after a barrier rank 0 renames it into place (atomic), fsyncs the directory, and only then
rewrites the ``latest`` pointer (tmp + ``os.replace``) and removes checkpoints beyond
``keep_last``. A kill during a write leaves a ``.tmp`` file that nobody loads.
"""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import h5py
import numpy as np

from hpcdqn import __version__
from hpcdqn.parallel.agree import Local
from hpcdqn.store.codec import attrs_crc, crc
from hpcdqn.store.errors import CheckpointIOError, agree
from hpcdqn.store.mpiio import Writeback, close_or_keep, fsync_path, h5_image, io_mode, stripe_bytes
from hpcdqn.store.reader import open_checkpoint
from hpcdqn.store.rundir import checkpoint_dir, ckpt_name
from hpcdqn.store.schema import FORMAT, LATEST, plan, rows_per_piece
from hpcdqn.testing import checkpoint_sleep, fault, set_steps


# Parallel writes go out in 32 MiB pieces, each one's writeback started as soon as it is written
# (``Writeback``): on the test VM 32 MiB pieces with a 64 MiB window ran at 2.5-3 GB/s (~dd)
# where 256 MiB pieces with a 256-1024 MiB window ran at 1.1-1.7 GB/s (page cache churn).
WRITE_PIECE_BYTES = 32 * 2**20
FIRST_REPLAY = ("replay/obs", "replay/frames")   # where the test hook's mid-data fault strikes


def write_checkpoint(run_dir, comm, layout: dict, env: dict, sizes: list[int], cfg: dict,
                     counters: dict, mine: dict, rank_json: bytes, keep_last: int,
                     mode: str | None = None, storage=None) -> dict:
    """Collective over ``comm`` (the world). ``mine``: {dataset name: array} of the parts this
    rank owns (replay shard rows, its layers, ...). Returns {'path', 'seconds', 'bytes'}.
    A failure on any rank in any phase raises the same ``CheckpointIOError`` on every rank
    (``agree``), after the temporary file is removed; the previous checkpoint is untouched.
    ``storage``: the backend writing the file (default: ``storage_for(mode)``)."""
    t0 = time.perf_counter()
    storage = storage or storage_for(mode or io_mode())
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
    nbytes = write_parts(storage, tmp, comm, layout, env, sizes, cfg, counters, mine, rank_json)
    sleep = checkpoint_sleep(int(counters["env_steps"]))
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


def write_parts(storage, target, comm, layout: dict, env: dict, sizes: list[int], cfg: dict,
                counters: dict, mine: dict, rank_json: bytes) -> int:
    """Collective over ``comm``: plan the checkpoint's datasets (``schema.plan``), check and
    checksum this rank's parts, and have ``storage`` (a ``storage.Storage`` backend) write them
    all to ``target`` with the root attributes. ``counters``: the same on every rank. Returns
    the bytes of the datasets."""
    rank = comm.Get_rank()
    with Local() as loc:
        mine = _prepare(rank, mine, rank_json, layout, env, sizes)
    agree(comm, "prepare", target, loc.err)
    maxlen = max(1, max(comm.allgather(len(rank_json))))
    specs = plan(layout, env, sizes, maxlen)
    with Local() as loc:
        my_crcs = _part_crcs(rank, specs, mine, maxlen)
    agree(comm, "prepare", target, loc.err)
    crcs = {}
    for part in comm.allgather(my_crcs):
        crcs.update(part)
    root_attrs = {"format": FORMAT, "version": __version__, "io_mode": storage.io_mode,
                  "config": json.dumps(cfg), "layout": json.dumps(layout), "env": json.dumps(env),
                  "layer_sizes": json.dumps(sizes), "counters": json.dumps(counters)}
    root_attrs["attrs_crc32"] = attrs_crc(root_attrs)
    storage.write(target, comm, specs, mine, crcs, root_attrs)
    return sum(int(np.prod(s.shape, dtype=np.int64)) * s.dtype.itemsize for s in specs)


class ParallelHDF5:
    """The HDF5 backend where every rank writes its own parts (``_write_parallel``)."""
    io_mode = "parallel"

    def write(self, target, comm, specs, parts, crcs, root_attrs) -> None:
        _write_parallel(target, comm, specs, parts, crcs, root_attrs)

    def open(self, target):
        return open_checkpoint(target)


class SerialHDF5(ParallelHDF5):
    """The HDF5 backend where rank 0 writes every part, the others sending theirs
    (``_write_serial``): h5py without MPI, or ``HPCDQN_H5_SERIAL=1``."""
    io_mode = "serial"

    def write(self, target, comm, specs, parts, crcs, root_attrs) -> None:
        _write_serial(target, comm, specs, parts, crcs, root_attrs)


def storage_for(mode: str):
    """The HDF5 backend of an I/O mode (``mpiio.io_mode``: 'parallel' or 'serial')."""
    return ParallelHDF5() if mode == "parallel" else SerialHDF5()


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


def _agree_or_discard(comm, phase, tmp, err, f=None, closer=None) -> None:
    """``agree``; on a failure anywhere every rank is here: its open file is closed (``f``, an
    HDF5 file, or ``closer``), the temporary removed (rank 0), then the agreed error raised."""
    try:
        agree(comm, phase, tmp, err)
    except CheckpointIOError:
        if closer is not None:
            closer()
        with Local():
            close_or_keep(f)
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


def dataset_attrs(spec, crcs: dict) -> dict:
    """A dataset's attributes in the file: ``parts`` ([[start, stop], ...]) and ``crc32`` (one
    CRC-32 per part, from ``crcs``: {(name, part index): crc})."""
    return {"parts": json.dumps([[a, b] for _, a, b in spec.parts]),
            "crc32": json.dumps([crcs.get((spec.name, j), 0) for j in range(len(spec.parts))])}


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
        ds.attrs.update(dataset_attrs(s, crcs))


def _file_kwargs():
    return {"libver": ("earliest", "v110")}


def _write_parallel(tmp, comm, specs, mine, crcs, root_attrs):
    """Every rank writes its own slabs with plain ``pwrite`` at the offsets HDF5 assigned; no
    MPI-IO, so no I/O call is collective and an error inside one rank's write cannot leave the
    ranks in different collectives (the only collectives are the agreements themselves).

    Phases, each agreed: open (per-rank checks: directory, free space), create (rank 0 alone
    builds the file's HDF5 metadata in memory: attributes, every dataset contiguous, its space
    allocated, stripe-aligned; then writes those bytes to the file itself, so HDF5 never meets
    a failing system call; the offsets broadcast), mid-data (each rank
    ``pwrite``s its parts in 32 MiB pieces, writeback paced, ``Writeback``), flush (fsync of
    what this rank wrote) and close (its descriptor)."""
    rank = comm.Get_rank()
    with Local() as loc:
        precheck_open(tmp, _my_bytes(rank, specs))
        fault("open", rank, tmp)
    _agree_or_discard(comm, "open", tmp, loc.err)
    offsets = fd = flusher = None
    with Local() as loc:
        if rank == 0:
            offsets, fd = _create_layout(tmp, specs, crcs, root_attrs)
        fault("create", rank, tmp)
    _agree_or_discard(comm, "create", tmp, loc.err, closer=lambda: _close_fd(fd, None))
    offsets = comm.bcast(offsets, root=0)
    mine_any = any(own == rank for s in specs for own, _, _ in s.parts)
    with Local() as loc:
        if mine_any:
            fd = os.open(tmp, os.O_WRONLY) if fd is None else fd
            flusher = Writeback(tmp)
            _write_slabs(fd, rank, specs, mine, offsets, flusher, tmp)
        else:
            fault("mid-data", rank, tmp)
    _agree_or_discard(comm, "mid-data", tmp, loc.err, closer=lambda: _close_fd(fd, flusher))
    with Local() as loc:
        if flusher is not None:
            flusher.close()
        if fd is not None:
            _named(os.fsync, fd, tmp)   # this rank's data is on disk (its client's pages)
        fault("flush", rank, tmp)
    _agree_or_discard(comm, "flush", tmp, loc.err, closer=lambda: _close_fd(fd, None))
    with Local() as loc:
        fd_, fd = fd, None
        if fd_ is not None:
            _named(os.close, fd_, tmp)
        fault("close", rank, tmp)
    _agree_or_discard(comm, "close", tmp, loc.err)


def _named(fn, fd, path):
    """``fn(fd)``; an OSError names ``path``."""
    try:
        return fn(fd)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None


def _close_fd(fd, flusher) -> None:
    for fn in ((flusher.close if flusher is not None else None),
               ((lambda: os.close(fd)) if fd is not None else None)):
        if fn is not None:
            with Local():
                fn()


def _create_layout(tmp, specs, crcs, root_attrs) -> dict:
    """Rank 0: the file with every attribute and dataset, each dataset's space allocated now
    (contiguous, never filled), built in memory (``h5_image``: HDF5 never writes to the disk,
    so a failing write is a plain OSError here, never a broken HDF5 handle); returns
    ({name: file offset of row 0}, the open descriptor of ``tmp``)."""
    from h5py import h5d, h5p

    def fill(f, hold):
        for k, v in root_attrs.items():
            f.attrs[k] = v
        offsets = {}
        for s in specs:
            dcpl = h5p.create(h5p.DATASET_CREATE)
            dcpl.set_alloc_time(h5d.ALLOC_TIME_EARLY)
            dcpl.set_fill_time(h5d.FILL_TIME_NEVER)   # every byte is written by its owner
            ds = f.create_dataset(s.name, shape=s.shape, dtype=s.dtype, dcpl=dcpl)
            hold.append(ds)
            ds.attrs.update(dataset_attrs(s, crcs))
            offsets[s.name] = ds.id.get_offset()
        return offsets

    align = stripe_bytes(Path(tmp).parent)    # each dataset starts on a stripe boundary
    return h5_image(tmp, fill, alignment_threshold=2**20, alignment_interval=align,
                    **_file_kwargs())


def _pwrite_all(fd, buf, offset: int) -> None:
    view = memoryview(buf).cast("B")
    done = 0
    while done < len(view):
        n = os.pwrite(fd, view[done:], offset + done)
        if n <= 0:      # pragma: no cover - the kernel reports errors as exceptions
            raise OSError(errno.EIO, "short write", None)
        done += n


def _write_slabs(fd, rank, specs, mine, offsets, flusher, tmp) -> None:
    """This rank's parts, 32 MiB pieces at their file offsets (independent ``pwrite``)."""
    hooked = False
    for s in specs:
        rowbytes = int(np.prod(s.shape[1:], dtype=np.int64)) * s.dtype.itemsize
        base = offsets.get(s.name)
        rpp = rows_per_piece(s, WRITE_PIECE_BYTES)
        for own, a, b in s.parts:
            if own != rank or b <= a:
                continue
            if base is None:
                raise OSError(errno.EIO, f"dataset '{s.name}' has no file offset", str(tmp))
            arr = mine[s.name]
            for p in range(0, b - a, rpp):
                piece = np.ascontiguousarray(arr[p:p + rpp])
                off = base + (a + p) * rowbytes
                try:
                    _pwrite_all(fd, piece, off)
                except OSError as e:
                    raise OSError(e.errno, e.strerror, str(tmp)) from None
                flusher.wrote(piece.nbytes, off)
                if s.name in FIRST_REPLAY and p == 0 and not hooked:
                    hooked = True
                    fault("mid-data", rank, tmp)
    if not hooked:
        fault("mid-data", rank, tmp)


def _my_bytes(rank, specs) -> int:
    return sum((b - a) * int(np.prod(s.shape[1:], dtype=np.int64)) * s.dtype.itemsize
               for s in specs for own, a, b in s.parts if own == rank)


def precheck_open(path, nbytes: int) -> None:
    """This rank's checks before the file is created: the directory
    exists and is writable, the name is not taken by a non-file, and the file system has room
    for this rank's ``nbytes``. Raises OSError (with errno) so ``agree`` can name it."""
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
            close_or_keep(f)
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
