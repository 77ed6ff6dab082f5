"""The I/O protocol and its tuning: parallel (MPI-IO) or serial writes, MPI-IO hints, ROMIO
preference, writeback pacing of big writes, fsync; the file system under a run (statfs), which
picks Lustre/GPFS hints, the shard alignment and whether to pace writeback."""

from __future__ import annotations

import collections
import os
import sys
from pathlib import Path

import h5py

SERIAL_ENV = "HPCDQN_H5_SERIAL"          # "1": write through rank 0 even with parallel h5py


def io_mode() -> str:
    """'parallel' (every rank writes its own slabs) or 'serial' (through rank 0)."""
    if os.environ.get(SERIAL_ENV, "") not in ("", "0") or not h5py.get_config().mpi:
        return "serial"
    return "parallel"


def serial_reason() -> str:
    """Why ``io_mode`` is 'serial'."""
    return f"{SERIAL_ENV}=1" if h5py.get_config().mpi else "h5py was built without MPI"


HINTS_ENV = "HPCDQN_MPIIO_HINTS"
# Each rank writes a few large contiguous blocks, so MPI-IO's two-phase collective buffering
# (aggregating through 16 MiB buffers) only adds copies: measured 0.7 vs 1.8 GB/s on one disk.
# Collective calls stay collective; only the aggregation step is skipped. Override with
# HPCDQN_MPIIO_HINTS="key=value,..." ("" for the MPI library's defaults).
DEFAULT_HINTS = "romio_cb_write=disable,collective_buffering=false"


IO_COMPONENT_ENV = "OMPI_MCA_io"


def _prefer_romio(MPI) -> None:
    """Open MPI 4.x: make MPI-IO use ROMIO instead of the default OMPIO, unless the user chose
    (``OMPI_MCA_io`` set, any value, e.g. ``OMPI_MCA_io=ompio`` to keep OMPIO).

    Measured on one local ext4 disk, the whole ``write_checkpoint`` (5.6 GB replay, 2 ranks):
    ROMIO 1.75 GB/s vs OMPIO 1.1 GB/s; 48 MB replay, 2 ranks: 0.04 s vs 0.45 s (OMPIO spends
    ~80 ms per file open and is slow in the collective writes). Open MPI opens its ``io``
    framework, and reads this variable, at the first MPI_File_open, not at MPI_Init, so setting
    it here (before the first checkpoint file is opened) takes effect. Only set when a ROMIO
    component is seen next to the loaded Open MPI components (naming a missing one makes every
    MPI_File_open fail); otherwise nothing changes."""
    if IO_COMPONENT_ENV in os.environ or "Open MPI" not in MPI.Get_library_version():
        return
    try:
        with open("/proc/self/maps") as fh:
            dirs = {os.path.dirname(x.split()[-1]) for x in fh if "/mca_" in x and ".so" in x}
    except OSError:
        return
    names = sorted({p.name[len("mca_io_"):].split(".")[0] for d in dirs
                    for p in Path(d).glob("mca_io_romio*.so")})
    if names:
        os.environ[IO_COMPONENT_ENV] = names[-1]


# statfs(2) f_type of the file systems we tune for (linux/magic.h and the vendors' headers)
FS_MAGIC = {0x0BD00BD0: "lustre", 0x47504653: "gpfs", 0x19830326: "beegfs", 0x6969: "nfs",
            0xEF53: "ext4", 0x58465342: "xfs", 0x01021994: "tmpfs", 0x9123683E: "btrfs"}
PARALLEL_FS = {"lustre", "gpfs", "beegfs", "nfs"}
# what each parallel file system gets besides DEFAULT_HINTS (reasoned from the vendors' docs,
# not measured here: this machine has ext4 only)
#
# On a parallel file system the collective buffering that DEFAULT_HINTS turns off (it only costs
# on a local disk) is turned back on: ROMIO's aggregators then gather the ranks' shards and write
# file domains that ROMIO aligns to the stripe (ad_lustre: whole stripes per aggregator; GPFS:
# the block size), so no two clients write one stripe, whatever each rank's shard offset is.
# Each dataset also starts on a stripe boundary (``stripe_bytes``, h5py's alignment).
CB_ON = "romio_cb_write=enable,collective_buffering=true"
FS_HINTS = {"lustre": CB_ON + ",romio_ds_write=disable",
            "gpfs": CB_ON + ",IBM_largeblock_io=true",
            "beegfs": CB_ON}
