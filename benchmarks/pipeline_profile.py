"""Where an update's time goes, per pipeline stage (or on pp=1): wall seconds per op kind, summed
over the timed updates and divided by their count, on the network and batch of
``benchmarks/pipeline.py`` (its ``setup``). Each op is timed from its start to its end (a
stage's receives inside F/B are timed apart as ``wait``).

    mpirun -n 2 python benchmarks/pipeline_profile.py --layout pp2 --threads 1 --micro 4 --schedule zbh1
    mpirun -n 1 python benchmarks/pipeline_profile.py --layout pp1 --threads 2

``--out FILE`` adds the run (per rank, with the commit and the load average before it) to the
JSON list in FILE (benchmarks/results/pipeline_profile.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pipeline as bench  # noqa: E402

T: dict = defaultdict(float)


def timed(obj, name: str, key: str) -> None:
    """Replace ``obj.name`` with a wrapper adding its wall time to ``T[key]``."""
    fn = getattr(obj, name)

    def wrap(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            T[key] += time.perf_counter() - t
    setattr(obj, name, wrap)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layout", default="pp2", choices=["pp1", "pp2"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--schedule", default="zbh1")
    ap.add_argument("--updates", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default="")
    ap.add_argument("--rows", default="", help="micro-batch sizes (e.g. 64,224,224), not equal")
    a = ap.parse_args()
    a.hidden, a.batch = [4096] * 4, 512
    comm, grid, layers, learner, batch, rows, base = bench.setup(a)
    from hpcdqn.learner import base as lbase
    from hpcdqn.parallel import stage as st
    from hpcdqn.parallel import stage_mlp
    if a.rows:
        from hpcdqn.learner import pipelined
        sizes = [int(v) for v in a.rows.split(",")]
        edges = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        pipelined.micro_splits = lambda n, micro: list(zip(edges[:-1], edges[1:]))
        learner.micro = len(sizes)
    if grid.pp > 1:
        stage = learner.pp_stage
        for name, key in [("forward_one_chunk", "F"), ("backward_one_chunk", "B"),
                          ("backward_weight_one_chunk", "W")]:
            timed(stage, name, key)
        timed(stage.link, "recv", "wait:recv")
        timed(stage.link, "finish_sends", "wait:finish_sends")
        timed(stage_mlp, "forward", "F:trained")
        timed(learner, "grad_norm", "step:grad_norm(+wait)")
        timed(learner, "_report", "report")
        timed(learner.online, "zero_grad_", "zero_grad")
        timed(st, "run_schedule", "schedule")
        timed(st, "as_np", "as_np")
    timed(lbase, "optimizer_step", "step:adam")
    timed(learner, "sync", "step:dp_sync")
    timed(learner, "step_optimizer", "step")
    load = Path("/proc/loadavg").read_text().split()[:3]
    for _ in range(a.warmup):
        learner.update(batch)
    T.clear()
    walls = bench.timed_updates(comm, learner, batch, a.updates)
    per = {k: round(v / a.updates, 4) for k, v in sorted(T.items())}
    mine = {"rank": comm.Get_rank(), "wall_per_update": round(sum(walls) / len(walls), 4),
            "per_update_s": per}
    out = comm.gather(mine, root=0)
    if comm.Get_rank() == 0:
        print("\n".join(json.dumps(o) for o in out), flush=True)
        if a.out:
            path = Path(a.out)
            runs = json.loads(path.read_text()) if path.exists() else []
            runs.append({"args": {k: v for k, v in vars(a).items() if k != "out"},
                         "commit": bench.commit(), "loadavg_before": load,
                         "updates": a.updates, "per_rank": out})
            path.write_text(json.dumps(runs, indent=1))
    grid.free()


if __name__ == "__main__":
    main()
