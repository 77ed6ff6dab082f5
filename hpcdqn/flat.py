"""Parameters and gradients living in one contiguous float32 buffer each.

Every parameter of a (stage of a) Q-network is a *view* into ``flat.data`` and its gradient a
view into ``flat.grad``. So:

- the allreduce is one in-place MPI call on ``flat.grad`` (no packing, no copies),
- the optimizer steps one tensor (Adam is elementwise, so this is the same update as per-tensor),
- the target network sync is one ``copy_`` / ``lerp_``, the broadcast one ``Bcast``,
- the cross-rank consistency check is one checksum.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class FlatModule(nn.Module):
    def __init__(self, layers: list[nn.Module], device: str | torch.device = "cpu"):
        super().__init__()
        self.net = nn.Sequential(*layers).to(device)
        params = list(self.net.parameters())
        total = sum(p.numel() for p in params)
        self.flat = nn.Parameter(torch.zeros(total, dtype=torch.float32, device=device))
        self.flat.grad = torch.zeros_like(self.flat)
        self.slices: list[tuple[int, int]] = []
        off = 0
        with torch.no_grad():
            for p in params:
                n = p.numel()
                self.flat.data[off:off + n].copy_(p.data.reshape(-1))
                p.data = self.flat.data[off:off + n].view_as(p)
                p.grad = self.flat.grad[off:off + n].view_as(p)
                self.slices.append((off, n))
                off += n
        self._params = params
        self._leaf_forwards = [m.forward for m in _unroll(self.net)]

    def forward(self, x):
        # the leaf modules in order, called without nn.Module's per-call hook machinery
        for f in self._leaf_forwards:
            x = f(x)
        return x

    @property
    def numel(self) -> int:
        return self.flat.numel()

    def zero_grad_(self) -> None:
        # autograd accumulates in place into the existing .grad views, so zeroing the one flat
        # buffer zeroes every parameter's gradient
        self.flat.grad.zero_()

    def load_flat_(self, values) -> None:
        with torch.no_grad():
            self.flat.data.copy_(torch.as_tensor(values, dtype=torch.float32))

    def checksum(self) -> float:
        return float(self.flat.data.double().sum() + (self.flat.data.double() ** 2).sum())

    def numpy_data(self) -> np.ndarray:
        return self.flat.data.detach().cpu().numpy()


def _unroll(m: nn.Module) -> list[nn.Module]:
    """The modules a (nested) nn.Sequential runs, in order; other modules stay whole."""
    if isinstance(m, nn.Sequential):
        return [leaf for child in m for leaf in _unroll(child)]
    return [m]
