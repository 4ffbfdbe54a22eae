"""Real int8 Linear layers, the torch side: calibrated activations (`calibrate`, post-training,
a few batches through torch.ao observers) and `quantize_linears` (nn.Linear -> Int8Linear, whose
torch forward is the exact reference of the kernel). search.backend.int8 lowers what TVM's
frontend makes of an Int8Linear to int8 kernels."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn


class ActQuant(NamedTuple):
    """Per-tensor affine uint8 quantization of a layer's input: q = clamp(round(x/s) + zp)."""

    scale: float
    zero_point: int  # 0..255; 0 for non-negative (post-ReLU) inputs


# --------------------------------------------------------------------------------------------
# torch side


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
        bias = bias - zero_point * scale * wq.to(torch.int32).sum(dim=1).float()
        # buffers, not attributes: a saved state_dict restores the calibration too
        self.register_buffer("act_scale", torch.tensor(act_scale))
        self.register_buffer("zero_point", torch.tensor(float(zero_point)))
        self.register_buffer("weight_q", wq)  # int8 (out, in)
        self.register_buffer("weight_scale", w_scale)  # fp32 (out,): for storage accounting
        self.register_buffer("scale", scale)  # fp32 (out,) = s_x * s_w
        self.register_buffer("bias", bias)  # fp32 (out,), zero-point term folded in

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.round(x / self.act_scale) + self.zero_point
        return torch.clamp(q, 0, 255).to(torch.uint8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.quantize_input(x)
        acc = torch.matmul(q.to(torch.int32), self.weight_q.to(torch.int32).t())
        return acc.to(torch.float32) * self.scale + self.bias

    computes_in_int8 = True  # the compile-and-time path checks the graph runs it in int8

    def stored_bytes(self) -> int:
        """int8 weights + fp32 per-channel scales and bias + the input's scale and zero point."""
        return self.weight_q.numel() + 4 * (2 * self.out_features + 2)

    def stored_params(self) -> int:
        return self.weight_q.numel() + self.out_features

    def latency_op(self, key_of: Callable[[nn.Module, bool], str], context: Mapping[str, Any]
                   ) -> tuple[str, Callable[[], nn.Module]]:
        """The per-layer latency table's key for this op, and a fresh op like it."""
        n_in, n_out = self.in_features, self.out_features
        act = ActQuant(float(self.act_scale), int(self.zero_point))
        key = (f"int8linear[{context.get('int8_kind', 'plain')}](out={n_out},"
               f"zp={int(act.zero_point != 0)})")
        return key, lambda: Int8Linear(nn.Linear(n_in, n_out), act)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, "
                f"act_scale={float(self.act_scale):.4g}, zero_point={int(self.zero_point)}")


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


def quantize_linears(model: nn.Module, acts: dict[str, ActQuant | float]) -> nn.Module:
    """Replace each named nn.Linear with an Int8Linear (in place; returns the model)."""
    for name, act in acts.items():
        layer = model.get_submodule(name)
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"{name} is {type(layer).__name__}, not nn.Linear")
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, Int8Linear(layer, act))
    return model



