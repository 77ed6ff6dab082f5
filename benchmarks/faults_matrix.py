"""The syscall fault matrix: {ENOSPC, EIO, EDQUOT} x {rank 0 only, last rank only, all ranks} x
{open, create, data pieces, sync, close, rename, latest pointer, resume read, model.h5,
metrics.csv, eval.csv, summary.json, TensorBoard} x {2, 4 ranks}, every fault raised inside
the real system call by the LD_PRELOAD injector (tests/faultshim/faultshim.c).

    python benchmarks/faults_matrix.py [--ranks 2,4] [--out benchmarks/results/fault_matrix.json]

Checkpoint points (open ... resume read) run in one MPI job per rank count
(tests/store/syscall_faults.py: a real checkpoint, then each case against a second one, or a
read of the first). Run-file points run one short ``hpcdqn train`` each (2 checkpoints, then
the fault), then ``hpcdqn train --resume`` without the fault, which must resume exactly from
the last checkpoint and end like an uninterrupted run (same final parameters, bitwise).

Counted per case: hang (the job outlived its timeout), signal (an exit by signal or a segfault
message), lost (a valid checkpoint gone, not ``latest``, or no longer bitwise equal), cause
(the message names the errno or its meaning), exit (2 for an agreed error; 0 where nothing
failed, as TensorBoard, which only warns, or a rank that writes no such file)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from mpi_util import TESTS, faultshim_lib, mpi_env, mpirun_cmd  # noqa: E402

ERRNOS = ("ENOSPC", "EIO", "EDQUOT")
WHO = ("0", "last", "all")
CKPT_POINTS = ("open", "create", "data0", "data1", "data-last", "sync", "close", "rename",
               "latest", "resume-read")
RUN_POINTS = {"model.h5": ("*/model.tmp", "open,write,sync"),
              "metrics.csv": ("*/metrics.csv", "write"),
              "eval.csv": ("*/eval.csv", "write"),
              "summary.json": ("*/summary.json", "write"),
              "TensorBoard": ("*/tb/events*", "write")}
CAUSE = {"ENOSPC": ("ENOSPC", "file system full", "no space left"), "EIO": ("EIO",),
         "EDQUOT": ("EDQUOT", "quota")}
TRAIN = ["total_steps=2000", "dqn.learning_starts=300", "dqn.train_frequency=100",
         "dqn.gradient_steps=2", "network.hidden=[16, 16]", "eval.episodes=0", "eval.every=1000",
         "eval.every_episodes=1", "log.progress=false", "log.every=500", "seed=3",
         "dqn.buffer_size=2000", "checkpoint_every=1000", "keep_last=3"]


SKIP = ("not run (without --full): only rank 0 writes the run files, so 'all ranks' is the "
        "rank-0 case and 'last rank' never fires; both are run for ENOSPC at the first rank count")


def run(cmd, env, timeout):
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=mpi_env(env), cwd=ROOT, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
        hang = False
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)
        out, err = p.communicate()
        hang = True
    return p.returncode, out, err, hang, time.time() - t0


def signalled(rc, err) -> bool:
    return rc < 0 or rc > 128 or "signal" in err.lower() and "exited on signal" in err.lower() \
        or "Segmentation fault" in err


def ckpt_cases(n: int, tmp: Path) -> list[dict]:
    cases = [f"{p}:{w}:{e}" for p in CKPT_POINTS for w in WHO for e in ERRNOS]
    rc, out, err, hang, wall = run(
        mpirun_cmd(n) + [sys.executable, str(TESTS / "store" / "syscall_faults.py"), str(tmp / f"ck{n}"),
                         ",".join(cases)], {"LD_PRELOAD": str(faultshim_lib())}, 120 + 10 * len(cases))
    if hang or rc:
        return [{"level": "checkpoint", "case": c, "ranks": n, "hang": hang,
                 "signal": signalled(rc, err), "exit": rc, "error": err[-2000:]} for c in cases]
    rows = []
    for o in json.loads(out.strip().splitlines()[-1]):
        point, who, code = o["case"].split(":")
        fired = o["error"] is not None
        rows.append({"level": "checkpoint", "point": point, "who": who, "errno": code, "ranks": n,
                     "hang": False, "signal": False, "exit": 0, "fired": fired,
                     "agreed_same_message": o["same_on_all_ranks"],
                     "names_cause": o["names_cause"] if fired else None,
                     # lost: the first checkpoint changed, set aside, or no longer latest
                     # after a failed write (a write no fault reached may publish its own)
                     "lost": not (o["first_bitwise"] and o["not_set_aside"]
                                  and (o["latest"] == "ckpt-000000001000.h5" or not fired)),
                     "first_bitwise": o["first_bitwise"], "latest": o["latest"],
                     "tmp_left": any(f.endswith(".tmp") for f in o["files"]),
                     "seconds": o["seconds"], "message": (o["error"] or "")[:400]})
    return rows


def run_case(n: int, point: str, who: str, code: str, tmp: Path, ref: dict) -> dict:
    pat, calls = RUN_POINTS[point]
    d = tmp / f"run-{n}-{point}-{who}-{code}".replace(".", "_")
    env = {"LD_PRELOAD": str(faultshim_lib()), "FAULTSHIM_PATH": pat, "FAULTSHIM_CALLS": calls,
           "FAULTSHIM_ERRNO": code, "FAULTSHIM_RANK": {"0": "0", "last": str(n - 1)}.get(who, "all"),
           "FAULTSHIM_AFTER_BYTES": {"metrics.csv": "900", "TensorBoard": "300"}.get(point, "0")}
    cmd = mpirun_cmd(n) + [sys.executable, "-m", "hpcdqn.cli", "train", *TRAIN, f"run_dir={d}"]
    rc, out, err, hang, wall = run(cmd, env, 240)
    fired = "faultshim:" in err
    lines = [x for x in err.splitlines() if x.startswith("hpcdqn train:")]
    row = {"level": "run file", "point": point, "who": who, "errno": code, "ranks": n, "hang": hang,
           "signal": signalled(rc, err), "exit": rc, "fired": fired,
           "traceback": "Traceback" in err, "one_line": len(lines) <= 1,
           "names_cause": (any(c.lower() in (lines[0] if lines else err).lower() for c in CAUSE[code])
                           if fired else None),
           "message": (lines[0] if lines else "")[:400], "seconds": round(wall, 1)}
    if point == "TensorBoard" and fired:
        row["names_cause"] = "TensorBoard events not written" in err and any(
            c in err for c in CAUSE[code])
    ck = d / "checkpoints"
    latest = (ck / "latest").read_text().strip() if (ck / "latest").is_file() else None
    row["latest"] = latest
    if rc == 2 and latest:       # the surviving checkpoint resumes and ends like the reference
        r2 = run(mpirun_cmd(n) + [sys.executable, "-m", "hpcdqn.cli", "train", "--resume", str(d)],
                 {}, 240)
        row["resume_exit"] = r2[0]
        row["resumed_exactly"] = "resumed exactly from" in r2[2]
        row["lost"] = r2[0] != 0 or not same_model(d, ref[n])
    else:
        row["lost"] = rc not in (0, 2) or (rc == 0 and not same_model(d, ref[n]))
    return row


def same_model(d: Path, ref: Path) -> bool:
    import h5py
    import numpy as np

    try:
        with h5py.File(d / "model.h5", "r") as a, h5py.File(ref / "model.h5", "r") as b:
            return bool(np.array_equal(a["online"][...], b["online"][...]))
    except OSError:
        return False


def table(path: Path) -> str:
    """The README table: per point and rank count, cases run, faults fired, exits, hangs,
    signals, lost checkpoints and messages naming the cause."""
    res = json.loads(Path(path).read_text())
    rows = {}
    for r in res["cases"]:
        if "skipped" in r:
            continue
        key = (r.get("point") or r["case"].split(":")[0], r["ranks"])
        d = rows.setdefault(key, {"run": 0, "fired": 0, "exit2": 0, "exit0": 0, "hang": 0,
                                  "signal": 0, "lost": 0, "cause": 0})
        d["run"] += 1
        d["fired"] += bool(r.get("fired"))
        d["exit2"] += r["exit"] == 2 or (r["level"] == "checkpoint" and bool(r.get("fired")))
        d["exit0"] += r["exit"] == 0 and not (r["level"] == "checkpoint" and r.get("fired"))
        d["hang"] += bool(r["hang"])
        d["signal"] += bool(r["signal"])
        d["lost"] += bool(r.get("lost"))
        d["cause"] += bool(r.get("names_cause"))
    out = ["| point | ranks | cases run | fault fired | agreed error / exit 2 | completed (exit 0) "
           "| hangs | signals | valid checkpoints lost | message names the cause |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for (point, n), d in rows.items():
        out.append(f"| {point} | {n} | {d['run']} | {d['fired']} | {d['exit2']} | {d['exit0']} | "
                   f"{d['hang']} | {d['signal']} | {d['lost']} | {d['cause']} of {d['fired']} |")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", default="2,4")
    p.add_argument("--dir", default="/tmp/hpcdqn-fault-matrix")
    p.add_argument("--levels", default="checkpoint,run")
    p.add_argument("--full", action="store_true", help="run-file points for every rank choice "
                   "and errno (default: rank 0 for all, the others for ENOSPC at 2 ranks)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fault_matrix.json"))
    p.add_argument("--missing", default=None, help="an earlier results file: run only the run-file "
                   "cases it skipped, keep all its other cases")
    p.add_argument("--table", action="store_true", help="print the README table of --out, run nothing")
    p.add_argument("--keep", default=None, help="an earlier results file whose cases of the levels "
                   "not run now are kept")
    a = p.parse_args()
    if a.table:
        print(table(Path(a.out)))
        return 0
    tmp = Path(a.dir)
    subprocess.run(["rm", "-rf", str(tmp)])
    tmp.mkdir(parents=True)
    ranks = [int(x) for x in a.ranks.split(",")]
    rows, t0 = [], time.time()
    for n in ranks:
        if "checkpoint" in a.levels:
            rows += ckpt_cases(n, tmp)
            print(f"{n} ranks: checkpoint cases done ({time.time() - t0:.0f} s)", file=sys.stderr)
    ref, done = {}, {}
    if a.missing:       # the earlier file's cases, but for the run-file cases it skipped
        earlier = json.loads(Path(a.missing).read_text())["cases"]
        rows += [r for r in earlier if r["level"] != "run file"]
        done = {(r["point"], r["who"], r["errno"], r["ranks"]): r for r in earlier
                if r["level"] == "run file" and "skipped" not in r}
        a.full = True
    for n in ranks if "run" in a.levels else ():
        ref[n] = tmp / f"ref-{n}"
        r = run(mpirun_cmd(n) + [sys.executable, "-m", "hpcdqn.cli", "train", *TRAIN,
                                 f"run_dir={ref[n]}"], {}, 240)
        assert r[0] == 0, r[2][-3000:]
        for point in RUN_POINTS:
            for who in WHO:
                for code in ERRNOS:
                    if (point, who, code, n) in done:
                        rows.append(done[point, who, code, n])
                        continue
                    if not a.full and who != "0" and (n != ranks[0] or code != "ENOSPC"):
                        rows.append({"level": "run file", "point": point, "who": who,
                                     "errno": code, "ranks": n, "hang": False, "signal": False,
                                     "exit": 0, "fired": None, "skipped": SKIP})
                        continue
                    rows.append(run_case(n, point, who, code, tmp, ref))
                    print(json.dumps({k: rows[-1][k] for k in ("point", "who", "errno", "ranks",
                                                                "exit", "fired", "lost")}),
                          file=sys.stderr, flush=True)
    if a.keep:
        levels = {"checkpoint" if "checkpoint" in a.levels else None, "run file" if "run" in a.levels else None}
        rows += [r for r in json.loads(Path(a.keep).read_text())["cases"] if r["level"] not in levels]
    fired = [r for r in rows if r.get("fired")]
    summary = {"cases": len(rows), "run": sum("skipped" not in r for r in rows),
               "fired": len(fired),
               "hangs": sum(bool(r["hang"]) for r in rows),
               "signals": sum(bool(r["signal"]) for r in rows),
               "lost_valid_checkpoints": sum(bool(r.get("lost")) for r in rows),
               "tracebacks": sum(bool(r.get("traceback")) for r in rows),
               "messages_naming_cause": sum(bool(r.get("names_cause")) for r in fired),
               "tmp_left": sum(bool(r.get("tmp_left")) for r in rows),
               "exit_other_than_0_or_2": sum(r["exit"] not in (0, 2) for r in rows),
               "wall_s": round(time.time() - t0, 1),
               "loadavg": open("/proc/loadavg").read().split()[:3]}
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    out = {"commit": commit, "summary": summary, "cases": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
