"""Apply a policy: a real smaller / lower-precision model, not a mask.

Order matters and is fixed: channel groups are removed first (search.channels), the surviving
layer is factorized by truncated SVD, sparsity masks are attached, and precision is applied
last, after fine-tuning (which trains through the quantizer), so the deployed weights are
rounded once.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.utils.parametrize as parametrize
from torch import nn

from search.channels import prune_channels
from search.data import Inputs, Loss, Split, as_inputs, cross_entropy
from search.int8 import Int8Linear, calibrate, quantize_linears
from search.policy import LayerPolicy, Policy, layer_rank
from search.quantize import Mask, nm_mask, parse_nm, quantize
from search.storage import nm_bytes, weight_bytes


@dataclass(frozen=True)
class ModelStats:
    """What a candidate costs before it is compiled."""

    params: int
    flops: int  # multiply-adds x 2 for one example
    size_bytes: int  # bytes the weights take in their deployed precision (int8 scales included)


class Half(nn.Module):
    """One Conv2d/Linear with 16-bit float (fp16 or bf16) weights and inputs; the bias is added
    in fp32 after.

    NOTE: TVM's torch frontend gives conv2d an fp32 output (fp32 accumulation) whatever its
    input types, so the cast back to fp32 sits right after the layer's op, where the two agree.
    """

    def __init__(self, layer: nn.Module, dtype: torch.dtype = torch.float16) -> None:
        super().__init__()
        self.layer = layer
        self.bias = layer.bias
        self.dtype = dtype
        layer.bias = None
        layer.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(x.to(self.dtype)).float()
        if self.bias is None:
            return y
        return y + (self.bias.view(1, -1, 1, 1) if y.dim() == 4 else self.bias)


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def factorize(layer: nn.Module, rank: int, split: str = "channel") -> nn.Sequential:
    """Truncated SVD to `rank`: Linear -> Linear(in, r) + Linear(r, out); Conv kxk -> kxk to r,
    then 1x1 (split "channel"), or kx1 to r, then 1xk (split "spatial", Jaderberg et al.).

    The factors keep the top singular values as they are (the best rank-r approximation),
    also when the rank was chosen by soft thresholding: shrinking them would only add error
    for the fine-tune to undo.
    """
    if split == "spatial" and isinstance(layer, nn.Conv2d):
        return _factorize_spatial(layer, rank)
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


def _factorize_spatial(layer: nn.Conv2d, rank: int) -> nn.Sequential:
    """W[o,c,y,x] ~ sum_r V[r,c,y] H[o,r,x]: the SVD of W arranged as a (c*kh) x (o*kw) matrix."""
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


def restructure(model: nn.Module, policy: Policy, example: Inputs, data: Split | None = None,
                loss: Loss = cross_entropy) -> nn.Module:
    """The fp32 smaller model of a policy (channels removed, layers factorized, sparsity masks
    attached); a new copy. `data` (training split) and `loss` feed gradient channel
    importances."""
    model = copy.deepcopy(model).eval()
    plan = {n: (lp.sparsity, lp.importance) for n, lp in policy.layers.items() if lp.sparsity}
    if plan:
        prune_channels(model, plan, example, data, loss=loss)
    for name, lp in policy.layers.items():
        if lp.factorized:
            layer = model.get_submodule(name)
            _set(model, name, factorize(layer, layer_rank(layer, lp), lp.split))
        for m in weight_layers(model.get_submodule(name)):
            mask = sparsity_mask(m.weight.data, lp)
            if mask is not None:  # a parametrization keeps pruned weights zero while fine-tuning
                parametrize.register_parametrization(m, "weight", Mask(mask))
    return model


def sparsity_mask(w: torch.Tensor, lp: LayerPolicy) -> torch.Tensor | None:
    """Unstructured magnitude pruning (the `prune` fraction of smallest |w| zeroed) and/or an
    N:M pattern, as one mask; None when the layer keeps every weight."""
    mask = None
    if lp.prune > 0.0:
        k = int(round(lp.prune * w.numel()))
        if k > 0:
            cut = w.abs().reshape(-1).kthvalue(k).values
            mask = w.abs() > cut
    if lp.nm != "off":
        nm = nm_mask(w, *parse_nm(lp.nm))
        mask = nm if mask is None else mask & nm
    return mask


def weight_layers(module: nn.Module) -> list[nn.Module]:
    """The Conv2d/Linear layers of a module (a layer, or the pair it was factorized into)."""
    return [m for m in module.modules() if isinstance(m, nn.Conv2d | nn.Linear)]


@torch.no_grad()
def apply_precision(model: nn.Module, policy: Policy, data: Split | None = None,
                    calibration: int = 256) -> nn.Module:
    """Make the weights final, in place: sparsity masks and training-time transforms baked in,
    then shared k-means values, int8/int4/ternary/binary per-channel values, or a 16-bit layer.

    An int8 Linear becomes a real integer layer (search.int8.Int8Linear: activations quantized
    with a range calibrated on `calibration` training inputs, int8 x int8 -> int32 kernels in
    TVM) when `data` is given. Int8 convs and 4/2/1-bit weights are weight storage: TVM computes
    those layers in fp32 on the dequantized values, a size win only. fp16/bf16 are real 16-bit
    layers.
    """
    model.eval()
    for m in weight_layers(model):  # masks (and fake quantizers) become plain weights now
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    int8_linears = []
    for name, lp in policy.layers.items():
        if lp.share:
            for m in weight_layers(model.get_submodule(name)):
                m.weight.data = share_weights(m.weight.data, lp.share)
        elif lp.bits == 8 and data is not None:
            for sub, m in model.get_submodule(name).named_modules():
                if isinstance(m, nn.Linear):
                    int8_linears.append(f"{name}.{sub}" if sub else name)
                elif isinstance(m, nn.Conv2d):
                    m.weight.data = quantize(m.weight.data, 8)
        elif lp.bits <= 8:  # (shared values are already a small codebook)
            for m in weight_layers(model.get_submodule(name)):
                m.weight.data = quantize(m.weight.data, lp.bits)
        elif lp.bits == 16:
            dtype = torch.bfloat16 if lp.half == "bf16" else torch.float16
            target = model.get_submodule(name)
            if isinstance(target, nn.Sequential):  # a factorized pair: each half separately
                for i, leaf in enumerate(list(target)):
                    target[i] = Half(leaf, dtype)
            else:
                _set(model, name, Half(target, dtype))
    if int8_linears:
        sample = Split(data).head(calibration)
        acts = calibrate(model, int8_linears, [b.inputs for b in sample.batches(64)])
        quantize_linears(model, acts)
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


def build(model: nn.Module, policy: Policy, example: Inputs, data: Split | None = None,
          loss: Loss = cross_entropy) -> nn.Module:
    """Structure and precision without fine-tuning (the deployed form of an untrained candidate).
    `data`: the training split, for gradient channel importances and int8 calibration."""
    return apply_precision(restructure(model, policy, example, data, loss), policy, data)


@torch.no_grad()
def model_stats(model: nn.Module, policy: Policy, example: Inputs) -> ModelStats:
    """Parameters, FLOPs and deployed weight bytes of a (compressed) model."""
    macs = 0

    def hook(m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal macs
        per_out = (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1] \
            if isinstance(m, nn.Conv2d) else m.in_features
        macs += out[0].numel() * per_out

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, nn.Conv2d | nn.Linear | Int8Linear)]
    try:
        model.eval()(*(t[:1] for t in as_inputs(example)))
    finally:
        for h in handles:
            h.remove()
    counted: set[int] = set()
    size = sum(layer_bytes(model.get_submodule(name), lp, counted)
               for name, lp in policy.layers.items())
    size += _plain_bytes(model, counted)
    return ModelStats(params=layer_params(model), flops=2 * macs, size_bytes=size)


def layer_bytes(module: nn.Module, lp: LayerPolicy, counted: set[int] | None = None) -> int:
    """Stored bytes of one (compressed) layer at its policy's precision: the one byte counter
    (model_stats sums it; `search show` prints it per layer). `counted` collects the tensors
    it counted, so the caller does not count them twice."""
    counted = set() if counted is None else counted
    size = 0
    for m in module.modules():
        if isinstance(m, Int8Linear):  # int8 weights + fp32 scales, bias, input range
            counted.update(id(b) for b in m.buffers())
            size += m.weight_q.numel() + 4 * (2 * m.out_features + 2)
    for m in weight_layers(module):
        for p in m.parameters():
            counted.add(id(p))
            if p is m.weight:
                size += stored_weight_bytes(m, lp)
            else:  # biases stay fp32 (a 16-bit layer adds its bias in fp32 after)
                size += p.numel() * p.element_size()
    return size + _plain_bytes(module, counted)


def _plain_bytes(module: nn.Module, counted: set[int]) -> int:
    """Bytes of the parameters and buffers not counted yet, as they are held."""
    size = 0
    for p in list(module.parameters()) + list(module.buffers()):
        if id(p) not in counted:
            counted.add(id(p))
            size += p.numel() * p.element_size()
    return size


def layer_params(module: nn.Module) -> int:
    """Parameters of a (compressed) module; an int8 layer's weights and bias are buffers."""
    return sum(p.numel() for p in module.parameters()) + sum(
        m.weight_q.numel() + m.out_features for m in module.modules()
        if isinstance(m, Int8Linear))


