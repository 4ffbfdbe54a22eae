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
