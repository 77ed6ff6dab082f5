"""Checkpoints with real mpirun and real files: exact resume, crash during a write, corrupted
files, reshard onto other layouts, serial fallback, Minari export."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpi_util import hpcdqn, mpi_env, mpirun_cmd

from hpcdqn.store import SERIAL_ENV, CheckpointError, read_meta, verify
from hpcdqn.testing import CKPT_SLEEP_ENV
from hpcdqn.store.reshard import reshard_plan, ring_rows
from hpcdqn.store.rundir import proc_start
from hpcdqn.store.schema import REPLAY_ROWS

# tiny and fast; prioritized replay and n-step so their state is exercised too
TINY = ["total_steps=3000", "dqn.learning_starts=500", "dqn.train_frequency=100",
        "dqn.gradient_steps=20", "network.hidden=[32, 32]", "eval.episodes=0",
        "log.progress=false", "log.tensorboard=false", "log.every=500", "seed=5",
        "dqn.buffer_size=2000", "replay.prioritized=true", "dqn.n_step=3",
        "checkpoint_every=1000", "keep_last=3"]
UNIFORM = [a for a in TINY if not a.startswith("replay.prioritized")] + ["replay.prioritized=false"]


def summary(r):
    return json.loads(r.stdout.strip().splitlines()[-1])


def model(run):
    with h5py.File(Path(run) / "model.h5") as f:
        return f["online"][...]


def ckpt_arrays(path, prefix=("params/", "adam/")):
    out = {}
    with h5py.File(path) as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and name.startswith(prefix):
                out[name] = obj[...]
        f.visititems(visit)
    return out


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    """The uninterrupted reference: 2 ranks, 3000 env steps, checkpoints at 1000/2000/3000."""
    d = tmp_path_factory.mktemp("a") / "run"
    r = hpcdqn(2, ["train", *TINY, f"run_dir={d}"], timeout=300)
    s = summary(r)
    assert s["env_steps"] == 3000 and s["checkpoints"] == 3 and s["checkpoint_io"] == "parallel"
    assert "stalled training" in r.stderr
    return d


def test_resume_is_bitwise_equal_to_uninterrupted(run_a, tmp_path):
    b = tmp_path / "b"
    # stop at 1300: not a log, checkpoint or training boundary
    s1 = summary(hpcdqn(2, ["train", *TINY, f"run_dir={b}", "stop_after=1300"], timeout=300))
    assert s1["stopped_after"] == 1300
    r = hpcdqn(2, ["train", "--resume", str(b)], timeout=300)
    assert "resumed exactly from" in r.stderr and "ckpt-000000001300.h5" in r.stderr
    assert summary(r)["env_steps"] == 3000
    _same_end(run_a, b)


def _same_end(a, b):
    """Runs ``a`` and ``b`` ended bit for bit the same: model file, parameters, Adam, replay;
    ``b``'s metrics (resumed) have no duplicated rows."""
    a_final, b_final = a / "checkpoints" / "ckpt-000000003000.h5", b / "checkpoints" / "ckpt-000000003000.h5"
    assert np.array_equal(model(a), model(b))
    pa, pb = ckpt_arrays(a_final), ckpt_arrays(b_final)
    assert pa.keys() == pb.keys() and len(pa) > 0
    for k in pa:
        assert np.array_equal(pa[k], pb[k]), k
    ra, rb = ckpt_arrays(a_final, ("replay/",)), ckpt_arrays(b_final, ("replay/",))
    assert ra.keys() == rb.keys() and len(ra) > 0
    for k in ra:
        assert np.array_equal(ra[k], rb[k]), k
    steps = [int(line.split(",")[0]) for line in (b / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == sorted(set(steps)) and steps[-1] == 3000


def test_pipelined_resume_is_bitwise_equal_to_uninterrupted(tmp_path):
    """pp=2 (each rank builds, saves and restores only its own stage): stopped at 1300 and
    resumed, the run ends bit for bit as the uninterrupted pp=2 run."""
    args = [*TINY, "pp=2", "micro_batches=2"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert summary(hpcdqn(2, ["train", *args, f"run_dir={a}"], timeout=300))["pp"] == 2
    assert summary(hpcdqn(2, ["train", *args, f"run_dir={b}", "stop_after=1300"],
                          timeout=300))["stopped_after"] == 1300
    r = hpcdqn(2, ["train", "--resume", str(b)], timeout=300)
    assert "resumed exactly from" in r.stderr and "ckpt-000000001300.h5" in r.stderr
    assert summary(r)["env_steps"] == 3000
    _same_end(a, b)


def _descendants(pid):
    """(pid, command) of every process below ``pid`` (mpirun's ranks and any helpers)."""
    parent = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
                parent[int(p.name)] = (int(fields[1]), (p / "cmdline").read_bytes())
            except OSError:
                continue
    out, todo = [], [pid]
    while todo:
        cur = todo.pop()
        for c, (pp, cmd) in parent.items():
            if pp == cur:
                out.append((c, cmd))
                todo.append(c)
    return out


def test_kill_9_during_checkpoint_write_resumes_from_previous(run_a, tmp_path):
    run = tmp_path / "crash"
    cmd = mpirun_cmd(2) + [sys.executable, "-m", "hpcdqn.cli", "train", *TINY, f"run_dir={run}"]
    # the checkpoint at 2000 steps sleeps 60 s after writing its data, before the rename
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=mpi_env({CKPT_SLEEP_ENV: "60@2000"}), start_new_session=True)
    d = run / "checkpoints"
    tmp = d / "ckpt-000000002000.h5.tmp"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not tmp.exists():
            time.sleep(0.2)
        assert tmp.exists(), "the second checkpoint never started"
        time.sleep(1.5)                  # inside the write (data written, not yet renamed)
        ranks = [c for c, cmd in _descendants(p.pid) if b"hpcdqn.cli" in cmd]
        assert len(ranks) == 2, ranks
        for pid in ranks:                # kill -9 every rank
            os.kill(pid, signal.SIGKILL)
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate(timeout=30)
        gone = time.time() + 30          # the kernel takes a moment to end a killed process
        while time.time() < gone and any(proc_start(pid) is not None for pid in ranks):
            time.sleep(0.1)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert (d / "latest").read_text().strip() == "ckpt-000000001000.h5"
    assert not (d / "ckpt-000000002000.h5").exists()
    verify(d / "ckpt-000000001000.h5")          # the previous checkpoint is intact
    r = hpcdqn(2, ["train", "--resume", str(run)], timeout=300)
    assert "resumed exactly from" in r.stderr and "ckpt-000000001000.h5" in r.stderr
    assert not tmp.exists()                        # the stale temporary was cleaned up
    assert np.array_equal(model(run_a), model(run))


def _flip_byte(path, dataset, where=0.5):
    with h5py.File(path, "r") as f:
        ds = f[dataset]
        off = ds.id.get_offset()
        n = ds.id.get_storage_size()
    assert off is not None and n > 0
    with open(path, "r+b") as fh:
        fh.seek(off + int(n * where))
        b = fh.read(1)
        fh.seek(off + int(n * where))
        fh.write(bytes([b[0] ^ 0xFF]))


def test_corrupted_latest_falls_back_to_previous_with_warning(run_a, tmp_path):
    run = tmp_path / "c"
    shutil.copytree(run_a, run)
    d = run / "checkpoints"
    # contiguous datasets have a file offset we can damage: a parameter layer
    _flip_byte(d / "ckpt-000000003000.h5", "params/online/1")
    with pytest.raises(CheckpointError, match=r"ckpt-000000003000\.h5.*'params/online/1'.*checksum"):
        verify(d / "ckpt-000000003000.h5")
    # truncate the one before: cannot be opened
    p2 = d / "ckpt-000000002000.h5"
    p2.write_bytes(p2.read_bytes()[: p2.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="ckpt-000000002000.h5.*truncated"):
        verify(p2)
    r = hpcdqn(2, ["train", "--resume", str(run), "total_steps=3000"], timeout=300)
    assert "warning" in r.stderr and "ckpt-000000003000.h5" in r.stderr and "params/online/1" in r.stderr
    assert "ckpt-000000002000.h5" in r.stderr and "truncated" in r.stderr
    assert "resumed exactly from" in r.stderr and "ckpt-000000001000.h5" in r.stderr
    assert np.array_equal(model(run_a), model(run))     # redone from 1000: still bitwise


def test_missing_dataset_and_other_env_are_clear_errors(run_a, tmp_path):
    p = tmp_path / "m.h5"
    shutil.copy(run_a / "checkpoints" / "ckpt-000000003000.h5", p)
    with h5py.File(p, "a") as f:
        del f["adam/exp_avg/2"]
    with pytest.raises(CheckpointError, match=r"m\.h5.*dataset 'adam/exp_avg/2' is missing"):
        verify(p)
    run = tmp_path / "e"
    shutil.copytree(run_a, run)
    r = hpcdqn(1, ["train", "--resume", str(run), "env_id=Acrobot-v1"], timeout=120, check=False)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "checkpoint error" in r.stderr and "CartPole-v1" in r.stderr and "(4,)" in r.stderr \
        and "Acrobot-v1" in r.stderr and "(6,)" in r.stderr, r.stderr[-2000:]


def test_reshard_plan_rule():
    # 4 streams of 10 -> 2 columns of capacity 10: each stream keeps its newest 5
    L, M, pieces = reshard_plan(4, 10, 2, 10)
    assert (L, M) == (5, 10)
    assert pieces == [[(0, 0, 5), (1, 0, 5)], [(2, 0, 5), (3, 0, 5)]]
    # 1 stream of 9 -> 2 columns: oldest remainder dropped, equal halves
    L, M, pieces = reshard_plan(1, 9, 2, 10)
    assert (L, M) == (9, 4) and pieces == [[(0, 1, 5)], [(0, 5, 9)]]
    assert ring_rows(0, 4, 10, 3, 10, 5) == [(8, 10), (0, 2)]


def _expected_reshard(old_path, dp_new, E_new, rows_new):
    """The documented rule, computed with numpy from the old file."""
    with h5py.File(old_path) as f:
        lay = json.loads(f.attrs["layout"])
        rows, E, dp = lay["rows"], lay["num_envs"], lay["dp"]
        filled, pos = int(f["replay/filled"][0]), int(f["replay/pos"][0])
        data = {k: f[f"replay/{k}"][...] for k in REPLAY_ROWS}
    oldest = pos if filled == rows else 0
    L, M, _ = reshard_plan(dp * E, filled, dp_new * E_new, rows_new)
    streams = []
    for q in range(dp):
        order = q * rows + (oldest + np.arange(filled - L, filled)) % rows
        for e in range(E):
            s = {k: v[order, e].copy() for k, v in data.items()}
            s["truncated"][-1] |= ~s["terminated"][-1]
            streams.append(s)
    cat = {k: np.concatenate([s[k] for s in streams]) for k in data}
    D = len(cat["obs"]) - dp_new * E_new * M
    cols = []
    for j in range(dp_new * E_new):
        c = {k: v[D + j * M:D + (j + 1) * M].copy() for k, v in cat.items()}
        c["truncated"][-1] |= ~c["terminated"][-1]
        cols.append(c)
    return M, cols


def _check_resharded(old_path, new_path, dp_new, E_new):
    with h5py.File(new_path) as f:
        rows_new = json.loads(f.attrs["layout"])["rows"]
        new = {k: f[f"replay/{k}"][...] for k in REPLAY_ROWS}
    M, cols = _expected_reshard(old_path, dp_new, E_new, rows_new)
    assert M > 100
    for j, c in enumerate(cols):
        q, e = divmod(j, E_new)
        for k in REPLAY_ROWS:
            assert np.array_equal(new[k][q * rows_new:q * rows_new + M, e], c[k]), (k, j)


def test_reshard_dp4_to_dp2(tmp_path):
    run = tmp_path / "r4"
    hpcdqn(4, ["train", *UNIFORM, f"run_dir={run}", "stop_after=1200"], timeout=400)
    old = run / "checkpoints" / "ckpt-000000001200.h5"
    keep = tmp_path / "old.h5"
    shutil.copy(old, keep)
    # resume on 2 ranks for one iteration (no training in it), check the replay redistribution
    r = hpcdqn(2, ["train", "--resume", str(run), "stop_after=1202"], timeout=300)
    assert "resharded" in r.stderr and summary(r)["dp"] == 2
    new = run / "checkpoints" / "ckpt-000000001202.h5"
    _check_resharded(keep, new, 2, 1)
    pa, pb = ckpt_arrays(keep), ckpt_arrays(new)
    for k in pa:
        assert np.array_equal(pa[k], pb[k]), k
    # and the run carries on to the end
    s = summary(hpcdqn(2, ["train", "--resume", str(run)], timeout=300))
    assert s["env_steps"] == 3000 and s["updates"] > 0


def test_reshard_dp2_to_dp1_then_serial_fallback(tmp_path):
    """dp=2 -> dp=1 (one rank), and the serial (rank 0) writer produces the same file format."""
    run = tmp_path / "r2"
    hpcdqn(2, ["train", *UNIFORM, f"run_dir={run}", "stop_after=1200"], timeout=300)
    keep = tmp_path / "old.h5"
    shutil.copy(run / "checkpoints" / "ckpt-000000001200.h5", keep)
    r = hpcdqn(1, ["train", "--resume", str(run), "stop_after=1201"], timeout=300)
    assert "resharded" in r.stderr
    _check_resharded(keep, run / "checkpoints" / "ckpt-000000001201.h5", 1, 1)


def test_serial_fallback_writes_the_same_file(run_a, tmp_path):
    run = tmp_path / "serial"
    r = hpcdqn(2, ["train", *TINY, f"run_dir={run}", "stop_after=1000"], timeout=300,
               env={SERIAL_ENV: "1"})
    warn = [line for line in r.stderr.splitlines() if "through rank 0" in line]
    assert len(warn) == 1 and "HPCDQN_H5_SERIAL=1" in warn[0]
    assert summary(r)["checkpoint_io"] == "serial"
    a, b = run_a / "checkpoints" / "ckpt-000000001000.h5", run / "checkpoints" / "ckpt-000000001000.h5"
    verify(b)
    assert read_meta(b)["io_mode"] == "serial"
    da, db = ckpt_arrays(a, ("",)), ckpt_arrays(b, ("",))
    assert da.keys() == db.keys()
    for k in da:                     # every dataset, the per-rank RNG/env states included
        assert np.array_equal(da[k], db[k]), k
    # and it resumes, serially read, to the same final parameters
    hpcdqn(2, ["train", "--resume", str(run)], timeout=300, env={SERIAL_ENV: "1"})
    assert np.array_equal(model(run_a), model(run))


def test_parallel_fs_hints_and_alignment(monkeypatch, tmp_path):
    """Lustre/GPFS/BeeGFS (statfs, or HPCDQN_FS_TYPE): collective buffering back on so ROMIO's
    aggregators write stripe-aligned file domains; no writeback pacing; local disks keep theirs."""
    from hpcdqn.store.mpiio import FS_TYPE_ENV, Writeback, fs_type, mpi_info, stripe_bytes

    def hints(kind):
        monkeypatch.setenv(FS_TYPE_ENV, kind)
        info = mpi_info(tmp_path)
        got = {k: info.Get(k) for k in ("romio_cb_write", "collective_buffering",
                                         "romio_ds_write", "IBM_largeblock_io")}
        info.Free()
        return got

    assert hints("ext4")["romio_cb_write"] == "disable"
    lus = hints("lustre")
    assert lus["romio_cb_write"] == "enable" and lus["collective_buffering"] == "true"
    assert lus["romio_ds_write"] == "disable"
    assert hints("gpfs")["IBM_largeblock_io"] == "true"
    monkeypatch.setenv(FS_TYPE_ENV, "lustre")
    assert fs_type(tmp_path) == "lustre" and stripe_bytes(tmp_path) % 2**20 == 0
    assert Writeback(tmp_path / "x.h5").every == 0          # no pacing on a parallel FS
    monkeypatch.delenv(FS_TYPE_ENV)
    assert fs_type(tmp_path) in ("ext4", "tmpfs", "xfs", "btrfs", "overlay") or \
        fs_type(tmp_path).startswith("0x")


def test_lustre_hints_write_the_same_checkpoint(run_a, tmp_path):
    """The collective-buffering write path that a Lustre run takes (ROMIO honours the cb hints
    on any file system; the Lustre-only striping itself is reasoned, not tested: ext4 here)
    writes a checkpoint identical, dataset by dataset, to the default path's."""
    run = tmp_path / "lustre"
    hpcdqn(2, ["train", *TINY, f"run_dir={run}", "stop_after=1000"], timeout=300,
           env={"HPCDQN_FS_TYPE": "lustre"})
    a, b = run_a / "checkpoints" / "ckpt-000000001000.h5", run / "checkpoints" / "ckpt-000000001000.h5"
    verify(b)
    da, db = ckpt_arrays(a, ("",)), ckpt_arrays(b, ("",))
    assert da.keys() == db.keys()
    for k in da:
        assert np.array_equal(da[k], db[k]), k


def test_minari_export_round_trip(run_a, tmp_path, monkeypatch):
    minari = pytest.importorskip("minari")
    root = tmp_path / "datasets"
    out = root / "hpcdqn" / "cartpole-replay-v0"
    r = subprocess.run([sys.executable, "-m", "hpcdqn.cli", "export", str(run_a), "--format", "minari",
                        str(out)], capture_output=True, text=True, env=mpi_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["dataset_id"] == "hpcdqn/cartpole-replay-v0"
    # expected episodes, straight from the replay in the checkpoint
    path = run_a / "checkpoints" / "ckpt-000000003000.h5"
    exp_lens, exp_rets = [], []
    with h5py.File(path) as f:
        rows = json.loads(f.attrs["layout"])["rows"]
        for q in range(2):
            filled, pos = int(f["replay/filled"][q]), int(f["replay/pos"][q])
            order = (np.arange(filled) + (pos if filled == rows else 0)) % rows + q * rows
            done = f["replay/terminated"][...][order, 0] | f["replay/truncated"][...][order, 0]
            rew = f["replay/rewards"][...][order, 0]
            ends = np.nonzero(done)[0]
            starts = np.concatenate([[0], ends[:-1] + 1])
            for i, (s, e) in enumerate(zip(starts, ends)):
                if i == 0 and filled == rows:
                    continue
                exp_lens.append(e - s + 1)
                exp_rets.append(float(rew[s:e + 1].sum()))
    assert len(exp_lens) > 50
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    ds = minari.load_dataset("hpcdqn/cartpole-replay-v0")
    assert ds.total_episodes == len(exp_lens) == res["episodes"]
    assert ds.total_steps == sum(exp_lens)
    eps = list(ds.iterate_episodes())
    assert [len(e.actions) for e in eps] == exp_lens
    assert [e.observations.shape[0] for e in eps] == [n + 1 for n in exp_lens]
    np.testing.assert_allclose([float(e.rewards.sum()) for e in eps], exp_rets)
    assert all(bool(e.terminations[-1] or e.truncations[-1]) for e in eps)
    assert ds.observation_space.shape == (4,) and ds.action_space.n == 2
    # the same dataset by path, through MinariDataset
    assert minari.MinariDataset(out / "data").total_episodes == len(exp_lens)


def _pipeline():
    import hpcdqn.parallel.pipeline  # noqa: F401


def test_reshard_dp2_to_pp2_and_back_to_pp1(tmp_path):
    _pipeline()
    run = tmp_path / "pp"
    hpcdqn(2, ["train", *UNIFORM, f"run_dir={run}", "stop_after=1200"], timeout=300)
    d = run / "checkpoints"
    keep = tmp_path / "dp2.h5"
    shutil.copy(d / "ckpt-000000001200.h5", keep)
    # dp=2 -> dp=1 x pp=2: one iteration without training; the layers must be split unchanged
    r = hpcdqn(2, ["train", "--resume", str(run), "pp=2", "stop_after=1201"], timeout=300)
    s = summary(r)
    assert s["pp"] == 2 and s["dp"] == 1, s
    pp2 = d / "ckpt-000000001201.h5"
    assert json.loads(h5py.File(pp2).attrs["layout"])["pp"] == 2
    pa, pb = ckpt_arrays(keep), ckpt_arrays(pp2)
    for k in pa:
        assert np.array_equal(pa[k], pb[k]), k
    _check_resharded(keep, pp2, 1, 1)
    # pp=2 -> pp=1 (dp=2 again), on to the end
    s = summary(hpcdqn(2, ["train", "--resume", str(run), "pp=1"], timeout=300))
    assert s["pp"] == 1 and s["dp"] == 2 and s["env_steps"] == 3000
    # a layout that cannot fit: more stages than layers, cut at layer boundaries only
    r = hpcdqn(4, ["train", "--resume", str(run), "pp=4", "network.split_layers=false"], timeout=300,
               check=False)
    assert r.returncode != 0 and "layers" in r.stderr
