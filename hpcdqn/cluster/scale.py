"""`hpcdqn scale`: weak and strong scaling studies, with a fitted allreduce cost model.

    hpcdqn scale --ranks 1,2,4 --mode weak --out scaling/ [--repeats 3] [--config F] [KEY=VALUE ...]

For every rank count ``p`` (and every repeat) a short ``hpcdqn train`` runs under ``mpirun -n p``
(workstation) or ``srun -n p`` (inside a Slurm allocation, i.e. with ``SLURM_JOB_ID`` set); its
``summary.json`` gives the throughput. ``p`` ranks form ``dp = p / pp`` replicas.

- ``--mode weak``: the same work per replica: ``total_steps`` (from the config or ``KEY=VALUE``) is
  the work of ONE replica and a run with ``dp`` replicas does ``dp * total_steps``.
- ``--mode strong``: ``total_steps`` is fixed, whatever ``p``.

Efficiency is throughput per rank relative to the smallest rank count measured:
``eff(p) = sps(p) / (p / p0 * mean sps(p0))`` (1.0 is ideal, for weak and strong alike).

For each ``p > 1`` a microbenchmark times ``MPI_Allreduce`` (in place, float32, sum: what the
gradient sync does) on several message sizes around the gradient size, and the model

    t_allreduce(p, n_bytes) = alpha * log2(p) + beta * 2 * (p - 1) / p * n_bytes

(a latency term per tree/recursive-doubling stage and a ring-style bandwidth term) is fitted to
those timings (non-negative least squares on relative error). With the measured compute time per
run it predicts throughput and efficiency at 16 to 1024 ranks: ``prediction.csv`` and
``prediction.json``, drawn dashed on ``scaling.png`` and labelled "prediction (model)". It is a
model, not a measurement: it ignores contention, stragglers, topology and pipeline traffic.

Outputs in ``--out``: ``scaling.csv`` (one row per run), ``allreduce.csv`` (benchmark points),
``prediction.csv``, ``prediction.json``, ``scaling.png``, ``runs/`` (the training runs).
``--merge DIR ...`` combines the outputs of several studies (e.g. one Slurm job per node count)
and redoes the efficiency, fit, prediction and plot.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from hpcdqn.cluster.costmodel import LABEL, bench_main, fit_allreduce, predict, t_allreduce

COLUMNS = ["ranks", "dp", "pp", "repeat", "env_steps_per_s", "updates_per_s", "allreduce_share",
           "efficiency", "mode", "nodes", "env_steps", "updates", "wall_s", "run_dir"]
BENCH_COLUMNS = ["ranks", "n_bytes", "seconds"]
PRED_COLUMNS = ["ranks", "dp", "env_steps_per_s", "updates_per_s", "efficiency",
                "t_allreduce_s", "allreduce_share"]
STUDY_DEFAULTS = ["log.progress=false", "log.tensorboard=false", "eval.episodes=0"]


class ScaleError(RuntimeError):
    pass


# -- launching ----------------------------------------------------------------------------------
def in_allocation() -> bool:
    return bool(os.environ.get("SLURM_JOB_ID")) and shutil.which("srun") is not None


def _tasks_per_node() -> int | None:
    v = os.environ.get("SLURM_NTASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE", "")
    v = v.split("(")[0].split(",")[0]
    return int(v) if v.isdigit() and int(v) > 0 else None


def nodes_for(p: int, launcher: str) -> int:
    if launcher != "srun":
        return 1
    alloc = int(os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or 1)
    tpn = _tasks_per_node()
    return max(1, min(alloc, math.ceil(p / tpn))) if tpn else 1


def launch_cmd(p: int, launcher: str) -> list[str]:
    """The command prefix that starts ``p`` ranks."""
    if launcher == "srun":
        cmd = ["srun", f"--mpi={os.environ.get('HPCDQN_SRUN_MPI', 'pmix')}", "-n", str(p),
               "-N", str(nodes_for(p, "srun")), "--kill-on-bad-exit=1"]
        bind = os.environ.get("HPCDQN_CPU_BIND", "cores")
        if bind:
            cmd.append(f"--cpu-bind={bind}")
        return cmd
    exe = shutil.which("mpirun") or shutil.which("mpiexec")
    if not exe:
        raise ScaleError("mpirun not found: run ./quickstart.sh setup (or use --launcher srun)")
    cmd = [exe, "-n", str(p)]
    if os.environ.get("HPCDQN_MPIRUN_ARGS") is not None:
        return cmd + os.environ["HPCDQN_MPIRUN_ARGS"].split()
    ompi = "Open MPI" in subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    if p <= _cores():
        cmd += ["--bind-to", "core"]        # one rank per core (Open MPI and MPICH hydra)
    else:
        cmd += ["--bind-to", "none"] + (["--oversubscribe"] if ompi else [])
    return cmd


def child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        env.update({"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"})
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _run(cmd: list[str], timeout: float, log: Path) -> subprocess.CompletedProcess:
    """Run a launcher; kill its whole process group on timeout; keep its output in ``log``."""
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=f, text=True, env=child_env(),
                             start_new_session=True)
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            raise ScaleError(f"timed out after {timeout}s: {' '.join(cmd)} (log: {log})")
        except BaseException:
            os.killpg(p.pid, signal.SIGKILL)
            raise
        f.write(out)
    if p.returncode != 0:
        tail = Path(log).read_text(errors="replace")[-3000:]
        raise ScaleError(f"failed ({p.returncode}): {' '.join(cmd)}\n{tail}")
    return subprocess.CompletedProcess(cmd, p.returncode, out, "")


# -- one study ----------------------------------------------------------------------------------
def parse_ranks(text: str) -> list[int]:
    try:
        ranks = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ScaleError(f"--ranks {text!r}: expected a comma separated list like 1,2,4") from None
    if not ranks or ranks[0] < 1:
        raise ScaleError(f"--ranks {text!r}: rank counts must be >= 1")
    return ranks


def run_study(ranks, mode, out: Path, repeats=1, config=None, overrides=(), launcher="auto",
              timeout=1800.0, bench=True, log=print) -> dict:
    from hpcdqn.config import load_config

    if mode not in ("weak", "strong"):
        raise ScaleError(f"--mode {mode!r}: use weak or strong")
    overrides = list(overrides)
    cfg = load_config(config, STUDY_DEFAULTS + overrides)     # ConfigError early, before any run
    pp = cfg["pp"]
    bad = [p for p in ranks if p % pp]
    if bad:
        raise ScaleError(f"rank counts {bad} are not multiples of pp={pp}")
    if launcher == "auto":
        launcher = "srun" if in_allocation() else "mpirun"
    out = Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    base_steps = cfg["total_steps"]
    rows, bench_rows, grad_bytes = [], [], None
    cfg_args = ["--config", str(config)] if config else []
    load0 = _loadavg()
    log(f"hpcdqn scale: {mode} scaling over ranks {ranks} x {repeats} repeat(s) with {launcher}; "
        f"total_steps={base_steps}{' per replica' if mode == 'weak' else ''}")
    for p in ranks:
        dp = p // pp
        steps = base_steps * dp if mode == "weak" else base_steps
        for r in range(repeats):
            run_dir = out / "runs" / f"{mode}_p{p}_r{r}"
            if run_dir.exists():
                shutil.rmtree(run_dir)
            cmd = launch_cmd(p, launcher) + [sys.executable, "-m", "hpcdqn.cli", "train", *cfg_args,
                                             *STUDY_DEFAULTS, *overrides, f"total_steps={steps}",
                                             f"run_dir={run_dir}"]
            t = time.perf_counter()
            _run(cmd, timeout, out / "logs" / f"{mode}_p{p}_r{r}.log")
            s = json.loads((run_dir / "summary.json").read_text())
            row = {"ranks": s["world"], "dp": s["dp"], "pp": s["pp"], "repeat": r,
                   "env_steps_per_s": s["sps"], "updates_per_s": s["ups"],
                   "allreduce_share": s["allreduce_share"], "efficiency": float("nan"), "mode": mode,
                   "nodes": nodes_for(p, launcher), "env_steps": s["env_steps"],
                   "updates": s["updates"], "wall_s": s["wall_s"], "run_dir": str(run_dir)}
            if row["ranks"] != p:
                raise ScaleError(f"asked for {p} ranks, the run had world={row['ranks']}")
            rows.append(row)
            log(f"  p={p} repeat={r}: {row['env_steps_per_s']:.1f} env-steps/s, "
                f"{row['updates_per_s']:.1f} updates/s, allreduce {100 * row['allreduce_share']:.1f}% "
                f"({time.perf_counter() - t:.0f}s)")
            if grad_bytes is None:
                grad_bytes = _grad_bytes(run_dir)
        if bench and p // pp > 1:
            sizes = bench_sizes(grad_bytes // pp)
            bench_rows += run_bench(p, sizes, launcher, out, timeout)
            log(f"  p={p} allreduce: " + ", ".join(f"{b['n_bytes']}B {1e6 * b['seconds']:.1f}us"
                                                    for b in bench_rows if b["ranks"] == p))
    meta = {"mode": mode, "pp": pp, "grad_bytes": grad_bytes, "launcher": launcher,
            "host": socket.gethostname(), "env_id": cfg["env_id"], "total_steps": base_steps,
            "bucket_mb": cfg["parallel"]["bucket_mb"], "cores": _cores(),
            "loadavg_1m": [load0, _loadavg()]}
    return finish(out, rows, bench_rows, meta, log)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _grad_bytes(run_dir: Path) -> int:
    import h5py

    with h5py.File(run_dir / "model.h5", "r") as f:
        return int(f["online"].size) * 4                     # float32 gradient buffer


def bench_sizes(grad_bytes: int) -> list[int]:
    g = max(64, int(grad_bytes))
    return sorted({8, 1024, max(64, g // 16), max(64, g // 4), g, 4 * g})


def run_bench(p: int, sizes, launcher: str, out: Path, timeout: float) -> list[dict]:
    path = out / "logs" / f"allreduce_p{p}.json"
    cmd = launch_cmd(p, launcher) + [sys.executable, "-m", "hpcdqn.cluster.scale", "bench",
                                     ",".join(map(str, sizes)), str(path)]
    _run(cmd, timeout, out / "logs" / f"allreduce_p{p}.log")
    return [{"ranks": p, "n_bytes": int(n), "seconds": float(t)}
            for n, t in json.loads(path.read_text())["points"]]


# -- analysis -----------------------------------------------------------------------------------
def add_efficiency(rows: list[dict]) -> float:
    """Fill ``efficiency`` in place; returns the baseline throughput per rank."""
    p0 = min(r["ranks"] for r in rows)
    base = [r["env_steps_per_s"] for r in rows if r["ranks"] == p0]
    per_rank = sum(base) / len(base) / p0
    for r in rows:
        r["efficiency"] = round(r["env_steps_per_s"] / (r["ranks"] * per_rank), 4)
    return per_rank


def finish(out: Path, rows, bench_rows, meta, log=print) -> dict:
    """Efficiency, CSVs, fit, prediction and plot for a finished (or merged) study."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not rows:
        raise ScaleError("no measurements")
    add_efficiency(rows)
    _write_csv(out / "scaling.csv", COLUMNS, rows)
    _write_csv(out / "allreduce.csv", BENCH_COLUMNS, bench_rows)
    alpha, beta = fit_allreduce(bench_rows)
    pred, info = predict(rows, alpha, beta, meta)
    info["fit_points"] = len([b for b in bench_rows if b["ranks"] > 1])
    info["fit_residuals"] = [
        {**b, "model_s": t_allreduce(b["ranks"], b["n_bytes"], alpha, beta)} for b in bench_rows]
    info["meta"] = meta
    info["measured"] = summarize(rows)
    _write_csv(out / "prediction.csv", PRED_COLUMNS, pred)
    (out / "prediction.json").write_text(json.dumps(info, indent=2))
    (out / "study.json").write_text(json.dumps(meta, indent=2))
    plot(out / "scaling.png", rows, pred if info["fit_points"] else [], meta, alpha, beta)
    log(f"hpcdqn scale: wrote {out / 'scaling.csv'}, {out / 'scaling.png'}, "
        f"{out / 'prediction.csv'} (alpha={alpha * 1e6:.2f}us, "
        f"beta={beta * 1e9:.4f}ns/B{' - no fit: no multi-rank benchmark' if not info['fit_points'] else ''})")
    return {"rows": rows, "bench": bench_rows, "prediction": pred, "model": info}


