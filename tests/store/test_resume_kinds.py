"""Resume by error kind, and one job per run directory, with real mpirun and real files: no
valid checkpoint is renamed or deleted by an impossible reshard, a newer format or a transient
I/O error; a corrupt one is set aside with a record; a second job on a run directory, or a fresh
start into one holding checkpoints, is refused."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpi_util import hpcdqn, mpirun_cmd, start_until

from hpcdqn.store import verify
from hpcdqn.testing import FAULT_ENV
from hpcdqn.store.codec import attrs_crc, crc

TINY = ["total_steps=3000", "dqn.learning_starts=500", "dqn.train_frequency=100",
        "dqn.gradient_steps=4", "network.hidden=[32, 32]", "eval.episodes=0",
        "log.progress=false", "log.tensorboard=false", "log.every=500", "seed=5",
        "dqn.buffer_size=2000", "dqn.n_step=3", "checkpoint_every=1000", "keep_last=3"]


def snapshot(d: Path) -> dict:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns, crc(np.frombuffer(p.read_bytes(), np.uint8)))
            for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def run1000(tmp_path_factory):
    """One prepared run (TINY, stopped after its checkpoint at 1000), copied by each test."""
    run = tmp_path_factory.mktemp("base") / "run"
    hpcdqn(1, ["train", *TINY, f"run_dir={run}", "stop_after=1000"], timeout=300)
    return run


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def one_message(r) -> str:
    lines = [x for x in r.stderr.splitlines() if x.startswith("hpcdqn train:")]
    assert r.returncode == 2 and len(lines) == 1, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr
    return lines[0]


def test_impossible_reshard_leaves_every_checkpoint(tmp_path):
    run = tmp_path / "run"
    hpcdqn(1, ["train", *TINY, f"run_dir={run}", "stop_after=4"], timeout=300)
    d = run / "checkpoints"
    before = snapshot(d)
    assert "ckpt-000000000004.h5" in before
    r = hpcdqn(2, ["train", "--resume", str(run)], timeout=300, check=False)
    msg = one_message(r)
    assert "cannot reshard" in msg and "too few" in msg and "left as it is" in msg, msg
    assert snapshot(d) == before                       # nothing renamed, deleted or rewritten
    r = hpcdqn(1, ["train", "--resume", str(run), "stop_after=8"], timeout=300)
    assert "resumed exactly from" in r.stderr and "ckpt-000000000004.h5" in r.stderr


def test_newer_format_and_transient_errors_leave_the_file(run1000, tmp_path):
    run = copy_run(run1000, tmp_path / "run")
    d = run / "checkpoints"
    p = d / "ckpt-000000001000.h5"
    before = snapshot(d)
    # an I/O error that persists through the retries: a clear failure, the file untouched
    r = hpcdqn(1, ["train", "--resume", str(run)], timeout=300, check=False,
               env={FAULT_ENV: "open:0:EIO"})
    msg = r.stderr
    assert r.returncode == 2 and "could not be read: EIO" in msg and "after 5 attempts" in msg, msg[-3000:]
    assert snapshot(d) == before
    # a newer major format: refused with the reason, the file untouched
    with h5py.File(p, "a") as f:
        f.attrs["format"] = "hpcdqn-checkpoint-3.0"
        f.attrs["attrs_crc32"] = attrs_crc({k: f.attrs[k] for k in f.attrs.keys()})
    newer = snapshot(d)
    r = hpcdqn(1, ["train", "--resume", str(run)], timeout=300, check=False)
    assert r.returncode == 2 and "newer than this hpcdqn reads" in r.stderr, r.stderr[-3000:]
    assert snapshot(d) == newer
    with h5py.File(p, "a") as f:
        f.attrs["format"] = "hpcdqn-checkpoint-1.1"
        f.attrs["attrs_crc32"] = attrs_crc({k: f.attrs[k] for k in f.attrs.keys()})
    # a transient error that clears: retried with backoff, then the resume goes on
    r = hpcdqn(1, ["train", "--resume", str(run), "stop_after=1500"], timeout=300,
               env={FAULT_ENV: "open:0:EIO:2"})
    assert r.stderr.count("test fault: EIO at phase 'open'") == 2
    assert "resumed exactly from" in r.stderr and "ckpt-000000001000.h5" in r.stderr
    assert not list(d.glob("*.bad"))


def test_corrupt_is_set_aside_nan_is_skipped_untouched(tmp_path):
    run = tmp_path / "run"
    hpcdqn(1, ["train", *TINY, f"run_dir={run}"], timeout=300)
    d = run / "checkpoints"
    nan, digit = d / "ckpt-000000003000.h5", d / "ckpt-000000002000.h5"
    with h5py.File(nan, "a") as f:          # a diverged run's file: consistent checksums
        a = f["params/online/0"][...]
        a[0] = np.nan
        f["params/online/0"][...] = a
        f["params/online/0"].attrs["crc32"] = json.dumps([crc(a)])
    with h5py.File(digit, "a") as f:        # one changed digit, no checksum fix
        f.attrs["counters"] = f.attrs["counters"].replace('"episodes": ', '"episodes": 1')
    nan_before = snapshot(d)[nan.name]
    r = hpcdqn(1, ["train", "--resume", str(run)], timeout=300)
    assert "NaN or infinite" in r.stderr and "root attributes do not match their checksum" in r.stderr
    assert "resumed exactly from" in r.stderr and "ckpt-000000001000.h5" in r.stderr
    assert (d / "ckpt-000000002000.h5.bad").is_file()
    rec = [json.loads(x) for x in (d / "set_aside.jsonl").read_text().splitlines()]
    assert [x["file"] for x in rec] == ["ckpt-000000002000.h5"] and "checksum" in rec[0]["reason"]
    assert not (d / "ckpt-000000003000.h5.bad").exists()
    # the NaN file was skipped, never renamed; the resumed run then wrote a new 3000
    assert nan_before[0] > 0


def test_second_job_refused_first_unharmed(tmp_path):
    run = tmp_path / "run"
    args = [*TINY, "total_steps=10000000", f"run_dir={run}"]     # runs until told to stop
    cmd = mpirun_cmd(1) + [sys.executable, "-m", "hpcdqn.cli", "train", *args]
    a = start_until(cmd, run / "checkpoints" / "latest", poll=0.2)
    try:
        assert (run / "checkpoints" / "latest").exists() and a.poll() is None
        owner = json.loads((run / "hpcdqn.lock").read_text())
        for extra in ([], ["--resume", str(run)]):
            b = hpcdqn(1, ["train", *extra, *([] if extra else args)], timeout=300, check=False)
            msg = one_message(b) if b.returncode == 2 else b.stderr
            assert "is in use by another job" in msg and f"pid {owner['pid']}" in msg \
                and socket.gethostname() in msg, msg[-3000:]
        assert a.poll() is None                        # the first job is still training
        os.kill(a.pid, signal.SIGUSR1)                 # mpirun forwards it: checkpoint, exit 3
        out, err = a.communicate(timeout=300)
    finally:
        if a.poll() is None:
            os.killpg(a.pid, signal.SIGKILL)
    assert a.returncode == 3, err[-3000:]
    s = json.loads(out.strip().splitlines()[-1])
    assert s["stopped_by_signal"] == int(signal.SIGUSR1) and s["env_steps"] > 1000, s
    verify(run / "checkpoints" / f"ckpt-{s['env_steps']:012d}.h5")   # its final checkpoint
    assert "in use" not in err and not (run / "hpcdqn.lock").exists()   # released at the end


def test_fresh_start_refused_stale_lock_taken_over(run1000, tmp_path):
    run = copy_run(run1000, tmp_path / "run")
    d = run / "checkpoints"
    before, metrics = snapshot(d), (run / "metrics.csv").read_text()
    r = hpcdqn(1, ["train", *TINY, f"run_dir={run}"], timeout=300, check=False)
    msg = one_message(r) if r.returncode == 2 else r.stderr
    assert "holds 1 checkpoint(s) of an earlier run" in msg and "--resume" in msg \
        and "overwrite=true" in msg, msg[-2000:]
    assert snapshot(d) == before and (run / "metrics.csv").read_text() == metrics
    # a lock left by a job that died (same host, its pid gone) is taken over
    (run / "hpcdqn.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": 2**22 + 7,
                                                 "job_id": "", "since": "earlier"}))
    r = hpcdqn(1, ["train", "--resume", str(run), "stop_after=1500"], timeout=300)
    assert "taking over the lock" in r.stderr and "resumed exactly from" in r.stderr
    r = hpcdqn(1, ["train", *TINY, f"run_dir={run}", "overwrite=true", "total_steps=1000"],
               timeout=300)
    assert "overwrite=true: removing" in r.stderr
    assert sorted(p.name for p in d.glob("ckpt-*.h5")) == ["ckpt-000000001000.h5"]
