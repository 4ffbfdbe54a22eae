"""What a compression knob is, and the registry of them.

A knob is one object that holds everything about it: the values it may take (identity first),
the values a layer offers, how it changes the model (a structure step before the fine-tune, a
precision step after it), what it trains through, what its weights cost to store, its label,
and what the sensitivity pass pairs it with. Policies, the search space, the build, the byte
counter, the fine-tune, the sensitivity pass, `search show` and the front all read knobs from
here, so adding one is one module that subclasses Knob and calls `register`.

Modules a knob puts into the model may carry `stored_bytes()`: the byte counter counts the
module by it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# A knob's hooks take policies (search.compress.policy), which import this registry: named
# here as aliases, not imported, so the two modules do not import each other.
LayerPolicy = Any  # a search.compress.policy.LayerPolicy
Policy = Any  # a search.compress.policy.Policy


@dataclass
class BuildContext:
    """What a knob's structure / precision step may need besides the model and the policy."""

    example: Any  # every input at batch 1
    data: Any = None  # the training split (a Split): gradient importances, calibration
    loss: Any = None  # the task's loss(outputs, labels)


@dataclass(frozen=True)
class LayerInfo:
    """One compressible layer as the space sees it: the module, its kind, its channel group."""

    name: str
    module: nn.Module
    kind: str  # "conv" or "linear"
    survey: Mapping[str, Any]  # knob name -> what its `survey` found for this layer


class Knob:
    """One compression knob. Subclasses set the class attributes and override the hooks they
    need; every hook's default does nothing, so a knob defines only what it changes."""

    name: str = ""
    values: tuple = ()  # every legal value, the identity first (for a range: the offered grid)
    bounds: tuple[float, float] | None = None  # a number knob: legal values lie in bounds
    interval: str = "[)"  # which ends of `bounds` are legal: "[)" lo <= v < hi, "(]" lo < v <= hi
    default_choices: tuple | None = None  # what a search offers unless `choices` says; None: all
    needs: tuple[tuple[str, Any], ...] = ()  # sensitivity: measured paired with these (knob,
    # value); "harshest" = the layer's last offered value. For knobs that change nothing alone.
    overrides: tuple[str, ...] = ()  # knobs whose steps this one replaces when both are set
    changes_ops: bool = True  # False: only the weights' values change (the compiled ops do not)
    costly: bool = False  # its per-layer values take real time: worked out only when searched
    doc: str = ""

    @property
    def identity(self) -> Any:
        return self.values[0]

    def check(self, value: Any) -> None:
        """Raise ValueError naming what would be right, if `value` is not legal."""
        if self.bounds is None:
            if value not in self.values:
                raise ValueError(f"{self.name} must be one of {self.values}, got {value!r}")
            return
        lo, hi = self.bounds
        number = isinstance(value, int | float) and not isinstance(value, bool)
        inside = number and ((lo < value) if self.interval[0] == "(" else (lo <= value)) \
            and ((value <= hi) if self.interval[1] == "]" else (value < hi))
        if not inside:
            raise ValueError(f"{self.name} must be in {self.interval[0]}{lo:g}, {hi:g}"
                             f"{self.interval[1]}, got {value!r}")

    # --- the search space --------------------------------------------------------------------
    def survey(self, model: nn.Module, example: Any) -> Mapping[str, Any] | None:
        """Model-wide facts the per-layer values need (channel groups), by layer name; run
        only when the knob is searched."""
        return None

    def offered(self, layer: LayerInfo, offered: Mapping[str, tuple]) -> tuple:
        """The values this layer offers (identity first). `offered`: what the knobs registered
        before this one offer on the same layer."""
        return self.values

    # --- the build ---------------------------------------------------------------------------
    def restructure(self, model: nn.Module, policy: Policy, ctx: BuildContext) -> None:
        """Change the model's structure in place, before the fine-tune (fp32)."""

    def train_transform(self, lp: LayerPolicy, options: Any) -> nn.Module | None:
        """A weight parametrization the fine-tune trains through (e.g. a fake quantizer)."""
        return None

    def apply_precision(self, model: nn.Module, policy: Policy, ctx: BuildContext) -> None:
        """Make the weights final in place, after the fine-tune (masks are baked in already)."""

    def tolerance(self, lp: LayerPolicy) -> float | None:
        """How far a compiled output may be from PyTorch's with this knob set (None: fp32's)."""
        return None

    # --- stored bytes of one final weight (search.compress.size) ------------------------------
    def value_bits(self, lp: LayerPolicy, bits: int) -> int:
        """Bits per stored weight value, given what the knobs before said."""
        return bits

    def sparse_bytes(self, w: torch.Tensor, lp: LayerPolicy, value_bits: int,
                     module: nn.Module) -> int | None:
        """Bytes of the weight's values and positions in this knob's sparse format, if it has
        one (the counter keeps the smallest format)."""
        return None

    def extra_bytes(self, w: torch.Tensor, lp: LayerPolicy) -> int:
        """Bytes stored beside the values (scales, a codebook)."""
        return 0

    # --- what a user reads -------------------------------------------------------------------
    def label(self, lp: LayerPolicy) -> str:
        """Short text for this knob's value in the front's policy summary ('' when off)."""
        value = getattr(lp, self.name)
        return "" if value == self.identity else f"{self.name}={value}"


REGISTRY: dict[str, Knob] = {}  # name -> knob, in the order they apply


def register(knob: Knob) -> Knob:
    """Add a knob (after those registered before it: structure steps run in this order)."""
    if not knob.name or not knob.values:
        raise ValueError("a knob needs a name and at least its identity value")
    if knob.name in REGISTRY:
        raise ValueError(f"knob {knob.name!r} is registered already")
    REGISTRY[knob.name] = knob
    return knob


def unregister(name: str) -> None:
    REGISTRY.pop(name)


@contextmanager
def registered(knob: Knob) -> Iterator[Knob]:
    """A knob registered for the duration of a block (tests, experiments)."""
    register(knob)
    try:
        yield knob
    finally:
        unregister(knob.name)


def knob_names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def active(lp: LayerPolicy) -> list[Knob]:
    """The knobs set away from their identity on a layer, minus those another set knob
    overrides (weight sharing replaces the bits' rounding)."""
    on = [k for k in REGISTRY.values() if getattr(lp, k.name) != k.identity]
    overridden = {name for k in on for name in k.overrides}
    return [k for k in on if k.name not in overridden]


def weight_layers(module: nn.Module) -> list[nn.Module]:
    """The Conv2d/Linear layers of a module (a layer, or the pair it was factorized into)."""
    return [m for m in module.modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)
