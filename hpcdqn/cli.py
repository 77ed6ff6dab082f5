"""Command line: ``hpcdqn train|eval|info``.

    hpcdqn train [--config FILE] [KEY=VALUE ...]
    mpirun -n 4 hpcdqn train pp=2 micro_batches=8 schedule=1f1b
    hpcdqn eval RUN_DIR [--episodes N]
    hpcdqn info
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _cmd_train(args) -> int:
    from .config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"hpcdqn train: config error: {e}", file=sys.stderr)
        return 2
    from .grid import LayoutError
    from .lifecycle import abort_on_exception
    from .train import train

    try:
        summary = abort_on_exception(train, cfg)
    except LayoutError as e:
        print(f"hpcdqn train: layout error: {e}", file=sys.stderr)
        return 2
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_rank() == 0:
        print(json.dumps(summary), flush=True)
    return 0


def _cmd_eval(args) -> int:
    from pathlib import Path

    import torch

    from .evaluate import evaluate
    from .modelfile import load_model

    run = Path(args.run_dir)
    path = run / "model.h5" if run.is_dir() else run
    try:
        net, cfg, _, _ = load_model(path)
    except (FileNotFoundError, ValueError) as e:
        print(f"hpcdqn eval: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, cfg.get("threads", 1)))

    @torch.no_grad()
    def policy(obs):
        return net(torch.as_tensor(obs)).argmax(1).numpy()

    episodes = args.episodes or cfg["eval"]["episodes"] or 10
    n_envs = min(cfg["eval"]["num_envs"], episodes)
    while episodes % n_envs:
        n_envs -= 1
    res = evaluate(policy, args.env_id or cfg["env_id"], episodes, n_envs,
                   args.seed if args.seed is not None else cfg["seed"] + 10_000_000, args.epsilon)
    res["run_dir"] = str(run)
    print(json.dumps(res))
    return 0


def _cmd_info(args) -> int:
    from .info import collect

    info = collect()
    if args.json:
        print(json.dumps(info))
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            print(f"{k:<{width}}  {v}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hpcdqn", description="Deep Q-Networks on HPC systems.")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train a DQN (under mpirun/srun: data x pipeline parallel)",
                       description="Train. KEY=VALUE overrides any config key by its own name "
                                   "(dotted for a section: dqn.lr=1e-3). Keys:\n",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--config", help="TOML config file (default: the CartPole-v1 defaults)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    t.set_defaults(fn=_cmd_train)

    e = sub.add_parser("eval", help="greedy evaluation of a trained run; prints JSON")
    e.add_argument("run_dir", help="run directory (or a model.h5 file)")
    e.add_argument("--episodes", type=int, default=None)
    e.add_argument("--epsilon", type=float, default=0.0)
    e.add_argument("--seed", type=int, default=None)
    e.add_argument("--env-id", default=None, help="evaluate on another env id (same spaces)")
    e.set_defaults(fn=_cmd_eval)

    i = sub.add_parser("info", help="versions, MPI and HDF5 capabilities, world size, device")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=_cmd_info)

    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["train"] and any(a in ("-h", "--help") for a in argv[1:]):
        from .config import describe

        t.description += describe()
    args = p.parse_args(argv)
    if getattr(args, "resume", None):
        args.overrides = list(args.overrides)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return args.fn(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
