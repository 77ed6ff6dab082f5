"""The resolved schedule: one unit (global env steps) for every schedule key, the same run at any
rank count (warm-up share, exploration window, replay ratio), or a clear error naming the key."""

import math
from fractions import Fraction
from pathlib import Path

import pytest

from hpcdqn.config import ConfigError, load_config
from hpcdqn.rl.schedule import Schedule

ROOT = Path(__file__).resolve().parents[2]
PONG = ROOT / "configs" / "atari_pong.toml"


def walk(s: Schedule):
    """Replay the loop's clock: (iteration, updates so far) at every phase and target sync."""
    updates, phases, syncs = 0, [], []
    for it in range(s.n_iters):
        if s.syncs_target_after(it):
            syncs.append((s.env_steps(it + 1), updates))
        if s.trains_after(it):
            updates += s.updates_per_phase
            phases.append(s.env_steps(it + 1))
    return updates, phases, syncs


@pytest.mark.parametrize("rule", ["sqrt_lr", "linear_lr"])
def test_pong_means_the_same_run_on_1_8_64_ranks(rule):
    cfg = load_config(PONG, [f"scaling.rule={rule}"])
    scheds = {dp: Schedule.resolve(cfg, dp) for dp in (1, 8, 64)}
    for dp, s in scheds.items():
        assert s.steps_per_iter == 4 * dp
        # replay ratio: updates x global batch per global env step, exactly the configured one
        ratio = Fraction(s.updates_per_phase * s.global_batch, s.train_every * s.steps_per_iter)
        assert ratio == Fraction(1 * 32, 4) == s.replay_ratio
        assert s.global_batch == 32 * dp and s.batch_per_replica == 32
        # the same warm-up share (to one iteration) and exploration window
        assert abs(s.warmup_share - 100_000 / 10_000_000) <= s.steps_per_iter / 10_000_000
        assert s.exploration_steps == 1_000_000
        assert s.buffer_per_replica == 1_000_000 // dp          # the global capacity, shared
        # updates shrink by dp (each on a dp-times larger batch): the same samples in all
        assert s.total_updates * s.global_batch == pytest.approx(
            scheds[1].total_updates * 32, rel=2e-3)
    assert scheds[64].lr_scale == (8.0 if rule == "sqrt_lr" else 64.0)


