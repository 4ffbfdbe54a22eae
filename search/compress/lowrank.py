"""Low-rank factorization: the `rank`, `threshold` and `split` knobs, and the one SVD.

A layer is replaced by a pair of smaller layers from its truncated SVD: Linear -> Linear(in, r)
+ Linear(r, out); Conv kxk -> kxk to r, then 1x1 ("channel" split), or kx1 to r, then 1xk
("spatial" split, Jaderberg et al.). The rank is a kept fraction of full rank (`rank`), or the
number of singular values that survive soft thresholding (`threshold`). The sensitivity pass
reads its rank-r approximations from the same SVD (`top_svd`) the build uses.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from search.compress.channels import round_channels
from search.compress.knob import BuildContext, Knob, LayerInfo, set_module
from search.core.granularity import granularity

RANK_RATIOS = (1.0, 0.5, 0.25, 0.125, 0.0625)  # kept fraction of min(in, out); 1.0 = not factorized
THRESHOLDS = (0.0, 0.2, 0.4, 0.6, 0.8)  # soft threshold on singular values (x their mean); 0 = off
SPLITS = ("channel", "spatial")  # conv low-rank: kxk->r + 1x1, or kx1->r + 1xk (Jaderberg)
EXACT_SVD_MAX = 512  # matrices at most this on their short side get an exact SVD
SVD_OVERSAMPLE = 32
SVD_POWER_ITERATIONS = 2  # re-orthonormalized each time: the top singular values to ~1e-3


# --- the one SVD ----------------------------------------------------------------------------

def top_svd(mat: torch.Tensor, q: int, seed: int = 0
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U (m x k), S (k), V (n x k) with k >= q, singular values descending: exact for small
    matrices, else a randomized range finder (Halko et al.) with SVD_POWER_ITERATIONS (QR in
    between) and a Rayleigh-Ritz step through the small Gram matrix. Seeded: the same layer
    gives the same factors in the sensitivity pass and in every build."""
    mat = mat.detach().float()
    m, n = mat.shape
    k = min(m, n)
    p = min(q + SVD_OVERSAMPLE, k)
    if k <= EXACT_SVD_MAX or 2 * p >= k:
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        return u, s, vh.T
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(mat @ torch.randn(n, p, generator=gen))
    for _ in range(SVD_POWER_ITERATIONS):
        basis, _ = torch.linalg.qr(mat @ (mat.T @ basis))
    b = basis.T @ mat  # p x n
    lam, e = torch.linalg.eigh(b @ b.T)
    lam, e = lam.flip(0), e.flip(1)
    s = lam.clamp_min(0).sqrt()
    v = (b.T @ e) / s.clamp_min(1e-12)
    return basis @ e, s, v


_SPECTRA: dict[tuple, torch.Tensor] = {}  # weight fingerprint -> singular values


def spectrum(mat: torch.Tensor) -> torch.Tensor:
    """Singular values of a weight matrix, cached by content: a 5120x5120 layer takes ~18 s,
    and every trial's copy of the same layer has the same spectrum."""
    flat = mat.detach().float().reshape(-1)
    key = (tuple(mat.shape), float(flat.sum()), float(flat.abs().sum()),
           float((flat * torch.arange(len(flat)) / len(flat)).sum()))
    if key not in _SPECTRA:
        if len(_SPECTRA) > 256:
            _SPECTRA.clear()
        _SPECTRA[key] = torch.linalg.svdvals(mat.detach().float())
    return _SPECTRA[key]


# --- ranks ------------------------------------------------------------------------------------

def _io(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, nn.Conv2d):
        return layer.in_channels, layer.out_channels
    return layer.in_features, layer.out_features


def weight_matrix(layer: nn.Module, split: str = "channel") -> torch.Tensor:
    """The weight as the matrix its SVD factorizes: out x in (conv: out x in*kh*kw; split
    spatially: (in*kh) x (out*kw))."""
    w = layer.weight.data
    if isinstance(layer, nn.Conv2d) and split == "spatial":
        n_out, n_in, kh, kw = w.shape
        return w.permute(1, 2, 0, 3).reshape(n_in * kh, n_out * kw)
    return w.reshape(w.shape[0], -1)


def factorized_rank(layer: nn.Module, ratio: float, split: str = "channel") -> int:
    """The rank a ratio means for this layer, rounded to the channel multiple."""
    n_in, n_out = _io(layer)
    if isinstance(layer, nn.Conv2d) and split == "spatial":
        full = min(n_out * layer.kernel_size[1], n_in * layer.kernel_size[0])
    elif isinstance(layer, nn.Conv2d):
        full = min(n_out, n_in * layer.kernel_size[0] * layer.kernel_size[1])
    else:
        full = min(n_out, n_in)
    return min(round_channels(full * ratio, granularity().rank), full)


