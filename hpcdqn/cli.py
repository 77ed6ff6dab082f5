"""Command line: ``hpcdqn train|plan|eval|info|scale``.

    hpcdqn train [--config FILE] [--mem-per-rank 6G] [--dry-run] [KEY=VALUE ...]
    hpcdqn plan [--config FILE] --ranks N [--mem-per-rank 6G] [KEY=VALUE ...]
    hpcdqn plan --ranks 4 --cores 2 actors=3 [--rates-from RUN/summary.json ...]  (expected rates)
    mpirun -n 4 hpcdqn train pp=2 micro_batches=8 schedule=1f1b
    hpcdqn scale --ranks 1,2,4 --mode weak --out DIR [--repeats R] [KEY=VALUE ...]
    hpcdqn scale --mode target --target-return 475 --ranks 1,2,4 --seeds 1-5 --out DIR
    hpcdqn scale --mode roles --ranks 1 --actors 1,2,4 --out DIR [--repeats R] [KEY=VALUE ...]
    mpirun -n 2 hpcdqn train --resume RUN_DIR [KEY=VALUE ...]   (another layout: reshard)
    hpcdqn eval RUN_DIR [--episodes N]
    hpcdqn export RUN_DIR_OR_CHECKPOINT --format minari OUT_DIR
    hpcdqn info
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# `hpcdqn train` exit status when a SIGUSR1 (Slurm's --signal=B:USR1@T warning, preemption) stopped
# training and a checkpoint was written: "checkpointed, requeue me" (slurm/train.sbatch requeues).
EXIT_CHECKPOINTED = 3

TRAIN_HELP = ("Train. KEY=VALUE overrides any config key by its own name "
              "(dotted for a section: dqn.lr=1e-3).\n\nUnits: every "
              "schedule key (total_steps, dqn.learning_starts, "
              "dqn.train_frequency, dqn.target_update_every, "
              "checkpoint_every, stop_after, log.every, eval.every) counts "
              "GLOBAL env steps, over all data-parallel replicas; "
              "dqn.exploration_fraction is a share of total_steps; "
              "dqn.buffer_size is the global replay capacity (buffer_size "
              "// dp per replica); what dqn.batch_size and dqn.lr mean at "
              "dp > 1 is scaling.rule's. The same config is the same run "
              "(warm-up share, exploration window, replay ratio) at any "
              "rank count, or stops with an error naming the key to change."
              " Rank 0 prints the resolved schedule at start.\n\nStalls: a rank that waits past "
              "watchdog.deadline_s at an agreed phase prints the phase and the ranks that have "
              "not arrived and aborts the job (exit status 3). A failed write (checkpoint, "
              "metrics.csv, eval.csv, summary.json, model.h5) stops every rank with one "
              "message and exit status 2.\n\nKeys:\n")


def _cmd_plan(args, world: int | None = None) -> int:
    """Per-rank memory by category for a layout, and the run's schedule figures; allocates
    nothing of the network or the replay. Exit 0 if every rank fits, 1 if not."""
    from hpcdqn.config import ConfigError, load_config
    from hpcdqn.learner.budget import describe_memory_plan, job_memory_plan
    from hpcdqn.parallel.grid import LayoutError
    from hpcdqn.sysinfo import ENV_CAP, fmt_bytes

    ranks = args.ranks or world or 1
    try:
        cfg = load_config(args.config, args.overrides)
        per_node = args.ranks_per_node or ranks
        res = job_memory_plan(cfg, ranks, per_node, args.mem_per_rank)
    except (ConfigError, LayoutError) as e:
        print(f"hpcdqn plan: config error: {e}", file=sys.stderr)
        return 2
    if res["actors"]:
        try:
            res["expected_rates"] = _expected_rates(args, cfg, res, per_node)
        except (OSError, ValueError, KeyError) as e:
            print(f"hpcdqn plan: --rates-from: {e}: pass summary.json files of actor runs "
                  "(actors > 0) of this config", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps(res))
    else:
        print(describe_memory_plan(res, res["mem_per_rank"], res["mem_per_rank_source"],
                                   res["baseline_rss"]))
        if "expected_rates" in res:
            from hpcdqn.parallel.roles_model import describe_rates
            print(describe_rates(res["expected_rates"]))
    if not res["fits"]:
        print(f"hpcdqn plan: WARNING: the largest rank needs {fmt_bytes(res['largest_rank_bytes'])}, "
              f"more than the {fmt_bytes(res['mem_per_rank'])} a rank may use "
              f"({res['mem_per_rank_source']}); use more pipeline stages, a smaller replay or "
              f"network, or raise --mem-per-rank / {ENV_CAP}", file=sys.stderr)
        return 1
    return 0


def _expected_rates(args, cfg: dict, plan: dict, per_node: int) -> dict:
    """The cost model with roles for ``plan`` (actors > 0): the committed defaults, or the
    constants of the actor runs whose ``summary.json`` files ``--rates-from`` names."""
    from pathlib import Path

    from hpcdqn.parallel import roles_model as rm

    constants, source = None, None
    rates_from = getattr(args, "rates_from", None)      # (train --dry-run has neither option)
    if rates_from:
        runs = [json.loads(Path(f).read_text()) for f in rates_from]
        constants = rm.constants_from_summaries(runs, cfg["actor"], plan["obs_bytes"])
        source = "measured from " + ", ".join(rates_from) + "; eta_learner, eta_actor: defaults"
    elif cfg["env_id"] != "CartPole-v1" or cfg["network"]["hidden"] != [256, 256]:
        source = f"{rm.DEFAULT_SOURCE}; {rm.DEFAULTS_NOTE}"
    return rm.plan_rates(plan, cfg["actor"], plan["obs_bytes"], getattr(args, "cores", None),
                         remote=per_node < plan["world"], constants=constants,
                         source=source)


def _cmd_train(args) -> int:
    from hpcdqn.parallel.lifecycle import install_signal_handlers

    install_signal_handlers()   # before the slow imports: an early USR1/TERM must not kill a rank
    from hpcdqn.config import load_config
    from hpcdqn.parallel.lifecycle import abort_on_exception, is_user_error, user_error_kind

    if args.dry_run:
        from mpi4py import MPI

        args.ranks, args.ranks_per_node, args.json = None, None, False
        if MPI.COMM_WORLD.Get_rank() != 0:
            return 0
        return _cmd_plan(args, world=MPI.COMM_WORLD.Get_size())
    try:
        if args.resume:
            if args.config:
                print("hpcdqn train: --config is ignored with --resume (the checkpoint holds the "
                      "config; pass KEY=VALUE overrides)", file=sys.stderr)
            from hpcdqn.store import resume_config

            cfg = resume_config(args.resume, args.overrides)
        else:
            cfg = load_config(args.config, args.overrides)
            _array_seed(cfg, args)
        if cfg["actors"]:
            from hpcdqn.actors import train_with_actors

            summary = abort_on_exception(train_with_actors, cfg, mem_per_rank=args.mem_per_rank,
                                         resume=args.resume)
        else:
            from hpcdqn.train import train

            summary = abort_on_exception(train, cfg, resume=args.resume,
                                         mem_per_rank=args.mem_per_rank)
    except Exception as e:   # one process: a user error is a message, anything else a traceback
        if not is_user_error(e):
            raise
        if _launcher_rank() == 0:      # every rank found the same (config, --resume's files)
            kind = getattr(e, "kind", None) or user_error_kind(e)
            print(f"hpcdqn train: {kind} error: {e}", file=sys.stderr)
        else:       # (before MPI: no barrier) mpirun ends the job at the first non-zero exit
            time.sleep(0.5)        # ... let rank 0's message out first
        from hpcdqn.parallel.lifecycle import leave

        leave(2, collective=False)
        return 2
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_rank() == 0:
        print(json.dumps(summary), flush=True)
    import signal

    if summary.get("stopped_by_signal") == int(signal.SIGUSR1) and (
            summary.get("checkpoints") or summary.get("checkpointed")):    # (an actor rank's)
        return EXIT_CHECKPOINTED
    return 0


def _array_seed(cfg: dict, args) -> None:
    """A Slurm array task trains with ``seed + SLURM_ARRAY_TASK_ID`` unless a seed was given
    (an override or the config file)."""
    task = os.environ.get("SLURM_ARRAY_TASK_ID", "")
    if not task.isdigit():
        return
    from hpcdqn.config import parse_overrides

    given = any(k == "seed" for k, _ in parse_overrides(args.overrides))
    if args.config and not given:
        import tomllib

        with open(args.config, "rb") as fh:
            given = "seed" in tomllib.load(fh)
    if not given:
        cfg["seed"] += int(task)
        if _launcher_rank() == 0:
            print(f"hpcdqn train: Slurm array task {task}: seed={cfg['seed']}", file=sys.stderr)


def _launcher_rank() -> int:
    """This process's rank as the launcher set it (before MPI is initialised); 0 if unknown."""
    for k in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if os.environ.get(k, "").isdigit():
            return int(os.environ[k])
    return 0


