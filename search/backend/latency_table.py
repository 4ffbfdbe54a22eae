"""Predicted latency: a per-target table of per-layer latencies, measured for real, summed.

Cheaper trials (OFA's latency lookup table, nn-Meter's kernel table): a candidate is made of
layer ops, and most of them repeat across trials (channel counts and ranks are rounded to a
multiple of 8), so each distinct op is compiled and timed once, on the target, with the run's
Compiler (MetaSchedule, the same tuning database), and a candidate's latency is

    predicted = sum of its ops' latencies + residual(family)

while the search runs. The front's points are then compiled and measured whole, and the table's
error on them is reported (`error_report`).

Decisions:
- A layer op is one call of a Conv2d or Linear (grouped and depthwise convs included), a `Half`
  (a 16-bit layer with its casts and fp32 bias add: TVM fuses those with the op) or an
  `Int8Linear` (the Compiler lowers it to int8 kernels; the key names the target's int8 form,
  `search.backend.int8.int8_kind`). Its key is everything that decides the compiled kernel: op
  kind, hyper-parameters, weight dtype, whether it has a bias, the real input shape and dtype
  (captured by forward hooks on the candidate). Weight values are not part of it: every kernel
  here is dense, so the op is timed as a fresh module with random weights.
- The residual is everything else: activations, pooling, reshapes, adds, the VM's per-call
  overhead, and that the whole model runs other kernels than its ops alone (a Linear fused with
  the ReLU after it is another workload, tuned separately, with its own luck in 8 MetaSchedule
  trials). It is learned per model family (default: the model's class and input shape; pass the
  task name) from whole-model measurements given to `record_whole`: the median over them of
  (measured - sum of ops), applied only once MIN_WHOLE (3) models of the family were measured
  whole; until then the prediction is the op sum alone (`residual_from=0`). It is at least
  -50% of the candidate's op sum (never <= 0 ms).
  Why not "start at the uncompressed model's residual": measured (bench/bench_predict.py,
  digits, host, 8 trials per kernel), the uncompressed model ran 25.6 ms whole against an op sum
  of 13.1 ms (its fused 5120-wide kernels tuned worse), and that one +12.5 ms residual made
  every compressed prediction 1.6-52x too high (median error +545%); the op sum alone was off
  by 12% (median; p95 48%), and the median over the other models (leave-one-out) by 8.6% (p95
  47%). The median, not a fit or a mean, because a mis-tuned or mis-timed model must not move
  it; milliseconds, not a fraction of the sum (16% median error on the same pairs).
- Ops of a candidate that the table lacks are tuned together in one MetaSchedule session
  (`tune_together`), then compiled and timed one by one: tuned one at a time, a big op got only
  the budget of a one-kernel module (the 5120x5120 Linear measured 16.4 ms alone, more than the
  whole model's 13.6 ms), and the shared database would have handed those weak records to
  later whole-model compiles too.
- Each entry says how it was made (`measured:<target>:tuned|untuned|partly-tuned(k/n)`); a
  prediction is labelled `predicted:<target>:...` the same way. `missing(tuned=True)` also
  lists entries measured untuned, so a table started without tuning is re-measured once tuning
  is on.
- One JSON file per target next to its tuning database (`<cache>/tuning/<target key>/
  layers.json`), shared by a run's workers: each update re-reads the file under a lock, merges
  and replaces it atomically (temp file + os.replace); readers never see half a file. An op is
  measured under the device lock, and skipped if another worker measured it meanwhile.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from search.backend.measure import compile_and_time
from search.backend.provenance import Provenance, tuning_label
from search.core.data import as_inputs
from search.core.errors import TrialFailed
from search.devices.lock import device_lock, file_lock
from search.devices.target import Measurement, TargetSpec

KEY_VERSION = "v1"  # bump when the key or how an op is timed changes: old entries are ignored
KEEP_WHOLE = 64  # whole-model records kept per family (the most recent)
MIN_WHOLE = 3  # whole-model records a family needs before its residual is applied
RESIDUAL_FLOOR = 0.5  # the residual is at least -this x the candidate's op sum


@dataclass(frozen=True)
class LayerOp:
    """One op of a candidate: its key and how to build it alone (fresh weights)."""

    key: str
    make: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    input_dtype: torch.dtype

    def example(self) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        return torch.randn(self.input_shape, generator=gen).to(self.input_dtype)


@dataclass(frozen=True)
class Prediction:
    """A predicted latency: the sum of the ops' table latencies plus the family's residual."""

    ms: float
    per_layer: list[tuple[str, float]]  # (key, ms) per op call, in call order
    residual_ms: float  # ms - the op sum
    residual_from: int  # whole-model measurements the residual is the median of (0: not used)
    source: Provenance  # predicted, on which target, from how many tuned ops

    @property
    def layer_sum_ms(self) -> float:
        return sum(ms for _, ms in self.per_layer)


class MissingLayers(LookupError):
    """The table has no latency for some of a model's ops (measure them first)."""

    def __init__(self, keys: list[str]) -> None:
        super().__init__(f"{len(keys)} layer op(s) not in the latency table, e.g. {keys[0]}")
        self.keys = keys


