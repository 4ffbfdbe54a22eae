"""Per-layer compression policies: which value each knob (search.compress.knobs) takes on each
layer. A LayerPolicy holds one value per registered knob, the identity where not given, each
checked by its knob."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from search.compress import knobs as _knobs  # noqa: F401  (registers the built-in knobs)
from search.compress.knob import REGISTRY


class LayerPolicy:
    """What to do to one layer: knob name -> value. The default is the identity. Immutable and
    hashable; read a knob as an attribute (`lp.bits`)."""

    __slots__ = ("_values",)

    def __init__(self, **values: Any) -> None:
        unknown = sorted(set(values) - set(REGISTRY))
        if unknown:
            raise TypeError(f"unknown knob(s) {', '.join(unknown)}; knobs: "
                            f"{', '.join(REGISTRY)}")
        full = {name: values.get(name, knob.identity) for name, knob in REGISTRY.items()}
        for name, value in values.items():
            REGISTRY[name].check(value)
        object.__setattr__(self, "_values", tuple(full.items()))

    def __getattr__(self, name: str) -> Any:
        for key, value in object.__getattribute__(self, "_values"):
            if key == name:
                return value
        if name in REGISTRY:  # a knob registered after this policy was made
            return REGISTRY[name].identity
        raise AttributeError(f"LayerPolicy has no knob {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("LayerPolicy is immutable: use .replace(knob=value)")

    def _key(self) -> tuple:
        return tuple(item for item in self._values if REGISTRY.get(item[0]) is None
                     or item[1] != REGISTRY[item[0]].identity)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LayerPolicy) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"LayerPolicy({', '.join(f'{k}={v!r}' for k, v in self.changed().items())})"

    def __reduce__(self) -> tuple:
        return (_layer_policy, (self.changed(),))

    def items(self) -> Iterator[tuple[str, Any]]:
        return iter(self._values)

    def as_dict(self) -> dict[str, Any]:
        """Every knob's value."""
        return dict(self._values)

    def changed(self) -> dict[str, Any]:
        """Only the knobs away from their identity."""
        return dict(self._key())

    def replace(self, **changes: Any) -> LayerPolicy:
        return LayerPolicy(**{**self.changed(), **changes})

    @property
    def is_identity(self) -> bool:
        return not self._key()


def _layer_policy(values: dict[str, Any]) -> LayerPolicy:
    return LayerPolicy(**values)


class Policy:
    """A whole-model policy: layer name -> LayerPolicy. Layers not named are left alone."""

    __slots__ = ("layers",)

    def __init__(self, layers: Mapping[str, LayerPolicy] | None = None) -> None:
        self.layers = dict(layers or {})

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Policy) and self.layers == other.layers

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.layers.items(), key=lambda kv: kv[0])))

    def __repr__(self) -> str:
        return f"Policy({self.to_dict()})"

    def get(self, name: str) -> LayerPolicy:
        return self.layers.get(name, LayerPolicy())

    def to_dict(self) -> dict[str, dict[str, float | int | str]]:
        """Only the knobs that differ from the identity: short, readable YAML."""
        return {name: lp.changed() for name, lp in self.layers.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Mapping[str, float | int | str]]) -> Policy:
        return cls({name: LayerPolicy(**dict(v or {})) for name, v in (data or {}).items()})

    def to_yaml(self) -> str:
        return yaml.safe_dump({"layers": self.to_dict()}, sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> Policy:
        return cls.from_dict((yaml.safe_load(text) or {}).get("layers", {}))

    def save(self, path: Path) -> None:
        path.write_text(self.to_yaml())

    @classmethod
    def load(cls, path: Path) -> Policy:
        return cls.from_yaml(path.read_text())

    def label(self) -> str:
        """Per-layer text from each knob's label, e.g. `fc1:r0.25/b8 conv2:s0.5`."""
        parts = []
        for name, lp in self.layers.items():
            labels = [text for knob in REGISTRY.values() if (text := knob.label(lp))]
            if labels:
                parts.append(f"{name}:{'/'.join(labels)}")
        return " ".join(parts) or "(uncompressed)"
