"""Pong replay on disk: checkpoint size per 100k transitions and the peak memory of
``hpcdqn export``, for the frame-stacked replay (this code) and, with ``--before DIR``, the
whole-stack replay (the code in DIR: ``git worktree add DIR dc4f9f6``). One JSON document.

    python benchmarks/replay_files.py [--steps 100000] [--buffer 100000] [--before DIR]
                                      [--dir /tmp/hpcdqn-replay]
                                      [--out benchmarks/results/replay_files.json]

Each side runs ``hpcdqn train --config configs/atari_pong.toml total_steps=STEPS
dqn.learning_starts=STEPS`` (1 rank, 8 envs, acting only, so both store the very same real Pong
transitions) with a replay of ``--buffer`` transitions, which writes one checkpoint at the end
(its size is set by the ring's capacity, filled or not: ``checkpoint_bytes_per_100k`` scales
it to a 100k-transition replica); then ``hpcdqn export`` of it as a Minari
dataset, in a child process whose peak RSS (``ru_maxrss``, from the kernel) is reported. With
``--before``: every episode the whole-stack export holds must be in the frame-stacked export,
byte for byte (observations, actions, rewards, flags) -- ``same_episodes``. (The frame-stacked
ring has 4 rows more, so at exactly 100k transitions it has not wrapped yet and keeps each env's
first episode, which the whole-stack export drops: ``episodes`` differ by up to num_envs.)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(cmd: list[str], code: Path) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run ``cmd`` in its own process (via a fresh wrapper, so ru_maxrss is that child's alone)."""
    wrapper = ("import resource, subprocess, sys, json; r = subprocess.run(sys.argv[1:]); "
               "print(json.dumps(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))")
    env = dict(os.environ, PYTHONPATH=str(code), OMP_NUM_THREADS="1")
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True,
                       env=env, cwd=code, timeout=3600)
    wall = time.perf_counter() - t
    if r.returncode:
        raise SystemExit(f"{cmd} failed:\n{r.stderr[-3000:]}")
    return r, int(r.stdout.strip().splitlines()[-1]) * 1024, wall


def side(code: Path, steps: int, buffer: int, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    run = out / "run"
    child([sys.executable, "-m", "hpcdqn.cli", "train", "--config", "configs/atari_pong.toml",
           f"total_steps={steps}", f"dqn.learning_starts={steps}", f"dqn.buffer_size={buffer}",
           "eval.episodes=0",
           "log.progress=false", "log.tensorboard=false", f"checkpoint_every={steps}",
           f"run_dir={run}"], code)
    ckpt = sorted((run / "checkpoints").glob("ckpt-*.h5"))[-1]
    r, peak, wall = child([sys.executable, "-m", "hpcdqn.cli", "export", str(run), "--format",
                           "minari", str(out / "export")], code)
    res = json.loads(r.stdout.strip().splitlines()[-2])
    data = out / "export" / "data" / "main_data.hdf5"
    return {"checkpoint_bytes": ckpt.stat().st_size,
            "checkpoint_bytes_per_100k": round(ckpt.stat().st_size * 100_000 / buffer),
            "export_peak_rss": peak, "export_s": round(wall, 1), "episodes": res["episodes"],
            "export_bytes": data.stat().st_size, "data": str(data)}


def digests(path: str) -> list[str]:
    import h5py
    import numpy as np

    out = []
    with h5py.File(path) as f:
        for k in f:
            h = hashlib.sha1()
            for d in ("observations", "actions", "rewards", "terminations", "truncations"):
                h.update(np.ascontiguousarray(f[k][d][...]).tobytes())
            out.append(h.hexdigest())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--buffer", type=int, default=100_000)
    ap.add_argument("--before", type=Path, default=None)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/hpcdqn-replay"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "replay_files.json")
    args = ap.parse_args()
    res = {"frames": side(ROOT, args.steps, args.buffer, args.dir / "frames")}
    if args.before:
        res["stacks_before"] = side(args.before.resolve(), args.steps, args.buffer,
                                     args.dir / "stacks")
        mine = set(digests(res["frames"]["data"]))
        theirs = digests(res["stacks_before"]["data"])
        res["same_episodes"] = f"{sum(d in mine for d in theirs)} of {len(theirs)}"
        res["ratio_checkpoint"] = round(res["frames"]["checkpoint_bytes"]
                                        / res["stacks_before"]["checkpoint_bytes"], 4)
        res["ratio_export_peak_rss"] = round(res["frames"]["export_peak_rss"]
                                             / res["stacks_before"]["export_peak_rss"], 4)
    res["target_checkpoint_le_0_8GB_per_100k"] = res["frames"]["checkpoint_bytes_per_100k"] <= 0.8e9
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
