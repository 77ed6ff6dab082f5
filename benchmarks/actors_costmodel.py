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
"""

import argparse
import json
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
RATIOS = {"rr32": [], "rr2": ["dqn.gradient_steps=8"]}
LAYOUTS = [(1, 1), (1, 2), (1, 3), (2, 2), (1, 7)]
CALIBRATE, FIT = (1, 1), [(1, 3)]
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
            "summary": {k: s[k] for k in ("env_steps", "updates", "wall_s", "sps", "ups",
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
    order = [(m, n, r) for r in RATIOS for m, n in LAYOUTS]
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


def actor_cfg() -> dict:
    from hpcdqn.config import load_config
    return load_config(str(ROOT / "configs/cartpole.toml"), [])["actor"]


OBS_BYTES = 4 * 4           # CartPole-v1: 4 float32


def fit_and_hold_out(by: dict, cores: int) -> dict:
    """Constants from the calibration layout, eta from the fit layouts, predictions for all."""
    ac = actor_cfg()
    calib = [r["summary"] for k, rs in by.items() for r in rs if k.startswith(name(*CALIBRATE, ""))]
    c = rm.constants_from_summaries(calib, ac, OBS_BYTES)
    med = {k: {q: statistics.median(r[q] for r in rs) for q in ("env_fps", "updates_per_s")}
           for k, rs in by.items()}
    runs = {k: rm.run_of_summary(rs[0]["summary"], ac, OBS_BYTES) for k, rs in by.items()}
    fit_keys = [k for k in by if any(k.startswith(name(*f, "")) for f in FIT)]
    c.update(rm.fit_eta(c, [(runs[k], med[k]["env_fps"]) for k in fit_keys], cores))
    compare = []
    for k in by:
        p = rm.predict(c, runs[k], cores)
        held = not k.startswith(name(*CALIBRATE, "")) and k not in fit_keys
        compare.append({"layout": k, "set": "held_out" if held else "fit", "limit": p["limit"],
                        **{f"{q}_{w}": v for q in ("env_fps", "updates_per_s") for w, v in
                           (("measured", med[k][q]), ("predicted", p[q]),
                            ("rel_err", rm.rel_err(p[q], med[k][q])))}})
    errs = lambda s: [abs(r[f"{q}_rel_err"]) for r in compare if r["set"] == s   # noqa: E731
                      for q in ("env_fps", "updates_per_s")]
    return {"constants": c, "cores": cores, "calibrated_on": name(*CALIBRATE, "*"),
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
    print(json.dumps({k: out[k] for k in ("constants", "held_out_median_abs_rel_err",
                                          "fit_median_abs_rel_err")}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("measure", "fit"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--wrap", default="", help="command put before each mpirun (a CPU lock)")
    ap.add_argument("--file", default=str(OUT), help="results file (fit: read and rewritten)")
    ap.add_argument("--append", action="store_true", help="add to the stored runs")
    a = ap.parse_args()
    measure(a) if a.what == "measure" else fit(a)


if __name__ == "__main__":
    main()
