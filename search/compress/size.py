"""The one byte counter of a policy's formats: what a (compressed) model's weights would take
stored in the smallest format each knob knows (packed sub-8-bit values, sparse + Huffman, N:M,
codebooks), and its parameters and FLOPs. This is an estimate (`ideal_size_bytes`): what an
artifact really carries is measured from it (search.backend.artifact, the front's size_bytes).
Each knob says what its weights cost (search.compress.knob: value bits, a sparse format, scales
or a codebook); a module a knob adds may count itself (`stored_bytes()`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from search.compress.knob import active, weight_layers
from search.compress.policy import LayerPolicy, Policy
from search.core.data import Inputs, as_inputs


@dataclass(frozen=True)
class ModelStats:
    """What a candidate costs before it is compiled."""

    params: int
    flops: int  # multiply-adds x 2 for one example
    ideal_size_bytes: int  # estimate: the weights in the formats the knobs count (not written)


@torch.no_grad()
def model_stats(model: nn.Module, policy: Policy, example: Inputs) -> ModelStats:
    """Parameters, FLOPs and deployed weight bytes of a (compressed) model."""
    macs = 0

    def hook(m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal macs
        per_out = (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1] \
            if hasattr(m, "kernel_size") else m.in_features  # a conv, or an int8 conv
        macs += out[0].numel() * per_out

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, nn.Conv2d | nn.Linear) or hasattr(m, "stored_bytes")]
    try:
        model.eval()(*(t[:1] for t in as_inputs(example)))
    finally:
        for h in handles:
            h.remove()
    counted: set[int] = set()
    size = sum(layer_bytes(model.get_submodule(name), lp, counted)
               for name, lp in policy.layers.items())
    size += _plain_bytes(model, counted)
    return ModelStats(params=layer_params(model), flops=2 * macs, ideal_size_bytes=size)


def layer_bytes(module: nn.Module, lp: LayerPolicy, counted: set[int] | None = None) -> int:
    """Stored bytes of one (compressed) layer at its policy's precision (model_stats sums it;
    `search show` prints it per layer). `counted` collects the tensors it counted, so the
    caller does not count them twice."""
    counted = set() if counted is None else counted
    size = 0
    for m in module.modules():
        if hasattr(m, "stored_bytes"):  # a module a knob made counts itself (an int8 layer)
            counted.update(id(t) for t in list(m.parameters()) + list(m.buffers()))
            size += m.stored_bytes()
    for m in weight_layers(module):
        for p in m.parameters():
            if id(p) in counted:
                continue
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
    """Parameters of a (compressed) module; a module a knob made may hold its weights as
    buffers and count them itself (`stored_params()`)."""
    inside = {id(p) for m in module.modules() if hasattr(m, "stored_params")
              for p in m.parameters()}
    return sum(p.numel() for p in module.parameters() if id(p) not in inside) + sum(
        m.stored_params() for m in module.modules() if hasattr(m, "stored_params"))


def stored_weight_bytes(m: nn.Module, lp: LayerPolicy) -> int:
    """Bytes of one (final) weight as stored: its values at the bits the knobs give, in the
    smallest format a knob offers (dense, sparse + Huffman, N:M), plus what the knobs store
    beside (per-channel scales, a codebook)."""
    w = m.weight
    knobs = active(lp)
    bits = 32 if w.dtype == torch.float32 else 8 * w.element_size()
    for knob in knobs:
        bits = knob.value_bits(lp, bits)
    size = (w.numel() * bits + 7) // 8
    for knob in knobs:
        sparse = knob.sparse_bytes(w, lp, bits, m)
        if sparse is not None:
            size = min(size, sparse)
    return size + sum(knob.extra_bytes(w, lp) for knob in knobs)
