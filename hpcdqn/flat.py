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

    def forward(self, x):
        return self.net(x)

    @property
    def numel(self) -> int:
        return self.flat.numel()

    def zero_grad_(self) -> None:
        self.flat.grad.zero_()
        # autograd keeps accumulating into the existing view; re-attach if something replaced it
        for p, (off, n) in zip(self._params, self.slices):
            if p.grad is None or p.grad.data_ptr() != self.flat.grad[off:].data_ptr():
                p.grad = self.flat.grad[off:off + n].view_as(p)

    def load_flat_(self, values) -> None:
        with torch.no_grad():
            self.flat.data.copy_(torch.as_tensor(values, dtype=torch.float32))

    def checksum(self) -> float:
        return float(self.flat.data.double().sum() + (self.flat.data.double() ** 2).sum())

    def numpy_data(self) -> np.ndarray:
        return self.flat.data.detach().cpu().numpy()
