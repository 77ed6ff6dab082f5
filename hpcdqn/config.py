"""Every hyperparameter in one place.

A config is a TOML file (see ``configs/``) plus ``KEY=VALUE`` overrides from the command line,
checked against the schema below *before any work starts*: unknown keys, wrong types and
impossible values each give one clear error naming the key and what to do.

Keys are addressed by their own name, dotted for a TOML section: ``seed=3``, ``dqn.lr=1e-3``.
"""

from __future__ import annotations

import copy
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any



class ConfigError(ValueError):
    """A config key is unknown, has the wrong type, or an impossible value."""


@dataclass(frozen=True)
class Key:
    default: Any
    type: type | tuple
    help: str
    check: Any = None  # callable(value) -> error string or None
    choices: tuple | None = None


def _pos(v):
    return None if v > 0 else "must be > 0"


def _nonneg(v):
    return None if v >= 0 else "must be >= 0"


def _unit(v):
    return None if 0.0 <= v <= 1.0 else "must be in [0, 1]"


def _unit_open(v):
    return None if 0.0 < v <= 1.0 else "must be in (0, 1]"


def _widths(v):
    if not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v):
        return "must be a list of positive integers, e.g. [256, 256]"
    return None


def _screen(v):
    return None if v >= 36 else "must be >= 36 (the Nature CNN's three convolutions need it)"


def _cuts(v):
    if not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v):
        return "must be a list of positive layer indices, e.g. [2] (empty: balance by parameters)"
    if list(v) != sorted(set(v)):
        return "must be strictly increasing"
    return None


