"""Weight quantizers: uniform per-channel int8/int4, ternary and binary weights with a scale,
N:M masks, and the straight-through estimator that trains through them.

One function per rounding rule, used both when a candidate is deployed (`apply_precision`) and
while it is fine-tuned (quantization-aware training), so the fine-tune sees the very weights that
ship.
"""

from __future__ import annotations

import torch
from torch import nn


def _per_channel(w: torch.Tensor) -> torch.Tensor:
    """A weight as rows of one output channel each (conv: out x in*kh*kw)."""
    return w.reshape(w.shape[0], -1)


def _view(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return v.view((-1,) + (1,) * (w.dim() - 1))


def quantize(w: torch.Tensor, bits: int) -> torch.Tensor:
    """The weight as deployed at `bits` (32/16 return it unchanged), in w's dtype.

    - 8, 4: symmetric uniform, one scale per output channel (max |w| -> 2^(b-1) - 1).
    - 2: ternary {-a, 0, +a} per channel (TWN, Li et al.: zero below 0.7 * mean |w|,
      a = mean of the |w| kept).
    - 1: binary {-a, +a} per channel (XNOR-Net, Rastegari et al.: a = mean |w|).
    """
    if bits >= 16:
        return w
    rows = _per_channel(w)
    if bits == 1:
        alpha = rows.abs().mean(dim=1)
        return torch.where(w >= 0, 1.0, -1.0).to(w.dtype) * _view(alpha, w)
    if bits == 2:
        delta = 0.7 * rows.abs().mean(dim=1)
        keep = rows.abs() > delta[:, None]
        alpha = (rows.abs() * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1)
        return (torch.sign(w) * keep.reshape(w.shape)) * _view(alpha, w)
    levels = (1 << (bits - 1)) - 1
    scale = _view(rows.abs().amax(dim=1).clamp_min(1e-12) / levels, w)
    return (w / scale).round().clamp(-levels, levels) * scale


def nm_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M sparsity: in every group of M consecutive input weights of an output channel, keep
    the N largest by magnitude (the pattern sparse tensor cores run; 2:4 on Ampere)."""
    rows = _per_channel(w)
    cols = rows.shape[1]
    pad = (-cols) % m
    padded = torch.nn.functional.pad(rows.abs(), (0, pad), value=-1.0)
    groups = padded.reshape(rows.shape[0], -1, m)
    top = groups.topk(n, dim=2).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, top, True)
    return mask.reshape(rows.shape[0], -1)[:, :cols].reshape(w.shape)


def parse_nm(pattern: str) -> tuple[int, int]:
    """'2:4' -> (2, 4)."""
    n, m = (int(v) for v in pattern.split(":"))
    if not 0 < n < m:
        raise ValueError(f"N:M pattern needs 0 < N < M, got {pattern!r}")
    return n, m


class Mask(nn.Module):
    """A fixed 0/1 mask on a weight (a `torch.nn.utils.parametrize` parametrization): pruned
    weights stay zero through the fine-tune, and gradients flow only to the kept ones."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


class FakeQuant(nn.Module):
    """Quantization-aware training: the forward pass uses the quantized weight, the backward pass
    the identity (straight-through estimator, Bengio et al. 2013)."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + (quantize(w, self.bits) - w).detach()


class DropConnect(nn.Module):
    """DropConnect (Wan et al. 2013): each weight is zeroed with probability p in training,
    rescaled by 1/(1-p) so evaluation uses the plain weight."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return w
        keep = torch.rand_like(w) >= self.p
        return w * keep / (1.0 - self.p)
