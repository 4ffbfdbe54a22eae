"""Real int8 layers, the torch side: calibrated activations (`calibrate`, post-training, a few
batches through torch.ao observers) and `quantize_layers` (nn.Linear -> Int8Linear, nn.Conv2d ->
Int8Conv2d, each torch forward the reference of its kernel). search.backend.int8 lowers what
TVM's frontend makes of them to int8 x int8 -> int32 kernels."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F


class ActQuant(NamedTuple):
    """Per-tensor affine uint8 quantization of a layer's input: q = clamp(round(x/s) + zp)."""

    scale: float
    zero_point: int  # 0..255; 0 for non-negative (post-ReLU) inputs


# --------------------------------------------------------------------------------------------
# torch side


def _runtime_scalar(value: float) -> torch.Tensor:
    """A calibrated scalar as a 1-element tensor, not a 0-d one: TVM inlines 0-d constants into
    the fused kernel as literals, so every calibration made new kernels that no tuning record
    matched (a trial's int8 layers always tuned); a 1-element constant is a kernel argument,
    and the kernels of two calibrations are the same workload (the kernel library's)."""
    return torch.tensor([float(value)])


def _legacy_scalars(state: dict[str, Any], prefix: str) -> None:
    """Weights saved before the scalars were 1-element tensors load too."""
    for name in ("act_scale", "zero_point"):
        key = prefix + name
        if key in state and state[key].dim() == 0:
            state[key] = state[key].reshape(1)


class Int8Linear(nn.Module):
    """A Linear computed in integers: uint8 activation x int8 weight (per output channel),
    int32 accumulation, then one fp32 multiply-add.

    y = float(sum_k q[k] * wq[n, k]) * (s_x * s_w[n]) + (b[n] - zp * s_x * s_w[n] * sum_k wq[n, k])

    which equals (q - zp) * s_x @ (wq * s_w)ᵀ + b: the zero-point term is folded into the bias, so
    the kernel is a plain u8 x i8 dot product (what VNNI computes). The forward is the exact
    reference of the compiled kernel (integer matmul in int32) and exports with torch.export.
    """

    def __init__(self, linear: nn.Linear, act: ActQuant | float) -> None:
        super().__init__()
        if not isinstance(act, ActQuant):
            act = ActQuant(float(act), 0)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        act_scale, zero_point = float(act.scale), int(act.zero_point)
        w = linear.weight.detach().float()
        w_scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        wq = (w / w_scale[:, None]).round().clamp(-127, 127).to(torch.int8)
        scale = (act_scale * w_scale).float()
        bias = linear.bias.detach().float() if linear.bias is not None else torch.zeros_like(scale)
        # the ONNX form's integer ops subtract the zero point themselves: the bias without it
        self.register_buffer("onnx_bias", bias.clone())
        bias = bias - zero_point * scale * wq.to(torch.int32).sum(dim=1).float()
        # buffers, not attributes: a saved state_dict restores the calibration too
        self.register_buffer("act_scale", _runtime_scalar(act_scale))
        self.register_buffer("zero_point", _runtime_scalar(zero_point))
        self.register_buffer("weight_q", wq)  # int8 (out, in)
        self.register_buffer("weight_scale", w_scale)  # fp32 (out,): for storage accounting
        self.register_buffer("scale", scale)  # fp32 (out,) = s_x * s_w
        self.register_buffer("bias", bias)  # fp32 (out,), zero-point term folded in

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str,
                              *args: Any) -> None:
        _legacy_scalars(state_dict, prefix)
        nn.Module._load_from_state_dict(self, state_dict, prefix, *args)  # (shared by both)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.round(x / self.act_scale) + self.zero_point
        return torch.clamp(q, 0, 255).to(torch.uint8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return _OnnxInt8Linear.apply(x, _as_u8(self.weight_q), self.scale, self.onnx_bias,
                                         float(self.act_scale), int(self.zero_point))
        q = self.quantize_input(x)
        acc = torch.matmul(q.to(torch.int32), self.weight_q.to(torch.int32).t())
        return acc.to(torch.float32) * self.scale + self.bias


    computes_in_int8 = True  # the compile-and-time path checks the graph runs it in int8

    def stored_bytes(self) -> int:
        """int8 weights + fp32 per-channel scales and bias + the input's scale and zero point."""
        return self.weight_q.numel() + 4 * (2 * self.out_features + 2)

    def stored_params(self) -> int:
        return self.weight_q.numel() + self.out_features

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, "
                f"act_scale={float(self.act_scale):.4g}, zero_point={int(self.zero_point)}")


