"""Memory per rank, before and during a job: the planner (``hpcdqn plan``, ``train --dry-run``
and the check ``hpcdqn train`` makes before allocating) and the accounting a run reports.

Categories, per rank: ``parameters`` (online network), ``target`` (target network; it has no
gradient buffer), ``gradients`` (one flat buffer), ``optimizer`` (Adam's two moments),
``replay`` (the replay shard's arrays, first pipeline stages only), ``activations`` (an
estimate: what one update keeps for backward, in-flight micro-batches included, plus the
transient target forwards; shapes by formula, nothing allocated) and ``transient`` (an
allowance for what training touches beyond those tensors: ``RUNTIME`` for the first update's
library working memory and code pages, MPI message buffers and the allocator's free lists;
``THREAD`` per torch thread beyond the first; the activations once more, for the update's
temporaries of the same widths; and ``SLACK`` of the rest). The planner also counts the process ``baseline`` (Python, torch
with its optimizer's imports, MPI, the envs: measured, this process's RSS,
``process_baseline``).

Measured (peak RSS = VmHWM; CartPole, batch 32, one thread, four hidden layers 500 to 4500
wide, pp=1, 2 and 4): peak - (baseline + parameters + target + gradients + optimizer + replay +
activations) was 13-31 MB on every rank and every size; at batch 512 (4 x 4096, pp=1) it was
115 MiB with one thread and 190 MiB with two. The allowance keeps the plan above the measured
peak by a few percent in all of these (tests/learner/test_memory.py checks 1.0-1.15x at batch
32). Two start-up costs that used to come on top are now in the baseline or gone: torch's
optimizer imports (~70 MB, measured in the baseline) and a meta-device forward for shapes
(imports torch's meta kernels, ~70 MB: shapes are computed by formula instead).

Stage sizes come from the run's layout (``parallel.layout.RunLayout``): the network built on
the meta device (``networks.network_layers``), cut exactly as the pipeline learner cuts it, so the
plan allocates nothing of the network. The cap per rank and the RSS figures: ``hpcdqn.sysinfo``.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from hpcdqn.config import ConfigError, LearnerConfig, learner_config
from hpcdqn.parallel.layout import RunLayout
from hpcdqn.parallel.partition import LinearPiece, stage_modules
from hpcdqn.rl.framereplay import planned_episode_steps, replay_nbytes
from hpcdqn.rl.networks import DuelingHead, Scale, unroll
from hpcdqn.sysinfo import ENV_CAP, cap_per_rank, current_rss, fmt_bytes

CATEGORIES = ("parameters", "target", "gradients", "optimizer", "replay", "activations",
              "transient")
RUNTIME = 48 << 20      # bytes: first-update library memory, MPI buffers, free lists (measured)
THREAD = 80 << 20       # bytes per torch thread beyond the first (BLAS/OpenMP buffers: measured)
SLACK = 0.05            # of a stage's other categories


class MemoryPlanError(ConfigError):
    """The job's layout needs more memory on some rank than that rank may use."""


def process_baseline() -> int:
    """This process's RSS once the libraries every rank loads anyway are in: constructing a
    torch optimizer imports ``torch._dynamo`` (sympy, mpmath: ~70 MB per rank), so a throwaway
    one-element Adam is made first. Network, replay and training state come on top of this."""
    from hpcdqn.rl.optim import make_adam

    make_adam(torch.nn.Parameter(torch.zeros(1)), {"lr": 1e-3, "adam_eps": 1e-8})
    return current_rss()


# -- the plan ---------------------------------------------------------------------------------------
def leaf_shape(leaf, in_shape: tuple) -> tuple:
    """Per-sample output shape of one of the network's leaf modules for a per-sample input
    shape, by formula (a forward on the meta device would import torch's meta kernels: ~70 MB
    in every rank); a module of another kind: by a meta-device forward."""
    if isinstance(leaf, LinearPiece):
        return (leaf.out_features,) if leaf.last else (int(in_shape[0]) + leaf.r1 - leaf.r0,)
    if isinstance(leaf, nn.Linear):
        return (leaf.out_features,)
    if isinstance(leaf, DuelingHead):
        return (leaf.out_features,)
    if isinstance(leaf, (nn.ReLU, Scale)):
        return tuple(in_shape)
    if isinstance(leaf, nn.Flatten) and leaf.start_dim == 1 and leaf.end_dim == -1:
        return (int(np.prod(in_shape)),)
    if isinstance(leaf, nn.Conv2d) and not isinstance(leaf.padding, str):
        hw = [(d + 2 * p - dil * (k - 1) - 1) // s + 1 for d, p, dil, k, s in zip(
            in_shape[1:], leaf.padding, leaf.dilation, leaf.kernel_size, leaf.stride)]
        return (leaf.out_channels, *hw)
    with torch.no_grad():
        return tuple(leaf(torch.zeros((1, *in_shape), device="meta")).shape[1:])


