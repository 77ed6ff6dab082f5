"""`hpcdqn scale --mode roles`: an actor-learner scaling study with the time split per role, and
the cost model with roles (``parallel.roles_model``) held against it.

    hpcdqn scale --mode roles --ranks L --actors 1,2,4 --out DIR [--repeats R] [KEY=VALUE ...]

Each repeat runs ``actors=N`` for every ``N`` of ``--actors`` (interleaved: repeat 0 over every
``N``, then repeat 1, ...) on ``L + N`` ranks (``L`` learner ranks: ``dp x pp``), with
checkpoints off, and reads the run's ``summary.json``: env frames/s and learner updates/s, the
replay ratio achieved, and each role's time split (actor: env, inference, send, wait; learner:
receive and insert, wait for data, sample, update, allreduce), averaged over the ranks of the
role. The model: its per-role constants are measured from the smallest ``N``'s runs
(``constants_from_summaries``), its scheduling efficiencies are fitted on the second smallest
where there are three or more ``N`` (else the committed defaults), and every other ``N`` is held
out: the study reports the model's median |error| there.

Outputs in ``--out``: ``roles.csv`` (one row per run), ``roles.json`` (meta, constants, the
held-out test), ``roles.png`` (rates against actor ranks with the model; the time split per role),
``runs/`` and ``logs/``.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from hpcdqn.cluster.scale import (STUDY_DEFAULTS, ScaleError, cores, launch_cmd, loadavg, parse_ranks,
                                  run_launcher)
from hpcdqn.parallel.roles_model import (DEFAULT_CONSTANTS, constants_from_summaries, fit_eta,
                                         predict, rel_err, run_of_summary)

ACTOR_SPLIT = ("env", "inference", "send", "wait")
LEARNER_SPLIT = ("receive_insert", "wait_data", "sample", "update", "allreduce")
COLUMNS = ["learners", "actors", "job_ranks", "repeat", "oversubscribed", "env_steps_per_s",
           "updates_per_s", "replay_ratio_achieved", "replay_ratio_configured",
           "actor_env_steps_per_s", *[f"actor_{k}_share" for k in ACTOR_SPLIT],
           *[f"learner_{k}_share" for k in LEARNER_SPLIT], "predicted_env_steps_per_s",
           "model_role", "rel_err", "wall_s", "run_dir"]


def commit() -> str | None:
    """The checkout's commit, where the package runs from one (else None)."""
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                           cwd=Path(__file__).resolve().parents[2], timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() or None if r.returncode == 0 else None


def role_shares(summary: dict) -> dict:
    """A run's time split per role: each rank's seconds over its own wall time, averaged over the
    ranks of the role; and an actor's env frames/s."""
    ranks = summary["ranks"]
    actors = [r for r in ranks if r["role"] == "actor"]
    learners = [r for r in ranks if r["role"] == "learner"]
    if not actors or not learners:
        raise ScaleError(f"{summary.get('run_dir')}: not an actor-learner run (roles "
                         f"{sorted({r['role'] for r in ranks})})")
    mean = statistics.fmean
    out = {f"actor_{k}_share": mean(a[f"{k}_s"] / a["wall_s"] for a in actors) for k in ACTOR_SPLIT}
    out["actor_env_steps_per_s"] = mean(a["env_steps"] / a["wall_s"] for a in actors)
    wall = summary["wall_s"]
    out.update({f"learner_{k}_share": mean(r.get(f"{k}_s", 0.0) / wall for r in learners)
                for k in LEARNER_SPLIT})
    return out