class Int8Conv2d(nn.Module):
    """A Conv2d computed in integers, as Int8Linear is: uint8 activation (per-tensor, calibrated)
    x int8 weight (per output channel), int32 accumulation, one fp32 multiply-add per output.

    Zero padding in the float domain is padding with the zero point in the integer domain, so
    with a zero point the input is padded explicitly with `zp` and the conv has none: every window
    then sums the same K = C/groups * kh * kw products, and the zero-point term
    zp * s_x * s_w[n] * sum(wq[n]) folds into the bias. The torch forward convolves the integer
    values in fp32 (torch has no CPU integer conv): exact while partial sums stay below 2^24,
    and within 6e-8 relative beyond; the compiled kernel accumulates exactly in int32.
    Only `padding_mode="zeros"` with numeric padding (`int8_convertible`).
    """

    def __init__(self, conv: nn.Conv2d, act: ActQuant | float) -> None:
        super().__init__()
        if not isinstance(act, ActQuant):
            act = ActQuant(float(act), 0)
        if not int8_convertible(conv):
            raise ValueError(f"{conv} has padding {conv.padding!r} / mode {conv.padding_mode!r}"
                             f": an int8 conv needs numeric zero padding")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = tuple(conv.kernel_size), tuple(conv.stride)
        self.padding, self.dilation = tuple(conv.padding), tuple(conv.dilation)
        self.groups = conv.groups
        act_scale, zero_point = float(act.scale), int(act.zero_point)
        w = conv.weight.detach().float()
        w_scale = w.flatten(1).abs().amax(dim=1).clamp_min(1e-12) / 127.0
        wq = (w / w_scale[:, None, None, None]).round().clamp(-127, 127).to(torch.int8)
        scale = (act_scale * w_scale).float()
        bias = conv.bias.detach().float() if conv.bias is not None else torch.zeros_like(scale)
        self.register_buffer("onnx_bias", bias.clone())  # (as Int8Linear's)
        bias = bias - zero_point * scale * wq.to(torch.int32).flatten(1).sum(dim=1).float()
        self.register_buffer("act_scale", _runtime_scalar(act_scale))
        self.register_buffer("zero_point", _runtime_scalar(zero_point))
        self.register_buffer("weight_q", wq)  # int8 (out, in/groups, kh, kw)
        self.register_buffer("weight_scale", w_scale)
        self.register_buffer("scale", scale)  # fp32 (out,) = s_x * s_w
        self.register_buffer("bias", bias)  # fp32 (out,), zero-point term folded in
        self.had_bias = conv.bias is not None
        self.folded_bn_scale = getattr(conv, "folded_bn_scale", None)  # (fold_batchnorm)
        self.pad_value = zero_point  # a Python int: torch.export cannot pad with a buffer's value
        self.register_load_state_dict_post_hook(_refresh_pad_value)

    quantize_input = Int8Linear.quantize_input
    _load_from_state_dict = Int8Linear._load_from_state_dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return _OnnxInt8Conv.apply(x, _as_u8(self.weight_q), self.scale, self.onnx_bias,
                                       float(self.act_scale), int(self.zero_point),
                                       list(self.stride), list(self.padding * 2),
                                       list(self.dilation), self.groups)
        q = self.quantize_input(x)
        padding = self.padding
        if self.pad_value and any(padding):  # (zero point 0: the conv's own zero padding)
            ph, pw = padding
            q, padding = F.pad(q, (pw, pw, ph, ph), value=self.pad_value), (0, 0)
        acc = F.conv2d(q.to(torch.float32), self.weight_q.to(torch.float32), None, self.stride,
                       padding, self.dilation, self.groups)
        return acc * self.scale.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)

    computes_in_int8 = True

    def stored_bytes(self) -> int:
        return self.weight_q.numel() + 4 * (2 * self.out_channels + 2)

    def stored_params(self) -> int:
        """The conv's own parameter count: its weights, and a bias if it had one (the zero-point
        term alone makes no parameter; a folded BatchNorm leaves its shift as the bias)."""
        return self.weight_q.numel() + (self.out_channels if self.had_bias else 0)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, groups={self.groups}, "
                f"act_scale={float(self.act_scale):.4g}, zero_point={int(self.zero_point)}")


