"""Memory per rank, measured from the OS with real mpirun: pipeline stages hold only their own
share of the training state; the planner sizes a job before it starts and stops one that
cannot fit before allocating it."""
import json
import time

import pytest

from hpcdqn.learner.budget import parse_bytes, plan_memory
from mpi_util import hpcdqn

STATE = ["parameters", "target", "gradients", "optimizer"]
BIG = ["total_steps=300", "dqn.learning_starts=100", "dqn.train_frequency=100",
       "dqn.gradient_steps=2", "dqn.buffer_size=1000", "network.hidden=[5000, 5000, 5000, 5000]",
       "checkpoint=false", "eval.episodes=0", "log.progress=false", "micro_batches=2"]


def _train(tmp_path, n, pp, extra=(), env=None, check=True, timeout=900):
    run = tmp_path / f"pp{pp}"
    r = hpcdqn(n, ["train", f"pp={pp}", f"run_dir={run}", *extra], timeout=timeout, env=env,
               check=check)
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else None
    return r, summary


def test_parse_bytes():
    assert parse_bytes("6G") == 6 << 30 and parse_bytes("512MiB") == 512 << 20
    assert parse_bytes("1.5g") == int(1.5 * 2**30) and parse_bytes("1000") == 1000
    with pytest.raises(ValueError, match="unit"):
        parse_bytes("lots")


def test_peak_rss_per_rank_shrinks_with_pipeline_stages(tmp_path):
    """>= 1 GB of training state (online, target, gradients, Adam): per-rank peak RSS above the
    process baseline (VmHWM from /proc, not tensor sizes) at pp=2 is <= 0.6x pp=1's and at
    pp=4 (oversubscribed) <= 0.35x."""
    above, state = {}, {}
    for pp in (1, 2, 4):
        _, s = _train(tmp_path, pp, pp, BIG)
        ranks = s["memory_per_rank"]
        assert len(ranks) == pp and all(r["target"] > 0 for r in ranks)
        assert all(r["gradients"] == r["parameters"] for r in ranks)   # no target gradient buffer
        state[pp] = sum(r[k] for r in ranks for k in STATE)
        above[pp] = max(r["peak_rss"] - r["baseline_rss"] for r in ranks)
    assert state[1] >= 1e9 and state[2] == state[4] == state[1]         # same network, split
    ratios = {pp: above[pp] / above[1] for pp in (2, 4)}
    print(f"peak RSS above baseline: {above}; ratios vs pp=1: {ratios}")
    assert ratios[2] <= 0.6, (above, ratios)
    assert ratios[4] <= 0.35, (above, ratios)


def test_planner_matches_what_the_stages_hold(tmp_path):
    extra = ["total_steps=600", "dqn.learning_starts=200", "network.hidden=[64, 48, 32]",
             "eval.episodes=0", "log.progress=false", "micro_batches=2", "dqn.buffer_size=5000"]
    _, s = _train(tmp_path, 2, 2, extra)
    from hpcdqn.config import load_config

    cfg = load_config(overrides=["pp=2", *extra])
    plan = plan_memory(cfg, (4,), "float32", 2, 2)
    for st, r in zip(plan["stages"], s["memory_per_rank"]):
        for k in STATE + ["replay"]:
            assert st[k] == r[k], (k, st, r)
        assert r["peak_rss"] > r["baseline_rss"] > 0


CAPPED = ["total_steps=500", "dqn.learning_starts=100", "dqn.train_frequency=100",
          "dqn.gradient_steps=50", "dqn.buffer_size=1000", "network.hidden=[3000, 3000, 3000, 3000]",
          "checkpoint=false", "eval.episodes=0", "log.progress=false", "micro_batches=2"]
CAP = "750M"


def test_network_that_does_not_fit_stops_pp1_and_trains_at_pp2(tmp_path):
    """Per-rank cap HPCDQN_MEM_PER_RANK=750M: pp=1 (27M parameters: 0.54 GB of training state
    plus the process) stops with the planner's message before allocating the network; pp=2
    trains it for 200 updates, its measured peak RSS under the cap."""
    env = {"HPCDQN_MEM_PER_RANK": CAP}
    t = time.time()
    r, s = _train(tmp_path, 1, 1, CAPPED, env=env, check=False)
    assert r.returncode == 2 and s is None
    assert "stopped before allocating" in r.stderr and "HPCDQN_MEM_PER_RANK" in r.stderr, r.stderr
    assert "pp=2" in r.stderr
    assert time.time() - t < 120
    r2, s2 = _train(tmp_path, 2, 2, CAPPED, env=env)
    assert s2["updates"] == 200
    peaks = [m["peak_rss"] for m in s2["memory_per_rank"]]
    print(f"pp=1 stopped: {r.stderr.strip().splitlines()[-1]}\npp=2 peak RSS per rank: {peaks}")
    assert max(peaks) <= parse_bytes(CAP)


def test_plan_cli_allocates_nothing_and_warns(tmp_path):
    args = ["plan", "--ranks", "1", "--json", "network.hidden=[20000, 20000, 20000]"]
    r = hpcdqn(1, [*args, "--mem-per-rank", "2G"], check=False, timeout=120)
    res = json.loads(r.stdout)
    assert r.returncode == 1 and not res["fits"] and "WARNING" in r.stderr
    need = res["stages"][0]["parameters"] * 5       # online, target, grads, 2 Adam moments
    assert need > 15e9                              # a 16 GB job...
    assert res["baseline_rss"] < 2e9                # ...planned in a process well under 2 GB
    r = hpcdqn(1, ["plan", "--ranks", "4", "pp=4", "network.hidden=[20000, 20000, 20000]",
                   "--mem-per-rank", "8G"], check=False, timeout=120)
    assert r.returncode == 0 and "fits" in r.stdout and "stage 3" in r.stdout
    assert "global batch 64" in r.stdout and "warm-up" in r.stdout