def test_default_cartpole_same_updates_at_every_dp_under_global_batch():
    cfg = load_config(overrides=["scaling.rule=global_batch"])
    ref = walk(Schedule.resolve(cfg, 1))
    assert ref[0] == 24_576 and ref[1][:2] == [1024, 1280]     # SB3's grid: after 1024, 1280, ...
    for dp in (2, 4, 8):
        s = Schedule.resolve(cfg, dp)
        assert (s.batch_per_replica, s.global_batch, s.lr_scale) == (64 // dp, 64, 1.0)
        assert walk(s) == ref          # same updates after the same env steps, same target syncs
        assert s.total_updates == ref[0]


@pytest.mark.parametrize("rule, scale", [("sqrt_lr", math.sqrt), ("linear_lr", float)])
def test_per_replica_batch_rules_keep_the_replay_ratio(rule, scale):
    cfg = load_config(overrides=[f"scaling.rule={rule}"])
    ref = Schedule.resolve(cfg, 1)
    for dp in (2, 4):
        s = Schedule.resolve(cfg, dp)
        assert s.global_batch == 64 * dp and s.updates_per_phase == 128 // dp
        assert s.replay_ratio == ref.replay_ratio == 32
        assert s.total_updates * dp == ref.total_updates
        assert s.lr_scale == scale(dp)


def test_lr_rule_at_dp1_is_the_plain_schedule_and_ramps_under_linear():
    d = load_config()["dqn"]
    plain = [d["lr"] + (d["lr"] * 0.1 - d["lr"]) * f for f in (0.0, 0.3, 1.0)]
    for rule in ("global_batch", "sqrt_lr", "linear_lr"):
        s = Schedule.resolve(load_config(overrides=[f"scaling.rule={rule}"]), 1)
        assert [s.lr(d, f) for f in (0.0, 0.3, 1.0)] == plain      # bit for bit
    s = Schedule.resolve(load_config(overrides=["scaling.rule=linear_lr",
                                                "scaling.lr_warmup_fraction=0.2"]), 4)
    assert s.lr(d, 0.0) == d["lr"]
    assert s.lr(d, 0.1) == pytest.approx(d["lr"] * 2.5 * (1 - 0.9 * 0.1))
    assert s.lr(d, 0.5) == pytest.approx(d["lr"] * 4 * (1 - 0.9 * 0.5))
    s = Schedule.resolve(load_config(overrides=["scaling.rule=sqrt_lr"]), 4)
    assert s.lr(d, 0.0) == pytest.approx(2 * d["lr"])


def test_target_sync_every_global_env_steps():
    cfg = load_config(overrides=["dqn.target_update_every=1000", "num_envs=8",
                                 "dqn.train_frequency=8", "dqn.gradient_steps=2",
                                 "dqn.learning_starts=10000", "total_steps=100000"])
    for dp in (1, 2, 64):      # 8, 16 and 512 env steps per iteration
        _, _, syncs = walk(Schedule.resolve(cfg, dp))
        assert len(syncs) == 100
        assert all(abs(t - 1000 * (i + 1)) < 8 * dp for i, (t, _) in enumerate(syncs))


@pytest.mark.parametrize("overrides, dp, words", [
    (["scaling.rule=global_batch", "dqn.train_frequency=258"], 3,
     ["dqn.batch_size=64", "divisible by dp=3", "scaling.rule=sqrt_lr"]),
    (["dqn.buffer_size=32"], 8, ["dqn.buffer_size=32 is the global replay capacity", "4 transitions"]),
    (["scaling.rule=global_batch", "pp=2", "micro_batches=8"], 16,
     ["per-replica batch 4", "micro_batches=8"]),
])
def test_layouts_that_cannot_keep_the_schedule_stop_clearly(overrides, dp, words):
    with pytest.raises(ConfigError) as e:
        Schedule.resolve(load_config(overrides=overrides), dp)
    for w in words:
        assert w in str(e.value), str(e.value)


@pytest.mark.parametrize("overrides", [
    ["dqn.learning_starts=0", "dqn.train_frequency=2"],
    ["dqn.learning_starts=0", "dqn.train_frequency=4", "dqn.gradient_steps=4",
     "dqn.batch_size=128"],                                   # acrobot's zoo schedule
    ["dqn.learning_starts=5", "dqn.train_frequency=1", "dqn.n_step=5", "num_envs=3"],
    ["dqn.learning_starts=0", "dqn.n_step=1"],
])
def test_n_step_floor_on_warm_up_is_the_same_rule_at_every_dp(overrides):
    """An n-step return needs n_step steps of each env before the first update: the same rule at
    every dp (it used to pass at dp=1 and stop at dp=2 for learning_starts=0). A learning_starts
    below it is raised to it; the first phase comes once every env holds n_step steps."""
    cfg = load_config(overrides=overrides)
    n = cfg["dqn"]["n_step"]
    for dp in (1, 2, 4, 8, 64):
        s = Schedule.resolve(cfg, dp)
        assert s.learn_start == max(cfg["dqn"]["learning_starts"] // s.steps_per_iter, n - 1)
        first = next(it for it in range(s.n_iters) if s.trains_after(it))
        assert first + 1 >= n                   # iterations stored = steps per env in replay
        assert s.total_updates > 0
        if s.learn_start == n - 1 > 0:
            assert f"the floor for n_step {n}" in s.describe()


@pytest.mark.parametrize("overrides, dp, k, phase", [
    (["dqn.gradient_steps=1"], 2, 1, 512),                      # 1/2 update per 256 -> 1 per 512
    (["dqn.train_frequency=4", "dqn.gradient_steps=1"], 4, 1, 16),   # 1/4 per 4 -> 1 per 16
    (["dqn.train_frequency=4", "dqn.gradient_steps=2"], 2, 1, 4),
    (["dqn.train_frequency=4", "dqn.gradient_steps=3"], 2, 3, 8),    # 3/2 per 4 -> 3 per 8
])
def test_fractional_updates_stretch_the_phase_and_keep_the_ratio(overrides, dp, k, phase):
    cfg = load_config(overrides=["scaling.rule=sqrt_lr", *overrides])
    s = Schedule.resolve(cfg, dp)
    d = cfg["dqn"]
    assert (s.updates_per_phase, s.train_every * s.steps_per_iter) == (k, phase)
    assert s.replay_ratio == d["gradient_steps"] * d["batch_size"] / d["train_frequency"]


def test_describe_and_record():
    s = Schedule.resolve(load_config(PONG), 64)
    text = s.describe()
    assert len(text.splitlines()) == 2
    for w in ("1 iteration = 256 global env steps", "replay ratio 8", "warm-up 390 iterations",
              "global 2048", "lr x 8", "epsilon anneals over 1000000 env steps"):
        assert w in text, text
    rec = s.as_dict()
    assert rec["replay_ratio"] == 8 and rec["updates_per_env_step"] == pytest.approx(1 / 256, abs=1e-6)
    assert rec["phase_env_steps"] == 256 and rec["rule"] == "sqrt_lr"


@pytest.mark.parametrize("overrides, dp, every, k", [
    (["num_envs=3"], 1, 256, 3),                    # lcm(256, 3) = 768 env steps = 256 iterations
    (["num_envs=3", "dqn.train_frequency=2"], 1, 2, 3),   # 3 periods of 2 in every 2 iterations
    (["num_envs=8", "dqn.train_frequency=12"], 1, 3, 2),  # lcm(12, 8) = 24 = 3 iterations
])
def test_train_frequency_off_the_iteration_grid_keeps_the_replay_ratio(overrides, dp, every, k):
    """A train_frequency that is neither a multiple nor a divisor of one iteration gets a phase
    at the least common multiple, with the updates of every period in it (it used to be refused
    at dp=1 and accepted at dp=2 for the same file)."""
    cfg = load_config(overrides=overrides)
    s = Schedule.resolve(cfg, dp)
    d = cfg["dqn"]
    assert (s.train_every, s.updates_per_phase // d["gradient_steps"]) == (every, k)
    assert s.replay_ratio == d["gradient_steps"] * d["batch_size"] / d["train_frequency"]


@pytest.mark.parametrize("overrides", [["num_envs=3"], ["num_envs=3", "dqn.train_frequency=2"],
                                       ["num_envs=8", "dqn.train_frequency=12"],
                                       ["num_envs=5", "dqn.train_frequency=7", "dqn.n_step=3"]])
def test_a_schedule_accepted_at_some_dp_is_accepted_at_every_dp(overrides):
    cfg = load_config(overrides=overrides + ["dqn.buffer_size=100000"])
    ratios = {Schedule.resolve(cfg, dp).replay_ratio for dp in (1, 2, 3, 4, 8, 64)}
    d = cfg["dqn"]
    assert ratios == {d["gradient_steps"] * d["batch_size"] / d["train_frequency"]}
