"""`hpcdqn scale`: weak and strong scaling studies, with a communication model fitted to measured
Allreduce sweeps and tested on a held-out rank count.

    hpcdqn scale --ranks 1,2,4 --mode weak --out scaling/ [--repeats 3] [--config F] [KEY=VALUE ...]

For every rank count ``p`` (and every repeat) a short ``hpcdqn train`` runs under ``mpirun -n p``
(workstation) or ``srun -n p`` (inside a Slurm allocation, i.e. with ``SLURM_JOB_ID`` set), with
checkpoints off; its ``summary.json`` gives the throughput and the time split (compute,
allreduce transfer, waiting for the slowest replica, pipeline bubble, other). ``p`` ranks form
``dp = p / pp`` replicas.

- ``--mode weak``: the same work per replica: ``total_steps``, ``dqn.learning_starts`` and
  ``dqn.buffer_size`` (global counts, from the config or ``KEY=VALUE``) are
  the work of ONE replica, multiplied by ``dp`` for a run with ``dp`` replicas (under the
  default ``scaling.rule=sqrt_lr`` each replica then steps, stores and updates as one rank does).
- ``--mode strong``: ``total_steps`` is fixed, whatever ``p``.

Efficiency is throughput per rank relative to the smallest rank count measured:
``eff(p) = sps(p) / (p / p0 * median sps(p0))`` (1.0 is ideal, for weak and strong alike).
Repeats are summarised by their median and 25th/75th percentiles.

At every rank count an OSU-style Allreduce sweep runs (``costmodel.bench_main``: 4 B to 64 MiB),
the model of ``hpcdqn.cluster.costmodel`` is fitted to it, and tested: fitted on every rank count
but the largest, its error at the largest is reported (``held_out``). Rank counts above the
cores of a workstation are oversubscribed (ranks share cores): they are flagged everywhere.

Outputs in ``--out``: ``scaling.csv`` (one row per run, with the time split), ``allreduce.csv``
(the sweep: median, p25, p75 per rank count and size, the model's value and its error),
``prediction.csv`` and ``prediction.json`` (the model, the held-out test, the predicted
throughput with a band), ``scaling.png`` (throughput, efficiency, time split; predictions dashed,
extrapolation beyond 8x the largest fitted rank count shaded), ``allreduce.png`` (the sweep and
the model), ``runs/``. ``--merge DIR ...`` combines the outputs of several studies (e.g. one Slurm
job per node count) and redoes the analysis.
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

from hpcdqn.cluster.costmodel import (EXTRAPOLATION_FACTOR, LABEL, MAX_SWEEP_BYTES, MODEL_TEXT, bench_main, fit_model,
                                      fit_straggler, held_out, held_out_skipped, predict, relative_errors, spread,
                                      sweep_sizes)

SPLIT = ("compute", "allreduce", "wait", "bubble", "other")
COLUMNS = ["ranks", "dp", "pp", "repeat", "env_steps_per_s", "updates_per_s", "allreduce_share",
           "efficiency", "mode", "nodes", "oversubscribed",
           *[f"{k}_share" for k in SPLIT if k != "allreduce"],
           *[f"{k}_ms_per_update" for k in SPLIT if k != "other"],
           "env_steps", "updates", "wall_s", "run_dir"]
BENCH_COLUMNS = ["ranks", "nodes", "ranks_per_node", "oversubscribed", "n_bytes", "iters",
                 "median_s", "p25_s", "p75_s", "model_s", "rel_err", "role"]
PRED_COLUMNS = ["ranks", "dp", "nodes", "extrapolation", "beyond_measured_nodes", "env_steps_per_s", "env_steps_per_s_low",
                "env_steps_per_s_high", "updates_per_s", "efficiency", "efficiency_low",
                "efficiency_high", "t_allreduce_s", "t_wait_s"]
STUDY_DEFAULTS = ["log.progress=false", "log.tensorboard=false", "eval.episodes=0",
                  "checkpoint=false"]
OVERSUBSCRIBED = ("oversubscribed: more ranks than cores, ranks share cores; its timings "
                  "measure time-sharing, not scaling")


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
    if p <= cores():
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


def run_launcher(cmd: list[str], timeout: float, log: Path) -> subprocess.CompletedProcess:
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
              timeout=1800.0, bench=True, log=print, sweep_max=MAX_SWEEP_BYTES) -> dict:
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
    rows, bench_rows, grad_bytes = [], [], None
    load0 = loadavg()
    log(f"hpcdqn scale: {mode} scaling over ranks {ranks} x {repeats} repeat(s) with {launcher}, "
        f"checkpoints off; total_steps={cfg['total_steps']}{' per replica' if mode == 'weak' else ''}")
    over = [p for p in ranks if oversubscribed(p, launcher)]
    if over:
        log(f"hpcdqn scale: NOTE ranks {over} exceed this machine's {cores()} cores: "
            f"{OVERSUBSCRIBED}")
    for p in ranks:
        for r in range(repeats):
            rows.append(run_point(p, r, mode, cfg, config, overrides, launcher, out, timeout, log))
            if grad_bytes is None:
                grad_bytes = _grad_bytes(Path(rows[-1]["run_dir"]))
        if bench:
            sizes = sweep_sizes(grad_bytes // pp, sweep_max)
            bench_rows += run_bench(p, sizes, launcher, out, timeout)
            log(f"  p={p} allreduce sweep: {len(sizes)} sizes, median (p25-p75) at the "
                f"gradient's {grad_bytes // pp} B: " + ", ".join(
                    f"{1e6 * b['median_s']:.1f} us ({1e6 * b['p25_s']:.1f}-{1e6 * b['p75_s']:.1f})"
                    for b in bench_rows if b["ranks"] == p and b["n_bytes"] == grad_bytes // pp // 4 * 4))
    meta = {"mode": mode, "pp": pp, "grad_bytes": grad_bytes, "launcher": launcher,
            "host": socket.gethostname(), "env_id": cfg["env_id"], "total_steps": cfg["total_steps"],
            "bucket_mb": cfg["parallel"]["bucket_mb"], "cores": cores(),
            "ranks_per_node": ranks_per_node(launcher), "loadavg_1m": [load0, loadavg()]}
    return finish(out, rows, bench_rows, meta, log)


def run_point(p, r, mode, cfg, config, overrides, launcher, out: Path, timeout, log) -> dict:
    """One training run at ``p`` ranks (repeat ``r``): its row of scaling.csv."""
    dp = p // cfg["pp"]
    k = dp if mode == "weak" else 1
    d = cfg["dqn"]       # weak: the global counts grow with dp (each replica's share stays)
    scaled = [f"total_steps={cfg['total_steps'] * k}", f"dqn.learning_starts={d['learning_starts'] * k}",
              f"dqn.buffer_size={d['buffer_size'] * k}"]
    run_dir = out / "runs" / f"{mode}_p{p}_r{r}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cfg_args = ["--config", str(config)] if config else []
    cmd = launch_cmd(p, launcher) + [sys.executable, "-m", "hpcdqn.cli", "train", *cfg_args,
                                     *STUDY_DEFAULTS, *overrides, *scaled, f"run_dir={run_dir}"]
    t = time.perf_counter()
    run_launcher(cmd, timeout, out / "logs" / f"{mode}_p{p}_r{r}.log")
    s = json.loads((run_dir / "summary.json").read_text())
    if s["world"] != p:
        raise ScaleError(f"asked for {p} ranks, the run had world={s['world']}")
    split = s["time_split"]
    row = {"ranks": s["world"], "dp": s["dp"], "pp": s["pp"], "repeat": r,
           "env_steps_per_s": s["sps"], "updates_per_s": s["ups"],
           "efficiency": float("nan"), "mode": mode, "nodes": s.get("nodes", nodes_for(p, launcher)),
           "oversubscribed": oversubscribed(p, launcher),
           **{f"{k}_share": split["shares"][k] for k in SPLIT},
           **{f"{k}_ms_per_update": split["per_update_ms"][k] for k in SPLIT if k != "other"},
           "env_steps": s["env_steps"], "updates": s["updates"], "wall_s": s["wall_s"],
           "run_dir": str(run_dir)}
    log(f"  p={p} repeat={r}: {row['env_steps_per_s']:.1f} env-steps/s, "
        f"{row['updates_per_s']:.1f} updates/s; time: " + ", ".join(
            f"{k} {100 * row[f'{k}_share']:.1f}%" for k in SPLIT)
        + f" ({time.perf_counter() - t:.0f}s){' [oversubscribed]' if row['oversubscribed'] else ''}")
    return row


def oversubscribed(p: int, launcher: str) -> bool:
    """More ranks than this machine's cores under mpirun (Slurm does not oversubscribe)."""
    return launcher != "srun" and p > cores()


