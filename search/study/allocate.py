"""Seeds from an integer program: the per-layer choice that loses the least accuracy under a
latency and a size limit (as HAWQ-V3's ILP and ModelOpt's AutoQuantize allocate bits), solved
for several limits, each solution enqueued as a trial the sampler then goes on from.

    minimize    sum_l sum_o drop[l, o] x[l, o]
    subject to  sum_o x[l, o] = 1                         for each layer (or block) l
                sum_l sum_o cost[l, o] x[l, o] <= f * cost(uncompressed)
                sum_l sum_o bytes[l, o] x[l, o] <= g * bytes(uncompressed)    (when given)
                x binary

An option o is one value of each searched knob. Decisions:
- drop[l, o]: the sum of the sensitivity table's accuracy drops of its knob values, each
  measured alone on that layer (additive, as HAWQ-V3 assumes); negative drops (noise) count as
  0, and a drop below the table's resolution as half of it times the share of the layer's cost
  the option removes (an undetected loss is not no loss). An option with a value the table
  lacks is left out (sensitivity narrowed it away).
- cost[l, o]: with `ip_cost: library`, the change of the kernel sum when only that layer takes
  that option, costed from the target's kernel library (search.study.layer_cost); with
  `ip_cost: estimate`, an ESTIMATE: the layer's multiply-adds in its compressed shape (rank,
  kept output channels at the target's granularity) times a per-precision factor
  (PRECISION_COST). Either way only to propose seeds: every seed is then built, fine-tuned
  and timed whole like any trial.
- bytes[l, o]: the layer's weights at its precision (params x bits / 8).
- `per="block"`: one option per block (layers sharing a name up to their first index, e.g.
  `features.3`), for large models: the options common to all its layers, costs summed.
- The solver is scipy's `milp` (HiGHS): a well-kept library, exact for a few thousand binaries.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from search.compress.channels import kept_channels
from search.compress.knob import REGISTRY
from search.compress.lowrank import factorized_rank
from search.compress.policy import LayerPolicy, Policy
from search.compress.space import LayerSpace
from search.core.hooks import watch
from search.study.sensitivity import Sensitivity

# NOTE: relative time per multiply-add by weight precision (an estimate): measured on this host's
# default task, the all-int8 MobileNetV2 ran 1.78x faster than fp32 (bench/RESULTS.md 12.1);
# 16-bit floats are emulated through fp32 on most CPUs (converts: slower)
PRECISION_COST = {32: 1.0, 16: 1.1, 8: 0.56}


@dataclass(frozen=True)
class Allocation:
    """One solution: the policy, and what the program estimated for it."""

    latency_fraction: float  # the limit it was solved for (of the uncompressed estimate)
    policy: Policy
    predicted_drop: float  # summed sensitivity drops (metric units): the objective
    cost_fraction: float  # estimated cost / uncompressed (MACs x precision factor)
    bytes_fraction: float


def _shapes(model: nn.Module, example: Any, names: list[str]) -> dict[str, int]:
    """Output positions per call of each layer (H x W for a conv, rows for a Linear)."""
    out: dict[str, int] = {}

    def count(name: str, _args: tuple[Any, ...], y: torch.Tensor) -> None:
        out[name] = out.get(name, 0) + int(y[0, 0].numel() if y.dim() == 4
                                           else y.numel() // y.shape[-1])

    watch(model, example, names, count, outputs=True)
    return out


def _option_cost(layer: nn.Module, positions: int, lp: LayerPolicy) -> tuple[float, float]:
    """(estimated cost, weight bytes) of one layer under one option."""
    if isinstance(layer, nn.Conv2d):
        k = layer.kernel_size[0] * layer.kernel_size[1]
        cin, cout = layer.in_channels, layer.out_channels
    else:
        k, cin, cout = 1, layer.in_features, layer.out_features
    kept = kept_channels(cout, lp.sparsity) if lp.sparsity else cout
    params = k * cin * kept
    if lp.rank < 1.0:
        rank = factorized_rank(layer, lp.rank)
        params = min(params, k * cin * rank + rank * kept)
    bits = lp.bits
    return positions * params * PRECISION_COST.get(bits, 1.0), params * bits / 8


def block_of(name: str) -> str:
    """`features.3.conv.0.0` -> `features.3`: the name up to its first numeric part."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if re.fullmatch(r"\d+", part):
            return ".".join(parts[:i + 1])
    return name


# layer -> knob values -> (summed drop, estimated cost, weight bytes)
Options = dict[str, dict[tuple, tuple[float, float, float]]]