def stage_widths(modules, in_shape: tuple) -> tuple[list[int], tuple]:
    """(per-sample sizes of the stage's input and of every leaf's output, the output shape)."""
    shape, widths = tuple(in_shape), [int(np.prod(in_shape))]
    for m in modules:
        for leaf in unroll(m):
            shape = leaf_shape(leaf, shape)
            widths.append(int(np.prod(shape)))
    return widths, shape


def activation_bytes(widths: list[int], batch: int, micro: int, schedule: str, stage: int,
                     pp: int) -> int:
    """Estimated bytes one update of ``batch`` rows (per replica) in ``micro`` micro-batches
    keeps alive on a stage whose leaves produce ``widths``."""
    micro = max(1, micro) if pp > 1 else 1
    rows = -(-batch // micro)
    in_flight = micro if schedule == "gpipe" or pp == 1 else \
        min(micro, pp if schedule == "zbh1" else pp - stage)   # zbh1: 1F1B's peak, any stage
    saved = in_flight * rows * sum(widths) * 4          # autograd's saved inputs and outputs
    transient = 4 * rows * max(widths) * 4              # target and double forwards, grads in/out
    return int(saved + transient)


def plan_memory(layout, lc: LearnerConfig, replay_cfg: dict, threads: int, obs_shape: tuple,
                obs_dtype, frame_stack: int = 0) -> dict:
    """Per-stage memory by category (bytes) and the run's schedule figures for ``layout`` (a
    ``parallel.layout.RunLayout`` with its stages placed, its schedule resolved), the learner's
    part of the config ``lc``, the ``[replay]`` section and the run's ``threads`` (0: torch's
    default); allocates nothing. ``frame_stack``: frames per observation where the replay stores
    each frame once (``rl.envs.frame_stack``)."""
    pp, sched = layout.pp, layout.schedule
    replay = replay_nbytes(layout.replay_per_replica, sched.num_envs, obs_shape, obs_dtype,
                           sched.n_step, lc.prioritized, frame_stack,
                           planned_episode_steps(replay_cfg))
    per_stage, in_shape = [], tuple(obs_shape)
    threads = threads or os.cpu_count() or 1        # (0: torch's default, one per core)
    for s, ((a, b), (lo, hi)) in enumerate(zip(layout.stages, layout.param_ranges)):
        n = hi - lo
        widths, in_shape = stage_widths(stage_modules(layout.layers, a, b), in_shape)
        cats = {"parameters": 4 * n, "target": 4 * n, "gradients": 4 * n, "optimizer": 8 * n,
                "replay": replay if s == 0 else 0,
                "activations": activation_bytes(widths, sched.batch_per_replica,
                                                lc.micro_batches, lc.schedule, s, pp)}
        cats["transient"] = (RUNTIME + (threads - 1) * THREAD + cats["activations"]
                             + int(SLACK * sum(cats.values())))
        per_stage.append({"stage": s, "holds": layout.stage_contents[s], "parameters_count": n,
                          **cats, "total": sum(cats.values())})
    res = sched.as_dict()
    return {"world": layout.world, "dp": layout.dp, "pp": pp, "stages": per_stage,
            "actors": layout.actors, "actor_parameters_bytes": 4 * layout.param_ranges[-1][1],
            "roles": [r.value for r in layout.roles], "roles_text": layout.describe_roles(),
            "global_batch": sched.global_batch, "replay_ratio": res["replay_ratio"],
            "updates_per_env_step": res["updates_per_env_step"],
            "total_updates": sched.total_updates, "env_steps": res["env_steps_total"],
            "warmup_share": res["warmup_share"], "schedule": res,
            "schedule_text": sched.describe()}


def check_fits(plan: dict, cap: int, source: str, baseline: int, ranks_per_stage=None) -> list[str]:
    """Raise ``MemoryPlanError`` naming the rank that cannot fit and what to do."""
    worst = max(plan["stages"], key=lambda st: st["total"])
    need = worst["total"] + baseline
    if need <= cap:
        return []
    raise MemoryPlanError(
        f"this layout needs {fmt_bytes(need)} on pipeline stage {worst['stage']} (parameters "
        f"{fmt_bytes(worst['parameters'])}, target {fmt_bytes(worst['target'])}, gradients "
        f"{fmt_bytes(worst['gradients'])}, Adam {fmt_bytes(worst['optimizer'])}, replay "
        f"{fmt_bytes(worst['replay'])}, activations ~{fmt_bytes(worst['activations'])}, transient "
        f"~{fmt_bytes(worst['transient'])}, process "
        f"baseline {fmt_bytes(baseline)}) but a rank may use {fmt_bytes(cap)} ({source}); stopped "
        f"before allocating. Use more pipeline stages (pp={2 * plan['pp']} with "
        f"{2 * plan['world']} ranks), a smaller dqn.buffer_size or network, or raise the cap "
        f"(--mem-per-rank / {ENV_CAP}); `hpcdqn plan` shows every layout's figures")


def describe_memory_plan(plan: dict, cap: int | None = None, source: str = "",
                         baseline: int = 0) -> str:
    """The plan as lines for people."""
    actors = plan.get("actors", 0)
    lines = [f"layout: world={plan['world']} = "
             + (f"{actors} actors + " if actors else "") + f"dp {plan['dp']} x pp {plan['pp']}; global batch "
             f"{plan['global_batch']}; replay ratio {plan['replay_ratio']} (sampled transitions per "
             f"env step); {plan['total_updates']} updates over {plan['env_steps']} env steps; "
             f"warm-up {100 * plan['warmup_share']:.1f}% of the run"]
    if "roles_text" in plan:
        lines.append(plan["roles_text"])
    if "schedule_text" in plan:
        lines += plan["schedule_text"].splitlines()
    if actors:
        lines.append(f"actor ranks: parameters {fmt_bytes(plan['actor_parameters_bytes'])} (a local "
                     f"copy of the online network), no replay, target or optimizer + baseline "
                     f"{fmt_bytes(baseline)}; the stages below are the learner ranks'")
    for st in plan["stages"]:
        cats = ", ".join(f"{k} {fmt_bytes(st[k])}" for k in CATEGORIES)
        lines.append(f"stage {st['stage']} ({st['holds']}; {st['parameters_count']} parameters): "
                     f"{cats}; total {fmt_bytes(st['total'])} + baseline {fmt_bytes(baseline)}")
    if cap is not None:
        worst = max(st["total"] for st in plan["stages"]) + baseline
        verdict = "fits" if worst <= cap else "DOES NOT FIT"
        lines.append(f"per-rank cap {fmt_bytes(cap)} ({source}): largest rank needs "
                     f"{fmt_bytes(worst)}: {verdict}")
    return "\n".join(lines)


def job_memory_plan(cfg: dict, world: int, local_ranks: int,
                    cap_override: str | None = None) -> dict:
    """What ``hpcdqn plan`` prints: the plan for ``world`` ranks, the cap, the measured process
    baseline and whether the largest rank fits. Builds one environment for its spaces."""
    from hpcdqn.rl.envs import frame_stack, make_vector_env

    layout = RunLayout.resolve(cfg, world, 0, cap_override)
    env = make_vector_env(cfg["env_id"], 1, cfg["seed"], "sync", cfg["atari"])
    space, n_actions = env.single_observation_space, int(env.single_action_space.n)
    stack = frame_stack(env)
    env.close()
    layout = layout.place(cfg["network"], space.shape, n_actions)
    plan = plan_memory(layout, learner_config(cfg), cfg["replay"], cfg["threads"], space.shape,
                       space.dtype, stack)
    cap, source = cap_per_rank(local_ranks, layout.mem_per_rank)
    baseline = process_baseline()
    need = max(st["total"] for st in plan["stages"]) + baseline
    return {**plan, "obs_bytes": int(np.prod(space.shape)) * np.dtype(space.dtype).itemsize,
            "mem_per_rank": cap, "mem_per_rank_source": source, "baseline_rss": baseline,
            "largest_rank_bytes": need, "fits": need <= cap}