def run_point(learners: int, actors: int, r: int, config, overrides, launcher: str, out: Path,
              timeout: float, log) -> tuple[dict, dict]:
    """One run with ``actors`` actor ranks beside ``learners`` learner ranks: its row and its
    summary."""
    p = learners + actors
    name = f"roles_l{learners}_a{actors}_r{r}"
    run_dir = out / "runs" / name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cfg_args = ["--config", str(config)] if config else []
    cmd = launch_cmd(p, launcher) + [sys.executable, "-m", "hpcdqn.cli", "train", *cfg_args,
                                     *STUDY_DEFAULTS, *overrides, f"actors={actors}",
                                     f"run_dir={run_dir}"]
    t = time.perf_counter()
    run_launcher(cmd, timeout, out / "logs" / f"{name}.log")
    s = json.loads((run_dir / "summary.json").read_text())
    if s.get("job_ranks") != p or s.get("actors") != actors:
        raise ScaleError(f"asked for {learners} learner + {actors} actor ranks, the run had "
                         f"{s.get('job_ranks')} ranks with {s.get('actors')} actors")
    row = {"learners": s["world"], "actors": actors, "job_ranks": p, "repeat": r,
           "oversubscribed": p > cores(), "env_steps_per_s": s["env_steps"] / s["wall_s"],
           "updates_per_s": s["updates"] / s["wall_s"],
           "replay_ratio_achieved": s["replay_ratio_achieved"],
           "replay_ratio_configured": s["replay_ratio_configured"], **role_shares(s),
           "wall_s": s["wall_s"], "run_dir": str(run_dir)}
    log(f"  {learners} learner(s) + {actors} actor(s), repeat {r}: {row['env_steps_per_s']:.1f} "
        f"env frames/s, {row['updates_per_s']:.1f} updates/s; actor: " + ", ".join(
            f"{k} {100 * row[f'actor_{k}_share']:.0f}%" for k in ACTOR_SPLIT) + "; learner: "
        + ", ".join(f"{k} {100 * row[f'learner_{k}_share']:.0f}%" for k in LEARNER_SPLIT)
        + f" ({time.perf_counter() - t:.0f}s){' [oversubscribed]' if row['oversubscribed'] else ''}")
    return row, s


def hold_out(rows: list[dict], summaries: list[dict], actor_cfg: dict, obs_bytes: int) -> dict:
    """The model's constants from the smallest actor count's runs, its efficiencies from the
    second smallest (with three or more counts; else the defaults), the rest held out; fills
    each row's prediction, role and error in place."""
    counts = sorted({r["actors"] for r in rows})
    first = [s for r, s in zip(rows, summaries) if r["actors"] == counts[0]]
    c = {**DEFAULT_CONSTANTS, **constants_from_summaries(first, actor_cfg, obs_bytes)}
    n_cores = cores()
    eta_on = counts[1] if len(counts) >= 3 else None
    if eta_on is not None:
        pts = [(run_of_summary(s, actor_cfg, obs_bytes), r["env_steps_per_s"])
               for r, s in zip(rows, summaries) if r["actors"] == eta_on]
        c.update(fit_eta(c, pts, n_cores))
    for r, s in zip(rows, summaries):
        pred = predict(c, run_of_summary(s, actor_cfg, obs_bytes), n_cores)
        r["predicted_env_steps_per_s"] = round(pred["env_fps"], 3)
        r["rel_err"] = round(rel_err(pred["env_fps"], r["env_steps_per_s"]), 4)
        r["model_role"] = ("constants" if r["actors"] == counts[0] else
                           "efficiencies" if r["actors"] == eta_on else "held out")
    held = [abs(r["rel_err"]) for r in rows if r["model_role"] == "held out"]
    return {"constants": c, "constants_from_actors": counts[0], "efficiencies_from_actors": eta_on,
            "held_out_actors": [n for n in counts if n not in (counts[0], eta_on)],
            "held_out_median_abs_rel_err": statistics.median(held) if held else None,
            "cores": n_cores}


def obs_nbytes(env_cfg, seed: int) -> int:
    """Bytes of one observation of the run's env (``config.EnvConfig``)."""
    from hpcdqn.rl.envs import make_vector_env

    env = make_vector_env(env_cfg.env_id, 1, seed, "sync", env_cfg.atari)
    try:
        sp = env.single_observation_space
        return int(sp.dtype.itemsize) * math.prod(sp.shape)
    finally:
        env.close()