# The schema. Sections are nested dicts; leaves are Key(default, type, help).
SCHEMA: dict[str, Any] = {
    "env_id": Key("CartPole-v1", str, "gymnasium environment id (Atari ids need ale-py)"),
    "seed": Key(1, int, "base seed; rank r uses seed + 1000 * r for its environments", _nonneg),
    "total_steps": Key(50_000, int, "global env steps of the run (over all replicas)", _pos),
    "run_dir": Key("", str, "run directory; empty: runs/<env_id>__s<seed>__<time>"),
    "num_envs": Key(1, int, "vector environments per data-parallel rank", _pos),
    "vector": Key("sync", str, "gymnasium vector env kind", None, ("sync", "async")),
    "device": Key("cpu", str, "torch device: cpu, cuda, cuda:N or auto"),
    "threads": Key(1, int, "torch intra-op threads per rank (0: torch default)", _nonneg),
    # parallel layout (world = dp x pp)
    "pp": Key(1, int, "pipeline stages per replica; dp = world size / pp", _pos),
    "micro_batches": Key(1, int, "micro-batches per pipelined minibatch", _pos),
    "schedule": Key("1f1b", str, "pipeline schedule (zbh1: zero bubble, ZB-H1)", None,
                    ("gpipe", "1f1b", "zbh1")),
    "actors": Key(0, int, "actor ranks (Ape-X style): world = actors + dp x pp learner ranks; "
                          "actors step envs and send transitions, learners only learn (0: every "
                          "rank steps envs and learns, in lockstep)", _nonneg),
    # checkpoints
    "checkpoint_every": Key(0, int, "global env steps between checkpoints (0: only at the end)",
                            _nonneg),
    "checkpoint_minutes": Key(30.0, float, "also checkpoint when this many wall-clock minutes "
                                           "passed since the last one, agreed at log points "
                                           "(0: off); a killed job loses at most this much",
                              _nonneg),
    "keep_last": Key(3, int, "checkpoints kept", _pos),
    "overwrite": Key(False, bool, "a fresh run (no --resume) may start in a run directory that "
                                  "holds checkpoints, deleting them (false: refused)"),
    "checkpoint": Key(True, bool, "write checkpoints at all (false: none, e.g. for benchmarks)"),
    "stop_after": Key(0, int, "stop (with a checkpoint) after this many global env steps without changing "
                              "any schedule; resume later with --resume (0: run to total_steps)", _nonneg),
    "network": {
        "kind": Key("auto", str, "Q-network: auto (nature for image observations, else mlp), "
                                 "mlp, nature (Mnih et al. 2015 CNN), minatar (Young & Tian "
                                 "2019: Conv 16x3x3, FC hidden[-1])", None,
                    ("auto", "mlp", "nature", "minatar")),
        "hidden": Key([256, 256], list, "MLP hidden widths (also the CNN's dense layer)", _widths),
        "dueling": Key(False, bool, "dueling head: Q = V + A - mean(A)"),
        "head": Key("q", str, "output head: q (one Q-value per action, the TD loss) or c51 "
                              "(Bellemare et al. 2017: per action a distribution over network.atoms "
                              "returns on [v_min, v_max], the projected cross-entropy loss)", None,
                    ("q", "c51")),
        "atoms": Key(51, int, "c51: atoms of each action's return distribution (2..1024)",
                     lambda v: None if 2 <= v <= 1024 else "must be in 2..1024"),
        "v_min": Key(-10.0, float, "c51: the lowest return of the support"),
        "v_max": Key(10.0, float, "c51: the highest return of the support (> v_min)"),
        "cuts": Key([], list, "pipeline cut points (layer indices); empty: balance by params", _cuts),
        "split_layers": Key(True, bool, "balanced pipeline stages may cut inside a Linear layer (by "
                                        "output rows) when no layer boundary balances them"),
    },
    "dqn": {
        "gamma": Key(0.99, float, "discount", _unit),
        "optimizer": Key("adam", str, "adam, or rmsprop (torch's RMSprop: the MinAtar paper "
                                      "uses centered, alpha 0.95, eps 0.01)", None,
                         ("adam", "rmsprop")),
        "lr": Key(2.3e-3, float, "learning rate (Adam or RMSprop)", _pos),
        "lr_final_fraction": Key(0.1, float, "lr decays linearly to lr * this at the end", _unit),
        "adam_eps": Key(1e-8, float, "Adam epsilon", _pos),
        "rmsprop_alpha": Key(0.95, float, "RMSprop smoothing of the squared gradient", _unit),
        "rmsprop_eps": Key(0.01, float, "RMSprop epsilon (added to the root)", _pos),
        "rmsprop_centered": Key(True, bool, "centered RMSprop (divides by the gradient's "
                                            "estimated standard deviation)"),
        "batch_size": Key(64, int, "minibatch of one update at dp=1; at dp>1 see scaling.rule", _pos),
        "buffer_size": Key(100_000, int, "GLOBAL replay capacity (transitions); each replica holds "
                                         "buffer_size // dp", _pos),
        "learning_starts": Key(1_000, int, "global env steps before learning", _nonneg),
        "uniform_warmup": Key(True, bool, "act uniformly at random before learning_starts (SB3); "
                                          "false: epsilon-greedy from step 0 (CleanRL)"),
        "train_frequency": Key(256, int, "a training phase after every this many global env "
                                         "steps, once past learning_starts (SB3, CleanRL)", _pos),
        "gradient_steps": Key(128, int, "updates per training phase at dp=1 (with the batch and "
                                        "train_frequency: the replay ratio every layout keeps)",
                              _pos),
        "target_update_every": Key(512, int, "global env steps between target syncs (SB3's "
                                             "target_update_interval; a sync comes before that "
                                             "step's training phase)", _pos),
        "tau": Key(1.0, float, "target sync: 1 = hard copy, < 1 = Polyak averaging", _unit_open),
        "double": Key(True, bool, "double DQN target"),
        "n_step": Key(3, int, "n-step returns", _pos),
        "huber_delta": Key(1.0, float, "Huber loss threshold", _pos),
        "max_grad_norm": Key(10.0, float, "gradient norm clip (0: off)", _nonneg),
        "epsilon_start": Key(1.0, float, "initial exploration epsilon", _unit),
        "epsilon_end": Key(0.04, float, "final exploration epsilon", _unit),
        "exploration_fraction": Key(0.16, float, "share of total_steps (global env steps) to "
                                                 "anneal epsilon", _unit_open),
        "exploration_steps": Key(0, int, "env steps to anneal epsilon over (0: "
                                         "exploration_fraction * total_steps)", _nonneg),
        "exploration_after_warmup": Key(False, bool, "the anneal starts at learning_starts "
                                                     "(the MinAtar paper) instead of step 0"),
        "epsilon_ladder": Key(False, bool, "Ape-X ladder: replica (or, with actors, actor) i of N explores with eps^(1+7i/(N-1))"),
    },
    "replay": {
        "prioritized": Key(False, bool, "proportional prioritized replay (sum tree)"),
        "alpha": Key(0.6, float, "priority exponent", _unit),
        "beta_start": Key(0.4, float, "importance-weight exponent at start", _unit),
        "beta_end": Key(1.0, float, "importance-weight exponent at the end", _unit),
        "priority_eps": Key(1e-6, float, "added to |td| for priorities", _pos),
        "episode_steps": Key(0, int, "frame replay: transitions per episode start the start store "
                                     "is sized (and the memory planned) for: the rate the run "
                                     "will see (0: 100)", _nonneg),
    },
    "parallel": {
        "bucket_mb": Key(25.0, float, "gradient allreduce bucket size cap (MiB)", _pos),
        "overlap": Key(False, bool, "overlap allreduce with backward (Iallreduce per bucket)"),
        "allreduce": Key("auto", str, "gradient allreduce: flat (MPI_Allreduce), hierarchical (in "
                                      "the node, among node leaders, in the node; blocking) or auto "
                                      "(flat on one node, else the one the cost model predicts "
                                      "faster; printed and in summary.json)",
                         choices=("auto", "flat", "hierarchical")),
        "check_every": Key(1000, int, "updates between cross-rank parameter checksums (0: off)", _nonneg),
        "manual_backward": Key(True, bool, "plain MLPs: the hand-written backward (checked against "
                                           "autograd at start; false: autograd)"),
    },
    # Atari preprocessing (Atari ids only): the defaults are the Nature DQN / SB3 AtariWrapper
    # protocol; Machado et al. (2018) use sticky_actions = 0.25 (and no fire_reset).
    "atari": {
        "noop_max": Key(30, int, "after each reset, a uniform 1..noop_max no-op frames (0: none)",
                        _nonneg),
        "frame_skip": Key(4, int, "emulator frames per agent step (the action repeated, the rewards "
                                  "summed)", _pos),
        "max_pool": Key(True, bool, "observe the pixel-wise max of a step's last two frames (RGB, "
                                    "before grayscale): removes sprite flicker"),
        "screen_size": Key(84, int, "frames are converted to grayscale and resized to screen_size "
                                    "x screen_size (OpenCV INTER_AREA)", _screen),
        "frame_stack": Key(4, int, "observation = the last frame_stack frames, shape (k, size, "
                                   "size), uint8; padded with the reset frame", _pos),
        "episodic_life": Key(True, bool, "TRAINING only: a lost life ends the episode for learning "
                                         "(the game goes on); evaluation plays full games"),
        "clip_reward": Key(True, bool, "TRAINING only: rewards clipped to their sign (-1, 0, +1); "
                                       "evaluation and logged episode returns are raw game scores"),
        "fire_reset": Key(True, bool, "press FIRE (then action 2) after a reset, and after a lost "
                                      "life with episodic_life, in games whose actions include FIRE"),
        "sticky_actions": Key(0.0, float, "repeat_action_probability: each emulator frame repeats "
                                          "the previous frame's action with this probability "
                                          "(Machado et al.: 0.25)", _unit),
        "full_action_space": Key(False, bool, "all 18 joystick actions (false: the game's minimal "
                                              "action set)"),
        "max_frames": Key(108_000, int, "an episode is truncated after this many emulator frames "
                                        "(108000 = 30 minutes of play)", _pos),
    },
    "scaling": {
        "rule": Key("sqrt_lr", str, "data-parallel rule: sqrt_lr / linear_lr = batch_size per "
                                    "replica (global dp x batch_size), 1/dp of the updates (same "
                                    "replay ratio), lr x sqrt(dp) / lr x dp after a ramp; "
                                    "global_batch = the global batch is dqn.batch_size "
                                    "(batch_size/dp per replica) and the updates those of one "
                                    "rank", None,
                    ("global_batch", "sqrt_lr", "linear_lr")),
        "lr_warmup_fraction": Key(0.1, float, "linear_lr: share of the updates over which lr "
                                              "ramps from dqn.lr to dp x dqn.lr", _unit),
    },
    "eval": {
        "episodes": Key(100, int, "greedy episodes at the end of training (0: none)", _nonneg),
        "every": Key(0, int, "global env steps between periodic greedy evaluations, written to "
                             "eval.csv; their time is left out of wall_s (0: none)", _nonneg),
        "every_episodes": Key(10, int, "greedy episodes per periodic evaluation", _pos),
        "num_envs": Key(10, int, "vector envs for evaluation", _pos),
        "epsilon": Key(0.0, float, "epsilon for evaluation", _unit),
    },
    "watchdog": {
        "deadline_s": Key(0.0, float, "stall watchdog: seconds a rank waits for the others at an "
                                      "agreed phase (checkpoint, resume, model file, eval, "
                                      "gradient sync) before it names the ranks that have not "
                                      "arrived and aborts the job with exit status 3; 0: per "
                                      "phase, scaled to it (checkpoint/resume 300 s + 1 s per 20 "
                                      "MB a rank writes, model file 300 s, gradient sync 900 s, "
                                      "eval 1800 s, each at least 20x the longest that phase "
                                      "took so far); < 0: off"),
    },
    "actor": {
        "lockstep": Key(False, bool, "actors > 0: reproducible mode: each learner iteration takes "
                                     "one env step of every actor, in a fixed actor order, and "
                                     "actors wait for the weights at fixed update counts"),
        "publish_every": Key(64, int, "actors > 0: learner updates between weight publications "
                                      "to the actors (non-blocking sends)", _pos),
        "max_ahead": Key(0, int, "actors > 0: iterations (env steps of each actor) an actor "
                                 "may run ahead of its learner's loop (0: one training phase, "
                                 "so actors fill the next phase's data while the learner "
                                 "updates); per env step the actors made, the replay ratio "
                                 "stays between the configured one and that x t/(t + "
                                 "max_ahead) at iteration t", _nonneg),
        "send_every": Key(8, int, "actors > 0: env steps of transitions per message an actor "
                                  "sends (sooner where it has to wait)", _pos),
        "timeout_s": Key(600.0, float, "actors > 0: seconds a learner waits for an actor's data "
                                       "before it stops the job naming that actor (actors wait "
                                       "1.5x as long for their learner)", _pos),
    },
    "log": {
        "every": Key(2_000, int, "global env steps between metric rows", _pos),
        "progress": Key(True, bool, "progress bar (rank 0, interactive or not)"),
        "tensorboard": Key(True, bool, "write TensorBoard events"),
    },
}