FS_TYPE_ENV = "HPCDQN_FS_TYPE"   # say which file system this is when statfs cannot (or in tests)


def fs_type(path) -> str:
    """The file system under ``path`` by statfs's f_type ('unknown' if it cannot be told);
    ``HPCDQN_FS_TYPE`` (lustre, gpfs, beegfs, nfs, ext4, ...) overrides it."""
    import ctypes

    forced = os.environ.get(FS_TYPE_ENV, "").strip().lower()
    if forced:
        return forced

    from hpcdqn.parallel.memory import libc

    buf = ctypes.create_string_buffer(256)     # struct statfs (120 bytes on x86-64 / aarch64)
    try:
        fn = libc().statfs
    except AttributeError:
        return "unknown"
    if fn(os.fsencode(str(path)), buf) != 0:
        return "unknown"
    magic = ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF
    return FS_MAGIC.get(magic, f"0x{magic:x}")


def stripe_bytes(path) -> int:
    """Alignment of shard offsets: the file system's preferred I/O size (Lustre reports the
    stripe size as st_blksize), at least 1 MiB."""
    try:
        return max(2**20, os.statvfs(path).f_bsize if fs_type(path) in PARALLEL_FS else 0)
    except OSError:
        return 2**20


def mpi_info(path=None):
    from mpi4py import MPI

    _prefer_romio(MPI)
    text = os.environ.get(HINTS_ENV)
    if text is None:
        text = DEFAULT_HINTS
        extra = FS_HINTS.get(fs_type(path)) if path is not None else None
        if extra:
            text += "," + extra
    info = MPI.Info.Create()
    for item in filter(None, (x.strip() for x in text.split(","))):
        k, _, v = item.partition("=")
        info.Set(k.strip(), v.strip())
    return info


