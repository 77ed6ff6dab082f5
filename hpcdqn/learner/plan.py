"""The execution plan of an update: the one place that decides how gradients are computed and
synced on this rank, printed once at start and recorded in summary.json.

- gradient path:
  - ``mlp-manual``: the hand-written MLP backward (``rl.mlp``), for a network that is exactly
    ``nn.Linear``/``nn.ReLU`` (on a pipeline stage: also ``partition.LinearPiece``; the
    backward split into input- and weight-gradient passes, ``parallel.stage_mlp``), when torch has the aten kernels it calls,
    ``parallel.manual_backward`` is on, the allreduce is not overlapped (that needs autograd's
    hooks), and it agreed with autograd on the real network at start-up (else: autograd, with
    a warning);
  - ``autograd-accumulate``: autograd, with every Linear's weight gradient added in place into
    the flat buffer (``flat.linear_accumulating``): pipeline stages that are not plain MLPs,
    where gradients accumulate over micro-batches;
  - ``autograd``: plain autograd (CNNs, dueling heads, the overlapped allreduce).
- sync: ``none`` (one replica), ``blocking`` (in-place ``Allreduce`` per bucket after
  backward), ``overlap`` (``Iallreduce`` per bucket from autograd hooks during backward; on a
  pipeline stage only with one micro-batch, since a bucket must be complete after one backward).
- allreduce (``parallel.allreduce``): ``flat`` (MPI_Allreduce) or ``hierarchical`` (in the node,
  among node leaders, in the node); ``auto`` asks the cost model
  (``hpcdqn.parallel.allreduce.choose_algorithm``: flat on one node). The choice, the node
  layout and both predicted times are in ``allreduce_choice``. The hierarchical path is
  blocking: with it, ``parallel.overlap`` is ignored (and ``auto`` with overlap stays flat).
- optimizer: ``fused-direct`` (torch's fused Adam kernel called directly) or ``torch`` (the
  public ``Adam.step``) where a private API is missing or the kernel is not fused.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field

import torch

from hpcdqn.config import LearnerConfig
from hpcdqn.parallel.allreduce import can_overlap, choose_algorithm
from hpcdqn.parallel import stage_mlp
from hpcdqn.parallel.flat import FlatModule
from hpcdqn.rl import mlp
from hpcdqn.rl.optim import uses_direct_kernel

MANUAL_TOLERANCE = 1e-5     # max |difference| relative to the gradient's largest entry


@dataclass(frozen=True)
class ExecutionPlan:
    device: str
    gradient: str                 # mlp-manual | autograd-accumulate | autograd
    sync: str                     # none | blocking | overlap
    buckets: int
    bucket_mb: float
    optimizer: str                # fused-direct | torch (Adam) | rmsprop
    manual_check: float | None = None   # max |hand-written - autograd| at start-up
    notes: tuple[str, ...] = field(default=())
    allreduce: str = "flat"             # flat | hierarchical
    allreduce_choice: dict | None = None   # layout, predicted times, reason (dp > 1)

    @property
    def overlap(self) -> bool:
        return self.sync == "overlap"

    def describe(self) -> str:
        check = "" if self.manual_check is None else f" (start-up check vs autograd: max |diff| " \
                                                     f"{self.manual_check:.1e})"
        c = self.allreduce_choice or {}
        algo = (f" {self.allreduce} ({c.get('requested')}: {c.get('reason')}; {c.get('nodes')} "
                f"node(s) x <= {c.get('ranks_per_node')} rank(s); predicted per update flat "
                f"{c.get('predicted_flat_s', 0) * 1e6:.1f} us, hierarchical "
                f"{c.get('predicted_hierarchical_s', 0) * 1e6:.1f} us)") if c else ""
        sync = {"none": "none (one replica)",
                "blocking": f"blocking{algo} Allreduce, {self.buckets} bucket(s) <= {self.bucket_mb:g} MiB",
                "overlap": f"overlapped Iallreduce, {self.buckets} bucket(s) <= {self.bucket_mb:g} MiB"}
        return (f"gradient={self.gradient}{check}; sync={sync[self.sync]}; "
                + ("optimizer=RMSprop (torch)" if self.optimizer == "rmsprop"
                   else f"optimizer=Adam ({self.optimizer})") + f"; device={self.device}"
                + "".join(f"; {n}" for n in self.notes))

    def as_dict(self) -> dict:
        return asdict(self)


def decide(cfg: LearnerConfig, online: FlatModule, opt, dp_comm, pipeline: bool, buckets: int,
           stage_ends: tuple[bool, bool], loss) -> ExecutionPlan:
    """The plan for a learner holding ``online`` (one stage, or the whole network);
    ``stage_ends``: (first, last) stage of a pipeline; ``loss``: the learner's (``rl.losses``),
    whose gradient the hand-written backward is checked with."""
    par = cfg.parallel
    one_backward = not pipeline or cfg.micro_batches == 1
    overlap = par["overlap"] and one_backward and can_overlap(online, dp_comm)
    notes = []
    if par["overlap"] and not overlap and dp_comm.Get_size() > 1:
        notes.append("parallel.overlap ignored: " + ("needs micro_batches=1 on a pipeline stage"
                                                      if not one_backward else "gradients on a GPU"))
    choice = None
    if dp_comm.Get_size() > 1:
        choice = choose_algorithm(par["allreduce"], dp_comm, 4 * online.numel, buckets)
        if overlap and choice["algorithm"] == "hierarchical":
            if choice["requested"] == "auto":
                choice = {**choice, "algorithm": "flat", "reason": "overlap needs the flat Iallreduce"}
            else:
                overlap = False
                notes.append("parallel.overlap ignored: the hierarchical allreduce is blocking")
    sync = "overlap" if overlap else "blocking" if dp_comm.Get_size() > 1 else "none"
    optimizer = ("rmsprop" if isinstance(opt, torch.optim.RMSprop)
                 else "fused-direct" if uses_direct_kernel(opt) else "torch")
    common = dict(device=str(online.flat.device), sync=sync, buckets=buckets,
                  bucket_mb=float(par["bucket_mb"]), optimizer=optimizer, allreduce_choice=choice,
                  allreduce=choice["algorithm"] if choice else "flat")
    if pipeline:
        return _stage_plan(cfg, online, overlap, stage_ends, loss, notes, common)
    layers = mlp.mlp_layers(online.net)
    if overlap or layers is None or not par["manual_backward"] or not mlp.kernels_available():
        if layers is not None and par["manual_backward"] and not overlap:
            notes.append("hand-written MLP backward unavailable in this torch: autograd")
        return ExecutionPlan(gradient="autograd", notes=tuple(notes), **common)
    diff = mlp.check_against_autograd(online, layers, online.flat.grad, layers[0].w.shape[1], loss)
    if not diff <= MANUAL_TOLERANCE:
        msg = (f"the hand-written MLP backward differs from autograd by {diff:.3g} on this network: "
               "falling back to autograd (set parallel.manual_backward=false to skip the check)")
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        return ExecutionPlan(gradient="autograd", manual_check=diff,
                             notes=tuple(notes + ["hand-written backward failed its check"]), **common)
    return ExecutionPlan(gradient="mlp-manual", manual_check=diff, notes=tuple(notes), **common)


def _stage_plan(cfg, online, overlap, stage_ends, loss, notes, common) -> ExecutionPlan:
    """A pipeline stage: the hand-written MLP backward (``parallel.stage_mlp``, guarded as on
    one rank: plain Linear/ReLU leaves, the aten kernels, ``manual_backward``, no overlap, and
    agreement with autograd on the real stage at start-up), else autograd."""
    fallback = "autograd" if overlap else "autograd-accumulate"
    ops = None if overlap or not cfg.parallel["manual_backward"] else stage_mlp.stage_ops(online.net)
    if ops is None:
        return ExecutionPlan(gradient=fallback, notes=tuple(notes), **common)
    first, last = stage_ends
    diff = stage_mlp.check_against_autograd(online, ops, stage_mlp.input_width(ops), last,
                                            not first, loss)
    if not diff <= MANUAL_TOLERANCE:
        warnings.warn(f"the hand-written MLP backward differs from autograd by {diff:.3g} on this "
                      "pipeline stage: falling back to autograd (set parallel.manual_backward="
                      "false to skip the check)", RuntimeWarning, stacklevel=3)
        return ExecutionPlan(gradient=fallback, manual_check=diff,
                             notes=tuple(notes + ["hand-written backward failed its check"]), **common)
    return ExecutionPlan(gradient="mlp-manual", manual_check=diff, notes=tuple(notes), **common)
