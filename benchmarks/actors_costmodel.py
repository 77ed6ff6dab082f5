"""The cost model with roles (``hpcdqn.parallel.roles_model``) against measured actor layouts:
CartPole-v1 (configs/cartpole.toml, shortened: ``total_steps``, ``dqn.learning_starts=256``,
no evaluation, seed 99: not a learning seed) with M learners + N actors, at the configured
replay ratio 32 (``gradient_steps=128``: the learner side sets the pace) and at 2
(``gradient_steps=8``: the actors, or the shared cores, set it).

Layouts (learners, actors): (1, 1), (1, 3) are *fitted*: the per-role constants are read from
the 1 + 1 runs' ``summary.json`` time splits (``roles_model.constants_from_summary``) and the one
free scalar, the oversubscription efficiency, is fitted on the 1 + 3 runs (2 cores, 4
processes); (1, 2), (2, 2), (1, 7) are *held out*: predicted from those constants and compared
with the measurement (median |relative error| of env frames/s and of learner updates/s).

Repeats interleave the layouts (one run of every layout per round, ``--repeats``, default 3);
every run's figures and the load average are stored, the fit uses per-layout medians. Runs are
launched with ``--wrap`` before ``mpirun`` (e.g. a CPU lock), one run per wrap.

    python benchmarks/actors_costmodel.py measure [--repeats 3] [--wrap "flock LOCK"]
    python benchmarks/actors_costmodel.py fit          # refit the stored runs, rewrite the file
    python benchmarks/actors_costmodel.py figure       # docs/actors_costmodel.png from the fit
"""

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from hpcdqn.parallel import roles_model as rm  # noqa: E402

OUT = ROOT / "benchmarks/results/actors_costmodel.json"
RATIOS = {"rr32": [], "rr2": ["dqn.gradient_steps=8"],
          "rr32-ahead64": ["actor.max_ahead=64"]}     # the rate limiter's band: 64 iterations
LAYOUTS = [(1, 1), (1, 2), (1, 3), (2, 2), (1, 7)]
EXTRA = [(1, 1, "rr32-ahead64")]        # measured in a later batch (--only), held out
CALIBRATE = ["1L+1A/rr32", "1L+1A/rr2"]
FIT = ["1L+3A/rr32", "1L+3A/rr2"]
TOTAL_STEPS = 12000


def name(m: int, n: int, ratio: str) -> str:
    return f"{m}L+{n}A/{ratio}"


