"""The memory planner checked on image networks: planned vs measured peak RSS per rank.

    python benchmarks/planner_images.py [--steps 24000] [--buffer 16000] [--out FILE]

Runs ``hpcdqn train`` (real mpirun) on Pong (``configs/atari_pong.toml``: Nature CNN, frame
replay) and Breakout with episodic life (``configs/atari_breakout.toml``: a lost life starts an
episode, many episode starts), each at dp=1 (one rank) and pp=2 (two ranks), with a replay of
``--buffer`` transitions run past capacity (``--steps`` > buffer: the ring wraps, the start store
holds a full ring's episode starts); ``--only none`` re-summarises ``--out`` alone. Per rank: the plan's peak (``planned_rss``: baseline + the
planner's categories, what ``hpcdqn plan`` prints) and the measured peak (``peak_rss``: VmHWM
from /proc) from summary.json, and their ratio (the planner's target: 1.0-1.15x). Per run: the
episode-start rate seen (env steps over the episode starts: games in metrics.csv times the
starts per game, 5 lives in Breakout with episodic life) against the rate the start store was
planned for (``replay.episode_steps``), and the load average before it.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIVES = {"pong": 1, "breakout": 5}   # episode starts per game with episodic life (Pong: no lives)
RUNS = [("pong", "atari_pong.toml", 1), ("pong", "atari_pong.toml", 2),
        ("breakout", "atari_breakout.toml", 1), ("breakout", "atari_breakout.toml", 2)]


def run(name: str, conf: str, pp: int, a, tmp: Path) -> dict:
    from hpcdqn.cluster.scale import child_env
    from hpcdqn.config import load_config
    from hpcdqn.rl.framereplay import planned_episode_steps

    run_dir = tmp / f"{name}_pp{pp}"
    exe = shutil.which("mpirun") or shutil.which("mpiexec")
    cmd = [exe, "-n", str(pp), "--bind-to", "none", sys.executable, "-m", "hpcdqn.cli", "train",
           "--config", str(ROOT / "configs" / conf), f"pp={pp}", f"total_steps={a.steps}",
           f"dqn.buffer_size={a.buffer}", f"dqn.learning_starts={a.learning_starts}",
           "eval.episodes=0", "checkpoint=false", "log.progress=false", "log.tensorboard=false",
           f"run_dir={run_dir}"]
    load = Path("/proc/loadavg").read_text().split()[:3]
    r = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=a.timeout)
    if r.returncode:
        raise SystemExit(f"{cmd} failed:\n{r.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    with open(run_dir / "metrics.csv") as f:
        last = list(csv.DictReader(f))[-1]
    cfg = load_config(ROOT / "configs" / conf)
    episodes, steps = int(last["episodes"]), int(summary["env_steps"])
    ranks = [{"rank": m["rank"], "planned_rss_mib": round(m["planned_rss"] / 2**20, 1),
              "peak_rss_mib": round(m["peak_rss"] / 2**20, 1),
              "ratio": round(m["planned_rss"] / m["peak_rss"], 3)}
             for m in summary["memory_per_rank"]]
    return {"game": name, "pp": pp, "ranks": ranks, "env_steps": steps, "episodes": episodes,
            "steps_per_episode_seen": round(steps / max(1, episodes), 1),
            "steps_per_episode_planned": planned_episode_steps(cfg["replay"]),
            "loadavg_before": load, "plan": summary["execution_plan"]["gradient"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=24000)
    ap.add_argument("--buffer", type=int, default=16000)
    ap.add_argument("--learning-starts", type=int, default=2000)
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--only", default="", help="comma-separated game_ppN names to run")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "planner_images.json"))
    a = ap.parse_args()
    out_path = Path(a.out)
    old = json.loads(out_path.read_text()) if out_path.exists() else {"runs": []}
    keep = {(r["game"], r["pp"]): {"commit": old.get("commit"), **r} for r in old["runs"]}
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        for name, conf, pp in RUNS:
            if a.only and f"{name}_pp{pp}" not in a.only.split(","):
                continue
            t = time.time()
            res = run(name, conf, pp, a, Path(tmp))
            res["wall_s"] = round(time.time() - t, 1)
            res["commit"] = commit
            keep[(name, pp)] = res
            print(json.dumps(res), flush=True)
    runs = sorted(keep.values(), key=lambda r: (r["game"] != "pong", r["pp"]))
    for r in runs:      # metrics.csv counts games; with episodic life each lost life is a start
        r["starts_per_game"] = LIVES[r["game"]]
        r["steps_per_start_seen"] = round(r["env_steps"] / max(1, r["episodes"] * LIVES[r["game"]]), 1)
    ratios = [k["ratio"] for r in runs for k in r["ranks"]]
    out = {"commit": sorted({r["commit"] for r in runs if r.get("commit")}), "env_steps": a.steps, "buffer_size": a.buffer, "runs": runs,
           "ratio_min_max": [min(ratios), max(ratios)],
           "verdict": ("planned / measured peak RSS within [1.0, 1.15] on every rank"
                       if all(1.0 <= x <= 1.15 for x in ratios) else
                       "planned / measured peak RSS OUTSIDE [1.0, 1.15] on some rank")}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
