"""Per-layer sensitivity: what compressing one layer alone costs, before any search.

For every layer of the space and every value a searched knob offers there (the identity
excluded), the model is built with only that layer compressed, without fine-tuning, and two
numbers are recorded:

- the drop of the task's metric on (a fixed prefix of) the validation set, relative to the
  uncompressed model: the direct, measured figure;
- a Fisher proxy of the loss increase, 0.5 * sum_i F_i * dw_i^2 over the layer's original
  weights, where F is the empirical Fisher (per-example squared gradients of the cross-entropy,
  averaged over a few training batches, computed once for the original model) and dw is the
  change of the layer's effective weight (a factorized pair multiplied back, or the rounded /
  pruned / shared weight). It is None where the compressed layer's weight has another shape
  (channels removed). It is a second-order Taylor estimate: cheap, smooth, and blind to the
  interactions the metric sees.

The result is stored with the run (sensitivity.json), narrows the space the study searches
(`narrow_space`) and is shown to the user (`sensitivity_table`).

Knobs that act only together with another (the split of a factorization, the channel
importance of a channel removal, the 16-bit float format) are measured paired with the layer's
harshest value of the knob they need (or bits=16 for `half`): each knob's `needs`. A pure truncation
(rank or threshold, channel split) is evaluated with a truncated SVD computed once per layer
instead of one factorization per value: the same model up to the SVD's accuracy, and one
randomized SVD instead of several on the default task's wide layers.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import json
import textwrap
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from search.compress.build import build
from search.compress.int8 import Int8Conv2d, Int8Linear
from search.compress.knob import REGISTRY
from search.compress.lowrank import (
    EXACT_SVD_MAX,
    SVD_POWER_ITERATIONS,
    Truncations,
    layer_rank,
    pure_truncation,
)
from search.compress.policy import LayerPolicy, Policy
from search.compress.space import LayerSpace
from search.core.data import Inputs, Loss, Split, call, cross_entropy, evaluate
from search.core.files import write_atomically
from search.core.task import Task, cache_dir

FORMAT_VERSION = 1
HARSHEST = "harshest"  # in a knob's `needs`: the last value the layer offers (mild to harsh)
_CHUNK_FLOATS = 1 << 24  # per-example gradients are formed this many floats at a time


@dataclass(frozen=True)
class LayerSensitivity:
    """One layer compressed alone by one knob value (plus `paired`, for a dependent knob)."""

    layer: str
    knob: str
    value: Any
    accuracy_drop: float  # baseline metric - this model's metric (the metric's units)
    fisher: float | None  # 0.5 * sum F * dw^2; None where the weight changes shape
    metric: float  # the metric with this layer compressed, no fine-tune
    paired: dict[str, Any] = field(default_factory=dict)  # other knobs set for the measurement
    seconds: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.knob}={self.value}"


@dataclass
class Sensitivity:
    """Every measured (layer, knob, value), the uncompressed baseline, and how it was made."""

    baseline: float  # the uncompressed model's metric on the same examples
    entries: list[LayerSensitivity]
    method: dict[str, Any] = field(default_factory=dict)
    skipped: list[dict[str, Any]] = field(default_factory=list)  # layer, knob, value, reason

    def get(self, layer: str, knob: str, value: Any) -> LayerSensitivity | None:
        for e in self.entries:
            if e.layer == layer and e.knob == knob and e.value == value:
                return e
        return None

    def layers(self) -> list[str]:
        return list(dict.fromkeys(e.layer for e in self.entries))

    def worst(self, n: int = 3) -> list[LayerSensitivity]:
        return sorted(self.entries, key=lambda e: -e.accuracy_drop)[:n]

    def to_dict(self) -> dict[str, Any]:
        return {"version": FORMAT_VERSION, "baseline": self.baseline, "method": self.method,
                "entries": [dataclasses.asdict(e) for e in self.entries],
                "skipped": self.skipped}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Sensitivity:
        if data.get("version", FORMAT_VERSION) != FORMAT_VERSION:
            raise ValueError(f"sensitivity format {data.get('version')} is not "
                             f"{FORMAT_VERSION}")
        return cls(float(data["baseline"]),
                   [LayerSensitivity(**e) for e in data.get("entries", [])],
                   dict(data.get("method") or {}), list(data.get("skipped") or []))

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: Path) -> Sensitivity:
        return cls.from_dict(json.loads(path.read_text()))


# --- what to measure ----------------------------------------------------------------------

def _identity(knob: str) -> Any:
    return REGISTRY[knob].identity


def paired_with(knob: str) -> tuple[tuple[str, Any], ...]:
    """What a knob is measured with (its `needs`): knobs that change nothing alone."""
    return REGISTRY[knob].needs if knob in REGISTRY else ()


def _paired(ls: LayerSpace, knob: str) -> dict[str, Any] | None:
    """The other knob values `knob` is measured with on this layer ({} when it acts alone),
    or None when the layer offers nothing it can act with."""
    needs = paired_with(knob)
    if not needs:
        return {}
    for other, want in needs:
        try:
            offered = [v for v in ls.choices(other) if v != _identity(other)]
        except KeyError:
            continue
        if want == HARSHEST and offered:
            return {other: offered[-1]}
        if want in offered:
            return {other: want}
    return None


def plan(space: list[LayerSpace], knobs: list[str]
         ) -> tuple[list[tuple[LayerSpace, str, Any, dict[str, Any]]], list[dict[str, Any]]]:
    """(layer, knob, value, paired) for every non-identity value each layer offers, and what
    is skipped with why."""
    todo, skipped = [], []
    for ls in space:
        for knob in knobs:
            try:
                values = [v for v in ls.choices(knob) if v != _identity(knob)]
            except (KeyError, AttributeError):
                skipped.append({"layer": ls.name, "knob": knob, "value": None,
                                "reason": "not a knob of this layer"})
                continue
            if not values:
                continue
            paired = _paired(ls, knob)
            if paired is None:
                for v in values:
                    skipped.append({"layer": ls.name, "knob": knob, "value": v,
                                    "reason": f"no effect alone; the layer offers none of "
                                              f"{[k for k, _ in paired_with(knob)]}"})
                continue
            todo.extend((ls, knob, v, paired) for v in values)
    return todo, skipped


# --- the empirical Fisher -----------------------------------------------------------------

def _per_example_rows(m: nn.Module, inp: torch.Tensor, grad_out: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's input and output gradient as (batch, positions, features), so that the
    per-example weight gradient is sum over positions of g^T a (conv: a unfolded)."""
    b = inp.shape[0]
    if isinstance(m, nn.Conv2d):
        x = inp
        pad = m._reversed_padding_repeated_twice  # what Conv2d pads with, 'same' included
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        if any(pad):
            x = F.pad(x, pad, mode=mode)
        cols = F.unfold(x, m.kernel_size, dilation=m.dilation, stride=m.stride)
        return cols.transpose(1, 2), grad_out.reshape(b, grad_out.shape[1], -1).transpose(1, 2)
    return inp.reshape(b, -1, inp.shape[-1]), grad_out.reshape(b, -1, grad_out.shape[-1])


