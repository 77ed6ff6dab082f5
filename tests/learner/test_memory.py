"""Memory per rank, measured from the OS (peak RSS = VmHWM) with real mpirun: pipeline stages
hold only their own share of the training state; the planner's figure stays above the measured
peak and close to it; a job that cannot fit stops before allocating; ``hpcdqn eval`` runs at
the run's own pp or on one rank.

Cheap by design: one module fixture trains the >= 1 GB network once per layout (pp=1 and pp=4
for a few updates, pp=2 for 200 updates under the cap) and every check reads those runs."""
import json
import math
import subprocess
import sys
import time

import pytest

from hpcdqn.config import ConfigError, learner_config, load_config
from hpcdqn.learner.budget import plan_memory
from hpcdqn.parallel.layout import RunLayout
from hpcdqn.sysinfo import cap_per_rank, parse_bytes
from mpi_util import hpcdqn, mpi_env

STATE = ["parameters", "target", "gradients", "optimizer"]
MiB = 1 << 20
# 4 x 4500 hidden on CartPole: 60.8M parameters, 1.22 GB of training state (online, target,
# gradients, Adam's two moments)
BIG = ["network.hidden=[4500, 4500, 4500, 4500]", "dqn.buffer_size=1000", "checkpoint=false",
       "eval.episodes=0", "log.progress=false", "micro_batches=2", "dqn.learning_starts=100",
       "dqn.train_frequency=100"]
FEW = ["total_steps=200", "dqn.gradient_steps=5"]          # 5 updates
MANY = ["total_steps=300", "dqn.gradient_steps=100"]       # 200 updates


def _train(run, n, pp, extra, env=None, check=True, timeout=600):
    r = hpcdqn(n, ["train", f"pp={pp}", f"run_dir={run}", *extra], timeout=timeout, env=env,
               check=check)
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else None
    return r, summary


def _memory_plan(cfg: dict, world: int) -> dict:
    """The planner's figures for CartPole's spaces on ``world`` ranks."""
    layout = RunLayout.resolve(cfg, world).place(cfg["network"], (4,), 2)
    return plan_memory(layout, learner_config(cfg), cfg["replay"], cfg["threads"], (4,), "float32")


def _cap_between(pp_low: int, pp_high: int, base: int) -> int:
    """A per-rank cap the planner puts between the two layouts' largest ranks (geometric mean),
    from the plan and a training process's measured baseline ``base``: nothing allocated. (Not
    this pytest process's baseline: it holds whatever earlier tests imported.)"""
    need = {}
    for pp in (pp_low, pp_high):
        cfg = load_config(overrides=[f"pp={pp}", *BIG, *MANY])
        need[pp] = base + max(st["total"] for st in _memory_plan(cfg, pp)["stages"])
    return int(math.sqrt(need[pp_low] * need[pp_high]))


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """The >= 1 GB network: pp=1 under the cap (stops), pp=2 under the cap (200 updates), and
    uncapped pp=1 and pp=4 (oversubscribed) for a few updates each."""
    root = tmp_path_factory.mktemp("big")
    runs = {1: _train(root / "pp1", 1, 1, [*BIG, *FEW])[1]}
    cap = _cap_between(1, 2, runs[1]["memory_per_rank"][0]["baseline_rss"])
    capped = {"HPCDQN_MEM_PER_RANK": str(cap)}
    t = time.time()
    stop, stop_summary = _train(root / "pp1-capped", 1, 1, [*BIG, *MANY], env=capped, check=False)
    stop_s = time.time() - t
    runs[2] = _train(root / "pp2-capped", 2, 2, [*BIG, *MANY], env=capped)[1]
    runs[4] = _train(root / "pp4", 4, 4, [*BIG, *FEW])[1]
    return {"cap": cap, "stop": stop, "stop_summary": stop_summary, "stop_s": stop_s, "runs": runs}


def test_peak_rss_per_rank_shrinks_with_pipeline_stages(big):
    """>= 1 GB of training state: per-rank peak RSS above the process baseline (VmHWM from
    /proc, not tensor sizes) at pp=2 is <= 0.6x pp=1's and at pp=4 (oversubscribed) <= 0.35x."""
    above, state = {}, {}
    for pp, s in big["runs"].items():
        ranks = s["memory_per_rank"]
        assert len(ranks) == pp and all(r["target"] > 0 for r in ranks)
        assert all(r["gradients"] == r["parameters"] for r in ranks)   # no target gradient buffer
        state[pp] = sum(r[k] for r in ranks for k in STATE)
        above[pp] = max(r["peak_rss"] - r["baseline_rss"] for r in ranks)
    assert state[1] >= 1e9 and state[2] == state[4] == state[1]         # same network, split
    ratios = {pp: round(above[pp] / above[1], 3) for pp in (2, 4)}
    print(f"training state {state[1] / 1e9:.3f} GB; peak RSS above baseline (MiB): "
          f"{ {pp: above[pp] // MiB for pp in above} }; ratios vs pp=1: {ratios}")
    assert ratios[2] <= 0.6, (above, ratios)
    assert ratios[4] <= 0.35, (above, ratios)