def _as_u8(wq: torch.Tensor) -> torch.Tensor:
    """int8 weights as uint8 with zero point 128 (folded into one uint8 initializer by the
    exporter): the same integers, (w + 128) - 128."""
    return (wq.to(torch.int16) + 128).to(torch.uint8)


def _onnx_int8(g: Any, x: Any, wq: Any, scale: Any, bias: Any, act_scale: float,
               zero_point: int, conv: dict[str, Any] | None) -> Any:
    """The ONNX form of an int8 layer, in ONNX's integer operators (what ONNX Runtime runs in
    int8): QuantizeLinear (uint8, round half to even and saturate, as `quantize_input`) ->
    MatMulInteger / ConvInteger (uint8 x uint8 -> int32, both zero points subtracted, padding
    in the zero-point domain) -> Cast -> per-channel Mul -> Add. The weights are 8-bit
    initializers: our int8 values + 128, with weight zero point 128.

    NOTE: uint8 x uint8, not uint8 x int8: on x86 CPUs without VNNI, ONNX Runtime computes
    u8 x s8 with VPMADDUBSW, whose int16 pair sums saturate (its quantization docs: "U8U8 ...
    doesn't have saturation issues"); a test's output moved 0.33 that way on such a machine.
    """
    s = g.op("Constant", value_t=torch.tensor(act_scale, dtype=torch.float32))
    zp = g.op("Constant", value_t=torch.tensor(zero_point, dtype=torch.uint8))
    w_zp = g.op("Constant", value_t=torch.tensor(128, dtype=torch.uint8))
    q = g.op("QuantizeLinear", x, s, zp)
    if conv is None:
        acc = g.op("MatMulInteger", q, g.op("Transpose", wq, perm_i=[1, 0]), zp, w_zp)
        shape = [-1]
    else:
        acc = g.op("ConvInteger", q, wq, zp, w_zp, **conv)
        shape = [1, -1, 1, 1]
    shape_c = g.op("Constant", value_t=torch.tensor(shape, dtype=torch.int64))
    y = g.op("Mul", g.op("Cast", acc, to_i=1), g.op("Reshape", scale, shape_c))
    return g.op("Add", y, g.op("Reshape", bias, shape_c))


class _OnnxInt8Linear(torch.autograd.Function):
    """Int8Linear under torch.onnx's TorchScript exporter (`_onnx_int8`); the forward is only
    traced for shapes."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor, act_scale: float, zero_point: int) -> torch.Tensor:
        return x @ wq.float().t() * scale + bias

    @staticmethod
    def symbolic(g: Any, x: Any, wq: Any, scale: Any, bias: Any, act_scale: float,
                 zero_point: int) -> Any:
        return _onnx_int8(g, x, wq, scale, bias, act_scale, zero_point, None)


class _OnnxInt8Conv(torch.autograd.Function):
    """Int8Conv2d under torch.onnx's TorchScript exporter (`_onnx_int8`)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor, act_scale: float, zero_point: int, strides: list[int],
                pads: list[int], dilations: list[int], group: int) -> torch.Tensor:
        acc = F.conv2d(x, wq.float(), None, strides, pads[:2], dilations, group)
        return acc * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)

    @staticmethod
    def symbolic(g: Any, x: Any, wq: Any, scale: Any, bias: Any, act_scale: float,
                 zero_point: int, strides: list[int], pads: list[int], dilations: list[int],
                 group: int) -> Any:
        conv = {"strides_i": strides, "pads_i": pads, "dilations_i": dilations,
                "group_i": group}
        return _onnx_int8(g, x, wq, scale, bias, act_scale, zero_point, conv)