def _accumulate(total: torch.Tensor, a: torch.Tensor, g: torch.Tensor) -> None:
    """total += sum over examples of (per-example gradient)^2; a: (B, T, in), g: (B, T, out)."""
    if a.shape[1] == 1:  # one position: (g a^T)^2 = g^2 (a^2)^T, summed over examples at once
        total += (g[:, 0] ** 2).T @ (a[:, 0] ** 2)
        return
    per = max(1, _CHUNK_FLOATS // total.numel())
    for i in range(0, a.shape[0], per):
        grads = torch.einsum("bto,bti->boi", g[i:i + per], a[i:i + per])
        total += (grads ** 2).sum(dim=0)


def empirical_fisher(model: nn.Module, names: list[str], data: Split, examples: int = 256,
                     batch: int = 64, seed: int = 0, loss_fn: Loss = cross_entropy
                     ) -> dict[str, torch.Tensor]:
    """The diagonal empirical Fisher of each named Conv2d/Linear weight: the mean over
    `examples` training examples (a seeded sample in memory; a stream's first ones) of the
    squared gradient of that example's loss (the task's, a mean over the batch, so it is
    scaled by the batch size), in eval mode. Per-example gradients come from each layer's
    input and output gradient (no per-example backward passes); the model's .grad is not
    touched. Inputs may be integer (token ids): the gradient is taken w.r.t. the weights."""
    sample = Split(data).head(examples, seed=seed)
    modules = {n: model.get_submodule(n) for n in names}
    totals = {n: torch.zeros(m.weight.shape[0], m.weight[0].numel()) for n, m in modules.items()}
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    grads: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = []

    def capture(n: str) -> Any:
        def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor
                 ) -> torch.Tensor:
            inputs[n].append(inp[0].detach())
            out.register_hook(lambda g: grads[n].append(g.detach()))
            return out.clone()  # what follows may work in place; the hooked tensor stays put

        return hook

    for n, m in modules.items():
        handles.append(m.register_forward_hook(capture(n)))
    was_training = model.training
    model.eval()
    weights = [m.weight for m in modules.values()]
    flags = [w.requires_grad for w in weights]
    try:
        for w in weights:
            w.requires_grad_(True)
        for b in sample.batches(batch):
            with torch.enable_grad():
                loss = loss_fn(call(model, b.inputs), b.labels) * len(b)  # the per-example sum
                torch.autograd.grad(loss, weights, allow_unused=True)  # no .grad is written
            for n, m in modules.items():
                if len(grads[n]) != len(inputs[n]):  # an output the loss does not use
                    inputs[n].clear()
                    grads[n].clear()
                    continue
                calls = list(zip(inputs[n], reversed(grads[n]), strict=True))
                rows = [_per_example_rows(m, a, g) for a, g in calls]
                a = torch.cat([r[0] for r in rows], dim=1)  # a layer called twice: one sum
                g = torch.cat([r[1] for r in rows], dim=1)
                _accumulate(totals[n], a.float(), g.float())
                inputs[n].clear()
                grads[n].clear()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        for w, flag in zip(weights, flags, strict=True):
            w.requires_grad_(flag)
    count = max(1, len(sample))
    return {n: (t / count).reshape(modules[n].weight.shape) for n, t in totals.items()}