def run_one(m: int, n: int, ratio: str, wrap: list[str], tmp: Path) -> dict:
    run_dir = tmp / name(m, n, ratio).replace("/", "_")
    cmd = [*wrap, "mpirun", "-n", str(m + n), "--oversubscribe", "--bind-to", "none",
           sys.executable, "-m", "hpcdqn.cli", "train", "--config", str(ROOT / "configs/cartpole.toml"),
           f"actors={n}", "seed=99", f"total_steps={TOTAL_STEPS}", "dqn.learning_starts=256",
           "eval.episodes=0", f"run_dir={run_dir}", "overwrite=true", "log.progress=false",
           "log.tensorboard=false", *RATIOS[ratio]]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMPI_ALLOW_RUN_AS_ROOT": "1",
           "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    before = Path("/proc/loadavg").read_text().split()[:3]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if r.returncode:
        raise SystemExit(f"{name(m, n, ratio)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    s = json.loads((run_dir / "summary.json").read_text())
    return {"layout": name(m, n, ratio), "learners": m, "actors": n, "ratio": ratio,
            "loadavg_before": before, "loadavg_after": Path("/proc/loadavg").read_text().split()[:3],
            "job_s": round(time.perf_counter() - t, 2), **rm.measured_rates(s),
            "summary": {k: s[k] for k in ("env_steps", "updates", "wall_s", "sps", "ups", "dp", "actors",
                                          "schedule", "ranks", "parameter_bytes_per_stage",
                                          "replay_ratio_achieved", "replay_ratio_configured")}}


def commit() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()


def measure(a) -> None:
    res = json.loads(OUT.read_text()) if a.append and OUT.exists() else {"runs": []}
    res.update({"benchmark": "actors_costmodel", "commit": commit(), "cpus": os.cpu_count(),
                "total_steps": TOTAL_STEPS})
    tmp = Path(tempfile.mkdtemp(prefix="hpcdqn-actors-cost-"))
    order = [(m, n, r) for r in ("rr32", "rr2") for m, n in LAYOUTS] + EXTRA
    if a.only:
        order = [x for x in order if name(*x) in a.only]
    first = 1 + max((r["repeat"] for r in res["runs"]), default=-1)
    for i in range(a.repeats):          # interleaved: one run of every layout per round
        k = (first + i) % len(order)    # each round starts elsewhere in the order
        for m, n, r in order[k:] + order[:k]:
            row = run_one(m, n, r, shlex.split(a.wrap), tmp)
            row["repeat"], row["commit"] = first + i, commit()
            res["runs"].append(row)
            print(json.dumps({x: row[x] for x in ("layout", "repeat", "env_fps", "updates_per_s",
                                                  "loadavg_before")}), flush=True)
            OUT.write_text(json.dumps(res, indent=1) + "\n")
    fit(a)


def spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def actor_cfg(layout: str) -> dict:
    """The ``[actor]`` section the runs of ``layout`` had."""
    from hpcdqn.config import load_config
    return load_config(str(ROOT / "configs/cartpole.toml"), RATIOS[layout.split("/")[1]])["actor"]


OBS_BYTES = 4 * 4           # CartPole-v1: 4 float32


def held_out_error(c: dict, runs: dict, med: dict, skip: list, cores: int) -> float:
    """Median |relative error| of env frames/s over the layouts not in ``skip``."""
    return statistics.median(abs(rm.rel_err(rm.predict(c, runs[k], cores)["env_fps"], med[k]["env_fps"]))
                             for k in runs if k not in skip)


def ablations(c: dict, runs: dict, med: dict, fit_keys: list, cores: int) -> dict:
    """The held-out error of simpler models: no shared-cores bound (a core per rank), and one
    efficiency for both roles (fitted on the same layouts)."""
    skip = fit_keys + CALIBRATE
    pts = [(runs[k], med[k]["env_fps"]) for k in fit_keys]
    best = min((sum(math.log(rm.predict({**c, "eta_learner": e / 100, "eta_actor": e / 100},
                                        r, cores)["env_fps"] / f) ** 2 for r, f in pts), -e)
               for e in range(20, 101))
    one = {**c, "eta_learner": -best[1] / 100, "eta_actor": -best[1] / 100}
    return {"no_cores_bound": held_out_error(c, runs, med, skip, 0),
            "one_eta": {"eta": one["eta_learner"],
                        "held_out_median_abs_rel_err": held_out_error(one, runs, med, skip, cores)}}


def fit_and_hold_out(by: dict, cores: int) -> dict:
    """Constants from the calibration layout, eta from the fit layouts, predictions for all."""
    calib = [r["summary"] for k in CALIBRATE for r in by[k]]
    c = rm.constants_from_summaries(calib, actor_cfg(CALIBRATE[0]), OBS_BYTES)
    med = {k: {q: statistics.median(r[q] for r in rs) for q in ("env_fps", "updates_per_s")}
           for k, rs in by.items()}
    runs = {k: rm.run_of_summary(rs[0]["summary"], actor_cfg(k), OBS_BYTES) for k, rs in by.items()}
    fit_keys = FIT
    c.update(rm.fit_eta(c, [(runs[k], med[k]["env_fps"]) for k in fit_keys], cores))
    compare = []
    for k in by:
        p = rm.predict(c, runs[k], cores)
        held = k not in CALIBRATE + fit_keys
        compare.append({"layout": k, "set": "held_out" if held else "fit", "limit": p["limit"],
                        **{f"{q}_{w}": v for q in ("env_fps", "updates_per_s") for w, v in
                           (("measured", med[k][q]), ("predicted", p[q]),
                            ("rel_err", rm.rel_err(p[q], med[k][q])))}})
    errs = lambda s: [abs(r[f"{q}_rel_err"]) for r in compare if r["set"] == s   # noqa: E731
                      for q in ("env_fps", "updates_per_s")]
    return {"constants": c, "cores": cores, "calibrated_on": CALIBRATE,
            "ablations": ablations(c, runs, med, fit_keys, cores),
            "eta_fitted_on": [k for k in fit_keys],
            "held_out": [r["layout"] for r in compare if r["set"] == "held_out"],
            "compare": compare,
            "held_out_median_abs_rel_err": statistics.median(errs("held_out")),
            "fit_median_abs_rel_err": statistics.median(errs("fit"))}


def fit(a) -> None:
    out_file = Path(a.file)
    res = json.loads(out_file.read_text())
    runs, cores = res["runs"], res.get("cpus") or os.cpu_count()
    by = {}
    for r in runs:
        by.setdefault(r["layout"], []).append(r)
    out = fit_and_hold_out(by, cores)
    res["model"] = rm.MODEL_TEXT
    res["measured"] = {k: {q: spread([r[q] for r in rs]) for q in ("env_fps", "updates_per_s")}
                       for k, rs in by.items()}
    res.update(out)
    res["loadavg_range"] = [min(float(r["loadavg_before"][0]) for r in runs),
                            max(float(r["loadavg_before"][0]) for r in runs)]
    out_file.write_text(json.dumps(res, indent=1) + "\n")
    for row in out["compare"]:
        print(f"{row['layout']:>12} {row['set']:>8} fps meas {row['env_fps_measured']:8.0f} "
              f"pred {row['env_fps_predicted']:8.0f} ({row['env_fps_rel_err']:+.1%})  ups meas "
              f"{row['updates_per_s_measured']:7.0f} pred {row['updates_per_s_predicted']:7.0f} "
              f"({row['updates_per_s_rel_err']:+.1%})  limit {row['limit']}")
    print(json.dumps({k: out[k] for k in ("constants", "ablations", "held_out_median_abs_rel_err",
                                          "fit_median_abs_rel_err")}))


FIG_ACTORS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024]
FIG_LEARNERS = (1, 4, 16)


