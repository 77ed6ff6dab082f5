import json

import h5py
import numpy as np
import pytest

from mpi_util import TESTS, hpcdqn, run_mpi


@pytest.mark.parametrize("comm", ["world", "dup", "split"])
@pytest.mark.parametrize("opts", [[], ["double"], ["overlap"]])
def test_two_ranks_batch_b_equal_one_rank_batch_2b(tmp_path, comm, opts):
    ref, dp = tmp_path / "ref.npy", tmp_path / "dp.npy"
    run_mpi(1, [TESTS / "parallel" / "dp_equivalence.py", ref, "self", *opts], timeout=120)
    run_mpi(2, [TESTS / "parallel" / "dp_equivalence.py", dp, comm, *opts], timeout=120)
    a, b = np.load(ref), np.load(dp)
    assert a.shape == b.shape
    diff = np.abs(a - b).max()
    assert diff <= 1e-6, diff
    # and the updates did something (the test can fail)
    run_mpi(1, [TESTS / "parallel" / "dp_equivalence.py", tmp_path / "k0.npy", "self", *opts, "0"], timeout=120)
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