def test_network_that_does_not_fit_stops_pp1_and_trains_at_pp2(big):
    """Per-rank cap HPCDQN_MEM_PER_RANK between the two layouts with >= 25% headroom on each
    side: pp=1 (the planner's figure >= 1.25x the cap) stops with the planner's message before
    allocating the network; pp=2 trains it for 200 updates, every rank's measured peak RSS
    <= cap / 1.25."""
    cap, r = big["cap"], big["stop"]
    assert r.returncode == 2 and big["stop_summary"] is None
    assert "stopped before allocating" in r.stderr and "HPCDQN_MEM_PER_RANK" in r.stderr, r.stderr
    assert "pp=2" in r.stderr
    assert big["stop_s"] < 60
    planned_pp1 = big["runs"][1]["memory_per_rank"][0]["planned_rss"]   # same plan, uncapped run
    s2 = big["runs"][2]
    peaks = [m["peak_rss"] for m in s2["memory_per_rank"]]
    print(f"cap {cap / MiB:.0f} MiB; pp=1 planned {planned_pp1 / MiB:.0f} MiB "
          f"({planned_pp1 / cap:.2f}x the cap): "
          f"{next(x for x in r.stderr.splitlines() if 'stopped before allocating' in x)}\n"
          f"pp=2: {s2['updates']} updates, peak RSS per rank {[p // MiB for p in peaks]} MiB "
          f"(cap / {cap / max(peaks):.2f})")
    assert s2["updates"] == 200
    assert planned_pp1 >= 1.25 * cap
    assert max(peaks) * 1.25 <= cap


def test_planner_is_just_above_the_measured_peak(big):
    """On every rank of every layout the planner's figure (baseline + every category, the
    transient allowance included) is at least the measured peak RSS and at most 15% above it."""
    for pp, s in big["runs"].items():
        for r in s["memory_per_rank"]:
            ratio = r["planned_rss"] / r["peak_rss"]
            print(f"pp={pp} rank {r['rank']}: planned {r['planned_rss'] // MiB} MiB, measured peak "
                  f"{r['peak_rss'] // MiB} MiB ({ratio:.3f}x)")
            assert 1.0 <= ratio <= 1.15, (pp, r)


# -- a small pipelined run: accounting, evaluation ---------------------------------------------------
SMALL = ["total_steps=600", "dqn.learning_starts=200", "network.hidden=[64, 48, 32]",
         "eval.episodes=4", "eval.num_envs=2", "log.progress=false", "micro_batches=2",
         "dqn.buffer_size=5000", "checkpoint=false"]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    run = tmp_path_factory.mktemp("small") / "pp2"
    return run, _train(run, 2, 2, SMALL)[1]


def test_planner_matches_what_the_stages_hold(small):
    _, s = small
    cfg = load_config(overrides=["pp=2", *SMALL])
    plan = _memory_plan(cfg, 2)
    for st, r in zip(plan["stages"], s["memory_per_rank"]):
        for k in STATE + ["replay"]:
            assert st[k] == r[k], (k, st, r)
        assert r["planned_rss"] == r["baseline_rss"] + st["total"]
        assert r["planned_rss"] >= r["peak_rss"] > r["baseline_rss"] > 0


def _eval(n, run, env=None):
    r = hpcdqn(n, ["eval", run], env=env, check=False, timeout=120)
    out = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else None
    return r, out


def test_eval_at_the_runs_pp_and_on_one_rank(small):
    """`mpirun -n 2 hpcdqn eval RUN` (each rank loads only its stage) and `hpcdqn eval RUN` on
    one rank (the whole network fits) give the training's own final evaluation; other rank
    counts and a cap below the whole network stop with messages naming the way out."""
    run, s = small
    r2, e2 = _eval(2, run)
    assert r2.returncode == 0, r2.stderr
    assert "pipelined over the run's pp=2 ranks, each holding only its stage" in r2.stderr
    r1, e1 = _eval(1, run)
    assert r1.returncode == 0, r1.stderr
    assert "on one rank (the run had pp=2)" in r1.stderr
    for e in (e1, e2):
        assert e["eval_episodes"] == s["eval_episodes"] == 4
        assert e["eval_return_mean"] == pytest.approx(s["eval_return_mean"], abs=1e-3)
    r3, _ = _eval(3, run)
    assert r3.returncode != 0 and "the run has pp=2 but 3 ranks were launched" in r3.stderr
    assert "mpirun -n 2 hpcdqn eval" in r3.stderr
    r4, _ = _eval(1, run, env={"HPCDQN_MEM_PER_RANK": "1M"})
    assert r4.returncode == 2 and "does not fit on one rank" in r4.stderr
    assert "mpirun -n 2 hpcdqn eval" in r4.stderr


