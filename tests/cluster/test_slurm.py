"""Slurm batch jobs against a real one-node Slurm cluster on loopback (tests/slurm_cluster.py):
train.sbatch runs to the end, survives USR1 by checkpointing + requeueing + resuming, and
`hpcdqn scale` runs inside an allocation. Plus the scaling analysis without a cluster."""

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpi_util import ROOT, hpcdqn, mpi_env
from slurm_cluster import slurm_cluster_fixture

TRAIN = ROOT / "slurm" / "train.sbatch"
SCALING = ROOT / "slurm" / "scaling.sbatch"
SUBMIT = ROOT / "slurm" / "submit_scaling.sh"

TINY = ["dqn.learning_starts=500", "dqn.train_frequency=100", "dqn.gradient_steps=20",
        "network.hidden=[32, 32]", "dqn.buffer_size=5000", "log.progress=false",
        "log.tensorboard=false", "log.every=200", "parallel.check_every=10"]

slurm_cluster = pytest.fixture(scope="session")(slurm_cluster_fixture)


def sbatch(cluster, cwd, *args, env=None) -> str:
    e = cluster.env({"HPCDQN_VENV": str(Path(sys.prefix)), **(env or {})})
    r = cluster.run(["sbatch", "--parsable", *map(str, args)], cwd=cwd, env=e)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def job_output(cwd, name, job) -> str:
    p = Path(cwd) / f"slurm-{name}-{job}.out"
    return p.read_text(errors="replace") if p.exists() else "(no output file)"


def wait_done(cluster, job, cwd, name, timeout) -> dict:
    try:
        info = cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                        "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}, timeout)
    except AssertionError as e:
        cluster.run(["scancel", "--full", job])
        raise AssertionError(f"{e}\n--- job output ---\n{job_output(cwd, name, job)[-6000:]}") from None
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", \
        f"{info}\n--- job output ---\n{job_output(cwd, name, job)[-6000:]}"
    return info