def fisher_proxy(fisher: torch.Tensor, before: torch.Tensor, after: torch.Tensor) -> float:
    """0.5 * sum F * (after - before)^2: the second-order estimate of the loss increase."""
    d = after.detach().float() - before.detach().float()
    return 0.5 * float(torch.dot(d.square_().reshape(-1), fisher.reshape(-1)))


# --- the effective weight of a compressed layer -------------------------------------------

def effective_weight(module: nn.Module) -> torch.Tensor | None:
    """The weight a (compressed) layer applies, as one fp32 tensor of the original layer's
    layout: a Linear/Conv2d (possibly wrapped, e.g. a 16-bit layer), or a factorized pair
    multiplied back. None for anything else."""
    kinds = nn.Linear | nn.Conv2d | Int8Linear | Int8Conv2d
    leaves = [m for m in module.modules() if isinstance(m, kinds)]
    if len(leaves) == 1:
        return _weight(leaves[0])
    if len(leaves) != 2:
        return None
    first, second = (_weight(m) for m in leaves)
    if all(isinstance(m, nn.Linear | Int8Linear) for m in leaves):
        return second @ first
    if not all(isinstance(m, nn.Conv2d | Int8Conv2d) for m in leaves):
        return None
    if second.shape[2:] == (1, 1):  # kxk to r, then 1x1
        return torch.einsum("or,rcyx->ocyx", second[:, :, 0, 0], first)
    if first.shape[3] == 1 and second.shape[2] == 1:  # kx1 to r, then 1xk (spatial split)
        return torch.einsum("rcy,orx->ocyx", first[..., 0], second[:, :, 0, :])
    return None