# the [dqn] keys a learner reads: its optimizer, clipping, target sync and loss (the batch,
# replay and exploration keys are the env-step schedule's: ``rl.schedule``)
LEARNER_DQN_KEYS = ("optimizer", "lr", "adam_eps", "rmsprop_alpha", "rmsprop_eps",
                    "rmsprop_centered", "max_grad_norm", "tau", "double", "huber_delta")


@dataclass(frozen=True)
class LearnerConfig:
    """The part of a run's config a learner reads (``learner_config(cfg)``), not the run's
    envs, batch, replay, files, logging or evaluation."""
    dqn: dict               # the ``LEARNER_DQN_KEYS`` of [dqn]
    network: dict           # [network]: the head (its loss), the stage cuts
    parallel: dict          # [parallel]: gradient buckets, allreduce, overlap, hand-written backward
    prioritized: bool       # replay.prioritized: an update returns |TD| for the priorities
    micro_batches: int = 1  # a pipelined minibatch's micro-batches
    schedule: str = "1f1b"  # the pipeline's op order


def learner_config(cfg: dict) -> LearnerConfig:
    """A learner's part of the whole config ``cfg``."""
    return LearnerConfig(dqn={k: cfg["dqn"][k] for k in LEARNER_DQN_KEYS}, network=cfg["network"],
                         parallel=cfg["parallel"], prioritized=bool(cfg["replay"]["prioritized"]),
                         micro_batches=cfg["micro_batches"], schedule=cfg["schedule"])


