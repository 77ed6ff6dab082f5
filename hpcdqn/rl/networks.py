"""Q-networks as an ordered sequence of layers.

Every network is a list of ``nn.Module`` *layers*; running them in order maps observations to
Q-values. The pipeline cuts this list into stages at layer boundaries, or inside a Linear layer
by output rows (``partition.LinearPiece``).

- MLP: ``[Linear+ReLU] * len(hidden)`` then the head.
- Nature-DQN CNN (Mnih et al. 2015) for image observations (C, 84, 84) uint8:
  ``[Scale, Conv 32x8x8/4+ReLU, Conv 64x4x4/2+ReLU, Conv 64x3x3/1+ReLU, Flatten,
  Linear 512+ReLU]`` then the head.
- MinAtar CNN (Young & Tian 2019) for MinAtar's (C, 10, 10) {0, 1} grids:
  ``[Scale(1), Conv 16x3x3/1+ReLU, Flatten, Linear 128+ReLU]`` then the head (16*8*8 = 1024
  features into the dense layer).
- ``network.kind`` picks one: ``auto`` = the Nature CNN for image observations, else the MLP.
- Head: ``Linear(n_actions)``, or the dueling head Q = V + A - mean(A) (Wang et al. 2016), or
  (``network.head = "c51"``) ``Linear(n_actions * atoms)``: each action's return distribution
  as logits (``head_width``; its loss: ``rl.losses.C51Loss``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


class Scale(nn.Module):
    """uint8 pixels -> float in [0, 1], image batches in channels-last memory order: the convs
    (oneDNN on CPU, cuDNN's NHWC kernels on GPU) then run their backward about 1.7x faster
    on one CPU thread (Nature CNN, batch 32: 13 vs 23 ms); values and shapes are the same, and
    the layers' parameters and gradients stay plain contiguous tensors (flat buffers)."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        x = x.float() * self.factor
        return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


class DuelingHead(nn.Module):
    def __init__(self, in_features: int, n_actions: int):
        super().__init__()
        self.value = nn.Linear(in_features, 1)
        self.advantage = nn.Linear(in_features, n_actions)

    @property
    def out_features(self) -> int:
        return self.advantage.out_features

    def forward(self, x):
        a = self.advantage(x)
        return self.value(x) + a - a.mean(dim=1, keepdim=True)


def _dense(i: int, o: int) -> nn.Module:
    return nn.Sequential(nn.Linear(i, o), nn.ReLU())


def _head(i: int, n_actions: int, dueling: bool) -> nn.Module:
    return DuelingHead(i, n_actions) if dueling else nn.Linear(i, n_actions)


def is_image(obs_shape: tuple) -> bool:
    return len(obs_shape) == 3


KINDS = ("auto", "mlp", "nature", "minatar")


def resolve_kind(obs_shape: tuple, kind: str = "auto") -> str:
    """The network kind for ``obs_shape`` (``auto``: nature for images, else mlp); a clear
    error for a kind the observations cannot take."""
    if kind not in KINDS:
        raise ValueError(f"network.kind={kind!r} is not one of {KINDS}")
    if kind == "auto":
        return "nature" if is_image(obs_shape) else "mlp"
    if kind in ("nature", "minatar") and not is_image(obs_shape):
        raise ValueError(f"network.kind={kind!r} needs image observations (C, H, W); this env's "
                         f"are {tuple(obs_shape)}: use network.kind=mlp (or auto)")
    if kind == "minatar" and min(obs_shape[1:]) < 3:
        raise ValueError(f"network.kind='minatar' needs H, W >= 3 (its 3x3 convolution); the "
                         f"observations are {tuple(obs_shape)}")
    return kind


def minatar_layers(obs_shape: tuple, hidden: list[int]) -> tuple[list[nn.Module], int]:
    """The MinAtar paper's trunk (its layers, its output width): Conv 16x3x3 stride 1 + ReLU,
    Flatten, Linear ``hidden[-1]`` (the paper: 128) + ReLU. Inputs are {0, 1}: Scale(1) only
    makes them float."""
    c, h, w = obs_shape
    flat = 16 * (h - 2) * (w - 2)
    width = hidden[-1] if hidden else 128
    return [Scale(1.0), nn.Sequential(nn.Conv2d(c, 16, 3, stride=1), nn.ReLU()), nn.Flatten(),
            _dense(flat, width)], width


def build_layers(obs_shape: tuple, n_actions: int, hidden: list[int], dueling: bool = False,
                 seed: int | None = None, kind: str = "auto") -> list[nn.Module]:
    """The Q-network's layers in order. ``seed`` makes the initial weights reproducible;
    ``kind``: ``network.kind`` (``KINDS``)."""
    kind = resolve_kind(tuple(obs_shape), kind)
    gen_state = None
    if seed is not None:
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
    try:
        if kind == "minatar":
            layers, last = minatar_layers(tuple(obs_shape), hidden)
        elif kind == "nature":
            c, h, w = obs_shape
            convs = [nn.Sequential(nn.Conv2d(c, 32, 8, stride=4), nn.ReLU()),
                     nn.Sequential(nn.Conv2d(32, 64, 4, stride=2), nn.ReLU()),
                     nn.Sequential(nn.Conv2d(64, 64, 3, stride=1), nn.ReLU())]
            # the convs' output size by formula: a probe forward on the meta device (as
            # meta_layers builds) would import torch's meta kernels, ~70 MB in every rank
            for k, stride in ((8, 4), (4, 2), (3, 1)):
                h, w = (h - k) // stride + 1, (w - k) // stride + 1
            flat = 64 * h * w
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


# -- stage-only construction ---------------------------------------------------------------------
# ``build_layers(seed=s)`` draws every parameter tensor in layer order from one torch generator
# (nn.Linear / nn.Conv2d ``reset_parameters``: weight by kaiming_uniform_(a=sqrt(5)), then bias
# uniform(+-1/sqrt(fan_in))), and torch's CPU ``uniform_`` draws the generator serially, one
# value per element. Draw k of the stream is therefore element k of the flattened network
# (``FlatModule`` order), scaled by its tensor's bound: a rank can compute any range [lo, hi)
# of the initial parameters alone, by drawing (and discarding, in bounded chunks) the lo values
# before it. ``initial_flat`` does that; tests check it against ``build_layers`` bit for bit.
SKIP_CHUNK = 1 << 20          # floats drawn at a time while skipping (4 MB of scratch)


def meta_layers(obs_shape: tuple, n_actions: int, hidden: list[int],
                dueling: bool = False, kind: str = "auto") -> list[nn.Module]:
    """The network's layers with shapes only (torch's meta device): nothing is allocated and
    no random number is drawn. Stages are planned on these; ``initial_flat`` gives values."""
    with torch.device("meta"):
        return build_layers(obs_shape, n_actions, hidden, dueling, kind=kind)


HEADS, MAX_ATOMS = ("q", "c51"), 1024


def head_width(net: dict, n_actions: int) -> int:
    """The network's outputs per sample for ``network.head``: ``q``, one Q-value per action;
    ``c51``, ``network.atoms`` logits per action (a return distribution, ``rl.losses.C51Loss``)."""
    head = net.get("head", "q")
    if head not in HEADS:
        raise ValueError(f"network.head={head!r} is not one of {HEADS}")
    if head == "q":
        return n_actions
    atoms = net.get("atoms")
    if type(atoms) is not int or not 2 <= atoms <= MAX_ATOMS or net.get("dueling", False):
        raise ValueError(f"network.head='c51' needs 2 <= network.atoms <= {MAX_ATOMS} (it is "
                         f"{atoms!r}) and no dueling head")
    return n_actions * atoms


def network_layers(net: dict, obs_shape: tuple, n_actions: int, seed: int | None = None,
                   meta: bool = True) -> list[nn.Module]:
    """The layers a config's ``network`` section describes: on the meta device (shapes only),
    or built with ``seed`` (``meta=False``). ValueError for a network the section cannot
    describe (every caller reports it as the config's or file's error)."""
    args = (tuple(obs_shape), head_width(net, int(n_actions)), net["hidden"], net.get("dueling", False))
    kind = net.get("kind", "auto")     # (model files from before network.kind: auto)
    return meta_layers(*args, kind=kind) if meta else build_layers(*args, seed=seed, kind=kind)


def is_meta(layers) -> bool:
    return any(p.is_meta for m in layers for p in m.parameters())


def init_segments(layers) -> list[tuple[int, float]]:
    """(numel, uniform bound) of every parameter tensor in flattened order, as
    ``reset_parameters`` draws them."""
    gain = nn.init.calculate_gain("leaky_relu", math.sqrt(5))
    out = []
    for m in layers:
        for mod in m.modules():
            if not isinstance(mod, (nn.Linear, nn.Conv2d)):
                if any(True for _ in mod.parameters(recurse=False)):
                    raise TypeError(f"initial_flat: no initialisation rule for {type(mod).__name__}")
                continue
            w = mod.weight
            fan_in = int(np.prod(w.shape[1:]))
            out.append((w.numel(), math.sqrt(3.0) * (gain / math.sqrt(fan_in))))
            if mod.bias is not None:
                out.append((mod.bias.numel(), 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0))
    return out


def initial_flat(layers, seed: int, lo: int = 0, hi: int | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Elements [lo, hi) of the flattened initial parameters that ``build_layers(..., seed=seed)``
    gives (bit for bit), computed without building the network; written into ``out`` (CPU
    float32 of hi - lo elements) if given. Time O(hi); memory O(hi - lo) + 4 MB."""
    segs = init_segments(layers)
    total = sum(n for n, _ in segs)
    hi = total if hi is None else hi
    if not 0 <= lo <= hi <= total:
        raise ValueError(f"initial_flat: range [{lo}, {hi}) outside the network's {total} parameters")
    if out is None:
        out = torch.empty(hi - lo, dtype=torch.float32)
    g = torch.Generator().manual_seed(int(seed))
    scratch = torch.empty(min(SKIP_CHUNK, max(lo, 1)), dtype=torch.float32)
    left = lo
    while left > 0:                  # the draws before this range: made and thrown away
        k = min(left, scratch.numel())
        scratch[:k].uniform_(generator=g)
        left -= k
    start = 0
    for n, bound in segs:
        a, b = max(start, lo), min(start + n, hi)
        if a < b:
            out[a - lo:b - lo].uniform_(-bound, bound, generator=g)
        start += n
        if start >= hi:
            break
    return out
