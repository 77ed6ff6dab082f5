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
