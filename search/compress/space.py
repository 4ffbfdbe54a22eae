"""The per-layer search space of a model, derived from the model and the registered knobs (each
says what values a layer offers), never hand-listed, so a user's own model gets a space with no
extra code."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from search.compress.knob import REGISTRY, LayerInfo
from search.compress.policy import LayerPolicy, Policy


def default_choices() -> dict[str, tuple]:
    """What a search offers unless the config's `choices` says otherwise (bits: 32/16/8)."""
    return {name: k.default_choices for name, k in REGISTRY.items()
            if k.default_choices is not None}


@dataclass(frozen=True)
class LayerSpace:
    """The knob values that apply to one layer (the identity value first)."""

    name: str
    kind: str  # "conv" or "linear"
    values: Mapping[str, tuple]  # knob -> offered values

    def choices(self, knob: str) -> tuple:
        return self.values[knob]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind,
                "values": {k: list(v) for k, v in self.values.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerSpace:
        return cls(data["name"], data["kind"], {k: tuple(v) for k, v in data["values"].items()})


def compressible_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv2d (ungrouped) and Linear layers, in definition order.

    NOTE: a MultiheadAttention's out_proj is skipped: attention reads its weight directly, so
    it cannot be replaced by a factorized pair or a smaller layer.
    """
    attention = [name for name, m in model.named_modules()
                 if isinstance(m, nn.MultiheadAttention)]
    return [
        (name, m)
        for name, m in model.named_modules()
        if (isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1))
        and not any(name.startswith(a + ".") for a in attention)
    ]


def derive_space(model: nn.Module, example: torch.Tensor,
                 choices: Mapping[str, Sequence] | None = None,
                 knobs: Iterable[str] | None = None) -> list[LayerSpace]:
    """The per-layer search space of a model.

    Each knob offers the values that make sense for the layer (a rank only where the pair is
    smaller, sparsity only on a channel group's root, ...). `choices` narrows (or, for bits,
    widens) the values a knob offers; by default `default_choices()`. Knobs not in `knobs`
    offer only their identity value (a costly knob's values are then not worked out).
    """
    choices = default_choices() if choices is None else choices
    knobs = set(REGISTRY if knobs is None else knobs)
    surveys = {}
    for name, knob in REGISTRY.items():
        if name in knobs:
            found = knob.survey(model, example)
            if found is not None:
                surveys[name] = found
    space = []
    for name, layer in compressible_layers(model):
        kind = "conv" if isinstance(layer, nn.Conv2d) else "linear"
        info = LayerInfo(name, layer, kind,
                         {k: s[name] for k, s in surveys.items() if name in s})
        values: dict[str, tuple] = {}
        for knob_name, knob in REGISTRY.items():
            if knob.costly and knob_name not in knobs:
                values[knob_name] = (knob.identity,)
            else:
                values[knob_name] = tuple(knob.offered(info, values))
        for knob_name, wanted in choices.items():
            offered = values[knob_name]
            values[knob_name] = (offered[0],) + tuple(v for v in offered[1:] if v in wanted)
        values = {k: v if k in knobs else v[:1] for k, v in values.items()}
        space.append(LayerSpace(name, kind, values))
    return space


def uniform(space: Iterable[LayerSpace], **knobs: float | int | str) -> Policy:
    """The same knob values on every layer, clipped to what each layer offers (the nearest
    number; a name the layer does not offer falls back to the identity)."""

    def pick(options: tuple, want: float | int | str) -> float | int | str:
        if isinstance(want, str):
            return want if want in options else options[0]
        return min(options, key=lambda o: abs(o - want))

    unknown = set(knobs) - set(REGISTRY)
    if unknown:
        raise ValueError(f"unknown knob(s) {sorted(unknown)}; known: {tuple(REGISTRY)}")
    return Policy({ls.name: LayerPolicy(**{k: pick(ls.choices(k), v) for k, v in knobs.items()})
                   for ls in space})
