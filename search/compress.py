"""Apply a policy: a real smaller / lower-precision model, not a mask.

Order matters and is fixed: channels are removed first (importance by weight norm), the surviving
layer is factorized by truncated SVD, and precision is applied last, after fine-tuning, so the
fine-tune trains fp32 weights and the deployed weights are rounded once.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.utils.prune
from torch import nn

from search.graph import channel_consumers
from search.policy import Policy, factorized_rank, round_channels
from search.storage import weight_bytes


@dataclass(frozen=True)
class ModelStats:
    """What a candidate costs before it is compiled."""

    params: int
    flops: int  # multiply-adds x 2 for one example
    size_bytes: int  # bytes the weights take in their deployed precision (int8 scales included)


class Fp16(nn.Module):
    """One Conv2d/Linear with fp16 weights and fp16 inputs (bias added in fp32 after).

    NOTE: TVM's torch frontend gives conv2d an fp32 output (fp32 accumulation) whatever its
    input types, so the cast back to fp32 sits right after the layer's op, where the two agree.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.bias = layer.bias
        layer.bias = None
        layer.half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(x.half()).float()
        if self.bias is None:
            return y
        return y + (self.bias.view(1, -1, 1, 1) if y.dim() == 4 else self.bias)


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _keep_outputs(layer: nn.Module, idx: torch.Tensor) -> None:
    layer.weight = nn.Parameter(layer.weight.data[idx].clone())
    if layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias.data[idx].clone())
    if isinstance(layer, nn.Conv2d):
        layer.out_channels = len(idx)
    else:
        layer.out_features = len(idx)


def _keep_inputs(layer: nn.Module, idx: torch.Tensor) -> None:
    layer.weight = nn.Parameter(layer.weight.data[:, idx].clone())
    if isinstance(layer, nn.Conv2d):
        layer.in_channels = len(idx)
    else:
        layer.in_features = len(idx)


def _keep_bn(bn: nn.Module, idx: torch.Tensor) -> None:
    bn.num_features = len(idx)
    if bn.affine:
        bn.weight = nn.Parameter(bn.weight.data[idx].clone())
        bn.bias = nn.Parameter(bn.bias.data[idx].clone())
    if bn.running_mean is not None:
        bn.running_mean = bn.running_mean[idx].clone()
        bn.running_var = bn.running_var[idx].clone()


def prune_channels(model: nn.Module, policy: Policy, example: torch.Tensor) -> None:
    """Remove the lowest-L2-norm output channels of each layer, and the matching consumer inputs."""
    consumers = channel_consumers(model, example)
    for name, lp in policy.layers.items():
        if lp.sparsity == 0.0:
            continue
        if name not in consumers:
            raise ValueError(f"layer {name!r} cannot be channel-pruned (no single consumer)")
        layer = model.get_submodule(name)
        w = layer.weight.data
        n_out = w.shape[0]
        keep = min(round_channels(n_out * (1 - lp.sparsity)), n_out)
        norms = w.reshape(n_out, -1).norm(dim=1)
        idx = torch.sort(torch.topk(norms, keep).indices).values
        _keep_outputs(layer, idx)
        cons = consumers[name]
        for bn in cons.batchnorms:
            _keep_bn(model.get_submodule(bn), idx)
        per = cons.per_channel  # a flatten spreads each channel over `per` features, channel-major
        cols = (idx[:, None] * per + torch.arange(per)[None, :]).reshape(-1)
        _keep_inputs(model.get_submodule(cons.name), cols)


def factorize(layer: nn.Module, ratio: float, split: str = "channel") -> nn.Sequential:
    """Truncated SVD: Linear -> Linear(in, r) + Linear(r, out); Conv kxk -> kxk to r, then 1x1
    (split "channel"), or kx1 to r, then 1xk (split "spatial", Jaderberg et al.)."""
    if split == "spatial" and isinstance(layer, nn.Conv2d):
        return _factorize_spatial(layer, ratio)
    rank = factorized_rank(layer, ratio)
    w = layer.weight.data
    mat = w.reshape(w.shape[0], -1)
    if min(mat.shape) > 512 and rank <= min(mat.shape) // 4:
        # randomized SVD (Halko et al.): exact enough for the top singular values, 20x faster
        u, s, v = torch.svd_lowrank(mat, q=min(rank + 32, min(mat.shape)), niter=4)
        vh = v.T
    else:
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    root = s[:rank].sqrt()
    first_w = root[:, None] * vh[:rank]
    second_w = u[:, :rank] * root[None, :]
    if isinstance(layer, nn.Conv2d):
        first = nn.Conv2d(layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding,
                          layer.dilation, bias=False)
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


def _factorize_spatial(layer: nn.Conv2d, ratio: float) -> nn.Sequential:
    """W[o,c,y,x] ~ sum_r V[r,c,y] H[o,r,x]: the SVD of W arranged as a (c*kh) x (o*kw) matrix."""
    rank = factorized_rank(layer, ratio, "spatial")
    w = layer.weight.data  # (out, in, kh, kw)
    n_out, n_in, kh, kw = w.shape
    mat = w.permute(1, 2, 0, 3).reshape(n_in * kh, n_out * kw)
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    root = s[:rank].sqrt()
    vertical = (u[:, :rank] * root).T.reshape(rank, n_in, kh, 1)
    horizontal = (root[:, None] * vh[:rank]).reshape(rank, n_out, kw).permute(1, 0, 2)
    first = nn.Conv2d(n_in, rank, (kh, 1), (layer.stride[0], 1), (layer.padding[0], 0),
                      (layer.dilation[0], 1), bias=False)
    first.weight = nn.Parameter(vertical.contiguous())
    second = nn.Conv2d(rank, n_out, (1, kw), (1, layer.stride[1]), (0, layer.padding[1]),
                       (1, layer.dilation[1]), bias=layer.bias is not None)
    second.weight = nn.Parameter(horizontal.reshape(n_out, rank, 1, kw).contiguous())
    if layer.bias is not None:
        second.bias = nn.Parameter(layer.bias.data.clone())
    return nn.Sequential(first, second)


