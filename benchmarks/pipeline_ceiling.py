"""How fast pp=2 could be on these 2 cores, measured: the ceiling that no pipeline schedule beats.

A pp=2 stage computes half the network with one thread, while pp=1 computes all of it with two.
So with no bubble and no copies, pp=2's update would take half of a one-thread pp=1 update
measured while the other core is busy too (both stages compute at once). Each round, one after
another, on the network and batch of ``benchmarks/pipeline.py`` (512 -> 4096 x 4 -> 18, batch 512,
double DQN, hand-written MLP backward):

- ``pp1 1 thread``: one rank, one torch thread, the other core idle;
- ``pp1 1 thread x2 at once``: two such jobs started together (each core busy, as in pp=2);
- ``pp1 2 threads``: the equal-cores baseline of ``pipeline.py``;
- ``pp2 zbh1 M=2``: the best pp=2 side of ``pipeline.py`` (one thread per rank).

Written: per side and round the median update wall time and the load average before it; per side
the median and spread over rounds; ``two_thread_speedup`` (1 thread alone / 2 threads),
``ceiling_vs_pp1`` (pp1 2 threads / (one-thread-at-once / 2): the most pp=2 can reach) and the
measured pp=2 ratio, each per round and as the median.

    python benchmarks/pipeline_ceiling.py [--rounds 3] [--updates 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pipeline as bench  # noqa: E402

SIDES = {"pp1 1 thread": ("pp1", 1, 1, 1), "pp1 1 thread x2 at once": ("pp1", 1, 1, 2),
         "pp1 2 threads": ("pp1", 1, 2, 1), "pp2 zbh1 M=2": ("pp2", 2, 1, 1)}


def run_side(a, layout: str, ranks: int, threads: int, copies: int) -> list[float]:
    """Median update wall time of each of ``copies`` jobs started together."""
    net = bench.NETS["4096"]
    args = ["--layout", layout, "--threads", str(threads), "--micro", "2", "--schedule", "zbh1",
            "--hidden", ",".join(map(str, net["hidden"])), "--batch", str(net["batch"]),
            "--updates", str(a.updates), "--warmup", str(a.warmup)]
    with ThreadPoolExecutor(copies) as ex:
        res = list(ex.map(lambda _: bench.launch(ranks, args, a.timeout), range(copies)))
    for r in res:
        if "mlp-manual" not in r["plan"]:
            raise SystemExit(f"a side ran off the hand-written MLP path: {r['plan']}")
    return [statistics.median(r["walls"]) for r in res]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--updates", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--out", default=str(bench.ROOT / "benchmarks" / "results" /
                                         "pipeline_ceiling.json"))
    a = ap.parse_args()
    rounds = []
    for _ in range(a.rounds):
        rd = {"commit": bench.commit(), "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                     time.gmtime()), "sides": {}}
        for name, (layout, ranks, threads, copies) in SIDES.items():
            load = Path("/proc/loadavg").read_text().split()[:3]
            walls = run_side(a, layout, ranks, threads, copies)
            rd["sides"][name] = {"loadavg_before": load, "median_wall_s": walls}
            print(name, load, [round(w, 4) for w in walls], file=sys.stderr, flush=True)
        s = rd["sides"]
        one, at_once = s["pp1 1 thread"]["median_wall_s"][0], s["pp1 1 thread x2 at once"]["median_wall_s"]
        two, pp2 = s["pp1 2 threads"]["median_wall_s"][0], s["pp2 zbh1 M=2"]["median_wall_s"][0]
        rd["two_thread_speedup"] = one / two
        rd["contention"] = statistics.mean(at_once) / one
        rd["ceiling_vs_pp1"] = two / (max(at_once) / 2)
        rd["pp2_vs_pp1"] = two / pp2
        rounds.append(rd)

    def summary(key):
        v = [r[key] for r in rounds]
        return {"median": round(statistics.median(v), 4), "min_max": [round(min(v), 4), round(max(v), 4)],
                "per_round": [round(x, 4) for x in v]}
    out = {"benchmark": "pipeline_ceiling",
           "command": "python benchmarks/pipeline_ceiling.py " + " ".join(sys.argv[1:]),
           "network": "512 -> 4096 x 4 -> 18, batch 512, double DQN, hand-written MLP backward",
           "cores": 2, "updates_per_side_per_round": a.updates, "rounds_done": len(rounds),
           "two_thread_speedup": summary("two_thread_speedup"),
           "contention_one_thread_at_once_vs_alone": summary("contention"),
           "ceiling_vs_pp1": summary("ceiling_vs_pp1"), "pp2_vs_pp1": summary("pp2_vs_pp1"),
           "note": ("ceiling_vs_pp1: pp=1 on 2 threads against half of a one-thread update run "
                    "while the other core computes too, i.e. pp=2 with no bubble, no copies and "
                    "perfectly balanced stages; pp2_vs_pp1: the measured best pp=2 side"),
           "rounds": rounds}
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("two_thread_speedup", "contention_one_thread_at_once_vs_alone",
                                          "ceiling_vs_pp1", "pp2_vs_pp1")}, indent=1))


if __name__ == "__main__":
    main()
