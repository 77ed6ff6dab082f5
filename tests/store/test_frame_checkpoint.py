"""Checkpoints of a frame-stacked replay (each frame stored once), with real mpirun and a small
image env behind gymnasium's FrameStackObservation (tests/frame_env.py: every frame is a pure
function of (episode, step), so any stored or rebuilt observation can be checked against what
the env produced): bitwise resume, a reshard dp 2 -> 1, and the Minari export."""

import json
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

import frame_env
from mpi_util import ROOT, hpcdqn, mpi_env

from hpcdqn.rl.framereplay import FrameReplay
from hpcdqn.store.reshard import reshard_plan
from hpcdqn.store.schema import CELL_ROWS

TESTS = ROOT / "tests"
ENV = {"PYTHONPATH": f"{ROOT}:{TESTS}"}       # the ranks import frame_env for its env id
K, SIZE = 4, 36
ARGS = ["env_id=frame_env:FrameToy-v0", "num_envs=2", "total_steps=2400",
        "dqn.learning_starts=400", "dqn.train_frequency=100", "dqn.gradient_steps=10",
        "network.hidden=[32]", "eval.episodes=0", "log.progress=false", "log.tensorboard=false",
        "log.every=400", "dqn.buffer_size=600", "replay.prioritized=true", "dqn.n_step=3",
        "checkpoint_every=800", "seed=3"]


def summary(r):
    return json.loads(r.stdout.strip().splitlines()[-1])


def datasets(path, prefix=("params/", "adam/", "replay/")):
    out = {}
    with h5py.File(path) as f:
        f.visititems(lambda n, o: out.__setitem__(n, o[...])
                     if isinstance(o, h5py.Dataset) and n.startswith(prefix) else None)
    return out


def toy_stack(ep, t):
    """The observation FrameStackObservation (reset padding) gives at step t of episode ep."""
    return np.stack([frame_env.frame(ep, max(0, t - K + 1 + i), SIZE) for i in range(K)])


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    d = tmp_path_factory.mktemp("fa") / "run"
    s = summary(hpcdqn(2, ["train", *ARGS, f"run_dir={d}"], timeout=300, env=ENV))
    assert s["env_steps"] == 2400 and s["checkpoints"] == 3 and s["updates"] > 0
    return d


def test_frame_replay_resume_is_bitwise(run_a, tmp_path):
    b = tmp_path / "b"
    hpcdqn(2, ["train", *ARGS, f"run_dir={b}", "stop_after=1300"], timeout=300, env=ENV)
    r = hpcdqn(2, ["train", "--resume", str(b)], timeout=300, env=ENV)
    assert "resumed exactly from" in r.stderr and "ckpt-000000001300.h5" in r.stderr
    name = "checkpoints/ckpt-000000002400.h5"
    with h5py.File(run_a / name) as f:
        lay = json.loads(f.attrs["layout"])
        assert f.attrs["format"] == "hpcdqn-checkpoint-2.0" and lay["frame_stack"] == K
        assert "replay/obs" not in f and f["replay/frames"].shape[2:] == (SIZE, SIZE)
    da, db = datasets(run_a / name), datasets(b / name)
    assert da.keys() == db.keys() and "replay/starts" in da and "replay/priorities" in da
    for k in da:
        assert np.array_equal(da[k], db[k]), k
    with h5py.File(run_a / "model.h5") as fa, h5py.File(b / "model.h5") as fb:
        assert np.array_equal(fa["online"][...], fb["online"][...])


def load_shard(path, q):
    """Shard q of a checkpoint as a FrameReplay (what a resumed run samples from)."""
    with h5py.File(path) as f:
        lay, env = json.loads(f.attrs["layout"]), json.loads(f.attrs["env"])
        rows, E = lay["rows"], lay["num_envs"]
        buf = FrameReplay((rows - K) * E, E, tuple(env["obs_shape"]), np.uint8, n_step=3)
        assert buf.rows == rows
        for k in FrameReplay.OBS_ROWS + CELL_ROWS:
            getattr(buf, k)[...] = f[f"replay/{k}"][q * rows:(q + 1) * rows]
        buf.pos, buf.filled = int(f["replay/pos"][q]), int(f["replay/filled"][q])
        a = int(np.sum(lay["replay_starts"][:q]))
        buf.restore(f["replay/starts"][a:a + lay["replay_starts"][q]])
    return buf


def old_streams(path):
    """Every env stream of a checkpoint, oldest first: its cells and the (episode, step) of
    each next observation (decoded from the stored newest frames)."""
    with h5py.File(path) as f:
        lay = json.loads(f.attrs["layout"])
        rows, E, dp = lay["rows"], lay["num_envs"], lay["dp"]
        filled, pos = int(f["replay/filled"][0]), int(f["replay/pos"][0])
        data = {k: f[f"replay/{k}"][...] for k in CELL_ROWS + ("frames",)}
    avail = min(filled, rows - K)
    out = []
    for q in range(dp):
        order = q * rows + (pos - avail + np.arange(avail)) % rows
        for e in range(E):
            s = {k: data[k][order, e] for k in CELL_ROWS}
            s["id"] = np.array([frame_env.decode(x) for x in data["frames"][order, e]])
            out.append(s)
    return out, avail


