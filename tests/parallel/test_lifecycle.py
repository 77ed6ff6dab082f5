"""How a job lives and ends (``hpcdqn.parallel.lifecycle``), with real mpirun: an exception on
one rank ends the whole job with that rank's traceback, a layout error is one agreed line, and
SIGTERM stops every rank cleanly at the next agreed point."""
import json
import os
import signal
import subprocess
import sys
import time

from mpi_util import TESTS, hpcdqn, mpi_env, mpirun_cmd, run_mpi


def test_exception_on_one_rank_ends_job_with_its_traceback(tmp_path):
    t = time.time()
    r = run_mpi(2, [TESTS / "parallel" / "fail_rank.py", tmp_path / "run"], timeout=60, check=False)
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