def ranks_per_node(launcher: str) -> int:
    """Ranks one node holds in this study's setting: Slurm's tasks per node, else the cores."""
    return (_tasks_per_node() if launcher == "srun" else None) or cores()


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _grad_bytes(run_dir: Path) -> int:
    from hpcdqn.store.modelfile import model_size

    return model_size(run_dir / "model.h5")[0] * 4          # float32 gradient buffer


def run_bench(p: int, sizes, launcher: str, out: Path, timeout: float) -> list[dict]:
    path = out / "logs" / f"allreduce_p{p}.json"
    cmd = launch_cmd(p, launcher) + [sys.executable, "-m", "hpcdqn.cluster.scale", "bench",
                                     ",".join(map(str, sizes)), str(path)]
    run_launcher(cmd, timeout, out / "logs" / f"allreduce_p{p}.log")
    res = json.loads(path.read_text())
    return [{"ranks": p, "nodes": res["nodes"], "ranks_per_node": res["ranks_per_node"],
             "oversubscribed": oversubscribed(p, launcher), **q} for q in res["points"]]


# -- analysis -----------------------------------------------------------------------------------
def add_efficiency(rows: list[dict]) -> float:
    """Fill ``efficiency`` in place (against the median at the smallest rank count); returns
    the baseline throughput per rank."""
    p0 = min(r["ranks"] for r in rows)
    per_rank = spread([r["env_steps_per_s"] for r in rows if r["ranks"] == p0])["median"] / p0
    for r in rows:
        r["efficiency"] = round(r["env_steps_per_s"] / (r["ranks"] * per_rank), 4)
    return per_rank