def run_roles_study(learners: int, actors: list[int], out: Path, repeats: int = 1, config=None,
                    overrides=(), launcher: str = "auto", timeout: float = 1800.0,
                    log=print) -> dict:
    from hpcdqn.cluster.scale import in_allocation
    from hpcdqn.config import env_config, load_config

    overrides = list(overrides)
    if any(o.split("=", 1)[0] == "actors" for o in overrides):
        raise ScaleError("give the actor counts with --actors, not actors=N")
    if not actors or min(actors) < 1:
        raise ScaleError("--actors needs actor counts >= 1, e.g. --actors 1,2,4")
    cfg = load_config(config, STUDY_DEFAULTS + overrides + [f"actors={max(actors)}"])
    if learners % cfg["pp"]:
        raise ScaleError(f"--ranks {learners} learner ranks is not a multiple of pp={cfg['pp']}")
    launcher = ("srun" if in_allocation() else "mpirun") if launcher == "auto" else launcher
    out = Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    log(f"hpcdqn scale: roles study, {learners} learner rank(s) + actors {actors} x {repeats} "
        f"repeat(s) (interleaved) with {launcher}, checkpoints off; total_steps={cfg['total_steps']}")
    rows, summaries, loads = [], [], [loadavg()]
    for r in range(repeats):
        for n in actors:
            row, s = run_point(learners, n, r, config, overrides, launcher, out, timeout, log)
            rows.append(row)
            summaries.append(s)
            loads.append(loadavg())
    model = hold_out(rows, summaries, cfg["actor"], obs_nbytes(env_config(cfg), cfg["seed"]))
    meta = {"mode": "roles", "commit": commit(), "learners": learners, "actors": actors,
            "repeats": repeats, "command": " ".join(sys.argv),
            "launcher": launcher, "host": socket.gethostname(), "env_id": cfg["env_id"],
            "total_steps": cfg["total_steps"], "cores": cores(), "loadavg_1m": loads}
    return finish(out, rows, meta, model, log)


def finish(out: Path, rows: list[dict], meta: dict, model: dict, log=print) -> dict:
    with open(out / "roles.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    (out / "roles.json").write_text(json.dumps({"meta": meta, "model": model, "rows": rows},
                                               indent=2))
    from hpcdqn.cluster.figures import plot_roles

    plot_roles(out / "roles.png", rows, model)
    for n in sorted({r["actors"] for r in rows}):
        g = [r for r in rows if r["actors"] == n]
        fps = statistics.median(r["env_steps_per_s"] for r in g)
        log(f"  actors={n}: median {fps:.1f} env frames/s [{min(r['env_steps_per_s'] for r in g):.1f}"
            f"-{max(r['env_steps_per_s'] for r in g):.1f}], model {g[0]['predicted_env_steps_per_s']:.1f}"
            f" ({g[0]['model_role']})")
    err = model["held_out_median_abs_rel_err"]
    log("hpcdqn scale: cost model with roles: constants from actors="
        f"{model['constants_from_actors']}, efficiencies from "
        f"{model['efficiencies_from_actors'] or 'the defaults'}; held out "
        + (f"actors={model['held_out_actors']}: median |error| {100 * err:.1f}%" if err is not None
           else "nothing (give three or more actor counts to test the model)"))
    log(f"hpcdqn scale: wrote {out / 'roles.csv'}, {out / 'roles.json'}, {out / 'roles.png'}")
    return {"rows": rows, "model": model, "meta": meta}


def main_cli(args) -> int:
    from hpcdqn.config import ConfigError

    try:
        ranks = parse_ranks(args.ranks or "")
        if len(ranks) != 1:
            raise ScaleError("--mode roles takes one learner rank count in --ranks (e.g. --ranks 1) "
                             "and the actor counts in --actors")
        run_roles_study(ranks[0], parse_ranks(args.actors or ""), Path(args.out), args.repeats,
                        args.config, args.overrides, args.launcher, args.timeout)
    except (ScaleError, ConfigError) as e:
        print(f"hpcdqn scale: {e}", file=sys.stderr)
        return 2
    return 0
