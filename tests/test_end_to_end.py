import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mpi_util import ROOT, mpi_env


def hp(*args, timeout=300):
    r = subprocess.run([sys.executable, "-m", "hpcdqn.cli", *map(str, args)], capture_output=True,
                       text=True, timeout=timeout, cwd=ROOT, env=mpi_env())
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_train_then_eval_single_process(tmp_path):
    run = tmp_path / "run"
    r = hp("train", "total_steps=3000", "dqn.learning_starts=500", "dqn.train_frequency=100",
           "dqn.gradient_steps=20", "network.hidden=[32, 32]", "eval.episodes=10", "log.every=500",
           f"run_dir={run}")
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    for k in ("env_steps", "updates", "wall_s", "sps", "eval_return_mean", "eval_return_std"):
        assert k in summary, k
    assert summary["env_steps"] == 3000
    assert summary["updates"] == ((3000 - 500) // 100) * 20
    assert summary["eval_episodes"] == 10
    # run directory: resolved config, metrics, tensorboard, model
    assert "network.hidden" not in (run / "config.toml").read_text()
    assert "hidden = [32, 32]" in (run / "config.toml").read_text()
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert len(rows) == 6 and rows[-1]["env_steps"] == "3000"
    for col in ("episodes", "episodic_return", "loss", "mean_q", "epsilon", "sps", "ups"):
        assert col in rows[0]
    assert float(rows[-1]["loss"]) > 0 and int(rows[-1]["episodes"]) > 0
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert (run / "model.h5").exists()
    png = (run / "learning_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # eval reproduces the training summary's greedy evaluation exactly (same seed, episodes)
    e = json.loads(hp("eval", run, "--episodes", 10).stdout.strip().splitlines()[-1])
    assert e["eval_return_mean"] == pytest.approx(summary["eval_return_mean"], abs=1e-3)
    assert e["eval_episodes"] == 10


def test_eval_missing_run_is_clear(tmp_path):
    r = subprocess.run([sys.executable, "-m", "hpcdqn.cli", "eval", tmp_path / "nope"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_info_reports_stack():
    info = json.loads(hp("info", "--json").stdout)
    for k in ("python", "torch", "numpy", "gymnasium", "mpi4py", "h5py", "mpi_library",
              "mpi_thread_level", "hdf5", "h5py_mpi", "world_size", "torch_device", "torch_threads"):
        assert k in info, k
    assert info["world_size"] == 1 and info["h5py_mpi"] is True
    assert "Open MPI" in info["mpi_library"] or "MPICH" in info["mpi_library"]


def test_unknown_env_is_clear(tmp_path):
    r = subprocess.run([sys.executable, "-m", "hpcdqn.cli", "train", "env_id=NoSuchEnv-v0",
                        f"run_dir={tmp_path}/r"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2 and "env error" in r.stderr and "NoSuchEnv-v0" in r.stderr
    assert "Traceback" not in r.stderr


def test_console_script_installed():
    exe = Path(sys.executable).parent / "hpcdqn"
    assert exe.exists(), "pip install -e . should install the hpcdqn console script"


@pytest.mark.parametrize("warmup", [True, False])
def test_training_grid_and_warmup_follow_sb3(tmp_path, warmup):
    """A phase after every train_frequency env steps once past learning_starts (SB3 trains after
    steps 1024, 1280, ... for learning_starts=1000, train_freq=256); uniform actions before
    learning_starts unless dqn.uniform_warmup=false."""
    run = tmp_path / "run"
    r = hp("train", "total_steps=2600", "dqn.learning_starts=1000", "dqn.train_frequency=256",
           "dqn.gradient_steps=3", "network.hidden=[16]", "eval.episodes=0", "log.every=200",
           "checkpoint=false", "dqn.exploration_fraction=0.5", f"dqn.uniform_warmup={str(warmup).lower()}", f"run_dir={run}")
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    phases = [t for t in range(256, 2601, 256) if t > 1000]     # 1024, 1280, ..., 2560
    assert summary["updates"] == len(phases) * 3 == 21
    rows = {int(x["env_steps"]): x for x in csv.DictReader(open(run / "metrics.csv"))}
    # epsilon logged after env step 1000 (acting at step 999): 1.0 in the warm-up, else the schedule
    eps_999 = 1.0 - (1.0 - 0.04) * 999 / (0.5 * 2600)
    assert float(rows[1000]["epsilon"]) == pytest.approx(1.0 if warmup else eps_999)
    assert float(rows[1200]["epsilon"]) == pytest.approx(1.0 - 0.96 * 1199 / 1300)
    assert int(rows[1000]["updates"]) == 0 and int(rows[1200]["updates"]) == 3