def _cmd_scale(args) -> int:
    if args.mode == "target":
        from hpcdqn.cluster.target import main_cli as target_cli

        return target_cli(args)
    if args.mode == "roles":
        from hpcdqn.cluster.roles import main_cli as roles_cli

        return roles_cli(args)
    from hpcdqn.cluster.scale import main_cli

    return main_cli(args)


def _add_roles_args(s) -> None:
    """``hpcdqn scale --mode roles`` (hpcdqn/cluster/roles.py)."""
    g = s.add_argument_group("--mode roles: --ranks learner ranks beside each actor count; the "
                             "time split per role and the cost model with roles, held out")
    g.add_argument("--actors", help="comma separated actor counts, e.g. 1,2,4")


def _add_target_args(s) -> None:
    """``hpcdqn scale --mode target`` (hpcdqn/cluster/target.py)."""
    g = s.add_argument_group("--mode target: time to target over rank counts and seeds")
    g.add_argument("--target-return", type=float, default=None, metavar="R",
                   help="the return a periodic greedy evaluation must reach (e.g. 475)")
    g.add_argument("--seeds", default="1-5", help="seeds, e.g. 1-5 or 1,2,3 (default 1-5)")
    g.add_argument("--rule", default=None,
                   help="scaling.rule(s), comma separated: global_batch, sqrt_lr, linear_lr "
                        "(default: the config's)")
    g.add_argument("--eval-every", type=int, default=2500, metavar="STEPS",
                   help="global env steps between periodic greedy evaluations (default 2500)")
    g.add_argument("--eval-episodes", type=int, default=10,
                   help="greedy episodes per periodic evaluation (default 10)")
    g.add_argument("--lock", default=None, metavar="FILE",
                   help="run each training under `flock FILE` (a machine shared with other jobs)")