class Writeback:
    """Stream big checkpoints to disk while writing, keeping at most ``HPCDQN_CKPT_WRITEBACK_MB``
    (default 64; 0: off) of this rank's freshly written data in the page cache.

    Without it a multi-GB write piles up dirty pages next to a multi-GB replay in memory, and
    this VM's disk then runs at 0.3-0.45 GB/s instead of 2-3 GB/s (measured with plain
    writes, with ``sync_file_range(WRITE)`` alone, and with a blocking fdatasync every 512 MB:
    0.9-1.2 GB/s, since nothing is written while it waits). So, where the byte range of each
    piece is known (contiguous datasets) and Linux's ``sync_file_range`` is available, it is
    pipelined like ``dd oflag=nocache`` does: start the writeback of the piece just written
    (asynchronous), then wait for the *older* pieces beyond the window and drop their
    now-clean pages (``posix_fadvise(DONTNEED)``) -- the disk never idles while we copy the
    next piece. Durability still comes from MPI_File_sync + fsync at the end; this only paces
    the page cache. Otherwise (no range, no ``sync_file_range``): fdatasync the whole file and
    drop its pages after every window's worth of data."""

    _sfr = False               # libc.sync_file_range, resolved once (None: unavailable)
    WAIT_BEFORE, WRITE, WAIT_AFTER = 1, 2, 4

    def __init__(self, path):
        self.every = int(float(os.environ.get("HPCDQN_CKPT_WRITEBACK_MB", "64")) * 2**20)
        if fs_type(Path(path).parent) in PARALLEL_FS:
            self.every = 0     # pacing is for local disks: a parallel FS client does its own
        self.fd = os.open(path, os.O_RDONLY) if self.every > 0 else None
        self.pending = 0           # whole-file fallback: bytes since the last fdatasync
        self.ranges = collections.deque()   # (offset, nbytes) started, not yet waited for
        self.queued = 0

    @classmethod
    def _libc_sfr(cls):
        if cls._sfr is False:
            cls._sfr = None
            if sys.platform.startswith("linux"):
                import ctypes

                from hpcdqn.parallel.memory import libc

                fn = getattr(libc(), "sync_file_range", None)
                if fn is not None:
                    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
                    fn.restype = ctypes.c_int
                    cls._sfr = fn
        return cls._sfr

    def wrote(self, n: int, offset: int | None = None) -> None:
        if self.fd is None or n <= 0:
            return
        sfr = self._libc_sfr() if offset is not None else None
        if sfr is None or sfr(self.fd, offset, n, self.WRITE) != 0:
            self.pending += n
            if self.pending >= self.every:
                os.fdatasync(self.fd)
                os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
                self.pending = 0
            return
        self.ranges.append((offset, n))
        self.queued += n
        while len(self.ranges) > 1 and self.queued - self.ranges[0][1] >= self.every:
            self._retire(sfr)

    def _retire(self, sfr) -> None:
        off, n = self.ranges.popleft()
        self.queued -= n
        sfr(self.fd, off, n, self.WAIT_BEFORE | self.WRITE | self.WAIT_AFTER)
        os.posix_fadvise(self.fd, off, n, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        if self.fd is not None:
            sfr = self._libc_sfr() if self.ranges else None
            while self.ranges:
                self._retire(sfr)
            os.close(self.fd)
            self.fd = None


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SparseImage:
    """A file-like object that keeps only the bytes written to it (HDF5's metadata, with
    ``h5py``'s ``fileobj`` driver), so an HDF5 file whose datasets are allocated but never
    filled costs only its metadata in memory. ``h5_image`` creates the file in one, and the
    real file is then written with plain ``pwrite``: HDF5 never sees a failing system call
    (HDF5 1.10 crashes closing a file whose flush or close failed)."""

    def __init__(self):
        self.pos, self.size = 0, 0
        self.writes: list[tuple[int, bytes]] = []

    def seekable(self):
        return True

    def readable(self):
        return True

    def writable(self):
        return True

    def seek(self, off, whence=0):
        self.pos = off if whence == 0 else (self.pos + off if whence == 1 else self.size + off)
        return self.pos

    def tell(self):
        return self.pos

    def write(self, b):
        b = bytes(b)
        self.writes.append((self.pos, b))
        self.pos += len(b)
        self.size = max(self.size, self.pos)
        return len(b)

    def read(self, n=-1):
        n = max(0, (self.size - self.pos) if n is None or n < 0 else min(n, self.size - self.pos))
        out = bytearray(n)
        for off, b in self.writes:
            lo, hi = max(off, self.pos), min(off + len(b), self.pos + n)
            if lo < hi:
                out[lo - self.pos:hi - self.pos] = b[lo - off:hi - off]
        self.pos += n
        return bytes(out)

    def readinto(self, buf):
        data = self.read(len(buf))
        buf[:len(data)] = data
        return len(data)

    def truncate(self, size=None):
        self.size = self.pos if size is None else size
        return self.size

    def flush(self):
        pass

    def extents(self):
        """(offset, bytes) to write, in order (later writes win where they overlap)."""
        return [(off, b[:max(0, self.size - off)]) for off, b in self.writes if off < self.size]


def h5_image(path, fill, **kw):
    """Create the HDF5 file ``path``: ``fill(f, hold)`` builds it in a ``SparseImage`` (the
    objects it creates appended to ``hold``), then its bytes are written to ``path`` with
    ``pwrite`` and the file sized with ``ftruncate`` (raising a plain OSError naming ``path``
    on failure). Returns (what ``fill`` returned, the open descriptor of ``path``): the caller
    fsyncs and closes it."""
    img = SparseImage()
    with h5py.File(img, "w", **kw) as f:
        hold: list = []
        out = fill(f, hold)
        del hold
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for off, b in img.extents():
            view = memoryview(b)
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], off + done)
        os.ftruncate(fd, img.size)
    except OSError as e:
        os.close(fd)
        raise OSError(e.errno, e.strerror, str(path)) from None
    return out, fd


def close_or_keep(f, hold=()) -> None:
    """Close an HDF5 file, flushing first; if the flush or the close fails, the file is kept
    open for good (``lifecycle.keep_broken``: closing it again crashes HDF5) and the error
    raised."""
    from hpcdqn.parallel.lifecycle import keep_broken

    if f is None or not f.id.valid:
        return
    try:
        f.flush()
        f.close()
    except Exception:
        keep_broken((f, list(hold)))     # its datasets too: no dealloc of an id in a broken file
        raise