def _weight(m: nn.Module) -> torch.Tensor:
    """A layer's weight in fp32 (an int8 layer's: its int8 values times their scales)."""
    if isinstance(m, Int8Linear):
        return m.weight_q.float() * m.weight_scale[:, None]
    if isinstance(m, Int8Conv2d):
        w = m.weight_q.float() * m.weight_scale[:, None, None, None]
    else:
        w = m.weight.detach().float()
    # in the original layer's terms: its BatchNorm unfolded (search.compress.int8.fold_batchnorm)
    bn = getattr(m, "folded_bn_scale", None)
    return w if bn is None else w / bn.view(-1, *[1] * (w.dim() - 1))


# --- the pass -----------------------------------------------------------------------------

def measure_sensitivity(task: Task, space: list[LayerSpace], knobs: list[str],
                        batches: int = 4, batch_size: int = 64, val_examples: int = 256,
                        seed: int = 0, progress: Any | None = None) -> Sensitivity:
    """One layer at a time, one knob value at a time: the metric drop (no fine-tune) on the
    first `val_examples` validation examples, and the Fisher proxy from `batches` x
    `batch_size` training examples. `progress` is a tqdm-like bar (reset/update/
    set_description/set_postfix_str)."""
    start = time.perf_counter()
    todo, skipped = plan(space, knobs)
    if progress is not None:
        progress.reset(total=len(todo))
        progress.set_description("sensitivity")
    model = task.model.eval()
    val = task.val.head(val_examples)
    names = list(dict.fromkeys(ls.name for ls, *_ in todo))
    fisher_s = time.perf_counter()
    fisher = empirical_fisher(model, names, task.train, batches * batch_size, batch_size, seed,
                              task.loss)
    fisher_s = time.perf_counter() - fisher_s
    baseline = evaluate(model, val, task.metric)
    originals = {n: model.get_submodule(n).weight.detach().float() for n in names}

    scratch: nn.Module | None = None  # a copy whose one weight is swapped per truncation
    svd_s = 0.0
    entries: list[LayerSensitivity] = []
    for name in names:
        layer = model.get_submodule(name)
        jobs = [(k, v, p, _policy(k, v, p, skipped, name)) for ls, k, v, p in todo
                if ls.name == name]
        ranks = {}  # (knob, value) -> rank, for the pure truncations
        for k, v, _, lp in jobs:
            if lp is not None and pure_truncation(lp):
                try:
                    ranks[(k, v)] = layer_rank(layer, lp)
                except Exception:  # noqa: BLE001 - build() will say what is wrong
                    pass
        t0 = time.perf_counter()
        svd = Truncations(layer, list(ranks.values()), seed) if ranks else None
        svd_s += time.perf_counter() - t0
        for knob, value, paired, lp in jobs:
            t0 = time.perf_counter()
            if lp is None:
                _tick(progress, name, knob, value)
                continue
            try:
                if svd is not None and (knob, value) in ranks:
                    if scratch is None:
                        scratch = copy.deepcopy(model)
                    w = svd.weight(ranks[(knob, value)])
                    metric = _evaluate_with_weight(scratch, name, w, val, task)
                else:
                    built = _build(model, Policy({name: lp}), task)
                    metric = evaluate(built, val, task.metric)
                    w = effective_weight(built.get_submodule(name))
            except Exception as exc:  # noqa: BLE001 - one bad value must not stop the pass
                skipped.append({"layer": name, "knob": knob, "value": value,
                                "reason": f"{type(exc).__name__}: {exc}"})
                _tick(progress, name, knob, value)
                continue
            proxy = None
            if w is not None and w.shape == originals[name].shape:
                proxy = fisher_proxy(fisher[name], originals[name], w)
            entries.append(LayerSensitivity(name, knob, value, baseline - metric, proxy, metric,
                                            dict(paired), round(time.perf_counter() - t0, 3)))
            _tick(progress, name, knob, value)
    method = {
        "knobs": list(knobs),
        "metric_examples": len(val),
        "metric_split": "val",
        "fisher_examples": min(batches * batch_size, len(task.train)) if task.train.in_memory
        else batches * batch_size,
        "loss": getattr(task.loss, "__name__", type(task.loss).__name__),
        "fine_tune": "none",
        "paired": {k: [list(p) for p in knob.needs] for k, knob in REGISTRY.items()
                   if knob.needs},
        "truncation": f"one SVD per layer (exact up to {EXACT_SVD_MAX} on the short side, else "
                      f"randomized, {SVD_POWER_ITERATIONS} power iteration(s))",
        "torch_threads": torch.get_num_threads(),
        "fisher_s": round(fisher_s, 2),
        "svd_s": round(svd_s, 2),
        "seconds": round(time.perf_counter() - start, 2),
    }
    return Sensitivity(baseline, entries, method, skipped)


