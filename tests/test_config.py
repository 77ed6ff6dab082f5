import subprocess
import sys
from pathlib import Path

import pytest

from hpcdqn.config import ConfigError, defaults, load_config
from hpcdqn.rl.schedule import Schedule

ROOT = Path(__file__).resolve().parents[1]


def test_default_equals_cartpole_toml():
    assert load_config(ROOT / "configs" / "cartpole.toml") == load_config()


@pytest.mark.parametrize("name", ["cartpole", "acrobot", "lunarlander", "atari_pong",
                                  "atari_breakout"])
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "configs" / f"{name}.toml")
    assert cfg["env_id"]


def test_overrides_by_name_and_dotted():
    cfg = load_config(overrides=["seed=3", "dqn.lr=1e-3", "network.hidden=[64, 64]",
                                 "env_id=Acrobot-v1", "total_steps=1e4", "replay.prioritized=true"])
    assert cfg["seed"] == 3 and cfg["dqn"]["lr"] == 1e-3 and cfg["network"]["hidden"] == [64, 64]
    assert cfg["env_id"] == "Acrobot-v1" and cfg["total_steps"] == 10000
    assert cfg["replay"]["prioritized"] is True
    assert defaults()["seed"] == 1   # defaults untouched


@pytest.mark.parametrize("override, words", [
    (["dqn.lrr=1"], ["unknown config key 'dqn.lrr'", "did you mean 'dqn.lr'"]),
    (["sed=1"], ["unknown config key 'sed'", "did you mean 'seed'"]),
    (["seed=abc"], ["'seed'", "expected int", "str"]),
    (["dqn.gamma=1.5"], ["'dqn.gamma'", "must be in [0, 1]"]),
    (["total_steps=0"], ["'total_steps'", "must be > 0"]),
    (["schedule=zigzag"], ["'schedule'", "not one of"]),
    (["dqn.double=3"], ["'dqn.double'", "expected bool"]),
    (["atari.screen_size=32"], ["'atari.screen_size'", "must be >= 36"]),
    (["atari.sticky_actions=1.5"], ["'atari.sticky_actions'", "must be in [0, 1]"]),
    (["network.hidden=[64, -1]"], ["'network.hidden'", "positive integers"]),
    (["dqn"], ["not KEY=VALUE"]),
    (["dqn=1"], ["is a section"]),
    (["dqn.epsilon_end=0.9", "dqn.epsilon_start=0.5"], ["epsilon_end must be <="]),
    (["eval.episodes=15"], ["multiple of eval.num_envs"]),
])
def test_config_errors_are_clear(override, words):
    """Each error before any work: loading the config, or resolving its schedule (which the
    trainer does first, on every rank, for its layout)."""
    with pytest.raises(ConfigError) as e:
        Schedule.resolve(load_config(overrides=override), 1)
    for w in words:
        assert w in str(e.value)


def test_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[dqn]\nlr = 'fast'\n")
    with pytest.raises(ConfigError, match="'dqn.lr': expected float"):
        load_config(bad)


def test_cli_config_error_exits_2_before_any_work(tmp_path):
    r = subprocess.run([sys.executable, "-m", "hpcdqn.cli", "train", "dqn.lr=-1",
                        f"run_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "config error" in r.stderr and "'dqn.lr'" in r.stderr and "must be > 0" in r.stderr
    assert not (tmp_path / "run").exists()


def test_slurm_array_task_offsets_the_seed_unless_given(tmp_path):
    import subprocess
    import sys

    from mpi_util import mpi_env

    base = ["total_steps=64", "dqn.learning_starts=32", "network.hidden=[8]", "eval.episodes=0",
            "log.progress=false", "log.tensorboard=false", "checkpoint=false"]
    seeds = {}
    for name, extra in (("array", []), ("given", ["seed=7"])):
        run = tmp_path / name
        r = subprocess.run([sys.executable, "-m", "hpcdqn.cli", "train", *base, *extra,
                            f"run_dir={run}"], capture_output=True, text=True, timeout=300,
                           env=mpi_env({"SLURM_ARRAY_TASK_ID": "3"}))
        assert r.returncode == 0, r.stderr[-2000:]
        seeds[name] = load_config(run / "config.toml")["seed"]
    assert seeds == {"array": 1 + 3, "given": 7}