def summarize(rows) -> list[dict]:
    out = []
    for p in sorted({r["ranks"] for r in rows}):
        g = [r for r in rows if r["ranks"] == p]
        out.append({"ranks": p, "repeats": len(g),
                    **{k: round(sum(r[k] for r in g) / len(g), 4)
                       for k in ("env_steps_per_s", "updates_per_s", "allreduce_share", "efficiency")}})
    return out


def _write_csv(path: Path, cols, rows) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def _read_csv(path: Path) -> list[dict]:
    def conv(v):
        for t in (int, float):
            try:
                return t(v)
            except ValueError:
                pass
        return v

    with open(path, newline="") as f:
        return [{k: conv(v) for k, v in r.items()} for r in csv.DictReader(f)]


def merge(dirs, out: Path, log=print) -> dict:
    rows, bench, metas = [], [], []
    for d in map(Path, dirs):
        if not (d / "scaling.csv").exists():
            raise ScaleError(f"{d}: no scaling.csv (did that study finish?)")
        rows += _read_csv(d / "scaling.csv")
        if (d / "allreduce.csv").exists():
            bench += _read_csv(d / "allreduce.csv")
        if (d / "study.json").exists():
            metas.append(json.loads((d / "study.json").read_text()))
    seen: dict[int, int] = {}
    for r in rows:   # repeats from different studies: number them per rank count again
        r["repeat"] = seen[r["ranks"]] = seen.get(r["ranks"], -1) + 1
    modes = {r["mode"] for r in rows}
    if len(modes) > 1:
        raise ScaleError(f"cannot merge studies of different modes {sorted(modes)}")
    meta = dict(metas[0]) if metas else {"mode": modes.pop(), "pp": rows[0]["pp"]}
    meta["merged_from"] = [str(d) for d in dirs]
    return finish(out, rows, bench, meta, log)


