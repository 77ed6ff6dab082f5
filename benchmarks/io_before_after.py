"""``benchmarks/io.py`` for two source trees side by side, interleaved: the checkpoint writer of a
base commit (collective MPI-IO writes) and of this tree (independent per-rank ``pwrite`` of each
rank's own slabs), same machine, same run, same cases. Writes one JSON document.

    python benchmarks/io_before_after.py --base-commit 88d5029 [--rounds 3] [--atari 20000]
        [--cartpole 1000000] [--out benchmarks/results/io_before_after.json]

Each round runs ``io.py`` (itself dd, write, dd, write, ..., dd with 3 writes per case and rank
count) once for the base tree and once for this tree, alternating which goes first. Per case and
rank count: the median over rounds of each tree's median ``write_vs_dd`` and ``write_MBps``, and
their spread (min, max)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def export_tree(commit: str, dest: Path) -> Path:
    """The base commit's files (``git archive``), so the base run imports its own ``hpcdqn``."""
    dest.mkdir(parents=True, exist_ok=True)
    tar = dest / "src.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(tar), commit], check=True)
    with tarfile.open(tar) as t:
        t.extractall(dest, filter="data")
    tar.unlink()
    return dest


def run_io(tree: Path, a) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, str(tree / "benchmarks" / "io.py"), "--dir", a.dir, "--ranks", a.ranks,
           "--atari", str(a.atari), "--cartpole", str(a.cartpole), "--repeats", str(a.repeats)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tree)
    if r.returncode:
        raise RuntimeError(f"{cmd} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return json.loads(r.stdout[r.stdout.index("{"):])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-commit", required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--atari", type=int, default=20_000)
    p.add_argument("--cartpole", type=int, default=1_000_000)
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default="/tmp/hpcdqn-io-ab")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "io_before_after.json"))
    a = p.parse_args()
    base = export_tree(a.base_commit, Path(tempfile.mkdtemp(prefix="hpcdqn-base-")))
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    trees = {"before": base, "after": ROOT}
    runs = {"before": [], "after": []}
    loads = []
    for r in range(a.rounds):
        order = ("before", "after") if r % 2 == 0 else ("after", "before")
        for name in order:
            loads.append(open("/proc/loadavg").read().split()[:3])
            runs[name].append(run_io(trees[name], a))
            print(f"round {r + 1} {name}: " + ", ".join(
                f"{x['case']}/{x['ranks']}: {x['write_MBps']} MB/s ({x['write_vs_dd']}x dd)"
                for x in runs[name][-1]["results"]), file=sys.stderr, flush=True)
    table = []
    for i, res in enumerate(runs["after"][0]["results"]):
        row = {"case": res["case"], "ranks": res["ranks"], "file_MB": res["file_MB"]}
        for name in ("before", "after"):
            for key in ("write_vs_dd", "write_MBps", "dd_MBps", "write_vs_dd_standalone"):
                vals = [run["results"][i][key] for run in runs[name]]
                row[f"{name}_{key}_median"] = round(statistics.median(vals), 3)
                row[f"{name}_{key}_min_max"] = [min(vals), max(vals)]
        table.append(row)
    out = {"base_commit": a.base_commit, "after_commit": head, "rounds": a.rounds,
           "args": vars(a), "loadavg_before_each_run": loads, "summary": table, "runs": runs,
           "before_writer": "collective MPI-IO writes (h5py mpio, H5Dwrite collective)",
           "after_writer": "rank 0 creates the file; every rank pwrites its own slabs"}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
