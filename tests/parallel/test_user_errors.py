"""A config error on two ranks ends the job with one clear line and status 2: no MPI_Abort, so
no Open MPI abort report and no `ORTE_ERROR_LOG ... show_help.c` lines under the message (two
ranks calling MPI_Abort at once made them). mpirun still reports, in its own words, that a
process exited with a non-zero status (it does so for any program); under `mpirun -q` that
report is left out and stderr is exactly the one line."""

import subprocess
import sys

import pytest
from mpi_util import mpi_env, mpirun_cmd

NOISE = ("ORTE_ERROR_LOG", "show_help", "MPI_ABORT", "help message", "Traceback", "rank 0/2",
         "rank 1/2")


def run(args, quiet=False):
    cmd = mpirun_cmd(2) + (["-q"] if quiet else []) + [sys.executable, "-m", "hpcdqn.cli",
                                                        "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=mpi_env())


@pytest.mark.parametrize("args, line", [
    # before MPI starts: loading the config
    (["dqn.lr=-1"], "hpcdqn train: config error: config key 'dqn.lr' = -1.0 must be > 0"),
    # after MPI started: resolving the schedule for dp=2 on every rank
    (["scaling.rule=global_batch", "dqn.batch_size=63"],
     "hpcdqn train: config error: dqn.batch_size=63 is the global batch under "
     "scaling.rule=global_batch and must be divisible by dp=2"),
])   # (a layout error, pp=3 on 2 ranks, takes the second path: test_data_parallel.py)
def test_two_rank_config_error_is_one_line_and_status_2(args, line, tmp_path):
    args = [*args, f"run_dir={tmp_path / 'run'}"]
    r = run(args)
    assert r.returncode == 2, r.stderr
    ours = [x for x in r.stderr.splitlines() if x.startswith("hpcdqn")]
    assert len(ours) == 1 and ours[0].startswith(line), r.stderr
    assert not [w for w in NOISE if w in r.stderr], r.stderr
    assert r.stdout == ""
    q = run(args, quiet=True)          # mpirun's own exit report left out: nothing but the line
    assert q.returncode == 2 and q.stderr.splitlines() == ours, q.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("failing", [0, 1])
def test_a_user_error_on_one_rank_is_agreed_by_all(failing):
    """A set-up error on one rank only: the other rank raises the same agreed error instead of
    going on into the next collective; one line (rank 0's), status 2, no abort."""
    from mpi_util import TESTS, run_mpi

    r = run_mpi(2, [TESTS / "parallel" / "agree_user_error.py", failing, "config"], timeout=60, check=False)
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines()[0] == \
        f"hpcdqn train: config error: injected config error on rank {failing}", r.stderr
    assert r.stderr.count("hpcdqn") == 1 and "set-up passed" not in r.stdout, r.stderr
    assert not [w for w in NOISE if w in r.stderr], r.stderr


def test_a_bug_in_set_up_still_aborts_with_its_traceback():
    from mpi_util import TESTS, run_mpi

    r = run_mpi(2, [TESTS / "parallel" / "agree_user_error.py", 1, "bug"], timeout=60, check=False)
    assert r.returncode != 0 and "set-up passed" not in r.stdout
    assert "[hpcdqn rank 1/2]" in r.stderr and "ZeroDivisionError: injected bug" in r.stderr