def model_run(ratio: str, m: int, n: int) -> dict:
    """``predict``'s run for the CartPole config at ``ratio`` with m learners, n actors."""
    from hpcdqn.config import load_config
    from hpcdqn.rl.schedule import Schedule

    cfg = load_config(str(ROOT / "configs/cartpole.toml"),
                      [f"actors={n}", f"total_steps={TOTAL_STEPS}", "dqn.learning_starts=256",
                       *RATIOS[ratio]])
    sched = Schedule.resolve(cfg, m, n)
    s = {"num_envs": sched.num_envs, "train_every": sched.train_every,
         "updates_per_phase": sched.updates_per_phase, "n_iters": sched.n_iters,
         "learn_start": sched.learn_start, "steps_per_iter": sched.steps_per_iter,
         "total_updates": sched.total_updates}
    return rm.run_from_schedule(s, m, n, cfg["actor"], PARAM_BYTES, OBS_BYTES)


PARAM_BYTES = 4 * 67586     # CartPole's 4-256-256-2 MLP


def curves(c: dict, ratio: str) -> dict:
    """Predicted steady rates, one core per rank, actors and learners on separate nodes."""
    out = {}
    for m in FIG_LEARNERS:
        rows = []
        for n in (x for x in FIG_ACTORS if x >= m):
            p = rm.predict(c, model_run(ratio, m, n), cores=0, remote=True)
            rows.append({"actors": n, "env_fps": p["steady_env_fps"],
                         "updates_per_s": p["steady_updates_per_s"], "limit": p["limit"]})
        out[str(m)] = rows
    return out


def figure(a) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = json.loads(Path(a.file).read_text())
    c, cores = res["constants"], res["cpus"]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    measured_max = max(n for _, n in LAYOUTS)
    res["figure"] = {}
    for col, ratio in enumerate(("rr32", "rr2")):
        cv = curves(c, ratio)
        res["figure"][ratio] = cv
        for row, q in enumerate(("env_fps", "updates_per_s")):
            ax = axes[row][col]
            ax.axvspan(0.8, measured_max + 0.5, color="0.9", zorder=0)
            for i, (m, rows) in enumerate(cv.items()):
                ax.plot([r["actors"] for r in rows], [r[q] for r in rows], color=f"C{i}", lw=1.5,
                        ls="--", label=f"model, {m} learner{'s' if m != '1' else ''}, a core per "
                                       "rank, across nodes (extrapolated)")
            for m in (1, 2):        # this machine: 2 shared cores, measured and predicted
                ks = sorted((n, k) for k in res["measured"] if k.endswith(ratio)
                            for mm, n in [tuple(map(int, k.split("/")[0][:-1].split("L+")))]
                            if mm == m)
                if not ks:
                    continue
                meas = [res["measured"][k][q] for _, k in ks]
                ax.errorbar([n for n, _ in ks], [x["median"] for x in meas],
                            yerr=[[x["median"] - x["min"] for x in meas], [x["max"] - x["median"] for x in meas]],
                            fmt="o" if m == 1 else "s", color="k", ms=4, capsize=2,
                            label=f"measured here, {m} learner{'s' if m > 1 else ''} + N actors on "
                                  f"{cores} shared cores (median, range)")
                pred = [next(r for r in res["compare"] if r["layout"] == k)[f"{q}_predicted"] for _, k in ks]
                ax.plot([n for n, _ in ks], pred, "x", color="r", ms=6,
                        label=f"model of the measured layouts ({cores} shared cores)" if m == 1 else None)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.set_ylabel({"env_fps": "env frames/s",
                           "updates_per_s": "updates/s (global batch M x 64)"}[q])
            if row == 0:
                ax.set_title(f"CartPole, replay ratio {ratio[2:]}; shaded: the layouts measured "
                             f"(N <= {measured_max})", fontsize=9)
            if row == 1:
                ax.set_xlabel("actor ranks N")
    handles, labels = axes[0][1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7.5, loc="lower center", ncol=2)
    fig.suptitle("Actor ranks and learner ranks: predicted steady rates (cost model with roles, "
                 "constants measured on a 2-core VM)", fontsize=10)
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    fig.savefig(a.out, dpi=110)
    Path(a.file).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {a.out}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("measure", "fit", "figure"))
    ap.add_argument("--out", default=str(ROOT / "docs/actors_costmodel.png"), help="figure: the PNG")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--wrap", default="", help="command put before each mpirun (a CPU lock)")
    ap.add_argument("--file", default=str(OUT), help="results file (fit: read and rewritten)")
    ap.add_argument("--only", nargs="+", default=None, help="measure: only these layouts")
    ap.add_argument("--append", action="store_true", help="add to the stored runs")
    a = ap.parse_args()
    {"measure": measure, "fit": fit, "figure": figure}[a.what](a)


if __name__ == "__main__":
    main()