def _cmd_eval(args) -> int:
    """Greedy evaluation of a run's model file. One process: the whole online network, if it
    fits one rank. Under ``mpirun -n P`` with the run's own pp=P: each rank reads and holds only
    its stage (``store.modelfile.load_model_stage``) and the stages serve the forward passes."""
    from pathlib import Path

    from hpcdqn.parallel.grid import mpi

    run = Path(args.run_dir)
    path = run / "model.h5" if run.is_dir() else run
    if mpi().COMM_WORLD.Get_size() > 1:
        return _eval_pipelined(args, run, path)
    try:
        policy, cfg = _whole_network_policy(path)
    except (FileNotFoundError, ValueError) as e:
        print(f"hpcdqn eval: {e}", file=sys.stderr)
        return 2
    print(json.dumps(_run_eval(policy, cfg, args, run)))
    return 0


def _whole_network_policy(path):
    """(greedy policy of the whole online network on this rank, the run's config); ValueError
    naming the way out if the whole network does not fit one rank."""
    import torch

    from hpcdqn.rl.losses import greedy_actions, make_loss
    from hpcdqn.store.modelfile import load_model, model_size
    from hpcdqn.sysinfo import ENV_CAP, cap_per_rank, current_rss, fmt_bytes

    n, pp = model_size(path)
    need, (cap, source) = 4 * n + current_rss(), cap_per_rank(1)
    if need > cap:
        how = f"`mpirun -n {pp} hpcdqn eval` (each rank holds one stage), or " if pp > 1 else ""
        raise ValueError(f"the whole online network ({n} parameters, {fmt_bytes(4 * n)}) does not "
                         f"fit on one rank ({fmt_bytes(cap)}, {source}): use {how}raise {ENV_CAP} "
                         "if the node has the memory")
    print(f"hpcdqn eval: on one rank (the run had pp={pp}): the whole online network, {n} "
          f"parameters ({fmt_bytes(4 * n)}), fits in {fmt_bytes(cap)} ({source})", file=sys.stderr)
    net, cfg, _, _ = load_model(path)
    torch.set_num_threads(max(1, cfg.get("threads", 1)))
    loss = make_loss(cfg["dqn"], cfg["network"])

    @torch.no_grad()
    def policy(obs):
        return greedy_actions(net(torch.as_tensor(obs)), loss).numpy()

    return policy, cfg


