"""The time split of a real run (mpirun, dp=2 x pp=2): metrics.csv has a share column per kind,
each row's shares add up to 1, and summary.json's time_split agrees with the learner's timers
(bubble only where there are stages to wait for, waiting for replicas only where there are
replicas)."""

import csv
import json

import pytest

from mpi_util import hpcdqn

TINY = ["dqn.learning_starts=300", "dqn.train_frequency=100", "dqn.gradient_steps=10",
        "network.hidden=[32, 32]", "dqn.buffer_size=5000", "log.progress=false",
        "log.tensorboard=false", "log.every=400", "eval.episodes=0", "checkpoint=false",
        "total_steps=2000"]
KINDS = ("compute", "allreduce", "wait", "bubble", "other")


@pytest.mark.timeout(200)
def test_time_split_columns_and_summary_dp2_pp2(tmp_path):
    run = tmp_path / "run"
    hpcdqn(4, ["train", *TINY, "pp=2", "micro_batches=2", f"run_dir={run}"], timeout=180)
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [f"{k}_share" for k in KINDS] == [c for c in rows[0] if c.endswith("_share")]
    for r in rows:
        shares = [float(r[f"{k}_share"]) for k in KINDS]
        assert all(0 <= x <= 1 for x in shares) and sum(shares) == pytest.approx(1, abs=2e-3), r
    last = rows[-1]
    assert float(last["compute_share"]) > 0 and float(last["bubble_share"]) > 0
    assert float(last["allreduce_share"]) > 0 and float(last["wait_share"]) > 0
    s = json.loads((run / "summary.json").read_text())
    t = s["time_split"]
    assert set(t["shares"]) == set(KINDS) and sum(t["shares"].values()) == pytest.approx(1, abs=2e-3)
    assert len(t["per_rank"]) == 4 and s["allreduce_share"] == round(t["shares"]["allreduce"], 4)
    for r in t["per_rank"]:     # each rank: its parts add up to its time inside updates
        parts = r["compute"] + r["allreduce"] + r["wait"] + r["bubble"]
        assert parts == pytest.approx(r["update"], rel=1e-4) and r["bubble"] > 0, r
    per = t["per_update_ms"]
    assert per["update"] == pytest.approx(1e3 * t["seconds"]["compute"] / s["updates"]
                                          + sum(per[k] for k in ("allreduce", "wait", "bubble")),
                                          rel=1e-3)


@pytest.mark.timeout(120)
def test_time_split_one_rank_has_no_communication(tmp_path):
    run = tmp_path / "run"
    hpcdqn(1, ["train", *TINY, f"run_dir={run}"], timeout=100)
    t = json.loads((run / "summary.json").read_text())["time_split"]
    assert t["seconds"]["allreduce"] == t["seconds"]["wait"] == t["seconds"]["bubble"] == 0
    assert t["shares"]["compute"] > 0 and t["shares"]["other"] > 0
