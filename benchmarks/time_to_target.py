"""Time to target on CartPole-v1: the default config at dp = 1, 2, 4, five seeds, every
data-parallel rule (``scaling.rule``), one command.

    python benchmarks/time_to_target.py [--seeds 1-5] [--ranks 1,2,4] [--work DIR] [--lock FILE]

Runs ``hpcdqn scale --mode target --target-return 475`` (hpcdqn/cluster/target.py: 10 greedy
episodes every 2,500 global env steps, evaluation time left out of the wall-clock, the trainer's
final 100-episode evaluation), keeps the runs in ``--work`` (finished runs are reused, so an
interrupted benchmark continues) and writes ``benchmarks/results/time_to_target_cartpole.json``
and ``docs/time_to_target.png``. Wall-clock figures at dp above the machine's cores are
oversubscribed (``meta.oversubscribed_dp``): no speed-up claim there.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hpcdqn.cluster.target import parse_seeds, run_target_study  # noqa: E402
from hpcdqn.cluster.scale import parse_ranks  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="1-5")
    ap.add_argument("--ranks", default="1,2,4")
    ap.add_argument("--rule", default="global_batch,sqrt_lr,linear_lr")
    ap.add_argument("--work", default="/tmp/hpcdqn-time-to-target")
    ap.add_argument("--lock", default=None, help="flock FILE around each training run")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    args = argparse.Namespace(
        target_return=475.0, ranks=parse_ranks(a.ranks), seeds=parse_seeds(a.seeds), rule=a.rule,
        eval_every=2500, eval_episodes=10, lock=a.lock, out=a.work, config=None,
        overrides=a.overrides, launcher="auto", timeout=3600.0)
    res = run_target_study(args)
    out = ROOT / "benchmarks" / "results" / "time_to_target_cartpole.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    res["meta"]["command"] = "python benchmarks/time_to_target.py " + " ".join(sys.argv[1:])
    out.write_text(json.dumps(res, indent=1))
    shutil.copy(Path(a.work) / "target.png", ROOT / "docs" / "time_to_target.png")
    print(json.dumps({"benchmark": "time_to_target", "summary": res["summary"],
                      "json": str(out), "png": "docs/time_to_target.png"}))


if __name__ == "__main__":
    main()
