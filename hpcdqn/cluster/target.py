"""`hpcdqn scale --mode target`: time to target over data-parallel rank counts and seeds.

    hpcdqn scale --mode target --target-return 475 --ranks 1,2,4 --seeds 1-5 \\
        --rule global_batch,sqrt_lr,linear_lr --out DIR [--config F] [--lock FILE] [KEY=VALUE ...]

For every rule, rank count ``dp`` and seed one ``hpcdqn train`` runs (``mpirun -n dp``, or
``srun`` inside a Slurm allocation) with ``scaling.rule`` set, checkpoints off and a periodic
greedy evaluation: ``--eval-episodes`` episodes (default 10) every ``--eval-every`` global env
steps (default 2,500), the same env steps at every ``dp``. Their time is left out of the run's
wall-clock (``train.Trainer.periodic_eval``). At ``dp = 1`` every rule is the same run, so it runs
once and serves all rules.

Per run: **env steps to target** and **wall-clock to target** are those of the first periodic
evaluation whose mean return reaches ``--target-return`` (the run's training time: the loop
from its first step, evaluations excluded, start-up excluded); a run that never reaches it
counts as infinite. Also the final greedy evaluation (the trainer's, ``eval.episodes``).
Per rule and ``dp``: medians over seeds (None when half or more never reach the target), how
many reached it, and the ratios ``median(dp=1) / median(dp)`` (above 1: sooner).

Outputs in ``--out``: ``target_runs.csv`` (one row per run), ``target.json`` (everything, with
the cadence, the cores of this machine and which rank counts oversubscribe them: there the
wall-clock is no speed-up claim), ``target.png`` (per rule: the evaluation return against env
steps and against wall-clock, thin lines per seed, thick the median per ``dp``) and ``runs/``.
Finished runs (a ``summary.json`` in their directory) are reused, so an interrupted study
continues; delete a run's directory to redo it. ``--lock FILE`` runs each training under
``flock FILE`` (one run at a time on a machine shared with other jobs).
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path

from hpcdqn.cluster.scale import ScaleError, child_env, in_allocation, launch_cmd, parse_ranks

RUN_COLUMNS = ["rule", "dp", "seed", "steps_to_target", "wall_to_target_s", "final_eval_mean",
               "final_eval_std", "final_solved", "env_steps", "updates", "wall_s", "eval_s",
               "run_dir"]
RULES = ("global_batch", "sqrt_lr", "linear_lr")


def parse_seeds(text: str) -> list[int]:
    """``"1-5"`` or ``"1,3,7"`` (or both: ``"1-3,9"``)."""
    try:
        out = []
        for part in (p.strip() for p in text.split(",") if p.strip()):
            lo, _, hi = part.partition("-")
            out += range(int(lo), int(hi or lo) + 1)
    except ValueError:
        raise ScaleError(f"--seeds {text!r}: expected e.g. 1-5 or 1,2,3") from None
    if not out:
        raise ScaleError(f"--seeds {text!r}: no seeds")
    return sorted(set(out))


def parse_rules(text: str | None, default: str) -> list[str]:
    rules = [r.strip() for r in (text or default).split(",") if r.strip()]
    bad = [r for r in rules if r not in RULES]
    if bad or not rules:
        raise ScaleError(f"--rule {text!r}: use one or more of {', '.join(RULES)} (comma separated)")
    return rules


def first_reach(rows: list[dict], target: float) -> tuple[int | None, float | None]:
    """(env steps, wall-clock s) of the first evaluation row whose mean return reaches target."""
    for r in rows:
        if float(r["eval_return_mean"]) >= target:
            return int(r["env_steps"]), float(r["wall_s"])
    return None, None


def median_or_none(values: list) -> float | None:
    """The median counting None (never reached) as infinite; None if that median is infinite."""
    xs = sorted(math.inf if v is None else float(v) for v in values)
    if not xs:
        return None
    m = statistics.median(xs)
    return None if math.isinf(m) else m


def run_one(cmd: list[str], run_dir: Path, timeout: float) -> dict:
    """One training run (skipped when its summary exists); returns its summary."""
    summary = run_dir / "summary.json"
    if not summary.exists():
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        log = run_dir.parent / f"{run_dir.name}.log"
        with open(log, "w") as fh:
            fh.write("$ " + " ".join(cmd) + "\n")
            fh.flush()
            p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=child_env(),
                                 start_new_session=True)
            try:
                rc = p.wait(timeout=timeout)
            except BaseException:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                raise
        if rc != 0 or not summary.exists():
            tail = log.read_text(errors="replace")[-3000:]
            raise ScaleError(f"run failed ({rc}): {' '.join(cmd)}\n{tail}")
    return json.loads(summary.read_text())


def run_row(rule: str, dp: int, seed: int, run_dir: Path, summary: dict, target: float) -> dict:
    with open(run_dir / "eval.csv", newline="") as fh:
        evals = list(csv.DictReader(fh))
    steps, wall = first_reach(evals, target)
    final = summary.get("eval_return_mean")
    return {"rule": rule, "dp": dp, "seed": seed, "steps_to_target": steps,
            "wall_to_target_s": wall, "final_eval_mean": final,
            "final_eval_std": summary.get("eval_return_std"),
            "final_solved": final is not None and final >= target,
            "env_steps": summary["env_steps"], "updates": summary["updates"],
            "wall_s": summary["wall_s"], "eval_s": summary.get("eval_s"), "run_dir": str(run_dir),
            "curve": [(int(r["env_steps"]), float(r["wall_s"]), float(r["eval_return_mean"]))
                      for r in evals]}


def study_runs(a, out: Path, cfg: dict, log=print) -> list[dict]:
    """Every (rule, dp, seed) run of the study (dp = 1 once for all rules)."""
    launcher = a.launcher if a.launcher != "auto" else ("srun" if in_allocation() else "mpirun")
    rows, pp = [], cfg["pp"]
    for p in a.ranks:
        if p % pp or (a.eval_every % (cfg["num_envs"] * (p // pp))):
            raise ScaleError(f"--ranks {p}: needs a multiple of pp={pp}, and --eval-every "
                             f"{a.eval_every} a multiple of num_envs x dp (so every dp evaluates "
                             "at the same env steps)")
    for rule in a.rules:
        for p in a.ranks:
            dp = p // pp
            for seed in a.seeds:
                name = f"dp1_s{seed}" if dp == 1 else f"{rule}_dp{dp}_s{seed}"
                run_dir = out / "runs" / name
                cmd = (["flock", a.lock] if a.lock else []) + launch_cmd(p, launcher) + [
                    sys.executable, "-m", "hpcdqn.cli", "train"] + (
                    ["--config", a.config] if a.config else []) + [
                    f"seed={seed}", f"scaling.rule={rule}", f"eval.every={a.eval_every}",
                    f"eval.every_episodes={a.eval_episodes}", "checkpoint=false",
                    "log.progress=false", "log.tensorboard=false", f"run_dir={run_dir}",
                    *a.overrides]
                done = (run_dir / "summary.json").exists()
                log(f"hpcdqn scale target: {rule} dp={dp} seed={seed}: "
                    f"{'reusing ' if done else ''}{run_dir}", flush=True)
                s = run_one(cmd, run_dir, a.timeout)
                rows.append(run_row(rule, dp, seed, run_dir, s, a.target_return))
                r = rows[-1]
                log(f"  steps to target {r['steps_to_target']}, wall {r['wall_to_target_s']} s, "
                    f"final eval {r['final_eval_mean']}", flush=True)
    return rows


def summarize(rows: list[dict], rules: list[str], target: float) -> list[dict]:
    """Per rule and dp: medians over seeds, how many reached, ratios vs dp = 1."""
    out = []
    for rule in rules:
        mine = [r for r in rows if r["rule"] == rule]
        base = None
        for dp in sorted({r["dp"] for r in mine}):
            rs = [r for r in mine if r["dp"] == dp]
            m = {"rule": rule, "dp": dp, "seeds": len(rs),
                 "reached": sum(r["steps_to_target"] is not None for r in rs),
                 "final_solved": sum(bool(r["final_solved"]) for r in rs),
                 "median_steps_to_target": median_or_none([r["steps_to_target"] for r in rs]),
                 "median_wall_to_target_s": median_or_none([r["wall_to_target_s"] for r in rs]),
                 "median_final_eval": statistics.median(evals) if (evals := [
                     r["final_eval_mean"] for r in rs if r["final_eval_mean"] is not None])
                 else None,       # no final evaluation (eval.episodes=0): none to report, not 0
                 "final_evals": [r["final_eval_mean"] for r in rs]}
            if dp == 1:
                base = m
            for k, key in (("steps_ratio_vs_dp1", "median_steps_to_target"),
                           ("wall_ratio_vs_dp1", "median_wall_to_target_s")):
                ok = base is not None and base[key] and m[key]
                m[k] = round(base[key] / m[key], 3) if ok else None
            out.append(m)
    return out


def plot(path: Path, rows: list[dict], rules: list[str], target: float, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rules), 2, figsize=(11, 3.6 * len(rules)), squeeze=False)
    colors = {1: "tab:blue", 2: "tab:orange", 4: "tab:green", 8: "tab:red", 16: "tab:purple"}
    for i, rule in enumerate(rules):
        for j, (x, label) in enumerate(((0, "global env steps"), (1, "wall-clock s (training)"))):
            ax = axes[i][j]
            for dp in sorted({r["dp"] for r in rows if r["rule"] == rule}):
                curves = [r["curve"] for r in rows if r["rule"] == rule and r["dp"] == dp]
                c = colors.get(dp)
                for cv in curves:
                    ax.plot([p[x] for p in cv], [p[2] for p in cv], color=c, alpha=0.25, lw=0.8)
                n = min(len(cv) for cv in curves)
                med = [(statistics.median(cv[k][x] for cv in curves),
                        statistics.median(cv[k][2] for cv in curves)) for k in range(n)]
                over = " (oversubscribed)" if dp in meta["oversubscribed_dp"] else ""
                ax.plot([m[0] for m in med], [m[1] for m in med], color=c, lw=2.2,
                        label=f"dp={dp}{over}: median of {len(curves)} seeds")
            ax.axhline(target, color="k", ls="--", lw=0.8)
            ax.set_xlabel(label)
            ax.set_ylabel("greedy eval return")
            ax.set_title(f"scaling.rule={rule}: return vs {label.split(' (')[0]}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"time to target {target:g}: {meta['eval_episodes']} greedy episodes every "
                 f"{meta['eval_every']} env steps; {meta['cores']} cores", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_target_study(a, log=print) -> dict:
    from hpcdqn.config import load_config

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(a.config, a.overrides)
    a.rules = parse_rules(a.rule, cfg["scaling"]["rule"])
    rows = study_runs(a, out, cfg, log)
    cores = os.cpu_count() or 1
    meta = {"target_return": a.target_return, "eval_every": a.eval_every,
            "eval_episodes": a.eval_episodes, "final_eval_episodes": cfg["eval"]["episodes"],
            "ranks": a.ranks, "seeds": a.seeds, "rules": a.rules, "config": a.config,
            "overrides": list(a.overrides), "total_steps": cfg["total_steps"], "cores": cores,
            "oversubscribed_dp": [p // cfg["pp"] for p in a.ranks if p > cores],
            "wall_clock": "training loop only: start-up and periodic evaluations excluded"}
    summary = summarize(rows, a.rules, a.target_return)
    with open(out / "target_runs.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=RUN_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    res = {"meta": meta, "summary": summary, "runs": rows}
    (out / "target.json").write_text(json.dumps(res, indent=1))
    plot(out / "target.png", rows, a.rules, a.target_return, meta)
    for m in summary:
        log(f"{m['rule']:>12} dp={m['dp']}: reached {m['reached']}/{m['seeds']}, median env "
            f"steps to target {m['median_steps_to_target']} (x{m['steps_ratio_vs_dp1']} vs dp=1), "
            f"wall {m['median_wall_to_target_s']} s (x{m['wall_ratio_vs_dp1']}); final eval >= "
            f"{a.target_return:g}: {m['final_solved']}/{m['seeds']} {m['final_evals']}")
    return res


def main_cli(args) -> int:
    from hpcdqn.config import ConfigError

    try:
        if args.target_return is None:
            raise ScaleError("--mode target needs --target-return R (e.g. 475 for CartPole-v1)")
        if not args.ranks:
            raise ScaleError("--ranks is required (e.g. --ranks 1,2,4)")
        args.ranks = parse_ranks(args.ranks)
        args.seeds = parse_seeds(args.seeds)
        run_target_study(args)
    except (ScaleError, ConfigError) as e:
        print(f"hpcdqn scale: {e}", file=sys.stderr)
        return 2
    return 0