def summarize(rows) -> list[dict]:
    """Per rank count: median, p25 and p75 over repeats of throughput, efficiency and the split."""
    keys = ["env_steps_per_s", "updates_per_s", "efficiency", *[f"{k}_share" for k in SPLIT],
            *[f"{k}_ms_per_update" for k in SPLIT if k != "other"]]
    out = []
    for p in sorted({r["ranks"] for r in rows}):
        g = [r for r in rows if r["ranks"] == p]
        row = {"ranks": p, "dp": g[0]["dp"], "repeats": len(g),
               "oversubscribed": bool(g[0].get("oversubscribed"))}
        for k in keys:
            sp = spread([float(r.get(k, 0.0) or 0.0) for r in g])
            row.update({k: round(sp["median"], 6), f"{k}_p25": round(sp["p25"], 6),
                        f"{k}_p75": round(sp["p75"], 6)})
        out.append(row)
    return out


def model_info(rows, bench_rows, meta) -> dict:
    """The fitted model (on every sweep point), the held-out test, the straggler term and the
    predicted throughput; the sweep rows get the model's value and role in place."""
    coef = fit_model(bench_rows)
    test = held_out(bench_rows, (meta.get("grad_bytes") or 0) // meta["pp"])
    top = test["held_out_ranks"] if test else None
    for b, e in zip(bench_rows, relative_errors(bench_rows, test["coef"] if test else coef)):
        b.update(model_s=e["model_s"], rel_err=round(e["rel_err"], 4),
                 role="held out" if b["ranks"] == top else "fit")
    summ = summarize(rows)
    sigma = fit_straggler([(s["dp"], s["wait_ms_per_update"] / 1e3) for s in summ
                           if not s["oversubscribed"]])
    band = None
    if test:
        band = abs(test["rel_err_at_grad_bytes"] if test["rel_err_at_grad_bytes"] is not None
                   else test["median_abs_rel_err"])
    p0 = summ[0]["ranks"]
    base_rows = [r for r in rows if r["ranks"] == p0]
    base = {"ranks": p0, **{k: spread([r[k] for r in base_rows])["median"]
                            for k in ("wall_s", "updates", "env_steps")}}
    base["allreduce_s"] = spread([r["allreduce_ms_per_update"] for r in base_rows])["median"] \
        * base["updates"] / 1e3
    base["wait_s"] = spread([r["wait_ms_per_update"] for r in base_rows])["median"] \
        * base["updates"] / 1e3
    seen = {"measured_ranks": [s["ranks"] for s in summ],
            "measured_nodes": [b["nodes"] for b in bench_rows] or [1]}
    no_pred = prediction_skipped(base, bench_rows)
    pred = [] if no_pred else predict(base, coef, {**meta, **seen}, sigma, band)
    return {"label": LABEL, "mode": meta["mode"], "model": MODEL_TEXT, "coef": coef,
            "held_out": test, "held_out_skipped": held_out_skipped(bench_rows) if bench_rows
            else "skipped: no Allreduce sweep (--no-bench)",
            "prediction_skipped": no_pred, "band_rel": band, "straggler_sigma_s": sigma,
            "straggler_skipped": None if sigma is not None else
            "not fitted: no measured rank count with dp > 1 that is not oversubscribed",
            "straggler": "wait(dp) = sigma * E[max of dp standard normals], fitted to the measured "
                         "waits at rank counts that are not oversubscribed",
            "baseline": base, "measured": summ, "meta": meta, "rows": pred,
            "assumptions": [
                "time per update outside the gradient sync as measured at the smallest rank count",
                "one gradient allreduce per update over the dp replicas, cost from the fitted model",
                "model terms no measured point exercised are zero (see coef.unfitted): e.g. without "
                "multi-node sweeps the between-node cost is NOT modelled",
                f"rows with extrapolation=true lie beyond {EXTRAPOLATION_FACTOR}x the largest fitted rank count",
                "a prediction, not a measurement"]}


def prediction_skipped(base: dict, bench_rows) -> str | None:
    """Why no throughput prediction is made (None: one is)."""
    if not bench_rows:
        return "skipped: no Allreduce sweep (--no-bench), no communication model"
    if not base["updates"]:
        return "skipped: the smallest rank count made no updates"
    if not any(b["ranks"] >= 2 for b in bench_rows):
        return ("skipped: the Allreduce sweep has no communicating rank count (p >= 2), so the "
                "model has no communication term to predict other rank counts with")
    return None


def finish(out: Path, rows, bench_rows, meta, log=print) -> dict:
    """Efficiency, CSVs, fit, held-out test, prediction and plots for a finished (or merged)
    study."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not rows:
        raise ScaleError("no measurements")
    add_efficiency(rows)
    info = model_info(rows, bench_rows, meta)
    _write_csv(out / "scaling.csv", COLUMNS, rows)
    _write_csv(out / "allreduce.csv", BENCH_COLUMNS, bench_rows)
    _write_csv(out / "prediction.csv", PRED_COLUMNS, info["rows"])
    (out / "prediction.json").write_text(json.dumps(info, indent=2))
    (out / "study.json").write_text(json.dumps(meta, indent=2))
    from hpcdqn.cluster.figures import plot_scaling, plot_sweep

    plot_scaling(out / "scaling.png", rows, info)
    if bench_rows:
        plot_sweep(out / "allreduce.png", bench_rows, info)
    for line in report_lines(info, bench_rows):
        log(line)
    log(f"hpcdqn scale: wrote {out / 'scaling.csv'}, {out / 'allreduce.csv'}, "
        f"{out / 'prediction.csv'}, {out / 'scaling.png'}"
        + (f", {out / 'allreduce.png'}" if bench_rows else ""))
    return {"rows": rows, "bench": bench_rows, "prediction": info["rows"], "model": info}


def report_lines(info: dict, bench_rows) -> list[str]:
    """What the study prints: the time split, the sweep table, the model and its held-out error."""
    lines = ["hpcdqn scale: measured (median over repeats, [p25, p75]); time split per update:"]
    for s in info["measured"]:
        lines.append(
            f"  p={s['ranks']:<3} {s['env_steps_per_s']:9.1f} env-steps/s "
            f"[{s['env_steps_per_s_p25']:.1f}, {s['env_steps_per_s_p75']:.1f}]  eff "
            f"{s['efficiency']:.3f}  " + " ".join(f"{k} {100 * s[f'{k}_share']:.1f}%" for k in SPLIT)
            + ("  [oversubscribed]" if s["oversubscribed"] else ""))
    if bench_rows:
        ranks = sorted({b["ranks"] for b in bench_rows})
        lines.append("hpcdqn scale: Allreduce sweep, median us [p25-p75] (bytes x ranks):")
        lines.append("  " + f"{'bytes':>10}" + "".join(f"{f'p={p}':>26}" for p in ranks))
        for n in sorted({b["n_bytes"] for b in bench_rows}):
            cells = {b["ranks"]: b for b in bench_rows if b["n_bytes"] == n}
            lines.append("  " + f"{n:>10}" + "".join(
                f"{'%.1f [%.1f-%.1f]' % (1e6 * c['median_s'], 1e6 * c['p25_s'], 1e6 * c['p75_s']):>26}"
                if (c := cells.get(p)) else f"{'-':>26}" for p in ranks))
    if not bench_rows:
        return lines + ["hpcdqn scale: no Allreduce sweep (--no-bench): no model, no prediction"]
    c = info["coef"]
    lines.append(f"hpcdqn scale: model {info['model']}: t0={c['t0'] * 1e6:.2f}us "
                 f"alpha={c['alpha'] * 1e6:.2f}us beta={c['beta'] * 1e9:.4f}ns/B "
                 f"alpha_net={c['alpha_net'] * 1e6:.2f}us beta_net={c['beta_net'] * 1e9:.4f}ns/B"
                 + (f" (not fitted, no point exercises them: {', '.join(c['unfitted'])})"
                    if c["unfitted"] else ""))
    t = info["held_out"]
    if t:
        g = t["rel_err_at_grad_bytes"]
        lines.append(f"hpcdqn scale: held-out test: fitted on p={t['fitted_on_ranks']}, predicts "
                     f"p={t['held_out_ranks']} with median |error| "
                     f"{100 * t['median_abs_rel_err']:.0f}% over sizes"
                     + (f", {100 * g:+.0f}% at the gradient's size" if g is not None else ""))
    else:
        lines.append(f"hpcdqn scale: held-out test: {info['held_out_skipped']}; the model's "
                     "dependence on p is untested")
    if info.get("prediction_skipped"):
        lines.append(f"hpcdqn scale: prediction: {info['prediction_skipped']}")
    if info.get("straggler_skipped"):
        lines.append(f"hpcdqn scale: straggler term: {info['straggler_skipped']}"
                     + (" (taken as 0 in the predictions)" if info["rows"] else ""))
    return lines


def _write_csv(path: Path, cols, rows) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def _read_csv(path: Path) -> list[dict]:
    def conv(v):
        if v in ("True", "False"):
            return v == "True"
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
            bench += [{k: v for k, v in b.items() if k not in ("model_s", "rel_err", "role")}
                      for b in _read_csv(d / "allreduce.csv")]
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
                  args.overrides, args.launcher, args.timeout, not args.no_bench,
                  sweep_max=args.sweep_max)
    except (ScaleError, ConfigError) as e:
        print(f"hpcdqn scale: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    if len(sys.argv) in (4, 5) and sys.argv[1] == "bench" and sys.argv[4:] in ([], ["flat"], ["hierarchical"]):
        bench_main([int(x) for x in sys.argv[2].split(",")], sys.argv[3], algorithm=(sys.argv[4:] or ["flat"])[0])
    else:
        print("usage: python -m hpcdqn.cluster.scale bench SIZES OUT.json [flat|hierarchical]  "
              "(use `hpcdqn scale` for studies)",
              file=sys.stderr)
        sys.exit(2)