# --------------------------------------------------------------------------------------------
# ops of a model


def _tuple(v: Any) -> str:
    return "x".join(str(int(i)) for i in v) if isinstance(v, tuple | list) else str(v)


def _dtype(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def _conv_key(m: nn.Conv2d, bias: bool) -> str:
    return (f"conv2d(out={m.out_channels},k={_tuple(m.kernel_size)},s={_tuple(m.stride)},"
            f"p={_tuple(m.padding)},d={_tuple(m.dilation)},g={m.groups},bias={int(bias)},"
            f"pad={m.padding_mode},w={_dtype(m.weight.dtype)})")


def _linear_key(m: nn.Linear, bias: bool) -> str:
    return f"linear(out={m.out_features},bias={int(bias)},w={_dtype(m.weight.dtype)})"


def _fresh(m: nn.Module, bias: bool) -> nn.Module:
    """A new layer with m's hyper-parameters and default-initialized weights."""
    if isinstance(m, nn.Conv2d):
        new: nn.Module = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride,
                                   m.padding, m.dilation, m.groups, bias, m.padding_mode)
    else:
        new = nn.Linear(m.in_features, m.out_features, bias)
    return new.to(m.weight.dtype)


def _plain_key(m: nn.Module, bias: bool) -> str:
    return _conv_key(m, bias) if isinstance(m, nn.Conv2d) else _linear_key(m, bias)


def _op(m: nn.Module, x: torch.Tensor, int8_kind: str) -> LayerOp:
    shape, dtype = tuple(int(s) for s in x.shape), x.dtype
    where = f"in={_tuple(shape)}:{_dtype(dtype)}"
    if hasattr(m, "latency_op"):  # a module a knob made keys and rebuilds itself
        key, make = m.latency_op(_plain_key, {"int8_kind": int8_kind})
        return LayerOp(f"{KEY_VERSION}|{key}|{where}", make, shape, dtype)
    bias = m.bias is not None
    return LayerOp(f"{KEY_VERSION}|{_plain_key(m, bias)}|{where}", lambda: _fresh(m, bias),
                   shape, dtype)


@torch.no_grad()
def layer_ops(model: nn.Module, example: torch.Tensor, int8_kind: str = "plain"
              ) -> list[LayerOp]:
    """The model's ops in call order (one per call: a layer called twice counts twice), found
    by forward hooks on one run of `example`. A Conv2d/Linear inside a Half is the Half's."""
    wrapped = {id(inner) for m in model.modules() if hasattr(m, "latency_op")
               for inner in m.modules() if inner is not m}
    found: list[LayerOp] = []

    def hook(m: nn.Module, args: tuple[Any, ...], _out: Any) -> None:
        if args and id(m) not in wrapped:  # (a layer called with keywords only is missed)
            found.append(_op(m, args[0], int8_kind))

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, nn.Conv2d | nn.Linear) or hasattr(m, "latency_op")]
    was_training = model.training
    try:
        model.eval()(*as_inputs(example))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return found


