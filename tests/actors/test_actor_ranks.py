"""Actor ranks and learner ranks (``hpcdqn.actors``) under real ``mpirun``: the layout's
refusals, a run that ends cleanly with every rank's role and time split, and lockstep runs that
repeat bitwise."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest

from hpcdqn.config import load_config
from hpcdqn.parallel.grid import LayoutError
from hpcdqn.parallel.layout import Role, RunLayout
from hpcdqn.rl.networks import initial_flat, network_layers
from mpi_util import ROOT, hpcdqn, mpirun_cmd, run_mpi, start_until

TINY = ["total_steps=2400", "dqn.learning_starts=400", "dqn.train_frequency=100",
        "dqn.gradient_steps=20", "network.hidden=[32, 32]", "eval.episodes=10",
        "log.progress=false", "log.tensorboard=false", "actor.publish_every=20"]


def test_layout_gives_roles_and_refuses_what_cannot_work():
    cfg = load_config(overrides=["actors=3"])
    lay = RunLayout.resolve(cfg, world=5, rank=4)
    assert lay.roles == (Role.LEARNER,) * 2 + (Role.ACTOR,) * 3 and lay.role is Role.ACTOR
    assert (lay.dp, lay.actor_index, lay.dp_rank) == (2, 2, 0)       # actor 2 feeds replica 0
    assert lay.actors_of(0) == [2, 4] and lay.actors_of(1) == [3]
    assert lay.schedule.steps_per_iter == 3 and lay.replay_here == 0
    assert RunLayout.resolve(cfg, world=5, rank=1).replay_here == 50_000
    assert "learner: ranks 0-1; actor: ranks 2-4" in lay.describe_roles()
    assert RunLayout.resolve(load_config(), world=2).roles == (Role.ENV_LEARNER,) * 2
    with pytest.raises(LayoutError, match=r"world has 3 ranks: launch mpirun -n 4"):
        RunLayout.resolve(cfg, world=3)
    pp = RunLayout.resolve(load_config(overrides=["actors=3", "pp=2"]), world=7, rank=6)
    assert (pp.dp, pp.dp_rank, pp.feeds) == (2, 0, 0) and pp.actors_of(1) == [5]
    assert "learner: ranks 0-3 (replay on first stages 0, 2); actor: ranks 4-6" in pp.describe_roles()
    with pytest.raises(LayoutError, match="not a multiple of pp=2: launch mpirun -n 3"):
        RunLayout.resolve(load_config(overrides=["actors=1", "pp=2"]), world=4)
    RunLayout.resolve(load_config(overrides=["actors=1", "checkpoint_every=1000"]), world=2)  # (now fine)


def test_actors_explore_with_a_fixed_schedule_or_the_apex_ladder():
    """Actor i of N: the run's epsilon schedule, or (dqn.epsilon_ladder) Ape-X's
    eps^(1 + 7 i / (N - 1)) with a fixed eps = 0.4 (epsilon_start = epsilon_end)."""
    fixed = ["actors=3", "dqn.uniform_warmup=false", "dqn.epsilon_start=0.4", "dqn.epsilon_end=0.4"]
    cfg = load_config(overrides=fixed + ["dqn.epsilon_ladder=true"])
    clock = RunLayout.resolve(cfg, world=4).schedule
    got = [clock.epsilon(cfg, 10, i, 3) for i in range(3)]
    assert np.allclose(got, [0.4, 0.4 ** 4.5, 0.4 ** 8])
    flat = load_config(overrides=fixed)
    assert [RunLayout.resolve(flat, world=4).schedule.epsilon(flat, 10, i, 3) for i in range(3)] == [0.4] * 3


def test_too_few_ranks_stop_the_job_with_one_clear_error(tmp_path):
    r = hpcdqn(2, ["train", "actors=2", f"run_dir={tmp_path}", *TINY], timeout=120, check=False)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.count("actors=2 needs at least one learner rank") == 1, r.stderr[-2000:]
    assert "world = actors + dp x pp" in r.stderr


def test_plan_shows_the_roles():
    r = run_mpi(1, ["-m", "hpcdqn.cli", "plan", "--ranks", "5", "actors=3"], timeout=120)
    assert "world=5 = 3 actors + dp 2 x pp 1" in r.stdout
    assert "roles: learner: ranks 0-1; actor: ranks 2-4 (actor i feeds learner replica i mod 2)" in r.stdout
    assert "actor ranks: parameters 264.01 KiB" in r.stdout


@pytest.mark.parametrize("where", ["data", "checkpoint"])
def test_a_stalled_actor_ends_the_job_with_its_name(tmp_path, where):
    """Actor rank 2 stops itself (SIGSTOP) at its 100th env step, or when its learner asks for
    its state at the first checkpoint: its learner, waiting for its data or its state, names it
    after actor.timeout_s in one line (no traceback), first, and the whole job ends (no hang)
    with no checkpoint file for that point."""
    stall, extra = ("actor:2@100", []) if where == "data" else ("actor-state:2@1", ["checkpoint_every=600"])
    r = hpcdqn(3, ["train", "actors=2", "actor.timeout_s=2", f"run_dir={tmp_path}", *TINY, *extra],
               env={"HPCDQN_TEST_STALL": stall}, timeout=120, check=False)
    assert r.returncode != 0
    lines = [x for x in r.stderr.splitlines() if x.startswith("hpcdqn train:")]
    assert lines[0] == ("hpcdqn train: error (rank 0, learner): no message from actor 2 (rank 2) "
                        "for 2 s (actor.timeout_s): did it stop?"), r.stderr[-3000:]
    # (the other actor, 1.5x as patient, may say its learner went silent before the abort lands)
    assert all("(rank 1, actor): no message from its learner" in x for x in lines[1:]), lines
    assert "Traceback" not in r.stderr and "phase 'actor-state'" in r.stderr or where == "data"
    assert not (tmp_path / "checkpoints" / "ckpt-000000000600.h5").exists()


def summary(r):
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_two_learners_two_actors_end_cleanly_with_every_ranks_role(tmp_path):
    """Asynchronous mode: 2 learner replicas (allreduce among themselves) fed by 2 actors."""
    r = hpcdqn(4, ["train", "actors=2", f"run_dir={tmp_path}", *TINY], timeout=240)
    s = summary(r)
    assert s["roles"] == ["learner", "learner", "actor", "actor"] and s["dp"] == 2
    assert s["job_ranks"] == 4 and s["world"] == 2      # the grid's world: the learners
    assert s["env_steps"] == 2400 and s["updates"] > 0 and s["eval_episodes"] == 10
    actors = [x for x in s["ranks"] if x["role"] == "actor"]
    learners = [x for x in s["ranks"] if x["role"] == "learner"]
    assert [a["learner"] for a in actors] == [0, 1]
    for a in actors:      # every env step made, its transitions sent (but the last n-1), a DONE
        assert a["env_steps"] == 1200 and a["transitions_sent"] == 1200 - 2
        assert a["weights_received"] >= 2
        assert all(a[k] >= 0 for k in ("env_s", "inference_s", "send_s", "wait_s"))
    for x in learners:
        assert x["inserted"] == 1198 and x["allreduce_s"] > 0 and x["sampled"] > 0
        assert all(k in x for k in ("receive_insert_s", "wait_data_s", "sample_s", "compute_s"))
    assert json.loads((tmp_path / "summary.json").read_text())["ranks"] == s["ranks"]
    assert (tmp_path / "model.h5").is_file()
    with open(tmp_path / "metrics_roles.csv") as fh:      # rank 0 writes every rank's row
        rows = list(csv.DictReader(fh))
    assert [(r["rank"], r["role"], r["learner"]) for r in rows] == \
        [("0", "learner", ""), ("1", "learner", ""), ("2", "actor", "0"), ("3", "actor", "1")]
    for r, x in zip(rows, s["ranks"]):
        keys = ("env_s", "inference_s", "send_s", "wait_s") if x["role"] == "actor" else \
            ("receive_insert_s", "wait_data_s", "sample_s", "update_s", "allreduce_s")
        assert all(abs(float(r[k]) - x[k]) < 1e-3 for k in keys), (r, x)
        assert 0 < float(r["wall_s"]) and (r["env_s"] == "") == (x["role"] == "learner")


def ckpt_arrays(path):
    """Every dataset of a checkpoint file (the replay, parameters, rank states with the actors')."""
    out = {}
    with h5py.File(path) as f:
        f.visititems(lambda n, o: out.__setitem__(n, o[...]) if isinstance(o, h5py.Dataset) else None)
    return out


def test_lockstep_runs_repeat_bitwise_and_resume_bitwise_and_pipelined_learners_act_alike(tmp_path):
    """1 learner + 2 actors in lockstep twice: the same final parameters, bit for bit, and not
    the initial ones (the test can fail); run ``a`` checkpoints at 1200 and 2400 env steps
    (taking them changes nothing: it equals ``b``), and a copy of it resumed from 1200 (the
    actors' environments, RNGs, n-step windows, networks and the data they had sent but the
    learner had not inserted, all restored) ends with the same model and the same 2400
    checkpoint, every array of it. Resuming that checkpoint with actors=0 is refused with one
    clear line (n_step=3 transitions cannot be split back into env steps). A pp=2 learner (its
    first stage holds the replay and talks to the actors; the weights are gathered over its
    stages before they are sent) ends within float rounding of it: its actors acted alike."""
    params = []
    for name, extra in (("a", ["checkpoint_every=1200"]), ("b", []), ("pp2", ["pp=2"])):
        r = hpcdqn(3 + (name == "pp2"), ["train", "actors=2", "actor.lockstep=true", "actor.send_every=3",
                                         "seed=3", f"run_dir={tmp_path / name}", *TINY, *extra], timeout=240)
        s = summary(r)
        assert s["lockstep"] is True
        with h5py.File(tmp_path / name / "model.h5") as f:
            params.append(f["online"][...])
        if name == "a":
            assert s["checkpoints"] == 2
            ckpts = tmp_path / "a" / "checkpoints"
            res = tmp_path / "res"
            shutil.copytree(tmp_path / "a", res)
            (res / "model.h5").unlink()
            (res / "checkpoints" / "ckpt-000000002400.h5").unlink()
            (res / "checkpoints" / "latest").write_text("ckpt-000000001200.h5")
            r = hpcdqn(3, ["train", "--resume", str(res)], timeout=240)
            assert "resumed exactly from" in r.stderr and summary(r)["env_steps"] == 2400
            with h5py.File(res / "model.h5") as f:
                assert np.array_equal(f["online"][...], params[0])
            want = ckpt_arrays(ckpts / "ckpt-000000002400.h5")
            got = ckpt_arrays(res / "checkpoints" / "ckpt-000000002400.h5")
            assert sorted(got) == sorted(want) and "replay/discounts" in got
            assert [k for k in want if not np.array_equal(want[k], got[k])] == []
            r = hpcdqn(2, ["train", "--resume", str(res), "actors=0"], timeout=240, check=False)
            line = [x for x in r.stderr.splitlines() if x.startswith("hpcdqn train:")]
            assert r.returncode == 2 and len(line) == 1, r.stderr[-3000:]
            assert "cannot be split back into env steps" in line[0] and "actors > 0" in line[0]
    assert np.array_equal(params[0], params[1])
    cfg = load_config(overrides=["seed=3", "network.hidden=[32, 32]"])
    start = initial_flat(network_layers(cfg["network"], (4,), 2), 3)
    assert params[0].shape == start.shape and np.abs(params[0] - start.numpy()).max() > 1e-3
    assert s["roles"] == ["learner", "learner", "actor", "actor"] and (s["dp"], s["pp"]) == (1, 2)
    assert [x["inserted"] for x in s["ranks"][:2]] == [2 * (1200 - 2), 0]
    assert np.abs(params[2] - params[0]).max() < 1e-5


def replay_of(path):
    with h5py.File(path) as f:
        return {k: f[f"replay/{k}"][...] for k in f["replay"]}


def test_sync_and_actor_checkpoints_reshard_both_ways_and_sigusr1_checkpoints_and_exits_3(tmp_path):
    """A sync dp=2 run's checkpoint resumes with 1 learner + 2 actors: its two env streams become
    the learner's first 1200 finished transitions (n_step=1: obs, action, reward as stored;
    discount gamma or 0), and the actors start afresh (a warning says so). That job, stopped
    by SIGUSR1 (Slurm's preemption warning, forwarded by mpirun), checkpoints and every rank
    exits with status 3, as in sync mode. Its checkpoint resumes with actors=0 dp=2: the
    learner's one stream is cut in two, each replica's shard starts with its piece, training
    goes on and ends cleanly."""
    run, g = tmp_path / "run", 0.99
    common = [*TINY, "dqn.n_step=1", "dqn.gamma=0.99", "dqn.buffer_size=4000", "eval.episodes=0",
              "total_steps=1000000", "checkpoint_every=600", "log.every=200", "keep_last=10"]
    hpcdqn(2, ["train", *common, f"run_dir={run}", "stop_after=1200"], timeout=240)
    sync = replay_of(run / "checkpoints" / "ckpt-000000001200.h5")
    rows = len(sync["obs"]) // 2
    streams = {k: np.concatenate([v[:600, 0], v[rows:rows + 600, 0]]) for k, v in sync.items()
               if k in ("obs", "next_obs", "actions", "rewards", "terminated")}
    cmd = mpirun_cmd(3) + [sys.executable, "-m", "hpcdqn.cli", "train", "--resume", str(run),
                           "actors=2", "stop_after=0"]
    a = start_until(cmd, run / "checkpoints" / "ckpt-000000001800.h5")
    try:
        assert a.poll() is None, a.communicate()[1][-3000:]
        os.kill(a.pid, signal.SIGUSR1)
        out, err = a.communicate(timeout=120)
    finally:
        if a.poll() is None:
            os.killpg(a.pid, signal.SIGKILL)
    assert a.returncode == 3, err[-3000:]
    assert "the actors start afresh at env step 1200, their environments re-seeded" in err
    s = summary(subprocess.CompletedProcess(cmd, 3, out, err))
    assert s["stopped_by_signal"] == int(signal.SIGUSR1) and s["env_steps"] >= 1800, s
    assert s["roles"] == ["learner", "actor", "actor"] and s["checkpoints"] >= 2
    fed = replay_of(run / "checkpoints" / "ckpt-000000001800.h5")
    assert fed["filled"][0] == 1800 and fed["obs"].shape[1] == 1     # 1200 resharded + 600 new
    for k in ("obs", "next_obs", "actions", "rewards", "terminated"):
        assert np.array_equal(fed[k][:1200, 0], streams[k]), k
    assert np.allclose(fed["discounts"][:1200, 0], np.where(streams["terminated"], 0.0, g))
    last = s["env_steps"]
    fed = replay_of(run / "checkpoints" / f"ckpt-{last:012d}.h5")
    n = int(fed["filled"][0])
    r = hpcdqn(2, ["train", "--resume", str(run), "actors=0", f"stop_after={last + 200}"], timeout=240)
    assert "resumed resharded" in r.stderr and summary(r)["env_steps"] == last + 200
    back = replay_of(run / "checkpoints" / f"ckpt-{last + 200:012d}.h5")
    m, rows = n // 2, len(back["obs"]) // 2
    assert list(back["filled"]) == [m + 100] * 2
    for q in range(2):
        piece = slice(n - 2 * m + q * m, n - 2 * m + (q + 1) * m)
        for k in ("obs", "actions", "rewards", "terminated"):
            assert np.array_equal(back[k][q * rows:q * rows + m, 0], fed[k][piece, 0]), (q, k)


FRAMES = ["env_id=frame_env:FrameToy-v0", "num_envs=2", "total_steps=800", "dqn.learning_starts=400",
          "dqn.train_frequency=100", "dqn.gradient_steps=5", "network.hidden=[32]", "eval.episodes=0",
          "log.progress=false", "log.tensorboard=false", "dqn.buffer_size=600", "dqn.n_step=3",
          "replay.prioritized=true", "actor.publish_every=10", "actor.send_every=3", "seed=3"]


def test_frame_stacked_lockstep_runs_repeat_bitwise_and_resume_bitwise(tmp_path):
    """A frame-stacked image env (tests/frame_env.py behind gymnasium's FrameStackObservation)
    with 1 learner + 2 actors in lockstep, twice: the actors send raw frames (one per env step,
    not stacks), the learner's frame replay takes every step, and both runs end with the same
    parameters bit for bit (not the initial ones). Run ``a`` checkpoints at 600 and 800 env
    steps (taking them changes nothing: it equals ``b``); a copy of it resumed from 600 (the
    actors' frame sinks, the learner's frame feed, the frames sent but not inserted, all
    restored) ends with the same model and the same 800 checkpoint, every array of it."""
    env = {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}       # the ranks import frame_env
    params = []
    for name, extra in (("a", ["checkpoint_every=600"]), ("b", [])):
        r = hpcdqn(3, ["train", "actors=2", "actor.lockstep=true", f"run_dir={tmp_path / name}",
                       *FRAMES, *extra], timeout=300, env=env)
        s = summary(r)
        with h5py.File(tmp_path / name / "model.h5") as f:
            params.append(f["online"][...])
        if name == "a":
            assert s["checkpoints"] == 2
            res = tmp_path / "res"
            shutil.copytree(tmp_path / "a", res)
            (res / "model.h5").unlink()
            (res / "checkpoints" / "ckpt-000000000800.h5").unlink()
            (res / "checkpoints" / "latest").write_text("ckpt-000000000600.h5")
            r = hpcdqn(3, ["train", "--resume", str(res)], timeout=300, env=env)
            assert "resumed exactly from" in r.stderr and summary(r)["env_steps"] == 800
            with h5py.File(res / "model.h5") as f:
                assert np.array_equal(f["online"][...], params[0])
            want = ckpt_arrays(tmp_path / "a" / "checkpoints" / "ckpt-000000000800.h5")
            got = ckpt_arrays(res / "checkpoints" / "ckpt-000000000800.h5")
            assert sorted(got) == sorted(want) and "replay/frames" in got
            assert want["replay/frames"].shape[1] == 4         # one column per env of each actor
            assert [k for k in want if not np.array_equal(want[k], got[k])] == []
    assert np.array_equal(params[0], params[1])
    learner, actors = s["ranks"][0], s["ranks"][1:]
    assert learner["inserted"] == 800 and s["updates"] == 20
    assert learner["sampled"] == 20 * s["schedule"]["batch_per_replica"]
    for a in actors:       # every env step sent as frames (none held back by an n-step window)
        assert a["env_steps"] == a["transitions_sent"] == 400 and a["messages_sent"] >= 67
    cfg = load_config(overrides=FRAMES)
    start = initial_flat(network_layers(cfg["network"], (4, 36, 36), 3), 3)
    assert np.abs(params[0] - start.numpy()).max() > 1e-3


def test_minatar_with_two_actors_checkpoints_resumes_and_ends_cleanly(tmp_path):
    """MinAtar Breakout (its config, a short window) with 1 learner + 2 actors: the grids go
    over the wire once per env step; the run checkpoints at 300 env steps and stops there, its
    --resume continues the actors exactly and ends with every rank's role and a greedy
    evaluation."""
    common = ["--config", str(ROOT / "configs" / "minatar_breakout.toml"), "total_steps=600",
              "dqn.learning_starts=300", "dqn.train_frequency=20", "dqn.gradient_steps=2",
              "dqn.buffer_size=2000", "checkpoint_every=300", "eval.episodes=10",
              "log.progress=false"]
    s = summary(hpcdqn(3, ["train", *common, "actors=2", "stop_after=300", f"run_dir={tmp_path}"],
                       timeout=300))
    assert s["env_steps"] == 300 and s["checkpoints"] == 1
    first = [a["env_steps"] for a in s["ranks"][1:]]     # (up to max_ahead beyond the checkpoint)
    r = hpcdqn(3, ["train", "--resume", str(tmp_path), "stop_after=0"], timeout=300)
    assert "resumed exactly from" in r.stderr, r.stderr[-2000:]
    s = summary(r)
    assert s["roles"] == ["learner", "actor", "actor"] and s["env_steps"] == 600
    assert s["ranks"][0]["inserted"] == 300 and s["updates"] == 30 and s["eval_episodes"] == 10
    # the steps sent ahead of the checkpoint are inserted from it, not stepped again (steps
    # made after the actor's state was taken, before its learner stopped, are made again)
    assert all(a["env_steps"] < 300 <= a["env_steps"] + n for a, n in zip(s["ranks"][1:], first))
    assert all(a["env_steps"] == a["transitions_sent"] for a in s["ranks"][1:])
    with h5py.File(tmp_path / "checkpoints" / "ckpt-000000000600.h5") as f:
        assert f["replay/obs"].shape[1:] == (2, 4, 10, 10)    # one column per actor env


def test_image_env_with_uneven_actors_refuses_checkpoints_in_one_line(tmp_path):
    """actors=1 on dp=2 replicas (an image env): the replay shards would differ in env columns,
    so a checkpoint is refused in one agreed line naming the fix."""
    r = hpcdqn(3, ["train", "--config", str(ROOT / "configs" / "minatar_breakout.toml"), "actors=1",
                   "total_steps=600", "checkpoint_every=200", f"run_dir={tmp_path}"],
               timeout=120, check=False)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.count("checkpoints and --resume need actors to be a multiple of dp") == 1, \
        r.stderr[-2000:]