def sensitivity_key(task: Task, space: list[LayerSpace], knobs: list[str], batches: int = 4,
                    batch_size: int = 64, val_examples: int = 256, seed: int = 0) -> str:
    """A digest of everything the pass reads: the model (structure and weights), the exact
    examples it scores and takes the Fisher on, the space, the knobs, the settings, and the
    code that builds and scores the candidates (this module, `search.compress`, the data
    helpers, a plugin knob's class). Equal keys: the same table."""
    h = hashlib.sha256()

    def text(x: Any) -> None:
        h.update(json.dumps(x, sort_keys=True, default=str).encode())

    def tensors(inputs: Inputs, labels: torch.Tensor) -> None:
        for t in (*inputs, labels):
            t = t.detach().cpu().contiguous()
            text([str(t.dtype), list(t.shape)])
            h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16
                     else t.float().numpy().tobytes())

    here = Path(__file__).resolve()
    for source in [here, here.parents[1] / "core" / "data.py",
                   *sorted((here.parents[1] / "compress").glob("*.py"))]:
        h.update(source.read_bytes())
    for k in knobs:
        try:
            text(inspect.getsource(type(REGISTRY[k])))
        except (KeyError, OSError, TypeError):  # no source to read (a REPL-made knob): its name
            text(k)
    text([FORMAT_VERSION, list(knobs), [ls.to_dict() for ls in space], batches, batch_size,
          val_examples, seed, getattr(task.loss, "__qualname__", repr(task.loss)),
          getattr(task.metric, "__qualname__", repr(task.metric)), repr(task.model)])
    for name, t in sorted(task.model.state_dict().items()):
        text(name)
        tensors((), t)
    for split in (task.val.head(val_examples), task.train.head(batches * batch_size, seed=seed)):
        assert split.tensors is not None
        tensors(*split.tensors)
    return h.hexdigest()[:24]


def cached_sensitivity(task: Task, space: list[LayerSpace], knobs: list[str], seed: int = 0,
                       progress: Any | None = None, say: Any = lambda _: None) -> Sensitivity:
    """`measure_sensitivity`, kept under the cache folder by `sensitivity_key`: a second run,
    sweep entry or benchmark on the same model, data, space and knobs reuses the table (5-11
    minutes on the default task) instead of measuring it again. Its `method` says which."""
    key = sensitivity_key(task, space, knobs, seed=seed)
    path = cache_dir() / "sensitivity" / f"{key}.json"
    if path.exists():
        try:
            sens = Sensitivity.load(path)
        except (ValueError, KeyError, TypeError) as exc:  # a damaged file: measure again
            say(f"sensitivity cache {path} unreadable ({type(exc).__name__}: {exc}); measuring")
        else:
            sens.method["reused_from"] = str(path)
            say(f"sensitivity table reused from {path} (same model, examples, space, knobs "
                f"and seed; measured in {sens.method.get('seconds', '?')} s)")
            return sens
    sens = measure_sensitivity(task, space, knobs, seed=seed, progress=progress)
    sens.method["cache_key"] = key
    write_atomically(path, sens.save)
    return sens


