"""Pipeline benchmark on equal cores: pp=1 with 2 torch threads against pp=2 with 1 thread per
rank (2 cores per side), on 512 -> 4096 x 4 -> 18 (52.5M parameters), batch 512, double DQN,
stage-only construction as ``hpcdqn train`` builds it; writes benchmarks/results/pipeline.json.

    python benchmarks/pipeline.py [--rounds 3] [--updates 20] [--append] [--out FILE]

Sides: pp=1; pp=2 with the 1F1B schedule at M = 2 and 4 micro-batches and the zero-bubble
(ZB-H1) one at M = 2, 3 and 4 (M = 8 was slower than 4 with either: smaller GEMMs). A *round* runs every side once, one after another (rounds interleave the sides);
each side runs ``--warmup`` updates, then ``--updates`` timed updates (each between barriers).
Per side and round: the median update's updates/s, the load average before its launch, the
execution plan it ran (the gradient path per stage: every side should name ``mlp-manual``).
Per side over the rounds: median and min/max of updates/s and of its ratio to the same round's
pp=1. For pp=2, the bubble per stage as the learner measures it (``bubble_share``: time blocked
on the other stage inside updates over the timed updates' wall time) against ``(p-1)/m`` (the
1F1B textbook, as the zero-bubble paper writes it), ``(p-1)/(3m)`` (ZB-H1's) and
``bubble_simulated`` for this implementation's op order. ``--append`` adds rounds to those in
``--out`` (several short runs, each under the machine's benchmark lock); the commit of each
round is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NETS = {"4096": {"hidden": [4096] * 4, "batch": 512}}
OBS, ACTIONS = 512, 18


# -- one configuration, on its ranks ------------------------------------------------------------
def setup(a):
    import numpy as np
    import torch
    from mpi4py import MPI

    from hpcdqn.config import learner_config, load_config
    from hpcdqn.learner import DataParallelLearner, PipelineLearner
    from hpcdqn.learner.budget import process_baseline
    from hpcdqn.parallel.grid import RankGrid
    from hpcdqn.parallel.memory import keep_freed_memory, release_freed_memory
    from hpcdqn.rl.networks import meta_layers
    from hpcdqn.rl.replay import Batch

    torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)
    keep_freed_memory()          # as ``hpcdqn train`` does, on every side
    comm = MPI.COMM_WORLD
    pp = 2 if a.layout == "pp2" else 1
    grid = RankGrid(comm, pp)
    rows = a.batch // grid.dp                      # the same global batch on every side
    cfg = load_config(overrides={"pp": pp, "micro_batches": a.micro, "schedule": a.schedule,
                                 "dqn.batch_size": rows, "network.hidden": a.hidden,
                                 "threads": a.threads})
    base = process_baseline()
    layers = meta_layers((OBS,), ACTIONS, a.hidden)
    learner = (DataParallelLearner(layers, learner_config(cfg), grid.dp_comm, "cpu", seed=1) if pp == 1 else
               PipelineLearner(layers, learner_config(cfg), grid, "cpu", seed=1))
    release_freed_memory()       # as ``hpcdqn train`` does once the learner is built
    batch = None
    if grid.is_first_stage:
        rng = np.random.default_rng(grid.dp_rank)
        batch = Batch(rng.standard_normal((rows, OBS)).astype(np.float32),
                      rng.integers(0, ACTIONS, rows), rng.standard_normal(rows).astype(np.float32),
                      rng.standard_normal((rows, OBS)).astype(np.float32),
                      np.full(rows, 0.99, np.float32), np.ones(rows, np.float32), np.arange(rows))
    return comm, grid, layers, learner, batch, rows, base


def timed_updates(comm, learner, batch, n: int) -> list[float]:
    """Wall seconds of ``n`` updates, each between two barriers (every rank's, so the slowest)."""
    walls = []
    for _ in range(n):
        comm.Barrier()
        t0 = time.perf_counter()
        learner.update(batch)
        comm.Barrier()
        walls.append(time.perf_counter() - t0)
    return walls


def worker(a) -> None:
    import numpy as np

    from hpcdqn.sysinfo import peak_rss

    comm, grid, layers, learner, batch, rows, base = setup(a)
    for _ in range(a.warmup):
        learner.update(batch)
    if grid.pp > 1:
        learner.reset_timings()      # the learner's own time accounting counts the timed updates
    walls = timed_updates(comm, learner, batch, a.updates)
    accounted = learner.timings()["bubble_s"] / max(sum(walls), 1e-12) if grid.pp > 1 else 0.0
    mine = np.array([base, peak_rss(), learner.online.numel, accounted], dtype=np.float64)
    allv = np.empty((comm.Get_size(), mine.size)) if comm.Get_rank() == 0 else None
    comm.Gather(mine, allv, root=0)
    if comm.Get_rank() == 0:
        ranks = [{"rank": i, "parameters": int(v[2]), "peak_rss": int(v[1]),
                  "above_baseline": int(v[1] - v[0]), "bubble_accounted": round(v[3], 4)}
                 for i, v in enumerate(allv)]
        print(json.dumps({"walls": walls, "ranks": ranks, "plan": learner.plan.describe()}),
              flush=True)
    grid.free()


# -- the driver ---------------------------------------------------------------------------------
def launch(n: int, args: list[str], timeout: int) -> dict:
    from hpcdqn.cluster.scale import child_env

    exe = shutil.which("mpirun") or shutil.which("mpiexec")
    cmd = [exe, "-n", str(n), "--bind-to", "none", sys.executable, __file__, "--worker", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=timeout)
    if r.returncode:
        raise SystemExit(f"{cmd} failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


SIDES = ([("pp1", 1, 2, 1, "1f1b")] + [("pp2", 2, 1, m, "1f1b") for m in (2, 4)]
         + [("pp2", 2, 1, m, "zbh1") for m in (2, 3, 4)])


def side_name(side) -> str:
    layout, _, _, micro, sched = side
    return layout if layout == "pp1" else f"pp2 {sched} M={micro}"


def one_round(a, net) -> list[dict]:
    """Every side once, in order (the rounds interleave the sides); the load average before
    each side's launch."""
    common = ["--hidden", ",".join(map(str, net["hidden"])), "--batch", str(net["batch"]),
              "--updates", str(a.updates), "--warmup", str(a.warmup)]
    out = []
    for side in SIDES:
        layout, n, threads, micro, sched = side
        load = Path("/proc/loadavg").read_text().split()[:3]
        res = launch(n, ["--layout", layout, "--threads", str(threads), "--micro", str(micro),
                         "--schedule", sched, *common], a.timeout)
        out.append({"side": side_name(side), "loadavg_before": load, **res})
        print(side_name(side), load, f"median {sorted(res['walls'])[len(res['walls']) // 2]:.3f} s",
              file=sys.stderr, flush=True)
    return out


def summarise(rounds: list[list[dict]]) -> list[dict]:
    """Per side: updates/s from each round's median update, their median and spread over the
    rounds, vs pp=1 (median of the per-round ratios: each round's sides ran back to back), the
    gradient path it ran, and (pp=2) the bubble against the textbook values."""
    import numpy as np

    from hpcdqn.parallel.pipeline import bubble_simulated

    rows = []
    for i, side in enumerate(SIDES):
        ups = [1.0 / float(np.median(r[i]["walls"])) for r in rounds]
        ratio = [u / (1.0 / float(np.median(r[0]["walls"]))) for u, r in zip(ups, rounds)]
        last = rounds[-1][i]
        row = {"side": side_name(side), "ranks": side[1], "threads_per_rank": side[2],
               "cores": side[1] * side[2], "micro_batches": side[3] if side[1] > 1 else None,
               "schedule": side[4] if side[1] > 1 else None, "plan": last["plan"],
               "updates_per_s_median": round(float(np.median(ups)), 4),
               "updates_per_s_min_max": [round(min(ups), 4), round(max(ups), 4)],
               "updates_per_s_per_round": [round(u, 4) for u in ups],
               "vs_pp1_median": round(float(np.median(ratio)), 3),
               "vs_pp1_min_max": [round(min(ratio), 3), round(max(ratio), 3)],
               "loadavg_before_per_round": [r[i]["loadavg_before"] for r in rounds],
               "peak_rss_per_rank_mib": [r["peak_rss"] >> 20 for r in last["ranks"]],
               "above_baseline_per_rank_mib": [r["above_baseline"] >> 20 for r in last["ranks"]]}
        if side[1] > 1:
            p, m = 2, side[3]
            acc = [[r[i]["ranks"][s]["bubble_accounted"] for r in rounds] for s in range(p)]
            sim = bubble_simulated(p, m, side[4], fused_double=True)
            row["bubble"] = {
                "measured_per_stage_median": [round(float(np.median(b)), 4) for b in acc],
                "measured_per_stage_per_round": acc,
                "simulated_per_stage": [round(b, 4) for b in sim],
                "(p-1)/m": round((p - 1) / m, 4), "(p-1)/(3m)": round((p - 1) / (3 * m), 4),
                "(p-1)/(m+p-1)": round((p - 1) / (m + p - 1), 4)}
        rows.append(row)
    return rows


def verdict(rows: list[dict]) -> str:
    pp2 = max(rows[1:], key=lambda r: r["vs_pp1_median"])
    return (f"best pp=2: {pp2['side']} at {pp2['vs_pp1_median']:.3f}x pp=1's updates/s (median of "
            f"{len(rows[0]['updates_per_s_per_round'])} rounds, range {pp2['vs_pp1_min_max']}) "
            "on 2 cores, every side on the hand-written MLP backward"
            if all("mlp-manual" in r["plan"] for r in rows) else "sides on different gradient paths")


def readme_row(out: dict) -> str:
    """The README's benchmark-table row, from the results file only (``--row``)."""
    rows, sides = out["rows"], []
    for r in rows:
        txt = (f"{r['side']}: {r['updates_per_s_median']} [{r['updates_per_s_min_max'][0]}–"
               f"{r['updates_per_s_min_max'][1]}] updates/s")
        if "bubble" in r:
            b = r["bubble"]
            txt += (f", {r['vs_pp1_median']}× [{r['vs_pp1_min_max'][0]}–{r['vs_pp1_min_max'][1]}],"
                    f" bubble (stage 0, 1) {b['measured_per_stage_median']} vs (p−1)/m "
                    f"{b['(p-1)/m']}, (p−1)/(3m) {b['(p-1)/(3m)']}")
        sides.append(txt)
    loads = [float(ld[0]) for r in rows for ld in r["loadavg_before_per_round"]]
    commits = sorted({rd["commit"][:7] + ("-dirty" if rd["commit"].endswith("dirty") else "")
                      for rd in out["rounds"]})
    what = ("equal cores (2): pp=1 with 2 threads vs pp=2 with 1 thread per rank, "
            + ", ".join(r["side"].removeprefix("pp2 ") for r in rows[1:])
            + f"; {out['network'].replace(' -> ', '→').replace(' x ', '×')} (52.5M parameters), "
            f"batch {out['global_batch']}, double DQN (its online forward on s' rides in the "
            "trained forward's GEMMs on every pp=2 stage); every side on the hand-written MLP "
            f"backward; {out['rounds_done']} interleaved rounds × {out['updates_per_side_per_round']} "
            "timed updates, median [min–max] over rounds")
    res = ("; ".join(sides) + f". {out['verdict']}. 1-minute load average {min(loads):.2f}–"
           f"{max(loads):.2f} before the sides, the benchmark at the scheduler's priority; commit "
           + ", ".join(commits))
    return f"| `pipeline.py` | {what} | {res} |"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--layout", default="pp1", choices=["pp1", "dp2", "pp2"])
    ap.add_argument("--hidden", default="4096,4096,4096,4096")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--schedule", default="1f1b")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--updates", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds to run now")
    ap.add_argument("--append", action="store_true",
                    help="add the rounds to those already in --out (several short locked runs)")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pipeline.json"))
    ap.add_argument("--row", action="store_true", help="print the README row from --out, run nothing")
    a = ap.parse_args()
    if a.row:
        print(readme_row(json.loads(Path(a.out).read_text())))
        return
    if a.worker:
        a.hidden = [int(x) for x in a.hidden.split(",")]
        worker(a)
        return
    net = NETS["4096"]
    out_path = Path(a.out)
    old = json.loads(out_path.read_text()) if a.append and out_path.exists() else {}
    rounds = old.get("rounds", [])
    for _ in range(a.rounds):
        t = time.time()
        rounds.append({"commit": commit(), "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                        time.gmtime(t)),
                       "sides": one_round(a, net), "wall_s": round(time.time() - t, 1)})
        rows = summarise([r["sides"] for r in rounds])
        out = {"network": f"{OBS} -> {net['hidden'][0]} x {len(net['hidden'])} -> {ACTIONS}",
               "global_batch": net["batch"], "cores": 2, "cpus_seen": os.cpu_count(),
               "double_dqn": True, "updates_per_side_per_round": a.updates,
               "warmup_updates": a.warmup, "rounds_done": len(rounds),
               "sides": "pp1: 1 rank x 2 threads; pp2: 2 ranks x 1 thread (same global batch)",
               "rows": rows, "verdict": verdict(rows), "rounds": rounds}
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(out, indent=1))
        print(json.dumps({"rows": rows, "verdict": out["verdict"]}, indent=1))


def commit() -> str:
    r = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    # (the results being written are not the code that made them)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no",
                            "--", ".", ":!benchmarks/results"],
                           capture_output=True, text=True).stdout.strip()
    return r.stdout.strip() + ("-dirty" if dirty else "")


if __name__ == "__main__":
    main()
