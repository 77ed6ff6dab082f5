"""Cutting a Q-network's ordered layer list into ``pp`` contiguous pipeline stages.

A partition is a list of ``pp`` half-open layer ranges ``[(a0, b0), (a1, b1), ...]`` with
``a0 = 0``, ``b_i = a_{i+1}``, ``b_last = len(layers)`` and every stage holding >= 1 layer.

- Explicit: ``network.cuts = [c1, ..., c_{pp-1}]`` (stage i holds layers ``[c_i, c_{i+1})``).
- Default: balanced by parameter count, i.e. the contiguous split that minimises the largest
  stage's parameter count (ties: fewest parameters in the first stage, which also steps the
  environments).
"""

from __future__ import annotations

from functools import lru_cache

from .grid import LayoutError
from .networks import num_params


class PartitionError(LayoutError):
    """The requested pipeline split cannot be made from this layer list."""


def stage_ranges(cuts: list[int], n_layers: int) -> list[tuple[int, int]]:
    bounds = [0, *cuts, n_layers]
    return [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


def check_cuts(cuts: list[int], n_layers: int, pp: int) -> None:
    cuts = list(cuts)
    if pp > n_layers:
        raise PartitionError(
            f"pp={pp} pipeline stages but the network has only {n_layers} layers (each stage needs "
            f">= 1 layer): use pp <= {n_layers} or more hidden layers (network.hidden)")
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
    """The ``pp`` stage ranges for ``layers`` (explicit ``cuts`` or balanced by parameters)."""
    n = len(layers)
    if cuts:
        check_cuts(list(cuts), n, pp)
        return stage_ranges(list(cuts), n)
    if pp > n:
        check_cuts([0] * (pp - 1), n, pp)
    c = balanced_cuts([num_params(m) for m in layers], pp)
    check_cuts(c, n, pp)
    return stage_ranges(c, n)
