"""Per-layer compression policies and the search space they are drawn from.

The space is derived from the model (every Conv2d and Linear, with the knob values that make
sense for its shape), never hand-listed, so a user's own model gets a space with no extra code.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from search.channels import IMPORTANCES, group_details, round_channels, sparsity_choices

RANK_RATIOS = (1.0, 0.5, 0.25, 0.125, 0.0625)  # kept fraction of min(in, out); 1.0 = not factorized
THRESHOLDS = (0.0, 0.2, 0.4, 0.6, 0.8)  # soft threshold on singular values (x their mean); 0 = off
SPARSITIES = (0.0, 0.25, 0.5, 0.75)  # fraction of output channels removed
BITS = (32, 16, 8, 4, 2, 1)  # weights: fp32, 16-bit float, int8/int4 per-channel, ternary, binary
HALVES = ("fp16", "bf16")  # which 16-bit float `bits: 16` means
PRUNES = (0.0, 0.5, 0.75, 0.9)  # fraction of weights zeroed by magnitude (unstructured)
NMS = ("off", "2:4", "1:4")  # N:M sparsity: keep N of every M consecutive weights
SHARES = (0, 4, 2)  # weight sharing: 2^b shared values per layer (k-means); 0 = off
SPLITS = ("channel", "spatial")  # conv low-rank: kxk->r + 1x1, or kx1->r + 1xk (Jaderberg)
KNOBS = ("rank", "threshold", "sparsity", "importance", "bits", "half", "prune", "nm", "share",
         "split")  # every knob of a LayerPolicy
DEFAULT_CHOICES: dict[str, tuple] = {"bits": (32, 16, 8)}  # what a search offers unless the
# config's `choices` widens it: 4/2/1-bit weights need quantization-aware fine-tuning to hold up


@dataclass(frozen=True)
class LayerPolicy:
    """What to do to one layer. The default is the identity."""

    rank: float = 1.0  # kept fraction of full rank (1.0: layer kept whole)
    threshold: float = 0.0  # > 0: the rank is chosen by soft-thresholding instead (overrides rank)
    sparsity: float = 0.0  # fraction of output channels physically removed
    importance: str = "l2"  # channel importance: weight norm, first-order Taylor, Fisher
    bits: int = 32  # weight precision
    half: str = "fp16"  # the 16-bit float when bits == 16
    prune: float = 0.0  # fraction of weights zeroed by magnitude: stored sparse, computed dense
    nm: str = "off"  # N:M structured sparsity ("2:4"): stored sparse, computed dense
    share: int = 0  # bits of a k-means code per weight (2^share shared values); 0 = off
    split: str = "channel"  # how a conv is factorized when rank < 1

    def __post_init__(self) -> None:
        if not 0.0 < self.rank <= 1.0:
            raise ValueError(f"rank must be in (0, 1], got {self.rank}")
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {self.threshold}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if not 0.0 <= self.prune < 1.0:
            raise ValueError(f"prune must be in [0, 1), got {self.prune}")
        for knob, allowed in (("importance", IMPORTANCES), ("bits", BITS), ("half", HALVES),
                              ("nm", NMS), ("share", SHARES), ("split", SPLITS)):
            if getattr(self, knob) not in allowed:
                raise ValueError(f"{knob} must be one of {allowed}, got {getattr(self, knob)!r}")

    @property
    def is_identity(self) -> bool:
        return self == LayerPolicy()

    @property
    def factorized(self) -> bool:
        return self.rank < 1.0 or self.threshold > 0.0

    @property
    def precision(self) -> str:
        """fp32, fp16, bf16, int8, int4, ternary or binary: how the weights are deployed."""
        if self.bits == 16:
            return self.half
        return {32: "fp32", 8: "int8", 4: "int4", 2: "ternary", 1: "binary"}[self.bits]


@dataclass(frozen=True)
class Policy:
    """A whole-model policy: layer name -> LayerPolicy. Layers not named are left alone."""

    layers: Mapping[str, LayerPolicy] = field(default_factory=dict)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.layers.items())))

    def get(self, name: str) -> LayerPolicy:
        return self.layers.get(name, LayerPolicy())

    def to_dict(self) -> dict[str, dict[str, float | int | str]]:
        """Only the knobs that differ from the identity: short, readable YAML."""
        identity = asdict(LayerPolicy())
        return {name: {k: v for k, v in asdict(lp).items() if v != identity[k]}
                for name, lp in self.layers.items()}

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


def factorized_rank(layer: nn.Module, ratio: float, split: str = "channel") -> int:
    """The rank a ratio means for this layer, rounded to the channel multiple."""
    full = min(_matrix_shape(layer, split))
    return min(round_channels(full * ratio), full)


def _matrix_shape(layer: nn.Module, split: str = "channel") -> tuple[int, int]:
    """The weight as the matrix its SVD factorizes: out x in (conv: out x in*kh*kw; split
    spatially: out*kw x in*kh)."""
    n_in, n_out = _io(layer)
    if isinstance(layer, nn.Conv2d) and split == "spatial":
        return n_out * layer.kernel_size[1], n_in * layer.kernel_size[0]
    if isinstance(layer, nn.Conv2d):
        return n_out, n_in * layer.kernel_size[0] * layer.kernel_size[1]
    return n_out, n_in


def weight_matrix(layer: nn.Module, split: str = "channel") -> torch.Tensor:
    """The matrix of `_matrix_shape` (spatial: (in*kh) x (out*kw), transposed)."""
    w = layer.weight.data
    if isinstance(layer, nn.Conv2d) and split == "spatial":
        n_out, n_in, kh, kw = w.shape
        return w.permute(1, 2, 0, 3).reshape(n_in * kh, n_out * kw)
    return w.reshape(w.shape[0], -1)


def soft_threshold_rank(singular: torch.Tensor, tau: float) -> int:
    """Iterative soft thresholding of singular values: shrink every value by lambda = tau x the
    mean of the survivors, keep those still positive, and repeat until the surviving set stops
    changing (it only shrinks, so this ends). The rank is how many survive.

    Unlike a fixed rank ratio, this adapts to the layer's spectrum: a layer whose energy sits in
    a few directions keeps few, a flat spectrum keeps many, at the same searched threshold.
    """
    s = singular.double()
    alive = torch.ones_like(s, dtype=torch.bool)
    while True:
        lam = tau * s[alive].mean()
        nxt = (s - lam) > 0
        if torch.equal(nxt, alive) or not nxt.any():
            break
        alive = nxt
    return max(1, int(alive.sum()))


_SPECTRA: dict[tuple, torch.Tensor] = {}  # weight fingerprint -> singular values


def spectrum(mat: torch.Tensor) -> torch.Tensor:
    """Singular values of a weight matrix, cached by content: a 5120x5120 layer takes ~18 s,
    and every trial's copy of the same layer has the same spectrum."""
    flat = mat.detach().float().reshape(-1)
    key = (tuple(mat.shape), float(flat.sum()), float(flat.abs().sum()),
           float((flat * torch.arange(len(flat)) / len(flat)).sum()))
    if key not in _SPECTRA:
        if len(_SPECTRA) > 256:
            _SPECTRA.clear()
        _SPECTRA[key] = torch.linalg.svdvals(mat.detach().float())
    return _SPECTRA[key]