def _refresh_pad_value(module: Int8Conv2d, _keys: Any) -> None:
    module.pad_value = int(module.zero_point)


def int8_convertible(conv: nn.Conv2d) -> bool:
    """Whether Int8Conv2d can compute this conv: zero padding given as numbers."""
    return conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


def calibrate(model: nn.Module, layer_names: Iterable[str], batches: Iterable[Any],
              observer: str = "histogram") -> dict[str, ActQuant]:
    """Post-training activation ranges of the named layers' inputs, over a few batches.

    torch.ao observers (HistogramObserver by default: it minimises the quantization error, so
    outliers don't stretch the range; "minmax" for MinMaxObserver), uint8 per-tensor affine.
    Returns {layer name: ActQuant(scale, zero_point)}.
    """
    from torch.ao.quantization.observer import HistogramObserver, MinMaxObserver

    cls = {"histogram": HistogramObserver, "minmax": MinMaxObserver}[observer]
    names = list(layer_names)
    observers = {n: cls(dtype=torch.quint8, qscheme=torch.per_tensor_affine) for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda _m, args, n=n: observers[n](args[0].detach().float())) for n in names]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:  # a tensor, or a tuple of every input
                model(*(batch if isinstance(batch, tuple) else (batch,)))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    out = {}
    for n, obs in observers.items():
        scale, zp = obs.calculate_qparams()
        out[n] = ActQuant(float(scale.reshape(-1)[0]), int(zp.reshape(-1)[0]))
    return out


def quantize_layers(model: nn.Module, acts: dict[str, ActQuant | float]) -> nn.Module:
    """Replace each named nn.Linear with an Int8Linear and each nn.Conv2d with an Int8Conv2d
    (in place; returns the model)."""
    for name, act in acts.items():
        layer = model.get_submodule(name)
        if isinstance(layer, nn.Linear):
            new: nn.Module = Int8Linear(layer, act)
        elif isinstance(layer, nn.Conv2d):
            new = Int8Conv2d(layer, act)
        else:
            raise TypeError(f"{name} is {type(layer).__name__}, not nn.Linear or nn.Conv2d")
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
    return model


def fold_batchnorm(model: nn.Module, name: str) -> bool:
    """Fold the BatchNorm2d that follows conv `name` in its parent Sequential into the conv (as
    every int8 deployment does before quantizing: the per-channel weight scales absorb it), and
    replace the BatchNorm with Identity. `name` may be a factorized pair (a Sequential of
    convs): the BatchNorm goes into its last conv. True if one was folded."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not isinstance(parent, nn.Sequential) or not leaf.isdigit():
        return False
    i = int(leaf)
    if i + 1 >= len(parent) or not isinstance(parent[i + 1], nn.BatchNorm2d):
        return False
    holder, index, conv, bn = parent, i, parent[i], parent[i + 1]
    if isinstance(conv, nn.Sequential) and len(conv) and isinstance(conv[-1], nn.Conv2d):
        holder, index, conv = conv, len(conv) - 1, conv[-1]
    if not isinstance(conv, nn.Conv2d) or not bn.track_running_stats:
        return False
    fused = fuse_conv_bn_eval(conv.eval(), bn.eval())
    # what the weights were multiplied by (per output channel): the sensitivity pass compares
    # a layer's effective weight with the original's, before the fold
    fused.folded_bn_scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().clone()
    holder[index] = fused
    parent[i + 1] = nn.Identity()
    return True