def options_of(model: nn.Module, example: Any, space: list[LayerSpace], knobs: list[str],
               sensitivity: Sensitivity) -> Options:
    """Per layer, every combination of the searched knobs' values the sensitivity table knows,
    with its summed drop, estimated cost and weight bytes."""
    modules = dict(model.named_modules())
    positions = _shapes(model, example, [ls.name for ls in space])
    examples = sensitivity.method.get("metric_examples")
    resolution = 1.0 / examples if examples else 0.0
    per_layer: Options = {}
    for ls in space:
        options = {}
        for values in itertools.product(*(ls.choices(k) for k in knobs)):
            drop, known = 0.0, True
            for knob, value in zip(knobs, values, strict=True):
                if value == REGISTRY[knob].identity:
                    continue
                entry = sensitivity.get(ls.name, knob, value)
                if entry is None:
                    known = False
                    break
                drop += max(entry.accuracy_drop, 0.0)
            if known:
                cost, size = _option_cost(modules[ls.name], positions.get(ls.name, 1),
                                          LayerPolicy(**dict(zip(knobs, values, strict=True))))
                options[values] = (drop, cost, size)
        # NOTE: a drop below the table's resolution (one example of `metric_examples`) reads 0,
        # which would make every such option free and the program compress far past its limit
        # (drops do not add up to nothing); it counts as half the resolution times the share
        # of the layer's cost the option removes, so the limit is met with the least removed
        identity = tuple(REGISTRY[k].identity for k in knobs)
        full = options.get(identity, (0.0, 0.0, 0.0))[1]
        if resolution > 0 and full > 0:
            options = {v: (max(d, 0.5 * resolution * max(0.0, 1 - c / full)), c, b)
                       for v, (d, c, b) in options.items()}
        per_layer[ls.name] = options
    return per_layer


def modelled(knobs: list[str]) -> list[str]:
    return [k for k in knobs if k in ("rank", "sparsity", "bits")]  # what the estimate models


def by_threshold(model: nn.Module, example: Any, space: list[LayerSpace], knobs: list[str],
                 sensitivity: Sensitivity, thresholds: list[float],
                 options: Options | None = None) -> list[tuple[float, Policy]]:
    """The sensitivity-threshold baseline (Distiller's sensitivity pruning; the AMC-style
    "uniform allocation scaled by sensitivity" of bench/RESULTS.md): for each threshold t,
    every layer independently takes its cheapest option whose summed drop is at most t. No
    budget is solved for; thresholds trace the family. Duplicates once (the first threshold
    giving a policy names it)."""
    knobs = modelled(knobs)
    per_layer = options or options_of(model, example, space, knobs, sensitivity)
    policies: list[tuple[float, Policy]] = []
    for t in thresholds:
        layers = {}
        for name, options in per_layer.items():
            ok = [(cost, values) for values, (drop, cost, _) in options.items() if drop <= t]
            if ok:
                layers[name] = LayerPolicy(**dict(zip(knobs, min(ok)[1], strict=True)))
        policy = Policy(layers)
        if all(policy != p for _, p in policies):
            policies.append((t, policy))
    return policies


def allocate(model: nn.Module, example: Any, space: list[LayerSpace], knobs: list[str],
             sensitivity: Sensitivity, latency_fractions: list[float],
             size_fraction: float | None = None, per: str = "layer",
             options: Options | None = None) -> list[Allocation]:
    """One solution per latency fraction (infeasible ones are left out), duplicates once.
    `options`: `options_of`'s, with the library's costs (search.study.layer_cost) in place of
    the estimate."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    knobs = modelled(knobs)
    per_layer = options or options_of(model, example, space, knobs, sensitivity)
    groups: dict[str, list[str]] = {}
    for ls in space:
        groups.setdefault(block_of(ls.name) if per == "block" else ls.name, []).append(ls.name)
    variables: list[tuple[str, tuple]] = []
    drops, costs, sizes = [], [], []
    for group, layers in groups.items():
        common = set.intersection(*(set(per_layer[n]) for n in layers))
        for values in sorted(common, key=str):
            variables.append((group, values))
            drops.append(sum(per_layer[n][values][0] for n in layers))
            costs.append(sum(per_layer[n][values][1] for n in layers))
            sizes.append(sum(per_layer[n][values][2] for n in layers))
    identity = tuple(REGISTRY[k].identity for k in knobs)
    full_cost = sum(per_layer[n][identity][1] for n in per_layer)
    full_size = sum(per_layer[n][identity][2] for n in per_layer)
    drops_a, costs_a, sizes_a = np.array(drops), np.array(costs), np.array(sizes)
    one_each = np.zeros((len(groups), len(variables)))
    index = {g: i for i, g in enumerate(groups)}
    for j, (group, _) in enumerate(variables):
        one_each[index[group], j] = 1.0
    # NOTE: a tiny cost term breaks ties between equally harmless options towards the faster
    objective = drops_a + 1e-9 * costs_a / max(full_cost, 1e-12)
    solutions: list[Allocation] = []
    for f in latency_fractions:
        rows = [LinearConstraint(one_each, 1, 1),
                LinearConstraint(costs_a[None, :], -np.inf, f * full_cost)]
        if size_fraction is not None:
            rows.append(LinearConstraint(sizes_a[None, :], -np.inf, size_fraction * full_size))
        res = milp(objective, constraints=rows, integrality=np.ones(len(variables)),
                   bounds=Bounds(0, 1))
        if res.x is None:
            continue
        chosen = {variables[j] for j in np.flatnonzero(res.x > 0.5)}
        layers = {}
        for group, values in chosen:
            for name in groups[group]:
                layers[name] = LayerPolicy(**dict(zip(knobs, values, strict=True)))
        policy = Policy(layers)
        if any(a.policy == policy for a in solutions):
            continue
        pick = np.array([variables[j] in chosen for j in range(len(variables))])
        solutions.append(Allocation(f, policy, float(drops_a[pick].sum()),
                                    float(costs_a[pick].sum() / full_cost),
                                    float(sizes_a[pick].sum() / full_size)))
    return solutions