def soft_threshold_rank(singular: torch.Tensor, tau: float) -> int:
    """Iterative soft thresholding of singular values: shrink every value by lambda = tau x the
    mean of the survivors, keep those still positive, and repeat until the surviving set stops
    changing (it only shrinks, so this ends). The rank is how many survive.

    Unlike a fixed rank ratio, this adapts to the layer's spectrum: a layer whose energy sits in
    a few directions keeps few, a flat spectrum keeps many, at the same searched threshold.
    """
    s = singular.double()
    alive = torch.ones_like(s, dtype=torch.bool)
    while True:
        lam = tau * s[alive].mean()
        nxt = (s - lam) > 0
        if torch.equal(nxt, alive) or not nxt.any():
            break
        alive = nxt
    return max(1, int(alive.sum()))


def threshold_rank(layer: nn.Module, tau: float, split: str = "channel") -> int:
    """The rank soft thresholding keeps for this layer, rounded to the channel multiple."""
    singular = spectrum(weight_matrix(layer, split))
    return min(round_channels(soft_threshold_rank(singular, tau), granularity().rank),
               len(singular))


def factorized(lp: object) -> bool:
    return lp.rank < 1.0 or lp.threshold > 0.0


def layer_rank(layer: nn.Module, lp: object) -> int:
    """The rank a layer policy factorizes to (by threshold when one is set, else by ratio)."""
    if lp.threshold > 0.0:
        return threshold_rank(layer, lp.threshold, lp.split)
    return factorized_rank(layer, lp.rank, lp.split)


def _smaller(layer: nn.Module, rank: int) -> bool:
    """A factorized pair worth having: at most 80% of the layer's parameters."""
    n_in, n_out = _io(layer)
    k = layer.kernel_size[0] * layer.kernel_size[1] if isinstance(layer, nn.Conv2d) else 1
    return rank * (n_in * k + n_out) < 0.8 * sum(p.numel() for p in layer.parameters())


def _distinct_smaller(layer: nn.Module, options: tuple, rank_of) -> tuple:
    """The options (identity first) that give distinct factorizations smaller than the layer."""
    kept, seen = [options[0]], set()
    for option in options[1:]:
        r = rank_of(option)
        if r not in seen and _smaller(layer, r):
            seen.add(r)
            kept.append(option)
    return tuple(kept)


# --- the factorization ------------------------------------------------------------------------

def factorize(layer: nn.Module, rank: int, split: str = "channel") -> nn.Sequential:
    """The layer as a pair from its truncated SVD at `rank` (see the module docstring).

    The factors keep the top singular values as they are (the best rank-r approximation), also
    when the rank was chosen by soft thresholding: shrinking them would only add error for the
    fine-tune to undo. The first layer keeps the original's stride, padding (and its mode) and
    dilation; the second its bias.
    """
    if split == "spatial" and isinstance(layer, nn.Conv2d):
        return _factorize_spatial(layer, rank)
    w = layer.weight.data
    u, s, v = top_svd(w.reshape(w.shape[0], -1), rank)
    root = s[:rank].sqrt()
    first_w = root[:, None] * v[:, :rank].T
    second_w = u[:, :rank] * root[None, :]
    if isinstance(layer, nn.Conv2d):
        first = nn.Conv2d(layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding,
                          layer.dilation, bias=False, padding_mode=layer.padding_mode)
        first.weight = nn.Parameter(first_w.reshape(rank, *w.shape[1:]).contiguous())
        second = nn.Conv2d(rank, layer.out_channels, 1, bias=layer.bias is not None)
        second.weight = nn.Parameter(second_w.reshape(layer.out_channels, rank, 1, 1).contiguous())
    else:
        first = nn.Linear(layer.in_features, rank, bias=False)
        first.weight = nn.Parameter(first_w.contiguous())
        second = nn.Linear(rank, layer.out_features, bias=layer.bias is not None)
        second.weight = nn.Parameter(second_w.contiguous())
    if layer.bias is not None:
        second.bias = nn.Parameter(layer.bias.data.clone())
    return nn.Sequential(first, second)


