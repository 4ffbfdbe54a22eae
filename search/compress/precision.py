"""Weight precision: the `bits` and `half` knobs.

- bits 16: a real 16-bit float layer (fp16 or bf16, as `half` says; `Half`).
- bits 8: a real integer layer (search.compress.int8: Int8Linear, Int8Conv2d with its
  BatchNorm folded in; activations calibrated on training inputs, uint8 x int8 -> int32 kernels
  in TVM). A conv with non-zero padding modes, and 4/2/1 bits, are rounded per-channel weights
  (search.compress.quantize) that TVM computes in fp32: a size win only.
The fine-tune trains through the rounding (a straight-through fake quantizer), so it sees the
weights that ship.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from search.compress.int8 import (
    calibrate,
    fold_batchnorm,
    int8_convertible,
    quantize_layers,
)
from search.compress.knob import BuildContext, Knob, active, set_module
from search.compress.quantize import FakeQuant, quantize

BITS = (32, 16, 8, 4, 2, 1)  # weights: fp32, 16-bit float, int8/int4 per-channel, ternary, binary
HALVES = ("fp16", "bf16")  # which 16-bit float `bits: 16` means
NAMES = {32: "fp32", 8: "int8", 4: "int4", 2: "ternary", 1: "binary"}
CALIBRATION_EXAMPLES = 256  # training inputs that set an int8 layer's activation range


def precision_of(lp: Any) -> str:
    """fp32, fp16, bf16, int8, int4, ternary or binary: how a layer's weights are deployed."""
    return lp.half if lp.bits == 16 else NAMES[lp.bits]


class Half(nn.Module):
    """One Conv2d/Linear with 16-bit float (fp16 or bf16) weights and inputs; the bias is added
    in fp32 after, along the layer's channel dimension (1 for a conv, the last for a Linear).

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
        if isinstance(self.layer, nn.Conv2d):
            return y + self.bias.view(1, -1, 1, 1)
        return y + self.bias

    @property
    def tolerance(self) -> float:
        """How far TVM's output of this layer may be from PyTorch's (bf16: 8 mantissa bits)."""
        return 1e-1 if self.dtype == torch.bfloat16 else 5e-2


class Bits(Knob):
    name = "bits"
    values = BITS
    default_choices = (32, 16, 8)  # 4/2/1-bit weights need quantization-aware fine-tuning
    doc = "weight precision: 32, 16 (a 16-bit float), 8 (int8), 4, 2 (ternary), 1 (binary)"

    def train_transform(self, lp: Any, options: Any) -> nn.Module | None:
        return FakeQuant(lp.bits) if options.qat and lp.bits <= 8 else None

    def apply_precision(self, model: nn.Module, policy: Any, ctx: BuildContext) -> None:
        int8_layers = []
        for name, lp in policy.layers.items():
            if self not in active(lp) or lp.bits == 32:
                continue
            if lp.bits == 16 or lp.bits == 8 and ctx.data is not None:
                # its BatchNorm into the weights before they round, as deployments do: left
                # behind a 16-bit conv (or a factorized int8 pair) it was a kernel of its own,
                # TVM's fold reaching only a BatchNorm right after an fp32 conv (35 extra
                # kernels on a 16-bit MobileNetV2, each a pass over memory and ~1 s of LLVM)
                fold_batchnorm(model, name)
            target = model.get_submodule(name)
            if lp.bits == 16:
                dtype = torch.bfloat16 if lp.half == "bf16" else torch.float16
                if isinstance(target, nn.Sequential):  # a factorized pair: each half separately
                    for i, leaf in enumerate(list(target)):
                        target[i] = Half(leaf, dtype)
                else:
                    set_module(model, name, Half(target, dtype))
                continue
            for sub, m in target.named_modules():
                if lp.bits == 8 and ctx.data is not None and (
                        isinstance(m, nn.Linear)
                        or isinstance(m, nn.Conv2d) and int8_convertible(m)):
                    int8_layers.append(f"{name}.{sub}" if sub else name)
                elif isinstance(m, nn.Conv2d | nn.Linear):
                    m.weight.data = quantize(m.weight.data, lp.bits)
        if int8_layers:
            from search.core.data import Split

            for name in int8_layers:  # its BatchNorm into the conv, before the weights round
                fold_batchnorm(model, name)
            sample = Split(ctx.data).head(CALIBRATION_EXAMPLES)
            acts = calibrate(model, int8_layers, [b.inputs for b in sample.batches(64)])
            quantize_layers(model, acts)

    def tolerance(self, lp: Any) -> float | None:
        """16-bit layers round differently in each runtime (bf16 keeps 8 bits of mantissa).
        An int8 layer computes exactly in each runtime, but x / s can land on the other side
        of a rounding boundary in another runtime's float arithmetic: one activation one step
        off, which a deep encoder carries to the output (2e-2 measured on MiniLM's logits)."""
        if lp.bits == 8:
            return 5e-2
        if lp.bits != 16:
            return None
        return 1e-1 if lp.half == "bf16" else 5e-2

    def value_bits(self, lp: Any, bits: int) -> int:
        return lp.bits

    def extra_bytes(self, w: torch.Tensor, lp: Any) -> int:
        return w.shape[0] * 4 if lp.bits <= 8 else 0  # one fp32 scale per output channel

    def label(self, lp: Any) -> str:
        if lp.bits == 32:
            return ""
        return lp.half if lp.bits == 16 else f"b{lp.bits}"


class HalfFormat(Knob):
    name = "half"
    values = HALVES
    needs = (("bits", 16),)
    doc = "which 16-bit float `bits: 16` means"

    def label(self, lp: Any) -> str:
        return ""  # the bits knob's label names it


BITS_KNOB = Bits()
HALF = HalfFormat()