# -- plot ---------------------------------------------------------------------------------------
def plot(path: Path, rows, pred, meta, alpha, beta) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = summarize(rows)
    ps = [s["ranks"] for s in summ]
    p0 = ps[0]
    thr0 = summ[0]["env_steps_per_s"]
    xmax = max(ps + [r["ranks"] for r in pred])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.6))
    ideal_x = [p0, xmax]
    a1.plot(ideal_x, [thr0, thr0 * xmax / p0], ":", color="k", lw=1, label="ideal (linear)")
    a1.scatter([r["ranks"] for r in rows], [r["env_steps_per_s"] for r in rows], s=12,
               color="C0", alpha=0.45, zorder=3)
    a1.plot(ps, [s["env_steps_per_s"] for s in summ], "o-", color="C0", label="measured (mean)",
            zorder=4)
    a2.axhline(1.0, ls=":", color="k", lw=1, label="ideal")
    a2.scatter([r["ranks"] for r in rows], [r["efficiency"] for r in rows], s=12, color="C1",
               alpha=0.45, zorder=3)
    a2.plot(ps, [s["efficiency"] for s in summ], "o-", color="C1", label="measured (mean)", zorder=4)
    if pred:
        px = [q["ranks"] for q in pred]
        a1.plot(px, [q["env_steps_per_s"] for q in pred], "--", color="C3", label=LABEL)
        a2.plot(px, [q["efficiency"] for q in pred], "--", color="C3", label=LABEL)
    from matplotlib.ticker import FuncFormatter

    for a in (a1, a2):
        a.set_xscale("log", base=2)
        a.set_xticks([2 ** k for k in range(int(math.log2(xmax)) + 1)])
        a.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        a.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        a.set_xlabel("MPI ranks")
        a.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=8)
    a1.set_yscale("log")
    a1.set_ylabel("env steps / s (all ranks)")
    a1.set_title(f"{meta['mode']} scaling: throughput")
    a2.set_ylabel(f"efficiency (vs {p0} rank{'s' if p0 > 1 else ''})")
    a2.set_ylim(0, max(1.2, max(r["efficiency"] for r in rows) * 1.1))
    a2.set_title(f"{meta['mode']} scaling: efficiency")
    sub = (f"{meta.get('env_id', '')}, pp={meta['pp']}, host {meta.get('host', '?')}, "
           f"launcher {meta.get('launcher', '?')}")
    if meta.get("loadavg_1m") and None not in meta["loadavg_1m"]:
        sub += (f", {meta.get('cores', '?')} cores, load avg {meta['loadavg_1m'][0]:g}"
                f"->{meta['loadavg_1m'][1]:g} (other jobs share the cores)"
                if max(meta["loadavg_1m"]) > meta.get("cores", 1) else "")
    if pred:
        sub += (f"\n{LABEL}: t_ar = {alpha * 1e6:.2f}us*log2(p) + 2(p-1)/p*n/"
                f"{(1 / beta / 1e9) if beta > 0 else float('inf'):.2f}GB/s, n={meta.get('grad_bytes')}B")
    fig.suptitle(sub, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- command line -------------------------------------------------------------------------------
def main_cli(args) -> int:
    from hpcdqn.config import ConfigError

    try:
        if args.merge:
            merge(args.merge, Path(args.out))
            return 0
        if not args.ranks:
            raise ScaleError("--ranks is required (e.g. --ranks 1,2,4)")
        run_study(parse_ranks(args.ranks), args.mode, Path(args.out), args.repeats, args.config,
                  args.overrides, args.launcher, args.timeout, not args.no_bench)
    except (ScaleError, ConfigError) as e:
        print(f"hpcdqn scale: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "bench":
        bench_main([int(x) for x in sys.argv[2].split(",")], sys.argv[3])
    else:
        print("usage: python -m hpcdqn.cluster.scale bench SIZES OUT.json  (use `hpcdqn scale` for studies)",
              file=sys.stderr)
        sys.exit(2)