def test_frame_replay_reshard_dp2_to_dp1(tmp_path):
    run = tmp_path / "r"
    hpcdqn(2, ["train", *ARGS, f"run_dir={run}", "stop_after=1200"], timeout=300, env=ENV)
    keep = tmp_path / "old.h5"
    shutil.copy(run / "checkpoints" / "ckpt-000000001200.h5", keep)
    r = hpcdqn(1, ["train", "--resume", str(run), "stop_after=1202"], timeout=300, env=ENV)
    assert "resharded" in r.stderr and summary(r)["dp"] == 1
    new = run / "checkpoints" / "ckpt-000000001202.h5"
    # the documented rule on the cells and on which env frames they hold
    streams, avail = old_streams(keep)
    buf = load_shard(new, 0)
    L, M, _ = reshard_plan(len(streams), avail, 2, buf.window)
    assert M > 200 and buf.filled == M + 1          # + the one step taken after the resume
    cat = {k: np.concatenate([s[k][len(s[k]) - L:] for s in streams]) for k in streams[0]}
    D = len(cat["id"]) - 2 * M                       # the oldest remainder, dropped
    ends = np.cumsum([L] * len(streams)) - 1 - D     # where each old stream ends
    for e in range(2):
        want = {k: v[D + e * M:D + (e + 1) * M].copy() for k, v in cat.items()}
        cut = [x - e * M for x in ends if 0 <= x - e * M < M] + [M - 1]
        want["truncated"][cut] |= ~want["terminated"][cut]
        for k in CELL_ROWS:
            assert np.array_equal(getattr(buf, k)[:M, e], want[k]), (k, e)
        got = np.array([frame_env.decode(x) for x in buf.frames[:M, e]])
        assert np.array_equal(got, want["id"]), e
        # every transition the new shard rebuilds is the env's genuine observation pair
        rows = np.arange(M)
        obs = buf.obs_at(rows, np.full(M, e))
        nxt = buf.next_obs_at(rows, np.full(M, e))
        for i, (ep, t) in enumerate(got):
            assert np.array_equal(nxt[i], toy_stack(ep, t)), i
            assert np.array_equal(obs[i], toy_stack(ep, t - 1)), i
    # on as 1 replica x 2 pipeline stages (the second stage holds no replay but writes the same
    # plan): the replay loads as it was and the next checkpoint keeps it
    r = hpcdqn(2, ["train", "--resume", str(run), "pp=2", "stop_after=1204"], timeout=300, env=ENV)
    assert summary(r)["pp"] == 2
    after = load_shard(run / "checkpoints" / "ckpt-000000001204.h5", 0)
    assert after.filled == buf.filled + 1
    for k in FrameReplay.OBS_ROWS + CELL_ROWS:
        assert np.array_equal(getattr(after, k)[:M + 1], getattr(buf, k)[:M + 1]), k


def test_frame_replay_minari_export_streams_genuine_observations(run_a, tmp_path):
    minari = pytest.importorskip("minari")
    out = tmp_path / "datasets" / "frames-v0"
    r = subprocess.run([sys.executable, "-m", "hpcdqn.cli", "export", str(run_a), "--format",
                        "minari", str(out)], capture_output=True, text=True, env=mpi_env(ENV),
                       timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    ds = minari.MinariDataset(out / "data")
    assert ds.total_episodes == res["episodes"] > 20
    assert ds.observation_space.shape == (K, SIZE, SIZE)
    for e in ds.iterate_episodes():
        ep, t0 = frame_env.decode(e.observations[0][-1])
        assert t0 == 0 and len(e.observations) == len(e.actions) + 1
        for t, o in enumerate(e.observations):
            assert np.array_equal(o, toy_stack(ep, t)), (ep, t)
        assert bool(e.terminations[-1] or e.truncations[-1])


def test_frame_layout_metadata_is_bounded():
    """A crafted frame layout is refused before anything is sized from it."""
    from hpcdqn.store.bounds import check_meta
    from hpcdqn.store.errors import CheckpointCorrupt

    def meta(**lay):
        layout = {"world": 2, "dp": 2, "pp": 1, "num_envs": 2, "rows": 304, "prioritized": True,
                  "frame_stack": K, "replay_starts": [10, 12], **lay}
        return {"layout": layout, "env": {"env_id": "x", "obs_shape": [K, SIZE, SIZE],
                                          "obs_dtype": "|u1", "n_actions": 3},
                "layer_sizes": [10], "counters": {"env_steps": 0}}

    check_meta(meta(), "f.h5")
    for bad, what in ((dict(frame_stack=3), "does not match"),
                      (dict(frame_stack=300), "layout.frame_stack"),
                      (dict(replay_starts=[10]), "replay_starts is not a list of 2"),
                      (dict(replay_starts=[10, 609]), r"replay_starts\[1\] = 609"),
                      (dict(replay_starts=[10, -1]), r"replay_starts\[1\]")):
        with pytest.raises(CheckpointCorrupt, match=what):
            check_meta(meta(**bad), "f.h5")
