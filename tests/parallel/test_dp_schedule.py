"""The resolved schedule in real runs: with scaling.rule=global_batch, 2 data-parallel ranks make
the updates of one rank at the same global env steps (and evaluate at the same env steps);
with sqrt_lr (the default) half as many, each on twice the global batch. Rank 0 prints the schedule, and
summary.json records it."""

import csv
import json
import subprocess
import sys

from mpi_util import ROOT, hpcdqn, mpi_env

TINY = ["total_steps=3000", "dqn.learning_starts=500", "dqn.train_frequency=100",
        "dqn.gradient_steps=20", "network.hidden=[32, 32]", "eval.episodes=0",
        "log.every=500", "eval.every=1000", "eval.every_episodes=5", "eval.num_envs=5",
        "log.progress=false", "log.tensorboard=false", "checkpoint=false"]


def steps_and_updates(run, name):
    with open(run / name, newline="") as fh:
        return [(int(r["env_steps"]), int(r["updates"])) for r in csv.DictReader(fh)]


def train(tmp_path, n, name, *extra):
    run = tmp_path / name
    r = hpcdqn(n, ["train", *TINY, *extra, f"run_dir={run}"], timeout=240)
    return run, json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


def test_global_batch_rule_makes_the_updates_of_one_rank(tmp_path):
    one, s1, _ = train(tmp_path, 1, "dp1")
    two, s2, err = train(tmp_path, 2, "dp2", "scaling.rule=global_batch")
    sqrt, s3, _ = train(tmp_path, 2, "sqrt")          # the default rule
    rows1 = steps_and_updates(one, "metrics.csv")
    assert rows1 == [(500, 0), (1000, 100), (1500, 200), (2000, 300), (2500, 400), (3000, 500)]
    assert steps_and_updates(two, "metrics.csv") == rows1
    assert steps_and_updates(two, "eval.csv") == steps_and_updates(one, "eval.csv") == \
        [(1000, 100), (2000, 300), (3000, 500)]
    assert [(t, 2 * u) for t, u in steps_and_updates(sqrt, "metrics.csv")] == rows1
    assert s1["updates"] == s2["updates"] == 2 * s3["updates"] == 500
    sched = s2["schedule"]
    assert (sched["dp"], sched["batch_per_replica"], sched["global_batch"]) == (2, 32, 64)
    assert sched["replay_ratio"] == s1["schedule"]["replay_ratio"] == s3["schedule"]["replay_ratio"] == 12.8
    assert s3["schedule"]["global_batch"] == 128 and abs(s3["schedule"]["lr_scale"] - 2 ** 0.5) < 1e-6
    assert "hpcdqn: schedule (dp 2, 1 envs per replica; 1 iteration = 2 global env steps)" in err
    assert "scaling.rule global_batch: batch 32 per replica x 2 = global 64" in err


def test_layout_that_cannot_keep_the_replay_ratio_stops_before_any_work(tmp_path):
    # (a train_frequency off the iteration grid is no longer refused: it trains at the lcm)
    r = hpcdqn(2, ["train", *TINY, "scaling.rule=global_batch", "dqn.batch_size=63",
                   f"run_dir={tmp_path / 'x'}"], timeout=120, check=False)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "config error" in r.stderr and "dqn.batch_size=63" in r.stderr
    assert "must be divisible by dp=2" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()


def test_plan_shows_the_schedule_without_ranks():
    r = subprocess.run([sys.executable, "-m", "hpcdqn.cli", "plan", "--ranks", "64"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT, env=mpi_env())
    assert "schedule (dp 64, 1 envs per replica; 1 iteration = 64 global env steps)" in r.stdout
    assert "2 updates every 4 iterations (256 env steps) = 384 updates; replay ratio 32" in r.stdout
    assert "scaling.rule sqrt_lr: batch 64 per replica x 64 = global 4096, lr x 8" in r.stdout