@dataclass(frozen=True)
class EnvConfig:
    """How a run makes its environments (``env_config(cfg)``): the env id, the vector kind and
    the ``[atari]`` preprocessing; what a greedy evaluation needs to play as the run trained."""
    env_id: str
    vector: str
    atari: dict


def env_config(cfg: dict) -> EnvConfig:
    """The run's env part of the whole config ``cfg``."""
    return EnvConfig(env_id=cfg["env_id"], vector=cfg.get("vector", "sync"), atari=cfg.get("atari"))


def defaults(schema=SCHEMA) -> dict:
    out = {}
    for k, v in schema.items():
        out[k] = defaults(v) if isinstance(v, dict) else copy.deepcopy(v.default)
    return out


def _typename(t) -> str:
    return t.__name__ if isinstance(t, type) else "/".join(x.__name__ for x in t)


def _coerce(path: str, key: Key, value: Any) -> Any:
    t = key.type
    if t is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if t is int and isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        value = int(value)  # 1e6 style
    if isinstance(value, bool) and t is not bool:
        raise ConfigError(f"config key '{path}': expected {_typename(t)}, got a boolean {value!r}")
    if not isinstance(value, t):
        raise ConfigError(
            f"config key '{path}': expected {_typename(t)}, got {type(value).__name__} {value!r}"
            f" ({key.help})"
        )
    if key.choices is not None and value not in key.choices:
        raise ConfigError(f"config key '{path}': {value!r} is not one of {list(key.choices)}")
    if key.check is not None:
        err = key.check(value)
        if err:
            raise ConfigError(f"config key '{path}' = {value!r} {err} ({key.help})")
    return value


