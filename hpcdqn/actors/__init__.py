"""Actor ranks and learner ranks (Ape-X style): ``actors=N`` adds N actor ranks to the dp
learner replicas (``parallel.layout.RunLayout``: learners are world ranks ``0 .. dp*pp-1``, actors
the rest; actor ``i`` feeds replica ``i mod dp``, i.e. that replica's first pipeline stage).

- ``nstep``: the actor's n-step window (transitions leave the actor with their n-step return
  and discount) and ``TransitionReplay``, the learner's shard of such transitions;
- ``frames``: image envs (MinAtar, Atari frame stacks): raw steps with each frame sent once,
  inserted by the learner into the sync run's replay class;
- ``wire``: the messages (contiguous numpy buffers with a small int64 header, no pickle);
- ``actor``: the actor loop (vector envs, batched CPU inference with a local copy of the
  online network, per-actor epsilon, sends, weight pick-up, the rate limit);
- ``learner``: the learner loop (``train.Trainer`` on the learners' own communicator, fed by
  its actors instead of its own envs) and ``train_with_actors``, the entry point.

A package of its own (beside ``learner``, which holds the update math both modes share)
because it is the one place that knows both ends of the actor-learner protocol.
"""

from __future__ import annotations


def train_with_actors(cfg: dict, quiet: bool = False, mem_per_rank: str | None = None,
                      resume: str | None = None) -> dict:
    """Collective over the world: this rank's part of an actor-learner run (its summary; the
    run's on learner ranks, the actor's own on actor ranks); ``resume``: a run directory to
    continue from (its newest valid checkpoint, written with or without actors)."""
    from hpcdqn.actors.learner import run_role

    return run_role(cfg, quiet, mem_per_rank, resume)
