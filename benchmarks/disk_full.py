"""A real full disk: a 300 MB tmpfs holds the run directory; once the second checkpoint's
``.tmp`` file appears, another process fills the file system (as another job on a shared file
system would). Each repetition must end cleanly (exit status 2, no signal, one message saying
"file system full"), and after the space is freed the previous checkpoint must resume
exactly. Needs root (mount); writes one JSON document.

    python benchmarks/disk_full.py [--reps 10] [--ranks 2] [--out benchmarks/results/disk_full.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from mpi_util import mpi_env, mpirun_cmd  # noqa: E402

TRAIN = ["total_steps=4000", "dqn.learning_starts=500", "dqn.train_frequency=100",
         "dqn.gradient_steps=2", "network.hidden=[32, 32]", "eval.episodes=0",
         "log.progress=false", "log.tensorboard=false", "log.every=1000", "seed=7",
         "dqn.buffer_size=2000000", "checkpoint_every=1000", "keep_last=1"]


def filler(ckpt_dir: Path, fill: Path) -> subprocess.Popen:
    """Another process: waits for ckpt-000000002000.h5.tmp, then writes until ENOSPC."""
    code = f"""
import os, time
from pathlib import Path
tmp = Path({str(ckpt_dir / 'ckpt-000000002000.h5.tmp')!r})
while not tmp.exists():
    time.sleep(0.0005)
fd = os.open({str(fill)!r}, os.O_WRONLY | os.O_CREAT, 0o644)
buf = b"\\0" * (1 << 20)
n = 0
try:
    while True:
        n += os.write(fd, buf)
except OSError as e:
    print(f"filler: {{n}} bytes, then {{e.strerror}} t={{time.time():.3f}}", flush=True)
time.sleep(3600)
"""
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def one(mnt: Path, n: int, rep: int) -> dict:
    run = mnt / f"run{rep}"
    fill = mnt / "fill.bin"
    f = filler(run / "checkpoints", fill)
    t0 = time.time()
    r = subprocess.run(mpirun_cmd(n) + [sys.executable, "-m", "hpcdqn.cli", "train", *TRAIN,
                                        f"run_dir={run}"], capture_output=True, text=True,
                       env=mpi_env(), timeout=600, cwd=ROOT)
    wall = time.time() - t0
    f.kill()
    fill_line = f.communicate()[0].strip()
    fill.unlink(missing_ok=True)
    lines = [x for x in r.stderr.splitlines() if x.startswith("hpcdqn train:")]
    ck = run / "checkpoints"
    out = {"rep": rep, "exit": r.returncode, "wall_s": round(wall, 1), "message": lines[:2],
           "one_line": len(lines) == 1, "file_system_full": "file system full" in " ".join(lines),
           "signal": r.returncode < 0 or r.returncode > 128 or "Segmentation" in r.stderr,
           "traceback": "Traceback" in r.stderr, "filler": fill_line,
           "files": sorted(p.name for p in ck.iterdir()) if ck.is_dir() else []}
    latest = (ck / "latest").read_text().strip() if (ck / "latest").is_file() else None
    out["latest"] = latest
    if latest:
        r2 = subprocess.run(mpirun_cmd(n) + [sys.executable, "-m", "hpcdqn.cli", "train",
                                             "--resume", str(run), "stop_after=" + str(
                                                 int(latest[5:17]) + 1000)],
                            capture_output=True, text=True, env=mpi_env(), timeout=600, cwd=ROOT)
        out["resume_exit"] = r2.returncode
        out["resumed_exactly"] = f"resumed exactly from {ck / latest}" in r2.stderr
    subprocess.run(["rm", "-rf", str(run)])
    out["clean"] = (out["exit"] == 2 and out["one_line"] and out["file_system_full"]
                    and not out["signal"] and not out["traceback"]
                    and out.get("resumed_exactly", False) and out.get("resume_exit") == 0)
    print(json.dumps(out), file=sys.stderr, flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--size", default="300m")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "disk_full.json"))
    a = p.parse_args()
    mnt = Path(tempfile.mkdtemp(prefix="hpcdqn-tmpfs-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={a.size}", "tmpfs", str(mnt)], check=True)
    try:
        reps = [one(mnt, a.ranks, i) for i in range(a.reps)]
    finally:
        subprocess.run(["umount", str(mnt)])
        os.rmdir(mnt)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    res = {"commit": commit, "tmpfs_size": a.size, "ranks": a.ranks, "train": TRAIN,
           "clean_ends": sum(r["clean"] for r in reps), "reps": len(reps),
           "loadavg": open("/proc/loadavg").read().split()[:3], "runs": reps}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: res[k] for k in ("clean_ends", "reps")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
