"""Cutting a Q-network's ordered layer list into ``pp`` contiguous pipeline stages.

A stage runs from one *boundary* to the next. A boundary ``(i, r)`` sits before output row ``r``
of layer ``i``; ``r = 0`` is the plain layer boundary before layer ``i``. Stage ``s`` holds what
lies between boundaries ``s`` and ``s + 1``: whole layers, and where a boundary falls inside a
Linear layer (``r > 0``), a *piece* of it (see ``LinearPiece``).

Flattened in layer order, the network's parameters form one vector; a Linear layer's part of it
is ``[W.flatten(), b]`` with ``W`` of shape ``[out, in]``, so output rows ``[r0, r1)`` are the
contiguous slice ``[r0 * in, r1 * in)`` (the bias goes with the last piece). Every stage therefore
holds one contiguous range ``[lo, hi)`` of that vector (``param_range``): checkpoints store it per
layer and re-partition it over any other layout.

- Explicit: ``network.cuts = [c1, ..., c_{pp-1}]`` cuts at layer boundaries (stage i holds layers
  ``[c_i, c_{i+1})``).
- Default: balanced by parameter count. The best contiguous split at layer boundaries is used
  when it is within 5% of an even split; otherwise (``network.split_layers``, the default) the
  boundaries go to the Linear rows nearest to ``k * total / pp``, so stages hold equal parameter
  counts (and, for an MLP, equal GEMM work). A benchmark net like 512 -> 4096 x 4 -> 18 has no
  layer boundary closer than 18.9M vs 33.6M parameters for pp=2; row cuts give 26.2M each.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from hpcdqn.parallel.flat import linear_accumulating
from hpcdqn.parallel.grid import LayoutError
from hpcdqn.rl.networks import num_params

BALANCE_SLACK = 1.05      # layer boundaries are kept if their largest stage is within 5% of even


class PartitionError(LayoutError):
    """The requested pipeline split cannot be made from this layer list."""


Boundary = tuple[int, int]          # (layer index, output row); row 0 = before the layer


def stage_ranges(cuts: list[int], n_layers: int) -> list[tuple[int, int]]:
    bounds = [0, *cuts, n_layers]
    return [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


def check_cuts(cuts: list[int], n_layers: int, pp: int) -> None:
    cuts = list(cuts)
    if pp > n_layers:
        raise PartitionError(
            f"pp={pp} pipeline stages but the network has only {n_layers} layers (each stage needs "
            f">= 1 layer): use pp <= {n_layers}, more hidden layers (network.hidden), or "
            "network.split_layers=true with network.cuts=[] to cut inside Linear layers")
    if len(cuts) + 1 != pp:
        raise PartitionError(
            f"network.cuts={cuts} makes {len(cuts) + 1} stages but pp={pp}: give exactly pp-1 = "
            f"{pp - 1} cut points, or network.cuts=[] to balance by parameter count")
    for c in cuts:
        if not isinstance(c, int) or isinstance(c, bool) or not 0 < c < n_layers:
            raise PartitionError(
                f"network.cuts={cuts}: cut {c!r} is out of range; cuts fall between layers, so each "
                f"must be in 1..{n_layers - 1} for this {n_layers}-layer network")
    if cuts != sorted(set(cuts)):
        raise PartitionError(f"network.cuts={cuts} must be strictly increasing")


def balanced_cuts(sizes: list[int], pp: int) -> list[int]:
    """Cut points splitting ``sizes`` (per-layer parameter counts) into ``pp`` contiguous
    non-empty groups minimising the largest group's sum."""
    n = len(sizes)
    if pp > n:
        check_cuts([], n, pp)      # raises the clear error
    prefix = [0]
    for s in sizes:
        prefix.append(prefix[-1] + s)

    @lru_cache(maxsize=None)
    def best(i: int, k: int):
        """Split layers[i:] into k groups -> (cost key, cuts)."""
        if k == 1:
            total = prefix[n] - prefix[i]
            return (total, 0), ()
        out = None
        for j in range(i + 1, n - k + 2):           # first group: layers[i:j]
            first = prefix[j] - prefix[i]
            (rest_max, _), rest_cuts = best(j, k - 1)
            key = (max(first, rest_max), first)
            if out is None or key < out[0]:
                out = (key, (j, *rest_cuts))
        return out

    return list(best(0, pp)[1])


