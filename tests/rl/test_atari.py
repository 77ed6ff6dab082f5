"""Atari: the standard preprocessing and the Nature-CNN (needs ale-py + opencv, which
./quickstart.sh installs)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from mpi_util import ROOT, mpi_env

ale_py = pytest.importorskip("ale_py", reason="ale-py not installed (./quickstart.sh installs it)")


def test_preprocessing_and_cnn_shapes():
    from hpcdqn.rl.envs import make_vector_env
    from hpcdqn.rl.networks import build_layers

    env = make_vector_env("ALE/Pong-v5", 2, seed=0)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (2, 4, 84, 84) and obs.dtype == np.uint8
    layers = build_layers(obs.shape[1:], int(env.single_action_space.n), [512], dueling=True)
    q = torch.nn.Sequential(*layers)(torch.as_tensor(obs))
    assert q.shape == (2, 6)
    env.close()


def test_short_pong_run(tmp_path):
    r = subprocess.run([sys.executable, "-m", "hpcdqn.cli", "train", "--config",
                        str(ROOT / "configs" / "atari_pong.toml"), "total_steps=800", "num_envs=2",
                        "dqn.learning_starts=400", "dqn.buffer_size=1000", "dqn.train_frequency=8",
                        "eval.episodes=0", "log.every=400", "log.progress=false",
                        f"run_dir={tmp_path / 'run'}"], capture_output=True, text=True,
                       timeout=300, env=mpi_env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["env_steps"] == 800 and s["updates"] == (400 // 2 // 4) * 1


# Breakout (lives, FIRE) with sticky actions, async envs in forkserver workers, 2 ranks
ASYNC_BREAKOUT = ["train", "env_id=ALE/Breakout-v5", "num_envs=2", "vector=async",
                  "total_steps=1600", "dqn.learning_starts=400", "dqn.train_frequency=16",
                  "dqn.gradient_steps=1", "dqn.batch_size=32", "dqn.buffer_size=1000",
                  "network.hidden=[64]", "eval.episodes=0", "log.every=400",
                  "log.progress=false", "log.tensorboard=false", "atari.sticky_actions=0.25",
                  "seed=3"]


def test_async_atari_resume_is_bitwise_equal_to_uninterrupted(tmp_path):
    """Real mpirun: stopped at env step 1000 (not a log, checkpoint or training boundary) and
    resumed, the run ends with the same network, Adam moments and replay as one that was never
    interrupted: the async workers' emulator, sticky-action and wrapper state came back."""
    import h5py

    from mpi_util import hpcdqn

    a, b = tmp_path / "a", tmp_path / "b"
    hpcdqn(2, [*ASYNC_BREAKOUT, f"run_dir={a}"], timeout=300)
    hpcdqn(2, [*ASYNC_BREAKOUT, f"run_dir={b}", "stop_after=1000"], timeout=300)
    r = hpcdqn(2, ["train", "--resume", str(b)], timeout=300)
    assert "resumed exactly from" in r.stderr and "re-seeded" not in r.stderr, r.stderr[-2000:]

    def arrays(run):
        out = {}
        with h5py.File(run / "checkpoints" / "ckpt-000000001600.h5") as f:
            f.visititems(lambda name, obj: out.__setitem__(name, obj[...])
                         if isinstance(obj, h5py.Dataset) and name.startswith(("params/", "adam/",
                                                                               "replay/")) else None)
        return out

    xa, xb = arrays(a), arrays(b)
    assert xa.keys() == xb.keys() and any(k.startswith("replay/") for k in xa)
    for k in xa:
        assert np.array_equal(xa[k], xb[k]), k


def test_periodic_eval_uses_the_runs_atari_settings(tmp_path):
    """Periodic evaluation makes its envs as the run trained them (its ``[atari]`` section):
    42x42 frames, two per observation. Evaluated under the default preprocessing (84x84, four
    frames: the old drift) the network cannot even take the observations, and the run fails."""
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "hpcdqn.cli", "train", "env_id=ALE/Pong-v5",
                        "num_envs=1", "total_steps=64", "dqn.learning_starts=32",
                        "dqn.train_frequency=32", "dqn.buffer_size=256", "dqn.batch_size=8",
                        "network.hidden=[16]", "atari.screen_size=42", "atari.frame_stack=2",
                        "atari.max_frames=200", "eval.every=64", "eval.every_episodes=1",
                        "eval.num_envs=1", "eval.episodes=0", "log.every=64",
                        "log.progress=false", "log.tensorboard=false", "checkpoint=false",
                        f"run_dir={run}"], capture_output=True, text=True, timeout=300,
                       env=mpi_env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = (run / "eval.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("64,"), rows