def _lookup(path: str) -> Key:
    node: Any = SCHEMA
    parts = path.split(".")
    for i, p in enumerate(parts):
        if not isinstance(node, dict) or p not in node:
            where = ".".join(parts[:i]) or "top level"
            known = sorted(node) if isinstance(node, dict) else []
            hint = _close(p, known)
            raise ConfigError(
                f"unknown config key '{path}'"
                + (f" (did you mean '{'.'.join(parts[:i] + [hint])}'?)" if hint else "")
                + f"; keys at {where}: {', '.join(known)}"
            )
        node = node[p]
    if isinstance(node, dict):
        raise ConfigError(f"config key '{path}' is a section; set one of its keys: "
                          + ", ".join(f"{path}.{k}" for k in node))
    return node


def _close(word: str, options: list[str]) -> str | None:
    import difflib

    m = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return m[0] if m else None


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        p = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, p + "."))
        else:
            out[p] = v
    return out


def _set(cfg: dict, path: str, value: Any) -> None:
    node = cfg
    parts = path.split(".")
    for p in parts[:-1]:
        node = node[p]
    node[parts[-1]] = value


def parse_value(text: str) -> Any:
    """Parse a command-line value as a TOML value; bare words are strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    """``["seed=3", "dqn.lr=1e-3"]`` -> ``[("seed", 3), ("dqn.lr", 0.001)]``."""
    items = []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not KEY=VALUE (e.g. seed=3 or dqn.lr=1e-3)")
        k, v = item.split("=", 1)
        items.append((k.strip(), parse_value(v.strip())))
    return items


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> dict:
    """Defaults <- TOML file <- overrides; validated. Raises ConfigError."""
    cfg = defaults()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist (see configs/ for examples)")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file '{p}' is not valid TOML: {e}") from None
        for k, v in flatten(data).items():
            _set(cfg, k, _coerce(k, _lookup(k), v))
    if isinstance(overrides, dict):
        items = list(flatten(overrides).items()) if any(isinstance(v, dict) for v in overrides.values()) \
            else list(overrides.items())
    else:
        items = parse_overrides(overrides)
    for k, v in items:
        _set(cfg, k, _coerce(k, _lookup(k), v))
    validate(cfg)
    return cfg


def validate(cfg: dict) -> None:
    """Cross-key checks: things each key alone cannot know."""
    d = cfg["dqn"]
    if d["epsilon_end"] > d["epsilon_start"]:
        raise ConfigError("dqn.epsilon_end must be <= dqn.epsilon_start")
    if d["n_step"] > d["buffer_size"] // 2:
        raise ConfigError("dqn.n_step must be well below dqn.buffer_size")
    if cfg["eval"]["episodes"] and cfg["eval"]["episodes"] % cfg["eval"]["num_envs"]:
        raise ConfigError(
            f"eval.episodes={cfg['eval']['episodes']} must be a multiple of eval.num_envs="
            f"{cfg['eval']['num_envs']} (each env runs the same number of episodes, so short "
            "episodes are not over-counted)")
    ev = cfg["eval"]
    if ev["every"] and ev["every_episodes"] % min(ev["num_envs"], ev["every_episodes"]):
        raise ConfigError(
            f"eval.every_episodes={ev['every_episodes']} must be a multiple of eval.num_envs="
            f"{ev['num_envs']} (or at most it)")
    net = cfg["network"]
    if net["head"] == "c51" and (net["dueling"] or net["v_min"] >= net["v_max"]):
        raise ConfigError(f"network.head='c51' needs network.v_min < network.v_max (they are "
                          f"{net['v_min']}, {net['v_max']}) and network.dueling=false")
    dev = cfg["device"]
    if not (dev in ("cpu", "auto", "cuda") or dev.startswith("cuda:")):
        raise ConfigError(f"device={dev!r}: use cpu, cuda, cuda:N or auto")


def to_toml(cfg: dict) -> str:
    """Write a resolved config back as TOML (top-level keys first, then sections)."""
    def val(v):
        return json.dumps(v)  # JSON scalars/lists of scalars are valid TOML

    lines = [f"{k} = {val(v)}" for k, v in cfg.items() if not isinstance(v, dict)]
    for k, v in cfg.items():
        if isinstance(v, dict):
            lines.append(f"\n[{k}]")
            lines += [f"{kk} = {val(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


def describe() -> str:
    """Every key with its default and help, for `hpcdqn train --help-config`."""
    rows = []
    for k, v in flatten(SCHEMA).items():
        rows.append(f"  {k:<28} {json.dumps(v.default):<14} {v.help}")
    return "\n".join(rows)