def partition(layers, pp: int, cuts: list[int] | None = None) -> list[tuple[int, int]]:
    """The ``pp`` stage ranges for ``layers`` at layer boundaries (explicit ``cuts`` or balanced
    by parameters)."""
    n = len(layers)
    if cuts:
        check_cuts(list(cuts), n, pp)
        return stage_ranges(list(cuts), n)
    return stage_ranges(balanced_cuts([num_params(m) for m in layers], pp), n)


# -- cutting inside Linear layers --------------------------------------------------------------------
def splittable(layer: nn.Module):
    """(linear, activation or None) for a layer that may be cut by output rows, else None: a
    plain ``nn.Linear`` (the head) or ``Sequential(Linear, ReLU)`` (a dense layer)."""
    if isinstance(layer, nn.Linear):
        return layer, None
    if (isinstance(layer, nn.Sequential) and len(layer) == 2 and isinstance(layer[0], nn.Linear)
            and isinstance(layer[1], nn.ReLU)):
        return layer[0], layer[1]
    return None


def layer_offsets(layers) -> list[int]:
    """Where each layer's parameters start in the flattened network (plus the total at the end)."""
    off = [0]
    for m in layers:
        off.append(off[-1] + num_params(m))
    return off


def boundary_offset(layers, b: Boundary, offsets: list[int]) -> int:
    """Where boundary ``b`` falls in the flattened parameters (``offsets``: ``layer_offsets``)."""
    i, r = b
    if r == 0:
        return offsets[i]
    return offsets[i] + r * splittable(layers[i])[0].in_features


def param_ranges(layers, stages: list[tuple[Boundary, Boundary]]) -> list[tuple[int, int]]:
    """Every stage's range ``[lo, hi)`` of the flattened network's parameters."""
    offsets = layer_offsets(layers)
    return [(boundary_offset(layers, a, offsets), boundary_offset(layers, b, offsets))
            for a, b in stages]


def cut_into_stages(layers, pp: int, cuts: list[int] | None = None,
                split_layers: bool = True) -> list[tuple[Boundary, Boundary]]:
    """The ``pp`` stages as (start, stop) boundaries; see the module docstring."""
    n = len(layers)
    if cuts or not split_layers:
        return [((a, 0), (b, 0)) for a, b in partition(layers, pp, cuts)]
    offsets = layer_offsets(layers)
    total = offsets[-1]
    rows = _row_boundaries(layers, pp, offsets)
    if pp <= n:
        whole = [((a, 0), (b, 0)) for a, b in partition(layers, pp)]
        if rows is None or _largest(layers, whole, offsets) <= BALANCE_SLACK * _largest(layers, rows, offsets):
            return whole
    if rows is None:
        raise PartitionError(
            f"pp={pp} pipeline stages cannot each get parameters from this {n}-layer network "
            f"({total} parameters): use fewer stages")
    return rows


def _largest(layers, stages, offsets) -> int:
    return max(boundary_offset(layers, b, offsets) - boundary_offset(layers, a, offsets)
               for a, b in stages)