def _run_eval(policy, cfg: dict, args, run) -> dict:
    """``args.episodes`` greedy episodes (default: the run's eval.episodes, else 10)."""
    from hpcdqn.config import env_config
    from hpcdqn.rl.evaluate import evaluate_run

    episodes = args.episodes or cfg["eval"]["episodes"] or 10
    n_envs = min(cfg["eval"]["num_envs"], episodes)
    while episodes % n_envs:
        n_envs -= 1
    res = evaluate_run(policy, env_config(cfg), episodes, n_envs,
                       args.seed if args.seed is not None else cfg["seed"] + 10_000_000,
                       cfg["eval"]["epsilon"] if args.epsilon is None else args.epsilon,
                       env_id=args.env_id, vector="sync")
    res["run_dir"] = str(run)
    return res


def _eval_pipelined(args, run, path) -> int:
    """``mpirun -n P hpcdqn eval RUN`` for a run with pp=P: collective over the world; errors
    (a missing file, another pp) are agreed so every rank stops with the same message."""
    import torch

    from hpcdqn.learner.pipelined import StagePolicy
    from hpcdqn.parallel.grid import RankGrid, mpi
    from hpcdqn.parallel.agree import Local
    from hpcdqn.store.errors import agree
    from hpcdqn.rl.losses import make_loss
    from hpcdqn.store.modelfile import load_model_stage, model_size
    from hpcdqn.sysinfo import fmt_bytes

    comm = mpi().COMM_WORLD
    world, rank = comm.Get_size(), comm.Get_rank()
    with Local() as loc:
        n, pp = model_size(path)
        if pp != world:
            raise ValueError(f"the run has pp={pp} but {world} ranks were launched: evaluate it "
                             + (f"with `mpirun -n {pp} hpcdqn eval {run}` (each rank holds one "
                                "stage) or " if pp > 1 else "") + f"on one rank (`hpcdqn eval {run}`)")
        net, cfg, _, _, (lo, hi) = load_model_stage(path, pp, rank)
    try:
        agree(comm, "load", path, loc.err, what="model file", keep_kind=True)
    except Exception as e:  # noqa: BLE001 - the same agreed message on every rank
        if rank == 0:
            print(f"hpcdqn eval: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, cfg.get("threads", 1)))
    held = comm.gather(hi - lo, root=0)
    if rank == 0:
        print(f"hpcdqn eval: pipelined over the run's pp={pp} ranks, each holding only its stage "
              f"(parameters per stage: {', '.join(f'{h} ({fmt_bytes(4 * h)})' for h in held)}; "
              f"{n} in all)", file=sys.stderr)
    grid = RankGrid(comm, pp)
    loss = make_loss(cfg["dqn"], cfg["network"])
    res = StagePolicy(net, grid, loss).evaluate(lambda greedy: _run_eval(greedy, cfg, args, run))
    grid.free()
    if rank == 0:
        print(json.dumps(res))
    return 0


def _cmd_export(args) -> int:
    from hpcdqn.store import CheckpointError
    from hpcdqn.store.export import export_minari

    if args.format != "minari":
        print(f"hpcdqn export: unknown format {args.format!r} (supported: minari)", file=sys.stderr)
        return 2
    try:
        res = export_minari(args.source, args.out_dir, dataset_id=args.dataset_id)
    except (CheckpointError, FileExistsError, ValueError) as e:
        print(f"hpcdqn export: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res))
    return 0


def _cmd_info(args) -> int:
    from hpcdqn.info import collect

    info = collect()
    if args.json:
        print(json.dumps(info))
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            print(f"{k:<{width}}  {v}")
    return 0


def _add_plan_parser(sub) -> None:
    pl = sub.add_parser("plan", help="per-rank memory by category for a layout, before running",
                        description="Allocates nothing: per-rank memory (parameters, target, "
                                    "gradients, Adam, replay, activations, process baseline) for "
                                    "the layout, the global batch, replay ratio, total updates "
                                    "and warm-up share; warns if a rank would exceed its cap.")
    pl.add_argument("--config", help="TOML config file")
    pl.add_argument("--ranks", type=int, required=True, help="world size (dp x pp)")
    pl.add_argument("--ranks-per-node", type=int, default=None,
                    help="ranks sharing one node's memory (default: all --ranks)")
    pl.add_argument("--mem-per-rank", default=None, metavar="SIZE", help="cap per rank, e.g. 6G")
    pl.add_argument("--cores", type=int, default=None,
                    help="actors > 0: CPU cores the ranks share, for the expected rates "
                         "(default: one core per rank)")
    pl.add_argument("--rates-from", nargs="+", default=None, metavar="SUMMARY_JSON",
                    help="actors > 0: summary.json of actor runs of this config to take the cost "
                         "model's constants from (default: the committed CartPole measurement)")
    pl.add_argument("--json", action="store_true")
    pl.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    pl.set_defaults(fn=_cmd_plan)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hpcdqn", description="Deep Q-Networks on HPC systems.")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train a DQN (under mpirun/srun: data x pipeline parallel)",
                       description=TRAIN_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--config", help="TOML config file (default: the CartPole-v1 defaults)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    t.add_argument("--mem-per-rank", default=None, metavar="SIZE",
                   help="memory a rank may use, e.g. 6G (default: $HPCDQN_MEM_PER_RANK, the Slurm "
                        "allocation, or the node's memory / ranks on it); checked before allocating")
    t.add_argument("--dry-run", action="store_true",
                   help="print the memory plan for this layout (as `hpcdqn plan`) and stop")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    t.set_defaults(fn=_cmd_train)

    _add_plan_parser(sub)

    e = sub.add_parser("eval", help="greedy evaluation of a trained run; prints JSON")
    e.add_argument("run_dir", help="run directory (or a model.h5 file)")
    e.add_argument("--episodes", type=int, default=None)
    e.add_argument("--epsilon", type=float, default=0.0)
    e.add_argument("--seed", type=int, default=None)
    e.add_argument("--env-id", default=None, help="evaluate on another env id (same spaces)")
    e.set_defaults(fn=_cmd_eval)

    x = sub.add_parser("export", help="write a checkpoint's replay as an offline-RL dataset")
    x.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT",
                   help="a run directory (its newest valid checkpoint) or a checkpoint file")
    x.add_argument("--format", default="minari", choices=["minari"])
    x.add_argument("out_dir", metavar="OUT_DIR", help="dataset directory (created; must not exist)")
    x.add_argument("--dataset-id", default=None,
                   help="Minari dataset id (default: hpcdqn/<OUT_DIR name>[-v0]); to load it with "
                        "minari.load_dataset(ID), export to $MINARI_DATASETS_PATH/ID")
    x.set_defaults(fn=_cmd_export)

    i = sub.add_parser("info", help="versions, MPI and HDF5 capabilities, world size, device")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=_cmd_info)

    s = sub.add_parser("scale", help="weak/strong scaling study: CSV, PNG, Allreduce sweep and a "
                                     "communication model tested on a held-out rank count",
                       description="Runs short trainings over rank counts (mpirun, or srun inside a "
                                   "Slurm allocation; checkpoints off), repeats each point, and an "
                                   "Allreduce sweep (4 B to 64 MiB) at each; writes scaling.csv "
                                   "(with the time split), scaling.png, allreduce.csv/png (the "
                                   "sweep) and prediction.csv/json (a fitted communication model, "
                                   "its error at the held-out largest rank count, labelled as a "
                                   "prediction).")
    s.add_argument("--ranks", help="comma separated rank counts, e.g. 1,2,4")
    s.add_argument("--mode", choices=["weak", "strong", "target", "roles"], default="weak",
                   help="weak: total_steps is per replica (scaled by dp); strong: fixed total_steps; "
                        "target: env steps and wall-clock to --target-return per dp and seed; "
                        "roles: learner ranks beside actor ranks (--actors)")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--repeats", type=int, default=1, help="runs per rank count")
    s.add_argument("--config", help="TOML config file for the runs")
    s.add_argument("--launcher", choices=["auto", "mpirun", "srun"], default="auto",
                   help="auto: srun inside a Slurm allocation (SLURM_JOB_ID set), else mpirun")
    s.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    s.add_argument("--no-bench", action="store_true", help="skip the Allreduce sweep")
    s.add_argument("--sweep-max", type=int, default=64 * 2**20, metavar="BYTES",
                   help="largest message of the Allreduce sweep (4 B to this, powers of 4)")
    s.add_argument("--merge", nargs="+", metavar="DIR",
                   help="combine finished studies (their scaling.csv/allreduce.csv) into --out")
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    _add_target_args(s)
    _add_roles_args(s)
    s.set_defaults(fn=_cmd_scale)

    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["train"] and any(a in ("-h", "--help") for a in argv[1:]):
        from hpcdqn.config import describe

        t.description += describe()
    args = p.parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return args.fn(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