def family_of(model: nn.Module, example: torch.Tensor) -> str:
    """The default residual family: the model's class and input shape."""
    cls = type(model)
    shapes = ",".join(_tuple(tuple(t.shape)) for t in as_inputs(example))
    return f"{cls.__module__}.{cls.__qualname__}[{shapes}]"


# --------------------------------------------------------------------------------------------
# the table


def _tuned(entry: dict[str, Any]) -> bool:
    """Measured on tuned kernels: its own records, or schedules transferred from a tuned
    neighbour (search.backend.transfer); not measured again once the compiler can tune."""
    return entry["tuning"] == "tuned" or entry["tuning"].startswith("tuned+")


def _tolerance(module: nn.Module, ref: torch.Tensor) -> float:
    """atol for checking a lone op's compiled output (random weights: scale by the output)."""
    base = getattr(module, "tolerance", 1e-3)  # a 16-bit layer rounds differently per runtime
    return base * max(1.0, float(ref.detach().float().abs().max()))


class LatencyTable:
    """Per-layer latencies of one target, in a JSON file shared by processes."""

    def __init__(self, path: Path, target_name: str = "", int8_kind: str = "plain",
                 min_whole: int = MIN_WHOLE) -> None:
        self.path = Path(path)
        self.min_whole = min_whole
        self.target_name = target_name
        self.int8_kind = int8_kind  # the int8 kernel form ops are lowered to (search.compress.int8)
        self.measured = 0  # ops this object compiled and timed (tests, progress)

    @classmethod
    def for_compiler(cls, compiler: Any) -> LatencyTable:
        """The table next to the compiler's tuning database (one per target key)."""
        from search.backend.int8 import int8_kind

        return cls(compiler.db_dir / "layers.json", compiler.spec.name,
                   int8_kind(compiler.target))

    # ---- the file

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            data = {}
        data.setdefault("layers", {})
        data.setdefault("whole", {})
        return data

    def _update(self, change: Callable[[dict[str, Any]], None]) -> None:
        """Re-read, change and atomically replace the file, under its lock."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(self.path.with_name(self.path.name + ".lock")):
            data = self._read()
            change(data)
            data["version"] = KEY_VERSION
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".layers-", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as handle:
                    json.dump(data, handle, indent=1, sort_keys=True)
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise

    @property
    def layers(self) -> dict[str, dict[str, Any]]:
        return self._read()["layers"]

    # ---- ops

    def missing(self, model: nn.Module, example: torch.Tensor, tuned: bool = False
                ) -> list[str]:
        """Keys of the model's ops the table lacks (distinct, in call order); with `tuned`,
        also those only measured with untuned kernels."""
        layers = self.layers
        out: list[str] = []
        for op in layer_ops(model, example, self.int8_kind):
            entry = layers.get(op.key)
            if (entry is None or (tuned and not _tuned(entry))) and op.key not in out:
                out.append(op.key)
        return out

    def measure_missing(self, model: nn.Module, example: torch.Tensor, compiler: Any,
                        target: TargetSpec | None = None, settings: Measurement | None = None,
                        progress: Any | None = None) -> list[str]:
        """Compile each op the table lacks as its own module with `compiler` (tuning it into the
        run's database when tuning is on) and time it on the target. Returns the keys measured.

        An entry measured untuned is measured again when the compiler can tune now.
        """
        return self.measure_ops(layer_ops(model, example, self.int8_kind), compiler, target,
                                settings, progress)

    def measure_ops(self, ops_in: Iterable[LayerOp], compiler: Any,
                    target: TargetSpec | None = None, settings: Measurement | None = None,
                    progress: Any | None = None, together: bool = True) -> list[str]:
        """`measure_missing` for a list of ops. `together`: tune the kernels of the missing ops
        in one MetaSchedule session first (else each compile tunes or transfers its own, as
        a trial's compile does: search.backend.transfer). Returns the keys measured."""
        from search.backend.compile import to_relax

        target = target or compiler.spec
        settings = settings or target.measurement
        want_tuned = bool(compiler.can_tune)
        ops: dict[str, LayerOp] = {}
        for op in ops_in:
            ops.setdefault(op.key, op)
        layers = self.layers
        todo = [k for k in ops if k not in layers or (want_tuned and not _tuned(layers[k]))]
        if todo and want_tuned and together:
            with device_lock(target):
                tune_together(compiler, [to_relax(ops[k].make().eval(), ops[k].example())
                                         for k in todo], progress)
        done: list[str] = []
        for key in todo:
            op = ops[key]
            entry = self.layers.get(key)  # another worker may have measured it meanwhile
            if entry is not None and (not want_tuned or _tuned(entry)):
                continue
            torch.manual_seed(0)
            module = op.make().eval()
            x = op.example()
            with torch.no_grad():
                atol = _tolerance(module, module(x))
            timed = compile_and_time(module, x, compiler, target, settings, atol,
                                     progress if together else None)  # (else: counts ops)
            latency = timed.latency
            record = {
                "ms": latency.median_ms, "p25_ms": latency.p25_ms, "p75_ms": latency.p75_ms,
                "repeats": latency.repeats, "tuning": timed.source.tuning,
                "kernels": timed.compiled.tasks, "source": timed.source.to_dict(),
                "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            self._update(lambda data, k=key, r=record: data["layers"].__setitem__(k, r))
            self.measured += 1
            done.append(key)
            if progress is not None and not together:
                progress.update(1)
        return done

    # ---- whole models and the residual

    def records(self, family: str) -> list[dict[str, Any]]:
        """The family's whole-model measurements (measured_ms, layer_sum_ms, note, when)."""
        return list(self._read()["whole"].get(family, []))

    def residual(self, family: str) -> tuple[float, int]:
        """(ms added to an op sum, how many whole-model records it is the median of): 0 and 0
        while the family has fewer than `min_whole` records."""
        records = self.records(family)
        if len(records) < self.min_whole:
            return 0.0, 0
        return statistics.median(r["measured_ms"] - r["layer_sum_ms"] for r in records), \
            len(records)

    def record_whole(self, model: nn.Module, example: torch.Tensor, measured_ms: float,
                     family: str | None = None, note: str = "") -> float:
        """Learn from a whole-model measurement (all its ops must be in the table). Returns
        this model's residual (measured - sum of its ops, ms)."""
        family = family or family_of(model, example)
        layer_sum = self._layer_sum(model, example)[0]
        record = {"measured_ms": float(measured_ms), "layer_sum_ms": layer_sum,
                  "note": note, "when": time.strftime("%Y-%m-%dT%H:%M:%S")}

        def change(data: dict[str, Any]) -> None:
            records = data["whole"].setdefault(family, [])
            records.append(record)
            del records[:-KEEP_WHOLE]

        self._update(change)
        return float(measured_ms) - layer_sum

    def _layer_sum(self, model: nn.Module, example: torch.Tensor
                   ) -> tuple[float, list[tuple[str, float]], list[str]]:
        layers = self.layers
        ops = layer_ops(model, example, self.int8_kind)
        absent = list(dict.fromkeys(op.key for op in ops if op.key not in layers))
        if absent:
            raise MissingLayers(absent)
        per = [(op.key, float(layers[op.key]["ms"])) for op in ops]
        return sum(ms for _, ms in per), per, [layers[op.key]["tuning"] for op in ops]

    def predict(self, model: nn.Module, example: torch.Tensor, family: str | None = None
                ) -> Prediction:
        """Sum of the ops' latencies + the family's residual; compiles nothing. Raises
        MissingLayers if an op has not been measured."""
        family = family or family_of(model, example)
        total, per, labels = self._layer_sum(model, example)
        residual, n = self.residual(family)
        residual = max(residual, -RESIDUAL_FLOOR * total)
        tuned = sum(lbl == "tuned" for lbl in labels)
        return Prediction(total + residual, per, residual, n,
                          Provenance("predicted", self.target_name or "?",
                                     tuning_label(tuned, len(labels))))


def tune_together(compiler: Any, mods: list[Any], progress: Any | None = None) -> int:
    """Tune the kernels of several modules in one MetaSchedule session. Returns how many.

    NOTE: compiled one at a time, each op would get the Compiler's budget for a one-kernel
    module (n trials), while in the whole model MetaSchedule's gradient scheduler gives the
    kernels that dominate latency up to 4n: the table then holds under-tuned big ops (measured:
    the digits model's 5120x5120 Linear took 16.4 ms alone vs 13.6 ms for the whole model) and,
    since the database is shared, so do later whole-model compiles. Tuning a candidate's new ops
    together gives them the budget split they get in the whole model.
    """
    if not compiler.can_tune or not mods:
        return 0
    return compiler.tune([k for mod in mods for k in compiler.kernels_of(mod)], progress)


def deployed_form(model: nn.Module, policy: Any,
                  data: tuple[torch.Tensor, torch.Tensor] | None = None) -> nn.Module:
    """A copy of a restructured (not yet fine-tuned) candidate in its deployed structure and
    precision: what `predict` needs before the fine-tune (the latency does not depend on the
    weights). Knobs that change values, not ops (weight sharing: a shared layer computes in
    fp32), are left out with the knobs they override, which skips their work (k-means)."""
    import copy

    from search.compress.build import apply_precision
    from search.compress.knob import REGISTRY
    from search.compress.policy import Policy

    def ops_only(lp: Any) -> Any:
        drop = {}
        for knob in REGISTRY.values():
            if not knob.changes_ops and getattr(lp, knob.name) != knob.identity:
                drop[knob.name] = knob.identity
                drop.update({o: REGISTRY[o].identity for o in knob.overrides})
        return lp.replace(**drop) if drop else lp

    structural = Policy({name: ops_only(lp) for name, lp in policy.layers.items()})
    return apply_precision(copy.deepcopy(model), structural, data)


def verify_front(items: Iterable[tuple[Any, nn.Module, float, float]], example: torch.Tensor,
                 table: LatencyTable, compiler: Any, target: TargetSpec | None = None,
                 family: str | None = None, settings: Measurement | None = None
                 ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Compile and measure each front point whole: `items` are (label, deployed model, the
    latency predicted for it during the search, atol). Each measurement is then recorded
    (`record_whole`: the residual learns from it) and the error of the predictions as made is
    reported. A point that fails to compile or run whole gets a row with its `error` and is
    left out of the report. Returns one row per point and `error_report` over them."""
    rows = []
    for label, model, predicted_ms, atol in items:
        try:
            timed = compile_and_time(model, example, compiler, target, settings, atol)
        except TrialFailed as exc:
            rows.append({"point": label, "predicted_ms": float(predicted_ms), "error": str(exc)})
            continue
        latency = timed.latency
        table.record_whole(model, example, latency.median_ms, family, note=f"front {label}")
        rows.append({"point": label, "predicted_ms": float(predicted_ms),
                     "measured_ms": latency.median_ms,
                     "measured_iqr_ms": [latency.p25_ms, latency.p75_ms],
                     "rel_error": (float(predicted_ms) - latency.median_ms) / latency.median_ms,
                     "source": timed.source.to_dict()})
    return rows, error_report((r["predicted_ms"], r["measured_ms"]) for r in rows
                              if "error" not in r)


# --------------------------------------------------------------------------------------------
# how good it is


def error_report(pairs: Iterable[tuple[float, float]]) -> dict[str, Any]:
    """Absolute relative error |predicted - measured| / measured over (predicted, measured)
    pairs: n, median, 95th percentile (numpy's linear interpolation), max, and the signed
    median (bias)."""
    pairs = [(float(p), float(m)) for p, m in pairs]
    if not pairs:
        return {"n": 0}
    rel = np.array([(p - m) / m for p, m in pairs])
    return {
        "n": len(pairs),
        "median_abs_rel_error": float(np.median(np.abs(rel))),
        "p95_abs_rel_error": float(np.percentile(np.abs(rel), 95)),
        "max_abs_rel_error": float(np.abs(rel).max()),
        "median_rel_error": float(np.median(rel)),
    }