# -- the plan and the cap ------------------------------------------------------------------------------
def _plan(args, env=None):
    r = subprocess.run([sys.executable, "-m", "hpcdqn.cli", "plan", *args], capture_output=True,
                       text=True, timeout=120, env=mpi_env(env))
    return r


def test_parse_bytes():
    assert parse_bytes("6G") == 6 << 30 and parse_bytes("512MiB") == 512 << 20
    assert parse_bytes("1.5g") == int(1.5 * 2**30) and parse_bytes("1000") == 1000
    with pytest.raises(ValueError, match="unit"):
        parse_bytes("lots")


def test_cap_per_rank_reads_the_slurm_allocation(monkeypatch):
    """The cap's sources in order: --mem-per-rank, HPCDQN_MEM_PER_RANK, Slurm (MB per cpu x
    cpus per task; MB per node / tasks per node; 0 = the whole node: next rule), MemTotal."""
    for k in ("HPCDQN_MEM_PER_RANK", "SLURM_MEM_PER_CPU", "SLURM_MEM_PER_NODE",
              "SLURM_CPUS_PER_TASK", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(k, raising=False)
    total, src = cap_per_rank(2)
    assert src.startswith("MemTotal") and total > 0
    monkeypatch.setenv("SLURM_MEM_PER_NODE", "8192")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4(x2)")
    assert cap_per_rank(3) == (2 << 30, "Slurm: SLURM_MEM_PER_NODE=8192M / 4 tasks per node")
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE")
    assert cap_per_rank(2)[0] == 4 << 30                      # the ranks found on the node
    monkeypatch.setenv("SLURM_MEM_PER_NODE", "0")             # --mem=0: all of the node
    assert cap_per_rank(2) == (total, src)
    monkeypatch.setenv("SLURM_MEM_PER_CPU", "1500")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "2")
    assert cap_per_rank(2) == (3000 << 20, "Slurm: SLURM_MEM_PER_CPU=1500M x 2 cpus per task")
    monkeypatch.setenv("HPCDQN_MEM_PER_RANK", "5G")
    assert cap_per_rank(2) == (5 << 30, "HPCDQN_MEM_PER_RANK")
    assert cap_per_rank(2, "7G") == (7 << 30, "--mem-per-rank")
    monkeypatch.delenv("HPCDQN_MEM_PER_RANK")
    monkeypatch.setenv("SLURM_MEM_PER_CPU", "lots")
    with pytest.raises(ConfigError, match="SLURM_MEM_PER_CPU='lots' is not a number"):
        cap_per_rank(2)


def test_plan_cli_allocates_nothing_and_warns():
    args = ["--ranks", "1", "--json", "network.hidden=[20000, 20000, 20000]"]
    r = _plan([*args, "--mem-per-rank", "2G"])
    res = json.loads(r.stdout)
    assert r.returncode == 1 and not res["fits"] and "WARNING" in r.stderr
    need = res["stages"][0]["parameters"] * 5       # online, target, grads, 2 Adam moments
    assert need > 15e9                              # a 16 GB job...
    assert res["baseline_rss"] < 2e9                # ...planned in a process well under 2 GB
    r = _plan(["--ranks", "4", "pp=4", "network.hidden=[20000, 20000, 20000]"],
              env={"SLURM_MEM_PER_CPU": "4096", "SLURM_CPUS_PER_TASK": "2"})
    assert r.returncode == 0, r.stderr
    assert "fits" in r.stdout and "stage 3" in r.stdout and "transient" in r.stdout
    assert "per-rank cap 8.00 GiB (Slurm: SLURM_MEM_PER_CPU=4096M x 2 cpus per task)" in r.stdout
    assert "global batch 64" in r.stdout and "warm-up" in r.stdout


def test_train_under_a_slurm_allocation_too_small_stops_before_allocating(tmp_path):
    """`hpcdqn train` reads the Slurm allocation (SLURM_MEM_PER_NODE / tasks per node) and
    stops every rank with the planner's message before building the network."""
    r, s = _train(tmp_path / "run", 2, 2, ["total_steps=300", "log.progress=false"],
                  env={"SLURM_MEM_PER_NODE": "400", "SLURM_NTASKS_PER_NODE": "2"}, check=False,
                  timeout=120)
    assert r.returncode == 2 and s is None
    assert "stopped before allocating" in r.stderr, r.stderr
    assert "Slurm: SLURM_MEM_PER_NODE=400M / 2 tasks per node" in r.stderr