def _evaluate_with_weight(model: nn.Module, name: str, weight: torch.Tensor,
                          val: Split, task: Task) -> float:
    """The metric with one layer's weight replaced (then put back)."""
    target = model.get_submodule(name)
    saved = target.weight.data
    target.weight.data = weight.to(saved.dtype)
    try:
        return evaluate(model, val, task.metric)
    finally:
        target.weight.data = saved


def _build(model: nn.Module, policy: Policy, task: Task) -> nn.Module:
    """build(), with the training data where it takes it (gradient channel importances)."""
    return build(model, policy, task.example, task.train, task.loss)


def _policy(knob: str, value: Any, paired: dict[str, Any], skipped: list[dict[str, Any]],
            layer: str) -> LayerPolicy | None:
    try:
        return LayerPolicy(**{**paired, knob: value})
    except (TypeError, ValueError) as exc:
        skipped.append({"layer": layer, "knob": knob, "value": value,
                        "reason": f"{type(exc).__name__}: {exc}"})
        return None


def _tick(progress: Any | None, layer: str, knob: str, value: Any) -> None:
    if progress is not None:
        progress.set_postfix_str(f"{layer} {knob}={value}")
        progress.update(1)


# --- narrowing the space ------------------------------------------------------------------

def _cost(sens: Sensitivity, layer: str, knob: str, value: Any) -> float | None:
    """The drop a value is judged by: its own, or for a paired value the extra drop over the
    value it was paired with alone (a split's cost beyond its rank's)."""
    e = sens.get(layer, knob, value)
    if e is None:
        return None
    base = 0.0
    for other, v in e.paired.items():
        alone = sens.get(layer, other, v)
        if alone is not None:
            base = max(base, alone.accuracy_drop)
    return e.accuracy_drop - base


def _with_choices(ls: LayerSpace, knob: str, values: tuple) -> LayerSpace:
    return dataclasses.replace(ls, values={**ls.values, knob: values})


def narrow_space(space: list[LayerSpace], sensitivity: Sensitivity, max_drop: float,
                 hopeless: float = 0.5) -> list[LayerSpace]:
    """The space without the knob values whose single-layer drop exceeds `max_drop` (a
    fraction of the metric: 0.05 = 5 points of accuracy).

    Per layer and knob: the identity always stays, and so do values not measured. If every
    measured non-identity value is over `max_drop`, the mildest one stays anyway (a fine-tune
    recovers much of a no-fine-tune drop, so the search keeps one step to try), unless even it
    loses `hopeless` or more. A paired value (a knob's `needs`) is judged by its drop beyond the
    value it was paired with alone. Values keep their order.
    """
    out = []
    for ls in space:
        for knob in dict.fromkeys(e.knob for e in sensitivity.entries if e.layer == ls.name):
            try:
                choices = tuple(ls.choices(knob))
            except KeyError:
                continue
            identity = _identity(knob)
            cost = {v: _cost(sensitivity, ls.name, knob, v) for v in choices if v != identity}
            measured = {v: c for v, c in cost.items() if c is not None}
            keep = {v for v, c in cost.items() if c is None or c <= max_drop}
            if measured and not keep & set(measured):
                mildest = min(measured, key=measured.get)
                if measured[mildest] < hopeless:
                    keep.add(mildest)
            kept = tuple(v for v in choices if v == identity or v in keep)
            if kept != choices:
                ls = _with_choices(ls, knob, kept)
        out.append(ls)
    return out


# --- the table ----------------------------------------------------------------------------

