"""Learning benchmark: the default CartPole-v1 config, one rank, several seeds.

    python benchmarks/learning.py [--seeds 1,2,3,4,5 | --seeds 1-30] [--parallel 2] [KEY=VALUE ...]

Runs ``hpcdqn train`` once per seed (``--parallel`` at a time, one thread each) and prints one
JSON object: each seed's final greedy evaluation (100 episodes) and how many reached the bar.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor


def run_seed(seed, overrides, out):
    cmd = [sys.executable, "-m", "hpcdqn.cli", "train", f"seed={seed}", f"run_dir={out}/s{seed}",
           "log.progress=false", "log.tensorboard=false", *overrides]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        return {"seed": seed, "error": r.stderr[-2000:]}
    s = json.loads(r.stdout.strip().splitlines()[-1])
    return {"seed": seed, "eval_return_mean": s["eval_return_mean"],
            "eval_return_std": s["eval_return_std"], "env_steps": s["env_steps"],
            "wall_s": s["wall_s"], "sps": s["sps"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="1,2,3,4,5")
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--threshold", type=float, default=475.0)
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    seeds = [i for part in a.seeds.split(",")            # "1,2,5" or "1-30"
             for i in range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1)]
    out = a.out or tempfile.mkdtemp(prefix="hpcdqn-learning-")
    t = time.perf_counter()
    with ThreadPoolExecutor(a.parallel) as ex:
        res = list(ex.map(lambda s: run_seed(s, a.overrides, out), seeds))
    ok = [r for r in res if r.get("eval_return_mean", -1) >= a.threshold]
    print(json.dumps({"benchmark": "learning", "env_id": "CartPole-v1", "overrides": a.overrides,
                      "threshold": a.threshold, "seeds": res, "reached": len(ok),
                      "of": len(seeds), "wall_s": round(time.perf_counter() - t, 1),
                      "run_dirs": out}))


if __name__ == "__main__":
    main()
