"""Apply a policy: a real smaller / lower-precision model, not a mask.

Each registered knob (search.compress.knobs) applies its own step, in registration order:
`restructure` (channel groups removed, layers factorized, sparsity masks attached) gives the
fp32 model the fine-tune trains, through each knob's `train_transform`; `apply_precision` then
bakes masks and transforms in and makes the weights final (int8, 16-bit, shared values), so the
deployed weights are rounded once.
"""

from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.utils.parametrize as parametrize
from torch import nn

from search.compress.knob import REGISTRY, BuildContext, weight_layers
from search.compress.policy import Policy
from search.core.data import Inputs, Loss, Split, cross_entropy


def restructure(model: nn.Module, policy: Policy, example: Inputs, data: Split | None = None,
                loss: Loss = cross_entropy) -> nn.Module:
    """The fp32 smaller model of a policy; a new copy. `data` (training split) and `loss` feed
    gradient channel importances."""
    model = copy.deepcopy(model).eval()
    ctx = BuildContext(example, data, loss)
    for knob in REGISTRY.values():
        knob.restructure(model, policy, ctx)
    return model


@torch.no_grad()
def apply_precision(model: nn.Module, policy: Policy, data: Split | None = None) -> nn.Module:
    """Make the weights final, in place: sparsity masks and training-time transforms baked in,
    then each knob's precision step. `data` (the training split) calibrates int8 activations;
    without it int8 Linears are rounded weights only."""
    model.eval()
    for m in weight_layers(model):  # masks (and fake quantizers) become plain weights now
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    ctx = BuildContext(None, data)
    for knob in REGISTRY.values():
        knob.apply_precision(model, policy, ctx)
    return model


def build(model: nn.Module, policy: Policy, example: Inputs, data: Split | None = None,
          loss: Loss = cross_entropy) -> nn.Module:
    """Structure and precision without fine-tuning (the deployed form of an untrained candidate).
    `data`: the training split, for gradient channel importances and int8 calibration."""
    return apply_precision(restructure(model, policy, example, data, loss), policy, data)


def output_tolerance(policy: Policy, fp32: float = 1e-3) -> float:
    """How far a compiled/exported output may be from PyTorch's: each layer whose knobs round
    differently in each runtime (16-bit floats, int8 requantization) adds its tolerance, the
    layers' combined in quadrature (independent rounding errors), else `fp32`.

    NOTE: the loosest single layer's tolerance alone failed correct candidates: a MobileNetV2
    policy with ~35 int8 / 16-bit layers differed by 0.078 on the logits (limit 0.05) and was
    recorded as a failed trial; a wrong kernel or layout is off by the logits' own scale."""
    per_layer = [max(found) for lp in policy.layers.values()
                 if (found := [t for knob in REGISTRY.values()
                               if getattr(lp, knob.name) != knob.identity
                               and (t := knob.tolerance(lp)) is not None])]
    return max(fp32, math.sqrt(sum(t * t for t in per_layer)))


TAIL = 4.0  # one input's error may reach this many times the tolerance (the tail measured 2.5x)


def output_error(pairs: Sequence[tuple[np.ndarray, np.ndarray]], atol: float,
                 rtol: float = 0.0) -> str | None:
    """Whether compiled (or exported) outputs match PyTorch's, over several inputs: None if so,
    else what differed. Per input, the largest absolute difference beyond `rtol` x |reference|;
    their median must be within `atol` (output_tolerance) and each within TAIL x `atol`.

    Why the median: a rounding layer (int8 requantization, a 16-bit float) computes the same
    function in each runtime, but an activation on a rounding boundary lands one step apart,
    and that step carries to the output. Measured on a MobileNetV2 policy with 15 int8 and
    13 fp16 layers over 32 inputs (logits of ~2): per-input error median 0.15, max 0.67, every
    top-1 the same; int8 layers alone: median 0.000, max 0.25. Checked on one input, such a
    candidate failed by chance (3 of 71 in bench/RESULTS.md 13.10). A wrong kernel, layout or
    weight is off on every input, and by the outputs' own scale."""
    errors = []
    for out, ref in pairs:
        if out.shape != ref.shape:
            return f"output shape {tuple(out.shape)}, PyTorch's {tuple(ref.shape)}"
        out = out.astype(np.float64)
        diff = np.abs(out - ref) - rtol * np.abs(ref)
        diff[(out == ref) | np.isnan(out) & np.isnan(ref)] = 0.0  # the same inf or NaN agrees
        errors.append(float(np.nan_to_num(diff, nan=np.inf).max()) if diff.size else 0.0)
    median, worst = statistics.median(errors), max(errors)
    if median <= atol and worst <= TAIL * atol:
        return None
    over = f"median over {len(errors)} inputs {median:.3g}, " if len(errors) > 1 else ""
    return f"max abs error {worst:.3g}; {over}limit {atol:.3g}"
