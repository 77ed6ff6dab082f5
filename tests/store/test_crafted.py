"""Crafted and damaged files: each kind gets a clear error or a fallback to an older
checkpoint, the loading process's peak RSS (VmHWM, from the kernel) stays under RSS_BOUND_MB,
and nothing outside the run directory is touched."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpi_util import TESTS, hpcdqn, mpi_env

from hpcdqn.store.codec import attrs_crc, crc

# the interpreter with torch, h5py and hpcdqn imported peaks at ~0.3-0.4 GB here; a crafted
# size that got allocated would be GBs (layout.dp=1e9 took 2.5 GB before these checks)
RSS_BOUND_MB = 600
TINY = ["total_steps=3000", "dqn.learning_starts=500", "dqn.train_frequency=100",
        "dqn.gradient_steps=4", "network.hidden=[32, 32]", "eval.episodes=0",
        "log.progress=false", "log.tensorboard=false", "log.every=500", "seed=5",
        "dqn.buffer_size=2000", "checkpoint_every=1000", "keep_last=3"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("base") / "run"
    hpcdqn(1, ["train", *TINY, f"run_dir={d}"], timeout=300)
    return d


def check(mode, path):
    r = subprocess.run([sys.executable, TESTS / "store" / "crafted_check.py", mode, str(path)],
                       capture_output=True, text=True, env=mpi_env(), timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["rss_mb"] < RSS_BOUND_MB, out
    print(f"crafted {mode} {Path(path).name}: {out['kind'] or 'ok'}; peak RSS {out['rss_mb']:.0f} MB "
          f"(after imports {out['rss_base_mb']:.0f} MB; bound {RSS_BOUND_MB} MB)")
    out["stderr"] = r.stderr
    return out


def snapshot(root: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def set_attr(path, key, fn, fix_crc=True):
    """Change a root JSON attribute; with ``fix_crc`` recompute the attribute checksum, as a
    deliberate crafter would (so the bounds, not the checksum, must catch it)."""
    with h5py.File(path, "a") as f:
        f.attrs[key] = fn(f.attrs[key])
        if fix_crc:
            f.attrs["attrs_crc32"] = attrs_crc({k: f.attrs[k] for k in f.attrs.keys()})


def set_dataset(path, name, arr):
    """Replace a dataset, with a matching CRC (a consistent crafted file)."""
    with h5py.File(path, "a") as f:
        attrs = dict(f[name].attrs)
        del f[name]
        ds = f.create_dataset(name, data=arr)
        for k, v in attrs.items():
            ds.attrs[k] = v
        ds.attrs["crc32"] = json.dumps([crc(arr)])


def json_edit(**kw):
    def fn(raw):
        d = json.loads(raw)
        for k, v in kw.items():
            d[k] = v
        return json.dumps(d)
    return fn


@pytest.fixture
def world(base, tmp_path):
    """A copy of the run, plus an 'outside' directory next to it that must never change."""
    run = tmp_path / "run"
    shutil.copytree(base, run)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(run / "checkpoints" / "ckpt-000000001000.h5", outside / "ckpt-000000009999.h5")
    (outside / "note.txt").write_text("keep me")
    return run, outside, snapshot(outside)


LAST = "ckpt-000000003000.h5"


CASES = {  # kind: (craft the file, the error kind, a phrase of the message)
    "huge layout numbers": (lambda p: set_attr(p, "layout", json_edit(dp=10**9, world=10**9)),
                            "CheckpointCorrupt", "layout.world = 1000000000 is not an integer in"),
    "layout within bounds, not the file": (
        lambda p: set_attr(p, "layout", json_edit(dp=2**20, world=2**20)),
        "CheckpointCorrupt", "dataset 'replay/pos' has shape (1,), its layout says (1048576,)"),
    "huge declared obs shape": (lambda p: set_attr(p, "env", json_edit(obs_shape=[2**31, 2**31])),
                                "CheckpointCorrupt", "env.obs_shape[0] = 2147483648"),
    "layout of wrong type": (lambda p: set_attr(p, "layout", json_edit(rows="4000")),
                             "CheckpointCorrupt", "layout.rows = '4000' is not an integer"),
    "changed digit in counters": (
        lambda p: set_attr(p, "counters", lambda raw: raw.replace('"env_steps": 3000', '"env_steps": 3900'),
                           fix_crc=False),
        "CheckpointCorrupt", "root attributes do not match their checksum"),
    "unknown root attribute": (lambda p: _add_attr(p),
                               "CheckpointCorrupt", "root attributes do not match their checksum"),
    "newer major format": (lambda p: set_attr(p, "format", lambda raw: "hpcdqn-checkpoint-3.0"),
                           "CheckpointIncompatible", "format hpcdqn-checkpoint-3.0, newer than"),
    "wrong dtype": (lambda p: _retype(p, "replay/rewards", np.float64),
                    "CheckpointCorrupt", "dataset 'replay/rewards' has shape"),
    "missing dataset": (lambda p: _delete(p, "rank_state"),
                        "CheckpointCorrupt", "dataset 'rank_state' is missing"),
    "truncated at 10%": (lambda p: _truncate(p, 0.10), "CheckpointCorrupt", "truncated"),
    "truncated at 50%": (lambda p: _truncate(p, 0.50), "CheckpointCorrupt", ""),
    "truncated at 97%": (lambda p: _truncate(p, 0.97), "CheckpointCorrupt", ""),
}


def _retype(p, name, dtype):
    with h5py.File(p, "r") as f:
        arr = f[name][...].astype(dtype)
    set_dataset(p, name, arr)


def _add_attr(p):
    with h5py.File(p, "a") as f:
        f.attrs["__class__"] = "os.system"


def _delete(p, name):
    with h5py.File(p, "a") as f:
        del f[name]


def _truncate(p, frac):
    data = p.read_bytes()
    p.write_bytes(data[: int(len(data) * frac)])


@pytest.mark.parametrize("kind", sorted(CASES))
def test_crafted_checkpoint_kinds(world, kind):
    run, outside, before = world
    p = run / "checkpoints" / LAST
    craft, want_kind, phrase = CASES[kind]
    craft(p)
    out = check("verify", p)
    assert not out["ok"] and out["kind"] == want_kind, out
    assert LAST in out["error"] and phrase in out["error"], out["error"]
    # a run directory whose newest checkpoint is crafted falls back to the previous one
    out = check("resolve", run)
    assert out["ok"] and out["result"] == "ckpt-000000002000.h5", out
    assert snapshot(outside) == before


def test_latest_outside_and_symlinks_are_ignored(world):
    run, outside, before = world
    d = run / "checkpoints"
    (d / "latest").write_text("../../outside/ckpt-000000009999.h5\n")
    (d / "ckpt-000000009000.h5").symlink_to(outside / "ckpt-000000009999.h5")
    out = check("resolve", run)
    assert out["ok"] and out["result"] == LAST, out        # the newest real checkpoint
    assert "not a checkpoint of this run directory; ignored" in out["stderr"]
    out = check("verify", d / "ckpt-000000009000.h5")
    assert not out["ok"] and "symbolic link" in out["error"], out
    assert snapshot(outside) == before and (outside / "ckpt-000000009999.h5").is_file()


def _model_attr(path, key, value):
    with h5py.File(path, "a") as f:
        f.attrs[key] = value


def test_crafted_model_files(base, tmp_path):
    src = base / "model.h5"
    assert check("model", src)["ok"]
    # a small file declaring a huge network: refused before anything is allocated
    big = tmp_path / "big.h5"
    shutil.copy(src, big)
    with h5py.File(big, "a") as f:
        cfg = json.loads(f.attrs["config"])
        cfg["network"]["hidden"] = [60000, 60000]
        f.attrs["config"] = json.dumps(cfg)
        del f["online"]
        f.create_dataset("online", shape=(4 * 60000 + 60000 + 60000 * 60000 + 60000 + 60000 * 2 + 2,),
                         dtype=np.float32)       # declared, never written: 0 bytes on disk
    assert big.stat().st_size < 1_000_000
    out = check("model", big)
    assert not out["ok"] and "bytes on disk" in out["error"], out
    # NaN parameters
    nan = tmp_path / "nan.h5"
    shutil.copy(src, nan)
    with h5py.File(nan, "a") as f:
        f["online"][3] = np.nan
    out = check("model", nan)
    assert not out["ok"] and "NaN or infinite" in out["error"], out
    # out-of-bounds declared shape, truncation
    odd = tmp_path / "odd.h5"
    shutil.copy(src, odd)
    _model_attr(odd, "obs_shape", json.dumps([2**40]))
    out = check("model", odd)
    assert not out["ok"] and "out of bounds" in out["error"], out
    cut = tmp_path / "cut.h5"
    cut.write_bytes(src.read_bytes()[:3000])
    out = check("model", cut)
    assert not out["ok"] and "cannot be opened" in out["error"], out
    r = subprocess.run([sys.executable, "-m", "hpcdqn.cli", "eval", str(big)], capture_output=True,
                       text=True, env=mpi_env(), timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "bytes on disk" in r.stderr, r.stderr


def test_env_state_allow_list():
    from hpcdqn.rl.envs import make_vector_env
    from hpcdqn.store.codec import env_state, restore_env_state

    venv = make_vector_env("CartPole-v1", 1, 0, "sync")
    venv.reset(seed=0)
    st = env_state(venv)
    st["envs"][0]["attrs"][-1]["reset"] = 5            # a method name
    st["envs"][0]["attrs"][-1]["__class__"] = "x"
    st["vector"]["close"] = 1
    warnings = restore_env_state(venv, st)
    assert any("'reset'" in w for w in warnings) and any("'close'" in w for w in warnings)
    assert callable(venv.envs[0].unwrapped.reset) and callable(venv.close)
    venv.close()
