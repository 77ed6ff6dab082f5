"""Q-networks as an ordered sequence of layers.

Every network is a list of ``nn.Module`` *layers*; running them in order maps observations to
Q-values. The pipeline cuts this list into stages at layer boundaries, or inside a Linear layer
by output rows (``partition.LinearPiece``).

- MLP: ``[Linear+ReLU] * len(hidden)`` then the head.
- Nature-DQN CNN (Mnih et al. 2015) for image observations (C, 84, 84) uint8:
  ``[Scale, Conv 32x8x8/4+ReLU, Conv 64x4x4/2+ReLU, Conv 64x3x3/1+ReLU, Flatten,
  Linear 512+ReLU]`` then the head.
- Head: ``Linear(n_actions)``, or the dueling head Q = V + A - mean(A) (Wang et al. 2016).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class Scale(nn.Module):
    """uint8 pixels -> float in [0, 1]."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x.float() * self.factor


class DuelingHead(nn.Module):
    def __init__(self, in_features: int, n_actions: int):
        super().__init__()
        self.value = nn.Linear(in_features, 1)
        self.advantage = nn.Linear(in_features, n_actions)

    def forward(self, x):
        a = self.advantage(x)
        return self.value(x) + a - a.mean(dim=1, keepdim=True)


def _dense(i: int, o: int) -> nn.Module:
    return nn.Sequential(nn.Linear(i, o), nn.ReLU())


def _head(i: int, n_actions: int, dueling: bool) -> nn.Module:
    return DuelingHead(i, n_actions) if dueling else nn.Linear(i, n_actions)


def is_image(obs_shape: tuple) -> bool:
    return len(obs_shape) == 3


def build_layers(obs_shape: tuple, n_actions: int, hidden: list[int], dueling: bool = False,
                 seed: int | None = None) -> list[nn.Module]:
    """The Q-network's layers in order. ``seed`` makes the initial weights reproducible."""
    gen_state = None
    if seed is not None:
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
    try:
        if is_image(obs_shape):
            c, h, w = obs_shape
            convs = [nn.Sequential(nn.Conv2d(c, 32, 8, stride=4), nn.ReLU()),
                     nn.Sequential(nn.Conv2d(32, 64, 4, stride=2), nn.ReLU()),
                     nn.Sequential(nn.Conv2d(64, 64, 3, stride=1), nn.ReLU())]
            with torch.no_grad():
                x = torch.zeros(1, c, h, w)
                for m in convs:
                    x = m(x)
            flat = int(np.prod(x.shape[1:]))
            width = hidden[-1] if hidden else 512
            layers = [Scale(1.0 / 255.0), *convs, nn.Flatten(), _dense(flat, width)]
            last = width
        else:
            last = int(np.prod(obs_shape))
            layers = [nn.Flatten()] if len(obs_shape) > 1 else []
            for w in hidden:
                layers.append(_dense(last, w))
                last = w
        layers.append(_head(last, n_actions, dueling))
    finally:
        if gen_state is not None:
            torch.random.set_rng_state(gen_state)
    return layers


def num_params(layer: nn.Module) -> int:
    return sum(p.numel() for p in layer.parameters())


def unroll(m: nn.Module) -> list[nn.Module]:
    """The modules a (nested) nn.Sequential runs, in order; other modules stay whole."""
    if isinstance(m, nn.Sequential):
        return [leaf for child in m for leaf in unroll(child)]
    return [m]