def stored_weight_bytes(m: nn.Module, lp: LayerPolicy) -> int:
    """Bytes of one (final) weight as stored: its values at the policy's bits (a k-means code
    plus codebook when shared; per-channel fp32 scales for int8 and below), in the smallest
    format its zeros allow (Deep Compression's relative indices + Huffman, or N:M)."""
    w = m.weight
    value_bits = lp.share or lp.bits
    size = (w.numel() * value_bits + 7) // 8
    if lp.prune > 0:
        index_bits = 8 if isinstance(m, nn.Conv2d) else 5  # Han et al.'s choice
        size = min(size, weight_bytes(w, value_bits, index_bits))
    if lp.nm != "off":
        size = min(size, nm_bytes(w, *parse_nm(lp.nm), value_bits))
    if lp.share:
        size += (1 << lp.share) * 4  # the codebook
    elif lp.bits <= 8:
        size += w.shape[0] * 4  # one fp32 scale per output channel
    return size


def output_tolerance(policy: Policy, fp32: float = 1e-3) -> float:
    """How far a compiled/exported output may be from PyTorch's: 16-bit layers round
    differently in each runtime (bf16 keeps 8 bits of mantissa, fp16 11)."""
    halves = {lp.half for lp in policy.layers.values() if lp.bits == 16}
    return 1e-1 if "bf16" in halves else 5e-2 if halves else fp32