def threshold_rank(layer: nn.Module, tau: float, split: str = "channel") -> int:
    """The rank soft thresholding keeps for this layer, rounded to the channel multiple."""
    singular = spectrum(weight_matrix(layer, split))
    return min(round_channels(soft_threshold_rank(singular, tau)), len(singular))


def layer_rank(layer: nn.Module, lp: LayerPolicy) -> int:
    """The rank a layer policy factorizes to (by threshold when one is set, else by ratio)."""
    if lp.threshold > 0.0:
        return threshold_rank(layer, lp.threshold, lp.split)
    return factorized_rank(layer, lp.rank, lp.split)


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


def _smaller(layer: nn.Module, rank: int) -> bool:
    """A factorized pair worth having: at most 80% of the layer's parameters."""
    return _factorized_params(layer, rank) < 0.8 * sum(p.numel() for p in layer.parameters())


def _rank_choices(layer: nn.Module) -> tuple[float, ...]:
    """The rank ratios that give distinct, smaller factorizations (1.0 first)."""
    ranks, seen = [1.0], set()
    for ratio in RANK_RATIOS[1:]:
        r = factorized_rank(layer, ratio)
        if r not in seen and _smaller(layer, r):
            seen.add(r)
            ranks.append(ratio)
    return tuple(ranks)


def _threshold_choices(layer: nn.Module) -> tuple[float, ...]:
    """The soft thresholds that give distinct, smaller factorizations of this layer's
    spectrum (0.0, off, first)."""
    singular = spectrum(weight_matrix(layer))
    thresholds, seen = [0.0], set()
    for tau in THRESHOLDS[1:]:
        r = min(round_channels(soft_threshold_rank(singular, tau)), len(singular))
        if r not in seen and _smaller(layer, r):
            seen.add(r)
            thresholds.append(tau)
    return tuple(thresholds)


def derive_space(model: nn.Module, example: torch.Tensor,
                 choices: Mapping[str, Sequence] | None = None,
                 knobs: Iterable[str] = KNOBS) -> list[LayerSpace]:
    """The per-layer search space of a model.

    A rank (or threshold) is offered only where the factorized pair is smaller than the layer;
    sparsity only on the root layer of a channel group (search.channels: the layers a residual
    add, concatenation, depthwise conv or BatchNorm couples go together), never on the model's
    output. `choices` narrows (or, for bits, widens) the values a knob offers; by default
    DEFAULT_CHOICES. Knobs not in `knobs` offer only their identity value (thresholds need
    each layer's spectrum: seconds on a large layer, so only when searched).
    """
    choices = DEFAULT_CHOICES if choices is None else choices
    knobs = set(knobs)
    groups = group_details(model, example) if "sparsity" in knobs else {}
    space = []
    for name, layer in compressible_layers(model):
        ranks = _rank_choices(layer)
        thresholds = _threshold_choices(layer) if len(ranks) > 1 and "threshold" in knobs \
            else (0.0,)
        group = groups.get(name)
        sparsities = sparsity_choices(group.channels, SPARSITIES, group.multiple) if group \
            else (0.0,)
        kind = "conv" if isinstance(layer, nn.Conv2d) else "linear"
        spatial = kind == "conv" and min(layer.kernel_size) > 1 and len(ranks) > 1
        values = {
            "rank": ranks, "threshold": thresholds, "sparsity": sparsities,
            "importance": IMPORTANCES if len(sparsities) > 1 else ("l2",),
            "bits": BITS, "half": HALVES, "prune": PRUNES, "nm": NMS, "share": SHARES,
            "split": SPLITS if spatial else ("channel",),
        }
        for knob, wanted in choices.items():
            offered = values[knob]
            values[knob] = (offered[0],) + tuple(v for v in offered[1:] if v in wanted)
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

    unknown = set(knobs) - set(KNOBS)
    if unknown:
        raise ValueError(f"unknown knob(s) {sorted(unknown)}; known: {KNOBS}")
    return Policy({ls.name: LayerPolicy(**{k: pick(ls.choices(k), v) for k, v in knobs.items()})
                   for ls in space})