def metrics(run_dir) -> list[dict]:
    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def expected_updates(total, dp, learning_starts=500, train_frequency=100, gradient_steps=20):
    """A phase after every train_frequency global env steps once past learning_starts (global
    env steps too); the default scaling.rule=sqrt_lr: gradient_steps / dp updates per phase,
    each on a dp-times larger global batch (the replay ratio of one rank)."""
    assert train_frequency % dp == 0 and total % dp == 0 and gradient_steps % dp == 0
    return (total // train_frequency - learning_starts // train_frequency) * gradient_steps // dp


def check_checkpoint(run_dir, env_steps):
    from hpcdqn.store import candidates, read_meta, verify

    cands = candidates(run_dir)
    assert cands, f"no checkpoint in {run_dir}"
    verify(cands[0])                       # re-reads every part, compares CRCs
    meta = read_meta(cands[0])
    assert meta["counters"]["env_steps"] == env_steps, meta["counters"]
    assert meta["layout"]["world"] == 2
    return cands[0], meta


# -- the cluster ---------------------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_train_sbatch_runs_to_the_end_with_a_valid_checkpoint(slurm_cluster, tmp_path):
    name = "t-train"
    # --time well above train.sbatch's --signal=B:USR1@300: with --time=5 the preemption
    # warning was due at once, and on a loaded machine the job checkpointed and requeued
    job = sbatch(slurm_cluster, tmp_path, "-n", "2", "-J", name, "--time=15", TRAIN,
                 *TINY, "total_steps=3000", "seed=3", "eval.episodes=10")
    wait_done(slurm_cluster, job, tmp_path, name, timeout=240)
    out = job_output(tmp_path, name, job)
    run = tmp_path / "runs" / f"{name}_{job}"            # one run directory per job id
    assert "fresh start" in out and "srun --mpi=pmix" in out and "--cpu-bind=cores" in out, out
    s = json.loads((run / "summary.json").read_text())
    assert s["env_steps"] == 3000 and s["world"] == 2 and s["dp"] == 2, s
    assert s["updates"] == expected_updates(3000, 2), s
    assert "stopped_by_signal" not in s and s["checkpoints"] >= 1, s
    assert "eval_return_mean" in s, s
    check_checkpoint(run, 3000)
    assert json.loads((run / "layout.json").read_text())["world"] == 2


@pytest.mark.timeout(480)
def test_usr1_checkpoints_requeues_and_resumes_without_losing_anything(slurm_cluster, tmp_path):
    name = "t-requeue"
    total = 16000
    args = [*TINY, f"total_steps={total}", "seed=4", "eval.episodes=0"]
    job = sbatch(slurm_cluster, tmp_path, "-n", "2", "-J", name, "--time=10", TRAIN, *args)
    run = tmp_path / "runs" / f"{name}_{job}"
    # wait until the ranks are learning (Adam state, target net, replay all in play), then
    # send the warning signal
    deadline = time.time() + 120
    while not ((run / "metrics.csv").exists() and any(int(r["updates"]) for r in metrics(run))):
        assert time.time() < deadline, job_output(tmp_path, name, job) + slurm_cluster.logs()
        info = slurm_cluster.job(job)
        assert info.get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), \
            f"{info}\n{job_output(tmp_path, name, job)}"
        time.sleep(0.2)
    r = slurm_cluster.run(["scancel", "--signal=USR1", "--batch", job])
    assert r.returncode == 0, r.stderr
    # the job checkpoints and requeues itself: Restarts goes to 1
    deadline = time.time() + 120
    while int(slurm_cluster.job(job).get("Restarts", 0)) < 1:
        assert time.time() < deadline, job_output(tmp_path, name, job) + slurm_cluster.logs()
        time.sleep(0.5)
    first = job_output(tmp_path, name, job)
    assert "got SIGUSR1" in first and "exited with status 3" in first, first
    assert "requeueing job" in first, first
    ck_path, meta = check_checkpoint(run, int(metrics(run)[-1]["env_steps"]))
    stopped_at = meta["counters"]["env_steps"]
    assert 0 < stopped_at < total and meta["counters"]["updates"] > 0, meta["counters"]
    # Slurm holds a requeued job for ~2 minutes (BeginTime), partly so that the node finishes
    # cleaning up the old instance first. Wait for that (no CPUs allocated, not COMPLETING, no
    # slurmstepd of this job left), then release it: a release during clean-up makes the batch
    # launch itself fail (ExitCode 1:0, before our script runs).
    deadline = time.time() + 90
    while time.time() < deadline:
        node = slurm_cluster.run(["scontrol", "-o", "show", "node"]).stdout
        steps = subprocess.run(["pgrep", "-f", rf"slurmstepd: \[{job}\."], capture_output=True)
        if "CPUAlloc=0 " in node and "COMPLETING" not in node and steps.returncode != 0 \
                and slurm_cluster.job(job).get("JobState") == "PENDING":
            break
        time.sleep(0.5)
    time.sleep(2)
    slurm_cluster.run(["scontrol", "update", f"JobId={job}", "StartTime=now"])
    info = wait_done(slurm_cluster, job, tmp_path, name, timeout=240)
    assert info["Restarts"] == "1", info
    out = job_output(tmp_path, name, job)       # --open-mode=append: both runs in one file
    assert out.count("fresh start") == 1 and "restart 1:" in out and "resuming from" in out, out
    assert "hpcdqn: resumed exactly from" in out, out
    # counters continue: every metric row once, steps and updates monotone, to the very end
    rows = metrics(run)
    steps = [int(r["env_steps"]) for r in rows]
    assert steps == list(range(200, total + 1, 200)), steps
    ups = [int(r["updates"]) for r in rows]
    assert ups == sorted(ups) and ups[-1] == expected_updates(total, 2), ups
    s = json.loads((run / "summary.json").read_text())
    assert s["env_steps"] == total and s["updates"] == expected_updates(total, 2), s
    assert "stopped_by_signal" not in s, s
    check_checkpoint(run, total)
    # nothing lost: bitwise the same network as the same run without the interruption
    ref = tmp_path / "ref"
    hpcdqn(2, ["train", *args, f"run_dir={ref}"], timeout=300)
    with h5py.File(run / "model.h5") as a, h5py.File(ref / "model.h5") as b:
        assert np.array_equal(a["online"][...], b["online"][...])
    ref_rows = metrics(ref)
    assert [int(r["updates"]) for r in ref_rows] == ups
    assert [r["episodes"] for r in ref_rows] == [r["episodes"] for r in rows]