def _fmt_value(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def sensitivity_table(sensitivity: Sensitivity, width: int = 100) -> str:
    """Layers as rows (a drop line and a Fisher line each), knob values as columns, wrapped
    to `width`; then the worst values."""
    sens = sensitivity
    columns: list[tuple[str, Any]] = []
    for e in sens.entries:
        if (e.knob, e.value) not in columns:
            columns.append((e.knob, e.value))
    by_knob = list(dict.fromkeys([k for k in sens.method.get("knobs", [])
                                  if any(c[0] == k for c in columns)] + [k for k, _ in columns]))
    columns.sort(key=lambda c: by_knob.index(c[0]))  # grouped by knob, first-seen order
    layers = sens.layers()
    name_w = min(max([len(n) for n in layers] + [5]), 24)
    head_w = name_w + 7
    cell = 9
    per_chunk = max(1, (width - head_w) // cell)
    m = sens.method
    head = [
        f"sensitivity: each layer compressed alone, no fine-tune ({m.get('seconds', 0):.0f} s); "
        f"baseline {100 * sens.baseline:.1f} on {m.get('metric_examples', '?')} val examples, "
        f"Fisher on {m.get('fisher_examples', '?')} train examples",
        "drop: metric points lost; F: 0.5*sum(Fisher*dw^2), - where the weight changes shape; "
        ". not offered",
    ]
    pairs: dict[str, set[str]] = {}
    for e in sens.entries:
        for other, value in e.paired.items():
            spec = dict(paired_with(e.knob))
            pairs.setdefault(e.knob, set()).add(
                f"the harshest {other}" if spec.get(other) == HARSHEST else f"{other}={value}")
    if pairs:
        head.append("+: measured with " + "; ".join(
            f"{k}: {' or '.join(sorted(v))}" for k, v in sorted(pairs.items())))
    lines = [w for line in head for w in textwrap.wrap(line, width, subsequent_indent="  ")]
    paired_knobs = set(pairs)

    def short(name: str) -> str:
        return name if len(name) <= name_w else "~" + name[-(name_w - 1):]

    for c0 in range(0, len(columns), per_chunk):
        chunk = columns[c0:c0 + per_chunk]
        knob_row, value_row, prev = [], [], None
        for knob, value in chunk:
            label = knob if knob != prev else ""
            prev = knob
            knob_row.append(label[:cell - 1].ljust(cell))
            mark = "+" if knob in paired_knobs else ""
            value_row.append((_fmt_value(value)[:cell - 1 - len(mark)] + mark).rjust(cell))
        lines.append("")
        lines.append(" " * head_w + "".join(knob_row).rstrip())
        lines.append("layer".ljust(head_w) + "".join(value_row))
        for name in layers:
            drops, fishers = [], []
            for knob, value in chunk:
                e = sens.get(name, knob, value)
                if e is None:
                    gone = any(s["layer"] == name and s["knob"] == knob and s["value"] == value
                               for s in sens.skipped)
                    drops.append(("err" if gone else ".").rjust(cell))
                    fishers.append(" " * cell)
                    continue
                drops.append(f"{100 * e.accuracy_drop:.1f}".rjust(cell))
                fishers.append(("-" if e.fisher is None else f"{e.fisher:.1e}").rjust(cell))
            lines.append(f"{short(name).ljust(name_w)}  drop " + "".join(drops))
            lines.append(f"{'':{name_w}}  F    " + "".join(fishers).rstrip())
    lines.append("")
    lines.append(worst_line(sens))
    return "\n".join(line.rstrip() for line in lines)


def worst_line(sensitivity: Sensitivity, n: int = 3) -> str:
    worst = sensitivity.worst(n)
    if not worst:
        return "worst: nothing measured"
    parts = [f"{e.layer} {e.knob}={_fmt_value(e.value)} -{100 * e.accuracy_drop:.1f}"
             for e in worst]
    return "worst (points lost): " + ", ".join(parts)
