"""Per-layer compression policies and the search space they are drawn from.

The space is derived from the model (every Conv2d and Linear, with the knob values that make
sense for its shape), never hand-listed, so a user's own model gets a space with no extra code.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn

from search.graph import channel_consumers

RANK_RATIOS = (1.0, 0.5, 0.25, 0.125, 0.0625)  # kept fraction of min(in, out); 1.0 = not factorized
SPARSITIES = (0.0, 0.25, 0.5, 0.75)  # fraction of output channels removed
BITS = (32, 16, 8)  # weight precision: fp32, fp16 (computed in fp16), int8 (per-channel scales)
PRUNES = (0.0, 0.5, 0.75, 0.9)  # fraction of weights zeroed by magnitude (unstructured)
SHARES = (0, 4, 2)  # weight sharing: 2^b shared values per layer (k-means); 0 = off
SPLITS = ("channel", "spatial")  # conv low-rank: kxk->r + 1x1, or kx1->r + 1xk (Jaderberg)
KNOBS = ("rank", "sparsity", "bits", "prune", "share", "split")  # every knob of a LayerPolicy
CHANNEL_MULTIPLE = 8  # ranks and channel counts are rounded to this so tuned kernels repeat


def round_channels(n: float, multiple: int = CHANNEL_MULTIPLE) -> int:
    """Round to a multiple (at least one multiple), so compiled workloads repeat across trials."""
    return max(multiple, int(n / multiple + 0.5) * multiple)  # half up, not banker's


@dataclass(frozen=True)
class LayerPolicy:
    """What to do to one layer. The default is the identity."""

    rank: float = 1.0  # kept fraction of full rank (1.0: layer kept whole)
    sparsity: float = 0.0  # fraction of output channels physically removed
    bits: int = 32  # weight precision
    prune: float = 0.0  # fraction of weights zeroed by magnitude: stored sparse, computed dense
    share: int = 0  # bits of a k-means code per weight (2^share shared values); 0 = off
    split: str = "channel"  # how a conv is factorized when rank < 1

    def __post_init__(self) -> None:
        if not 0.0 < self.rank <= 1.0:
            raise ValueError(f"rank must be in (0, 1], got {self.rank}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {self.bits}")
        if not 0.0 <= self.prune < 1.0:
            raise ValueError(f"prune must be in [0, 1), got {self.prune}")
        if self.share not in SHARES:
            raise ValueError(f"share must be one of {SHARES}, got {self.share}")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")

    @property
    def is_identity(self) -> bool:
        return self == LayerPolicy()


@dataclass(frozen=True)
class Policy:
    """A whole-model policy: layer name -> LayerPolicy. Layers not named are left alone."""

    layers: Mapping[str, LayerPolicy] = field(default_factory=dict)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.layers.items())))

    def get(self, name: str) -> LayerPolicy:
        return self.layers.get(name, LayerPolicy())

    def to_dict(self) -> dict[str, dict[str, float | int]]:
        return {name: asdict(lp) for name, lp in self.layers.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Mapping[str, float | int]]) -> Policy:
        return cls({name: LayerPolicy(**dict(v)) for name, v in (data or {}).items()})

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


@dataclass(frozen=True)
class LayerSpace:
    """The knob values that apply to one layer."""

    name: str
    kind: str  # "conv" or "linear"
    ranks: tuple[float, ...]
    sparsities: tuple[float, ...]
    bits: tuple[int, ...]
    prunes: tuple[float, ...] = PRUNES
    shares: tuple[int, ...] = SHARES
    splits: tuple[str, ...] = ("channel",)

    def choices(self, knob: str) -> tuple:
        return {"rank": self.ranks, "sparsity": self.sparsities, "bits": self.bits,
                "prune": self.prunes, "share": self.shares, "split": self.splits}[knob]


def factorized_rank(layer: nn.Module, ratio: float, split: str = "channel") -> int:
    """The rank a ratio means for this layer, rounded to the channel multiple.

    Full rank is that of the weight as a matrix: out x in (conv: out x in*kh*kw; split spatially:
    out*kw x in*kh).
    """
    n_in, n_out = _io(layer)
    if isinstance(layer, nn.Conv2d) and split == "spatial":
        n_in, n_out = n_in * layer.kernel_size[0], n_out * layer.kernel_size[1]
    elif isinstance(layer, nn.Conv2d):
        n_in *= layer.kernel_size[0] * layer.kernel_size[1]
    full = min(n_in, n_out)
    return min(round_channels(full * ratio), full)


def _io(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, nn.Conv2d):
        return layer.in_channels, layer.out_channels
    assert isinstance(layer, nn.Linear)
    return layer.in_features, layer.out_features


def _factorized_params(layer: nn.Module, rank: int) -> int:
    n_in, n_out = _io(layer)
    k = layer.kernel_size[0] * layer.kernel_size[1] if isinstance(layer, nn.Conv2d) else 1
    return rank * (n_in * k + n_out)


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


def derive_space(model: nn.Module, example: torch.Tensor) -> list[LayerSpace]:
    """The per-layer search space of a model.

    A rank is offered only where the factorized pair is smaller than the layer; sparsity only where
    the layer's output channels feed exactly one Conv2d/Linear through channel-wise ops (so
    removing them is a real, consistent edit) and never on the model's output layer.
    """
    consumers = channel_consumers(model, example)
    space = []
    for name, layer in compressible_layers(model):
        n_in, n_out = _io(layer)
        ranks = [1.0]
        seen = set()
        for ratio in RANK_RATIOS[1:]:
            r = factorized_rank(layer, ratio)
            full = sum(p.numel() for p in layer.parameters())
            if r not in seen and _factorized_params(layer, r) < 0.8 * full:
                seen.add(r)
                ranks.append(ratio)
        sparsities = [0.0]
        if name in consumers:
            kept_seen = {n_out}
            for s in SPARSITIES[1:]:
                kept = round_channels(n_out * (1 - s))
                if kept not in kept_seen:
                    kept_seen.add(kept)
                    sparsities.append(s)
        kind = "conv" if isinstance(layer, nn.Conv2d) else "linear"
        spatial = kind == "conv" and min(layer.kernel_size) > 1 and len(ranks) > 1
        space.append(LayerSpace(name, kind, tuple(ranks), tuple(sparsities), BITS,
                                splits=SPLITS if spatial else ("channel",)))
    return space


def uniform(space: Iterable[LayerSpace], rank: float = 1.0, sparsity: float = 0.0,
            bits: int = 32, prune: float = 0.0, share: int = 0,
            split: str = "channel") -> Policy:
    """The same knob values on every layer, clipped to what each layer offers."""

    def nearest(options: tuple, want: float) -> float:
        return min(options, key=lambda o: abs(o - want))

    return Policy({
        ls.name: LayerPolicy(nearest(ls.ranks, rank), nearest(ls.sparsities, sparsity),
                             int(nearest(ls.bits, bits)), nearest(ls.prunes, prune),
                             int(nearest(ls.shares, share)),
                             split if split in ls.splits else "channel")
        for ls in space
    })