def _factorize_spatial(layer: nn.Conv2d, rank: int) -> nn.Sequential:
    """W[o,c,y,x] ~ sum_r V[r,c,y] H[o,r,x]: the SVD of W arranged as a (c*kh) x (o*kw) matrix."""
    w = layer.weight.data  # (out, in, kh, kw)
    n_out, n_in, kh, kw = w.shape
    u, s, v = top_svd(weight_matrix(layer, "spatial"), rank)
    root = s[:rank].sqrt()
    vertical = (u[:, :rank] * root).T.reshape(rank, n_in, kh, 1)
    horizontal = (root[:, None] * v[:, :rank].T).reshape(rank, n_out, kw).permute(1, 0, 2)
    first = nn.Conv2d(n_in, rank, (kh, 1), (layer.stride[0], 1), (layer.padding[0], 0),
                      (layer.dilation[0], 1), bias=False, padding_mode=layer.padding_mode)
    first.weight = nn.Parameter(vertical.contiguous())
    second = nn.Conv2d(rank, n_out, (1, kw), (1, layer.stride[1]), (0, layer.padding[1]),
                       (1, layer.dilation[1]), bias=layer.bias is not None,
                       padding_mode=layer.padding_mode)
    second.weight = nn.Parameter(horizontal.reshape(n_out, rank, 1, kw).contiguous())
    if layer.bias is not None:
        second.bias = nn.Parameter(layer.bias.data.clone())
    return nn.Sequential(first, second)


class Truncations:
    """The rank-r approximations of one layer's weight (channel split), from one top_svd at the
    largest rank: the sensitivity pass evaluates every rank of a layer from it."""

    def __init__(self, layer: nn.Module, ranks: list[int], seed: int = 0) -> None:
        w = layer.weight.detach().float()
        self.shape = w.shape
        self.u, self.s, self.v = top_svd(w.reshape(w.shape[0], -1), max(ranks), seed)

    def weight(self, rank: int) -> torch.Tensor:
        return ((self.u[:, :rank] * self.s[:rank]) @ self.v[:, :rank].T).reshape(self.shape)


def pure_truncation(lp: object) -> bool:
    """A layer policy that only factorizes, channel-wise: its model is the layer's best
    low-rank approximation, which Truncations gives for every rank."""
    plain = lp.replace(rank=1.0, threshold=0.0)
    return factorized(lp) and lp.split == "channel" and plain.is_identity


# --- the knobs --------------------------------------------------------------------------------

class Rank(Knob):
    name = "rank"
    values = RANK_RATIOS
    bounds = (0.0, 1.0)
    interval = "(]"
    doc = "kept fraction of full rank (1.0: the layer is kept whole)"

    def offered(self, layer: LayerInfo, offered: Mapping[str, tuple]) -> tuple:
        return _distinct_smaller(layer.module, self.values,
                                 lambda r: factorized_rank(layer.module, r))

    def restructure(self, model: nn.Module, policy: object, ctx: BuildContext) -> None:
        """Factorizes every layer whose rank or threshold asks (split as its `split` says)."""
        for name, lp in policy.layers.items():
            if factorized(lp):
                layer = model.get_submodule(name)
                set_module(model, name, factorize(layer, layer_rank(layer, lp), lp.split))

    def label(self, lp: object) -> str:
        return f"r{lp.rank:g}" if lp.rank < 1.0 and lp.threshold == 0.0 else ""


class Threshold(Knob):
    name = "threshold"
    values = THRESHOLDS
    bounds = (0.0, 1.0)
    costly = True  # a layer's thresholds need its spectrum: seconds on a large layer
    doc = "> 0: the rank is chosen by soft-thresholding the singular values (overrides rank)"

    def offered(self, layer: LayerInfo, offered: Mapping[str, tuple]) -> tuple:
        if len(offered.get("rank", ())) <= 1:
            return self.values[:1]
        singular = spectrum(weight_matrix(layer.module))
        return _distinct_smaller(
            layer.module, self.values,
            lambda tau: min(round_channels(soft_threshold_rank(singular, tau),
                                           granularity().rank), len(singular)))

    def label(self, lp: object) -> str:
        return f"t{lp.threshold:g}" if lp.threshold > 0 else ""


class Split(Knob):
    name = "split"
    values = SPLITS
    needs = (("rank", "harshest"), ("threshold", "harshest"))
    doc = "how a conv is factorized: kxk->r + 1x1 (channel), or kx1->r + 1xk (spatial)"

    def offered(self, layer: LayerInfo, offered: Mapping[str, tuple]) -> tuple:
        spatial = layer.kind == "conv" and min(layer.module.kernel_size) > 1 \
            and len(offered.get("rank", ())) > 1
        return self.values if spatial else self.values[:1]

    def label(self, lp: object) -> str:
        return "sp" if lp.split == "spatial" and factorized(lp) else ""


RANK = Rank()
THRESHOLD = Threshold()
SPLIT = Split()
