"""``hpcdqn scale --mode roles``: real actor-learner runs under ``mpirun`` (1 learner beside 1, 2
and 3 actor ranks), each role's time split in ``roles.csv``, and the cost model with roles fitted
on the first two actor counts and held out on the third."""
import csv
import json
import subprocess
import sys

import pytest

from mpi_util import mpi_env

TINY = ["total_steps=1600", "dqn.learning_starts=400", "dqn.train_frequency=100",
        "dqn.gradient_steps=20", "network.hidden=[32, 32]", "actor.publish_every=20"]


@pytest.mark.timeout(960)      # 3 runs of ~15 s; up to 300 s each on a loaded machine
def test_roles_study_records_each_roles_time_and_holds_the_model_out(tmp_path):
    out = tmp_path / "roles"
    r = subprocess.run([sys.executable, "-m", "hpcdqn.cli", "scale", "--mode", "roles", "--ranks",
                        "1", "--actors", "1,2,3", "--out", str(out), "--timeout", "300", *TINY],
                       capture_output=True, text=True, env=mpi_env(), timeout=930)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = list(csv.DictReader(open(out / "roles.csv")))
    assert [int(x["actors"]) for x in rows] == [1, 2, 3]
    assert [x["model_role"] for x in rows] == ["constants", "efficiencies", "held out"]
    for x in rows:
        assert int(x["job_ranks"]) == 1 + int(x["actors"]) and int(x["learners"]) == 1
        shares = {k: float(v) for k, v in x.items() if k.endswith("_share")}
        assert len(shares) == 9 and all(0.0 <= v <= 1.0 for v in shares.values()), shares
        for role in ("actor", "learner"):
            total = sum(v for k, v in shares.items() if k.startswith(role))
            assert 0.3 < total <= 1.02, (role, total)     # the named parts, not the whole wall
        assert float(x["env_steps_per_s"]) > 0 and float(x["predicted_env_steps_per_s"]) > 0
        assert float(x["actor_env_steps_per_s"]) > 0
    info = json.loads((out / "roles.json").read_text())
    assert info["model"]["held_out_actors"] == [3]
    err = info["model"]["held_out_median_abs_rel_err"]
    assert err == abs(float(rows[2]["rel_err"]))
    assert f"held out actors=[3]: median |error| {100 * err:.1f}%" in r.stdout
    assert (out / "roles.png").stat().st_size > 10_000


def test_roles_study_refuses_what_it_cannot_run(tmp_path):
    def scale(*args):
        return subprocess.run([sys.executable, "-m", "hpcdqn.cli", "scale", "--mode", "roles",
                               "--out", str(tmp_path), *args], capture_output=True, text=True,
                              env=mpi_env(), timeout=120)
    r = scale("--ranks", "1,2", "--actors", "1")
    assert r.returncode == 2 and "one learner rank count" in r.stderr
    r = scale("--ranks", "1", "--actors", "1", "actors=3")
    assert r.returncode == 2 and "--actors, not actors=N" in r.stderr