def _row_boundaries(layers, pp: int, offsets: list[int]):
    """Boundaries at the allowed positions nearest to k * total / pp, or None if some stage
    would be left without parameters."""
    total = offsets[-1]
    bounds: list[Boundary] = [(0, 0)]
    for k in range(1, pp):
        t = k * total / pp
        i = max(j for j in range(len(layers)) if offsets[j] <= t)
        cands = [(i, 0), (i + 1, 0)] if i + 1 < len(layers) else [(i, 0)]
        lin = splittable(layers[i])
        if lin is not None and lin[0].out_features > 1:
            r = min(max(1, round((t - offsets[i]) / lin[0].in_features)), lin[0].out_features - 1)
            cands.append((i, r))
        bounds.append(min(cands, key=lambda b: (abs(boundary_offset(layers, b, offsets) - t), b)))
    bounds.append((len(layers), 0))
    offs = [boundary_offset(layers, b, offsets) for b in bounds]
    if any(offs[k + 1] <= offs[k] for k in range(pp)):
        return None
    return [(bounds[k], bounds[k + 1]) for k in range(pp)]


class LinearPiece(nn.Module):
    """Output rows ``[r0, r1)`` of a Linear layer (+ its activation), as one pipeline stage holds
    it when a boundary falls inside the layer.

    The pieces of a layer run on consecutive stages and pass the layer's input on: a piece gets
    ``z = [x, h_0 .. h_{r0})`` (just ``x`` for the first piece), computes ``h = x W[r0:r1]^T`` and
    sends ``[z, h]`` on; the last piece adds the bias and applies the activation to
    ``[h_0 .. h_out)``. Same function as the whole layer; autograd sends the input's gradient
    back through the pass-through columns. Parameters: ``weight`` (rows r0:r1), and ``bias`` in
    the last piece only, so the pieces' parameters, concatenated, are the layer's ``[W, b]``."""

    def __init__(self, layer: nn.Module, r0: int, r1: int):
        super().__init__()
        lin, act = splittable(layer)
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.r0, self.r1 = r0, r1
        self.first, self.last = r0 == 0, r1 == lin.out_features
        self.weight = nn.Parameter(lin.weight.detach()[r0:r1].clone())
        self.bias = nn.Parameter(lin.bias.detach().clone()) if self.last and lin.bias is not None else None
        self.act = act

    def forward(self, z):
        return self._run(z, F.linear)

    def forward_accumulating(self, z):
        """The same function; backward adds the weight gradient into ``weight.grad`` in place
        (``flat.linear_accumulating``; ``FlatModule.accumulate_grads_in_place`` picks it)."""
        return self._run(z, linear_accumulating)

    def _run(self, z, linear):
        if self.first:
            x, prev = z, None
        else:
            x, prev = z[:, :self.in_features], z[:, self.in_features:]
        h = linear(x, self.weight)
        if not self.last:
            return torch.cat([z, h], dim=1)
        y = h if prev is None else torch.cat([prev, h], dim=1)
        if self.bias is not None:
            y = y + self.bias
        return self.act(y) if self.act is not None else y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, rows=[{self.r0}, {self.r1}) of {self.out_features}"


def stage_modules(layers, start: Boundary, stop: Boundary) -> list[nn.Module]:
    """The modules of the stage between two boundaries (whole layers and Linear pieces)."""
    (i0, r0), (i1, r1) = start, stop
    out = []
    for i in range(i0, i1 + (1 if r1 > 0 else 0)):
        lo = r0 if i == i0 else 0
        hi = r1 if (i == i1 and r1 > 0) else None
        if lo == 0 and hi is None:
            out.append(layers[i])
        else:
            full = splittable(layers[i])[0].out_features
            out.append(LinearPiece(layers[i], lo, full if hi is None else hi))
    return out


def describe(stages: list[tuple[Boundary, Boundary]]) -> list[str]:
    """Human-readable stage contents, e.g. 'layers [0, 2) + layer 2 rows [0, 1024)'."""
    out = []
    for (i0, r0), (i1, r1) in stages:
        if i0 == i1:
            out.append(f"layer {i0} rows [{r0}, {r1})")
            continue
        parts = []
        if r0:
            parts.append(f"layer {i0} rows [{r0}, end)")
            i0 += 1
        if i1 > i0:
            parts.append(f"layers [{i0}, {i1})")
        if r1:
            parts.append(f"layer {i1} rows [0, {r1})")
        out.append(" + ".join(parts))
    return out