def _rank_pids(run) -> list[int]:
    """The training ranks of a run (python processes, not srun or the batch shell)."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            argv = (p / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and Path(argv[0].decode(errors="replace")).name.startswith("python") and \
                f"run_dir={run}".encode() in argv and b"train" in argv:
            out.append(int(p.name))
    return out


@pytest.mark.timeout(480)
def test_node_failure_drill_kill_9_one_rank_resubmit_resumes_periodic(slurm_cluster, tmp_path):
    """kill -9 one rank mid-run with periodic (wall-clock) checkpoints: the job ends within 30 s,
    is not retried as a launch failure; a resubmission resumes from the last periodic checkpoint,
    losing at most about one interval."""
    import os
    import signal

    from hpcdqn.store import candidates

    name, total, minutes = "t-drill", 400000, 0.1       # a checkpoint every 6 s
    run = tmp_path / "runs" / "drill"
    args = [*TINY, f"total_steps={total}", "seed=6", "eval.episodes=0",
            f"checkpoint_minutes={minutes}"]
    env = {"HPCDQN_RUN_DIR": str(run)}
    job = sbatch(slurm_cluster, tmp_path, "-n", "2", "-J", name, "--time=10", TRAIN, *args, env=env)
    deadline = time.time() + 180
    while len(candidates(run)) < 2:                      # two periodic checkpoints written
        assert time.time() < deadline, job_output(tmp_path, name, job) + slurm_cluster.logs()
        time.sleep(0.5)
    time.sleep(3)
    pids = _rank_pids(run)
    assert len(pids) == 2, pids
    last = candidates(run)[0]
    os.kill(max(pids), signal.SIGKILL)                  # one rank dies, as with a node failure
    t_kill = time.time()
    info = slurm_cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "NODE_FAIL"}, 60)
    ended = time.time() - t_kill
    out = job_output(tmp_path, name, job)
    assert ended < 30, (ended, out)
    assert info["JobState"] == "FAILED", (info, out)
    assert "not a launch failure, not retried" in out and "retry 1" not in out, out
    last = candidates(run)[0]                            # (one may have landed meanwhile)
    lost_s = t_kill - last.stat().st_mtime
    assert lost_s < minutes * 60 + 10, lost_s            # one interval (+ a log period's slack)
    # resubmit on the same run directory: the dead job's lock is stale, the run resumes
    job2 = sbatch(slurm_cluster, tmp_path, "-n", "2", "-J", name, "--time=10", TRAIN, *args,
                  "stop_after=" + str(int(last.name[5:17]) + 2000), env=env)
    wait_done(slurm_cluster, job2, tmp_path, name, timeout=240)
    out2 = job_output(tmp_path, name, job2)
    assert "resuming from" in out2 and f"resumed exactly from {last}" in out2, out2
    assert "taking over the lock" in out2, out2
    print(f"drill: job ended {ended:.1f} s after kill -9; last periodic checkpoint "
          f"{last.name} written {lost_s:.1f} s before the kill (interval {minutes * 60:.0f} s)")


@pytest.mark.timeout(300)
def test_sigterm_cancel_still_checkpoints_and_does_not_requeue(slurm_cluster, tmp_path):
    name = "t-term"
    job = sbatch(slurm_cluster, tmp_path, "-n", "2", "-J", name, "--time=10", TRAIN,
                 *TINY, "total_steps=200000", "seed=5", "eval.episodes=0")
    run = tmp_path / "runs" / f"{name}_{job}"
    deadline = time.time() + 120
    while not ((run / "metrics.csv").exists() and len(metrics(run)) >= 2):
        assert time.time() < deadline, job_output(tmp_path, name, job) + slurm_cluster.logs()
        time.sleep(0.2)
    assert slurm_cluster.run(["scancel", job]).returncode == 0      # SIGTERM to every process
    info = slurm_cluster.wait_state(job, {"CANCELLED", "COMPLETED", "FAILED"}, timeout=90)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", info
    deadline = time.time() + 30     # the batch shell may still be logging its last lines
    while "exited with status" not in job_output(tmp_path, name, job) and time.time() < deadline:
        time.sleep(0.5)
    out = job_output(tmp_path, name, job)
    assert "exited with status 0 (after SIGTERM)" in out and "requeueing" not in out, out
    _, meta = check_checkpoint(run, int(metrics(run)[-1]["env_steps"]))
    assert 0 < meta["counters"]["env_steps"] < 200000


@pytest.mark.timeout(420)
def test_scale_inside_an_allocation_writes_csv_png_and_prediction(slurm_cluster, tmp_path):
    name = "t-scale"
    out = tmp_path / "study"
    job = sbatch(slurm_cluster, tmp_path, "-n", "2", "-J", name, "--time=10", SCALING,
                 "--ranks", "1,2", "--mode", "weak", "--out", out, "--timeout", "150",
                 "--sweep-max", "1024", *TINY, "total_steps=1500")
    wait_done(slurm_cluster, job, tmp_path, name, timeout=360)
    check_study(out, launcher="srun", ranks=[1, 2])
    with open(out / "scaling.csv", newline="") as f:       # weak: each replica does one rank's work
        work = {int(r["ranks"]): (int(r["env_steps"]), int(r["updates"])) for r in csv.DictReader(f)}
    assert work == {1: (1500, 200), 2: (3000, 200)}, work


# -- no cluster needed ---------------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_scale_with_mpirun_on_a_workstation(tmp_path):
    out = tmp_path / "study"
    env = {k: v for k, v in mpi_env().items() if not k.startswith("SLURM_")}
    r = subprocess.run([sys.executable, "-m", "hpcdqn.cli", "scale", "--ranks", "1,2", "--mode",
                        "strong", "--out", str(out), "--timeout", "150", "--sweep-max", "1024", *TINY,
                        "total_steps=1500"],
                       env=env, capture_output=True, text=True, timeout=280, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-4000:]
    check_study(out, launcher="mpirun", ranks=[1, 2])
    assert "checkpoints off" in r.stdout and "Allreduce sweep, median us [p25-p75]" in r.stdout
    assert "held-out test: skipped: a held-out test needs at least two communicating rank " \
        "counts" in r.stdout, r.stdout
    assert "fitted on p=[1]" not in r.stdout and "median |error|" not in r.stdout, r.stdout


def check_study(out, launcher, ranks):
    with open(out / "scaling.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:8] == ["ranks", "dp", "pp", "repeat", "env_steps_per_s", "updates_per_s",
                                 "allreduce_share", "efficiency"]
    assert sorted(int(r["ranks"]) for r in rows) == ranks, rows
    for r in rows:
        assert float(r["env_steps_per_s"]) > 0 and float(r["updates_per_s"]) > 0, r
        assert 0 < float(r["efficiency"]) <= 1.5, r
        shares = [float(r[f"{k}_share"]) for k in ("compute", "allreduce", "wait", "bubble", "other")]
        assert all(0 <= x <= 1 for x in shares) and sum(shares) == pytest.approx(1, abs=2e-3), r
        assert float(r["compute_share"]) > 0 and float(r["bubble_share"]) == 0, r   # pp=1
        if int(r["ranks"]) == 1:
            assert float(r["allreduce_share"]) == 0 and float(r["wait_share"]) == 0, r
        else:
            assert float(r["allreduce_share"]) > 0 and float(r["wait_share"]) > 0, r
        assert r["oversubscribed"] == "False"
        run = json.loads((Path(r["run_dir"]) / "summary.json").read_text())
        assert run["checkpoints"] == 0 and run["time_split"]["shares"]["compute"] > 0, run
    assert float(rows[0]["efficiency"]) == 1.0
    for name in ("scaling.png", "allreduce.png"):
        png = (out / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000, name
    pred = json.loads((out / "prediction.json").read_text())
    assert pred["label"] == "prediction (model)" and pred["coef"]["ranks"] == ranks, pred
    assert pred["meta"]["launcher"] == launcher
    # p=1 and 2: one communicating rank count, nothing to fit the communication on and test
    assert pred["held_out"] is None and pred["band_rel"] is None, pred
    assert "at least two communicating rank counts" in pred["held_out_skipped"], pred
    with open(out / "prediction.csv", newline="") as f:
        p = {int(r["ranks"]): r for r in csv.DictReader(f)}
    assert {16, 64, 256, 1024} <= set(p), p
    assert p[16]["extrapolation"] == "False" and p[32]["extrapolation"] == "True"   # > 8 x 2
    for q in p.values():
        assert float(q["env_steps_per_s"]) > 0 and float(q["efficiency"]) > 0, q
        assert float(q["env_steps_per_s_low"]) <= float(q["env_steps_per_s"]) \
            <= float(q["env_steps_per_s_high"]), q
    with open(out / "allreduce.csv", newline="") as f:
        bench = list(csv.DictReader(f))
    assert {int(b["ranks"]) for b in bench} == {1, 2}
    for b in bench:        # the tiny sweep: 4 B ... --sweep-max, and the gradient's size
        assert float(b["p25_s"]) <= float(b["median_s"]) <= float(b["p75_s"]), b
        assert int(b["iters"]) >= 10 and b["role"] == "fit"
    assert {int(b["n_bytes"]) for b in bench} >= {4, 16, 64, 256, 1024}


def test_submit_scaling_dry_run_uses_arrays_and_a_loop_over_node_counts(tmp_path):
    r = subprocess.run(["bash", str(SUBMIT), "-n", "-r", "1 2 4", "-N", "1 2 4", "-t", "4", "-k",
                        "2", "-o", str(tmp_path / "s"), "-s", "-p debug", "total_steps=1000"],
                       capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    cmds = [ln for ln in r.stderr.splitlines() if ln.startswith("sbatch")]
    assert len(cmds) == 1 + 3 + 2, cmds
    assert "-N 1 -n 4 --array=0-1" in cmds[0] and "--ranks 1,2,4" in cmds[0]
    for n, c in zip((1, 2, 4), cmds[1:4]):
        assert f"-N {n} --ntasks-per-node=4 --array=0-1" in c and f"--ranks {4 * n}" in c, c
        assert "total_steps=1000" in c and "-p debug" in c
    assert all("--dependency=afterany:" in c and "hpcdqn scale --merge" in c for c in cmds[4:])
