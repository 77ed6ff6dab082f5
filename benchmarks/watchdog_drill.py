"""The stall watchdog's SIGSTOP drill: for each agreed phase (checkpoint, resume, model file,
eval, gradient sync) one rank stops itself (SIGSTOP, test hook ``HPCDQN_TEST_STALL``) inside the
phase; the job must end with exit status 3 within deadline + 10 s, naming the phase and the rank.

    python benchmarks/watchdog_drill.py [--ranks 2] [--deadline 5] [--out benchmarks/results/watchdog_drill.json]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from mpi_util import mpi_env, mpirun_cmd  # noqa: E402

TRAIN = ["total_steps=2000", "dqn.learning_starts=300", "dqn.train_frequency=100",
         "dqn.gradient_steps=2", "network.hidden=[16, 16]", "eval.episodes=0", "eval.every=1000",
         "eval.every_episodes=1", "log.progress=false", "log.every=500", "seed=3",
         "dqn.buffer_size=2000", "checkpoint_every=1000", "keep_last=3"]
DRILLS = [("checkpoint", "last", 2), ("gradient sync", "0", 3), ("eval", "last", 1),
          ("model file", "last", 1), ("resume", "0", 1)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--deadline", type=float, default=5.0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "watchdog_drill.json"))
    a = p.parse_args()
    n, tmp, rows = a.ranks, Path(tempfile.mkdtemp(prefix="hpcdqn-drill-")), []
    for phase, who, at in DRILLS:
        rank = n - 1 if who == "last" else int(who)
        run = tmp / phase.replace(" ", "_")
        args = ["train", *TRAIN, f"run_dir={run}", f"watchdog.deadline_s={a.deadline}"]
        if phase == "resume":     # a run with checkpoints first, then the drill in its resume
            subprocess.run(mpirun_cmd(n) + [sys.executable, "-m", "hpcdqn.cli", *args,
                                            "stop_after=1000"], env=mpi_env(), cwd=ROOT,
                           capture_output=True, timeout=300, check=True)
            args = ["train", "--resume", str(run), f"watchdog.deadline_s={a.deadline}"]
        r = subprocess.run(mpirun_cmd(n) + [sys.executable, "-m", "hpcdqn.cli", *args],
                           env=mpi_env({"HPCDQN_TEST_STALL": f"{phase}:{rank}@{at}"}), cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        end = time.time()
        m = re.search(r"test stall: .* t=([0-9.]+)", r.stderr)
        msg = [x for x in r.stderr.splitlines() if x.startswith("hpcdqn: stall:")]
        row = {"phase": phase, "stopped_rank": rank, "ranks": n, "deadline_s": a.deadline,
               "exit": r.returncode, "message": msg[0] if msg else None,
               "end_after_stop_s": round(end - float(m.group(1)), 2) if m else None}
        row["ok"] = bool(r.returncode == 3 and msg and f"phase '{phase}'" in msg[0]
                         and f"rank {rank} of {n}" in msg[0]
                         and row["end_after_stop_s"] is not None
                         and row["end_after_stop_s"] < a.deadline + 10)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    out = {"commit": commit, "loadavg": open("/proc/loadavg").read().split()[:3],
           "all_ok": all(r["ok"] for r in rows), "drills": rows}
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({"all_ok": out["all_ok"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
