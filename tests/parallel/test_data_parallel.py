import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from mpi_util import SCRIPTS, hpcdqn, mpi_env, mpirun_cmd, run_mpi


@pytest.mark.parametrize("comm", ["world", "dup", "split"])
@pytest.mark.parametrize("opts", [[], ["double"], ["overlap"]])
def test_two_ranks_batch_b_equal_one_rank_batch_2b(tmp_path, comm, opts):
    ref, dp = tmp_path / "ref.npy", tmp_path / "dp.npy"
    run_mpi(1, [SCRIPTS / "dp_equivalence.py", ref, "self", *opts], timeout=120)
    run_mpi(2, [SCRIPTS / "dp_equivalence.py", dp, comm, *opts], timeout=120)
    a, b = np.load(ref), np.load(dp)
    assert a.shape == b.shape
    diff = np.abs(a - b).max()
    assert diff <= 1e-6, diff
    # and the updates did something (the test can fail)
    run_mpi(1, [SCRIPTS / "dp_equivalence.py", tmp_path / "k0.npy", "self", *opts, "0"], timeout=120)
    assert np.abs(np.load(tmp_path / "k0.npy") - a).max() > 1e-3


TINY = ["total_steps=3000", "dqn.learning_starts=500", "dqn.train_frequency=100",
        "dqn.gradient_steps=20", "network.hidden=[32, 32]", "eval.episodes=10",
        "log.progress=false", "parallel.check_every=10"]


def test_same_seed_same_layout_is_bitwise_deterministic(tmp_path):
    outs = []
    for i in range(2):
        r = hpcdqn(2, ["train", *TINY, f"run_dir={tmp_path / str(i)}", "seed=5"], timeout=240)
        outs.append(json.loads(r.stdout.strip().splitlines()[-1]))
        assert outs[-1]["world"] == 2 and outs[-1]["dp"] == 2
    with h5py.File(tmp_path / "0" / "model.h5") as f0, h5py.File(tmp_path / "1" / "model.h5") as f1:
        a, b = f0["online"][...], f1["online"][...]
    assert np.array_equal(a, b)
    r = hpcdqn(2, ["train", *TINY, f"run_dir={tmp_path / 'other'}", "seed=6"], timeout=240)
    with h5py.File(tmp_path / "other" / "model.h5") as f2:
        assert not np.array_equal(a, f2["online"][...])


def test_exception_on_one_rank_ends_job_with_its_traceback(tmp_path):
    t = time.time()
    r = run_mpi(2, [SCRIPTS / "fail_rank.py", tmp_path / "run"], timeout=60, check=False)
    took = time.time() - t
    assert r.returncode != 0
    assert took < 30, took
    assert "[hpcdqn rank 1/2]" in r.stderr
    assert "ZeroDivisionError: injected failure on rank 1" in r.stderr
    assert "Traceback" in r.stderr


def test_layout_error_is_clear(tmp_path):
    r = hpcdqn(2, ["train", "pp=3", f"run_dir={tmp_path}/x"], timeout=60, check=False)
    assert r.returncode == 2
    assert "layout error" in r.stderr and "not divisible by pp=3" in r.stderr
    assert "Traceback" not in r.stderr
    # agreed by both ranks: one line, no MPI_Abort (tests/parallel/test_user_errors.py)
    assert r.stderr.count("hpcdqn train: layout error: world size 2") == 1, r.stderr
    assert "MPI_ABORT" not in r.stderr and "ORTE_ERROR_LOG" not in r.stderr, r.stderr


def test_sigterm_stops_all_ranks_cleanly(tmp_path):
    cmd = mpirun_cmd(2) + [sys.executable, "-m", "hpcdqn.cli", "train", "total_steps=10000000",
                           "log.every=200", "log.progress=false", f"run_dir={tmp_path / 'run'}"]
    # On SIGTERM, mpirun waits odls_base_sigkill_timeout seconds (default 1), sends the ranks
    # SIGTERM, waits as long again, then SIGKILL. Like Slurm's KillWait, that second wait is the
    # ranks' time to agree, checkpoint and exit (README: "Stopping a run").
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=mpi_env({"OMPI_MCA_odls_base_sigkill_timeout": "5"}),
                         start_new_session=True)
    try:
        deadline = time.time() + 60
        while not (tmp_path / "run" / "metrics.csv").exists() and time.time() < deadline:
            time.sleep(0.5)
        time.sleep(2)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    # mpirun itself reports the signal it got (exit 1); the ranks must have stopped cleanly:
    # a final summary, a saved model, no traceback, no abort.
    assert out.strip(), err[-3000:]
    assert "Traceback" not in err and "MPI_ABORT" not in err, err[-3000:]
    s = json.loads(out.strip().splitlines()[-1])
    assert s["stopped_by_signal"] == signal.SIGTERM
    assert (tmp_path / "run" / "model.h5").exists()


@pytest.mark.slow
def test_two_ranks_learn_cartpole(tmp_path):
    r = hpcdqn(2, ["train", f"run_dir={tmp_path / 'run'}", "log.progress=false"], timeout=600)
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["env_steps"] == 50000 and s["dp"] == 2
    # Learning far above random play (~22), not "solved": the same code (88d5029 and later,
    # bitwise equal to each other here) gave seed 1 at dp=2 a final greedy 500 on the VM of
    # 2026-12-03 and 387.4 on that of 2026-12-07 (float results differ across CPUs); the
    # solve rate over seeds is the time-to-target study's claim (README), not this test's.
    assert s["eval_return_mean"] >= 350, s