def restructure(model: nn.Module, policy: Policy, example: torch.Tensor) -> nn.Module:
    """The fp32 smaller model of a policy (channels removed, layers factorized); a new copy."""
    model = copy.deepcopy(model).eval()
    prune_channels(model, policy, example)
    for name, lp in policy.layers.items():
        if lp.rank < 1.0:
            _set(model, name, factorize(model.get_submodule(name), lp.rank, lp.split))
        if lp.prune > 0.0:  # torch's pruning keeps the mask through the fine-tune
            for m in _weights(model.get_submodule(name)):
                torch.nn.utils.prune.l1_unstructured(m, "weight", amount=lp.prune)
    return model


def _weights(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d | nn.Linear)]


@torch.no_grad()
def apply_precision(model: nn.Module, policy: Policy) -> nn.Module:
    """Round weights to the policy's precision, in place: shared k-means values, int8
    per-channel, or an fp16 layer.

    NOTE: int8 is weight storage (symmetric, per output channel); the TVM graph computes it in
    fp32 because TVM 0.27's Relax has no int8-weight kernels reachable from torch.export, so it
    shows as a size win only. fp16 is real: the layer's weights and arithmetic are half.
    """
    for m in _weights(model):  # unstructured pruning is final now: zeros become plain weights
        if torch.nn.utils.prune.is_pruned(m):
            torch.nn.utils.prune.remove(m, "weight")
    for name, lp in policy.layers.items():
        if lp.share:
            for m in _weights(model.get_submodule(name)):
                m.weight.data = share_weights(m.weight.data, lp.share)
        if lp.bits == 8 and not lp.share:  # shared values are already a small codebook
            for m in _weights(model.get_submodule(name)):
                w = m.weight.data
                scale = w.reshape(w.shape[0], -1).abs().amax(dim=1).clamp_min(1e-12) / 127.0
                shape = (-1,) + (1,) * (w.dim() - 1)
                m.weight.data = (w / scale.view(shape)).round().clamp(-127, 127) * scale.view(shape)
        elif lp.bits == 16:
            target = model.get_submodule(name)
            if isinstance(target, nn.Sequential):  # a factorized pair: each half separately
                for i, leaf in enumerate(list(target)):
                    target[i] = Fp16(leaf)
            else:
                _set(model, name, Fp16(target))
    return model


def share_weights(w: torch.Tensor, bits: int, sample: int = 100_000, seed: int = 0
                  ) -> torch.Tensor:
    """Weight sharing (Deep Compression): k-means to 2^bits values; zeros stay zero.

    Centroids are fitted on a sample (scikit-learn's k-means++, linear init as in Han et al. is
    not needed at these sizes), then every weight snaps to its nearest centroid.
    """
    from sklearn.cluster import KMeans

    flat = w.detach().float().reshape(-1).cpu().numpy()
    nonzero = flat != 0
    values = flat[nonzero]
    k = 1 << bits
    if values.size <= k:
        return w
    rng = np.random.default_rng(seed)
    fit = values if values.size <= sample else rng.choice(values, sample, replace=False)
    km = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(fit.reshape(-1, 1))
    centers = np.sort(km.cluster_centers_.reshape(-1))
    edges = (centers[1:] + centers[:-1]) / 2
    out = flat.copy()
    out[nonzero] = centers[np.searchsorted(edges, values)]
    return torch.from_numpy(out).reshape(w.shape).to(w.dtype)


def build(model: nn.Module, policy: Policy, example: torch.Tensor) -> nn.Module:
    """Structure and precision without fine-tuning (the deployed form of an untrained candidate)."""
    return apply_precision(restructure(model, policy, example), policy)


@torch.no_grad()
def model_stats(model: nn.Module, policy: Policy, example: torch.Tensor) -> ModelStats:
    """Parameters, FLOPs and deployed weight bytes of a (compressed) model."""
    macs = 0

    def hook(m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal macs
        per_out = (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1] \
            if isinstance(m, nn.Conv2d) else m.in_features
        macs += out[0].numel() * per_out

    handles = [m.register_forward_hook(hook) for m in _weights(model)]
    try:
        model.eval()(example[:1])
    finally:
        for h in handles:
            h.remove()
    size = 0
    counted: set[int] = set()
    for name, lp in policy.layers.items():
        for m in _weights(model.get_submodule(name)):
            for p in m.parameters():
                counted.add(id(p))
                value_bits = lp.share or lp.bits  # shared: a code per weight + a codebook
                if lp.share and p is m.weight:
                    size += (1 << lp.share) * 4
                if p is m.weight and lp.prune > 0:  # stored sparse when that is smaller
                    index_bits = 8 if isinstance(m, nn.Conv2d) else 5  # Han et al.'s choice
                    size += weight_bytes(p, value_bits, index_bits)
                elif p is m.weight:
                    size += (p.numel() * value_bits + 7) // 8
                else:
                    size += p.numel() * (32 if lp.bits == 8 else lp.bits) // 8  # int8: fp32 bias
            if lp.bits == 8 and not lp.share:
                size += m.weight.shape[0] * 4  # one fp32 scale per output channel
    for p in list(model.parameters()) + list(model.buffers()):
        if id(p) not in counted:
            size += p.numel() * p.element_size()
    params = sum(p.numel() for p in model.parameters())
    return ModelStats(params=params, flops=2 * macs, size_bytes=size)
