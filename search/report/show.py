"""Look inside finished runs: compare two fronts, and break one trial down layer by layer.

`compare` answers "is run B better than run A?" with numbers that do not depend on how many
points a front has: the normalized hypervolume of each front against one shared reference, and
which points of each front the other dominates. `show` answers "where did this trial's
latency and size go?": per layer, the knobs chosen, parameters and stored bytes before and after,
the layer's own compiled-and-timed latency, and (with sensitivity.json) what the chosen knobs
cost alone.

NOTE: named report, not inspect: a module named like the stdlib's `inspect` shadows it (and
breaks torch) whenever search/ itself lands on sys.path.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from search.backend.provenance import Provenance
from search.compress.policy import LayerPolicy, Policy
from search.core.errors import TrialFailed, UserError
from search.core.hooks import layer_inputs
from search.report.compare import load_front

LAYERS_FORMAT = 1  # layers.json


# --- hypervolume ----------------------------------------------------------------------------


# --- comparing two runs -----------------------------------------------------------------------


# --- one trial, layer by layer ----------------------------------------------------------------

@dataclass(frozen=True)
class LayerTiming:
    """One layer compiled alone by TVM for the run's target and timed like a whole model."""

    median_ms: float
    p25_ms: float
    p75_ms: float
    source: Provenance | None  # how it was timed (None: it failed, see error)
    input_shape: list[int]  # the input it was timed on: captured inside the model, batch 1
    error: str | None = None  # the layer could not be compiled or run alone: why


@dataclass(frozen=True)
class LayerRow:
    """One compressible layer of a trial, before (the task's model) and after (the trial's)."""

    name: str
    knobs: dict[str, Any]  # the knobs that differ from the identity
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    inputs_pruned: bool  # smaller only because the layer feeding it lost channels
    latency_before: LayerTiming | None = None
    latency_after: LayerTiming | None = None
    sensitivity: dict[str, float | None] = field(default_factory=dict)  # "knob=value" -> drop

    @property
    def changed(self) -> bool:
        return bool(self.knobs) or self.inputs_pruned


@dataclass(frozen=True)
class TrialLayers:
    """A trial broken down by layer, with the whole-model figures it adds up to."""

    run_dir: str
    trial: int
    target: str
    result: dict[str, Any]  # the trial's result.json
    baseline: dict[str, Any] | None  # front.json's uncompressed point
    rows: list[LayerRow]
    notes: list[str]


def _layer_bytes(module: nn.Module, lp: LayerPolicy) -> int:
    from search.compress.size import layer_bytes

    return layer_bytes(module, lp)


def _params(module: nn.Module) -> int:
    from search.compress.size import layer_params

    return layer_params(module)


def _time_layer(module: nn.Module, x: torch.Tensor, compiler: Any, target: Any,
                atol: float) -> LayerTiming:
    """Compile one layer as its own model (tuning database reused, never extended) and time
    it; a layer that fails alone is reported, not raised."""
    from search.backend.measure import compile_and_time

    shape = list(x.shape)
    try:
        timed = compile_and_time(module, x, compiler, target, atol=atol)
    except TrialFailed as exc:
        return LayerTiming(math.nan, math.nan, math.nan, None, shape, str(exc))
    lat = timed.latency
    return LayerTiming(lat.median_ms, lat.p25_ms, lat.p75_ms, timed.source, shape)


def _cache_key(info: Any) -> dict[str, Any]:
    return {"version": LAYERS_FORMAT, "target": info.target, "device": info.device}


def _read_cache(path: Path, info: Any) -> dict[str, dict[str, LayerTiming | None]]:
    """layers.json's timings, when they were made for this target and device."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    if {k: data.get(k) for k in _cache_key(info)} != _cache_key(info):
        return {}
    def timing(v: dict[str, Any]) -> LayerTiming:
        source = v.get("source")
        return LayerTiming(**{**v, "source": Provenance.from_dict(source) if source else None})

    try:
        return {name: {k: timing(v) if v else None for k, v in t.items()}
                for name, t in data.get("layers", {}).items()}
    except (TypeError, KeyError, ValueError):
        return {}  # a damaged or older cache: measured again


def _sensitivity(run_dir: Path) -> dict[tuple[str, str, str], float]:
    """(layer, knob, value as JSON) -> accuracy drop, from the run's sensitivity.json (a
    search.study.sensitivity.Sensitivity, or a bare list of its records)."""
    path = run_dir / "sensitivity.json"
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        records = data if isinstance(data, list) else data.get("entries", [])
        return {(r["layer"], r["knob"], json.dumps(r["value"])): float(r["accuracy_drop"])
                for r in records}
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, KeyError,
            TypeError) as exc:  # (a damaged file: any of these)
        raise UserError(f"{path} is damaged ({type(exc).__name__}: {exc}); delete it to show "
                        f"the trial without sensitivity") from None


def _trial_files(run_dir: Path, trial: int, front: Mapping[str, Any]) -> dict[str, Any]:
    """The trial's result.json, or a one-line UserError naming why there is none."""
    from search.study.runfolder import trial_file

    if trial_file(run_dir, trial, "policy.yaml") is None:
        raise UserError(f"run {str(run_dir)!r} has no trial {trial}; pick one from "
                        f"`search front {run_dir}`")
    path = trial_file(run_dir, trial, "result.json")
    if path is None:
        failed = {f["trial"]: f["reason"] for f in front.get("trials", {}).get("failed", [])}
        if trial in failed:
            raise UserError(f"trial {trial} failed, so it has nothing to show: {failed[trial]}")
        raise UserError(f"trial {trial} has no result (it is running, or was interrupted)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} cannot be read ({exc}): the trial's files are damaged") from None
    if not isinstance(data, dict) or not isinstance(data.get("policy"), dict):
        raise UserError(f"{path} is not a trial result (no policy): the trial's files are "
                        f"damaged")
    return data


def trial_layers(run_dir: Path, trial: int, measure: bool = False) -> TrialLayers:
    """A trial of a run, layer by layer. `measure`: compile and time each layer alone, before
    and after (cached in the trial's layers.json); without it, cached timings are shown if any.
    """
    from search.compress.build import build
    from search.compress.space import compressible_layers
    from search.core.task import load_task
    from search.study.runfolder import load_trial_model, setup_threads, trial_file

    info, front = load_front(run_dir)
    result = _trial_files(run_dir, trial, front)
    trial_dir = run_dir / "trials" / f"{trial:04d}"
    notes = []
    target = info.load_target()
    setup_threads(target)
    task = load_task(info.config.task, **info.config.task_args)
    policy = Policy.from_dict(result["policy"])
    if all(lp.is_identity for lp in policy.layers.values()) or \
            trial_file(run_dir, trial, "model.pt", info) is not None:
        model, _ = load_trial_model(run_dir, trial, task)
    else:  # off the front: its weights were dropped, its structure is the policy's
        model = build(task.model, policy, task.example, task.train, task.loss).eval()
        notes.append("this trial is off the front, so its fine-tuned weights were not kept: "
                     "sizes of pruned/shared layers come from the un-fine-tuned build")
    original = task.model.eval()
    names = [n for n, _ in compressible_layers(original)]
    sens = _sensitivity(run_dir)
    rows = []
    for name in names:
        lp = policy.get(name)
        before, after = original.get_submodule(name), model.get_submodule(name)
        knobs = Policy({name: lp}).to_dict()[name]
        rows.append(LayerRow(
            name, knobs, _params(before), _params(after), _layer_bytes(before, LayerPolicy()),
            _layer_bytes(after, lp), not knobs and _params(after) != _params(before),
            sensitivity={f"{k}={v}": sens.get((name, k, json.dumps(v))) for k, v in knobs.items()}
            if sens else {}))
    trial_cache = trial_dir / "layers.json"
    timings = _read_cache(trial_cache, info)
    if measure and set(timings) != set(names):
        # the uncompressed layers are the same in every trial: timed once per run, kept with
        # the baseline trial (whose layers are exactly those)
        base = front.get("baseline")
        base_cache = run_dir / "trials" / f"{base['trial']:04d}" / "layers.json" if base \
            else None
        known = _read_cache(base_cache, info) if base_cache else {}
        timings = _measure(original, model, policy, rows, task.example, target,
                           {n: t["before"] for n, t in known.items() if t.get("before")})
        notes += _write_cache(trial_cache, info, timings)
        if base_cache and not known and base_cache != trial_cache:
            notes += _write_cache(base_cache, info, {
                n: {"before": t["before"], "after": t["before"]} for n, t in timings.items()})
    rows = [replace(r, latency_before=timings.get(r.name, {}).get("before"),
                    latency_after=timings.get(r.name, {}).get("after")) for r in rows]
    return TrialLayers(str(run_dir), trial, info.target, result, front.get("baseline"), rows,
                       notes)


def _measure(original: nn.Module, model: nn.Module, policy: Policy, rows: list[LayerRow],
             example: torch.Tensor, target: Any, known_before: Mapping[str, LayerTiming]
             ) -> dict[str, dict[str, LayerTiming | None]]:
    """Every layer alone, before and after; an unchanged layer is timed once, and uncompressed
    layers already in `known_before` not again."""
    from tqdm import tqdm

    from search.backend.compile import Compiler
    from search.compress.build import output_tolerance
    from search.study.runfolder import tuning_dir

    # NOTE: trials_per_task=0 uses the run's tuning database as it is: kernels the search tuned
    # are reused; a layer compiled alone fuses differently (no following activation), so some
    # of its kernels may be missing there and run untuned; its source says so.
    compiler = Compiler(target, tuning_dir(target), trials_per_task=0)
    names = [row.name for row in rows]
    x_before, x_after = layer_inputs(original, example, names), layer_inputs(model, example, names)
    out: dict[str, dict[str, LayerTiming | None]] = {}
    # each layer compiles twice (before, after): minutes on a large model, so a bar says where
    bar = tqdm(rows, desc="timing layers", unit="layer", leave=False,
               disable=None)  # None: shown on a terminal only
    for row in bar:
        name = row.name
        bar.set_postfix_str(name, refresh=False)
        if name not in x_before or name not in x_after:
            out[name] = {"before": None, "after": None}  # not reached by the forward pass
            continue
        before = known_before.get(name) or _time_layer(
            original.get_submodule(name), x_before[name], compiler, target, 1e-3)
        same = not row.changed and x_before[name].shape == x_after[name].shape
        after = before if same else _time_layer(
            model.get_submodule(name), x_after[name], compiler, target,
            output_tolerance(Policy({name: policy.get(name)})))
        out[name] = {"before": before, "after": after}
    return out


def _write_cache(path: Path, info: Any, timings: Mapping[str, Mapping[str, Any]]
                 ) -> list[str]:
    """Write layers.json; a read-only run folder costs only the cache (said in a note)."""
    layers = {n: {k: asdict(v) if v else None for k, v in t.items()}
              for n, t in timings.items()}
    try:
        path.write_text(json.dumps({**_cache_key(info), "layers": layers}, indent=1))
    except OSError as exc:
        return [f"per-layer timings not cached in {path} ({exc.strerror})"]
    return []


def _size(n: float) -> str:
    return f"{n / 1024:,.1f} KiB" if n < 10 * 1024**2 else f"{n / 1024**2:,.1f} MiB"


def _ms(t: LayerTiming | None) -> str:
    if t is None:
        return "-"
    return "failed" if t.error else f"{t.median_ms:.4f}"


def _knob_text(knobs: Mapping[str, Any], inputs_pruned: bool) -> str:
    if inputs_pruned:
        return "(inputs pruned)"
    return " ".join(f"{k}={v}" for k, v in knobs.items()) or "-"


def _sens_text(sens: Mapping[str, float | None]) -> str:
    return " ".join(f"{k}:{'?' if d is None else f'{-100 * d:+.1f}'}" for k, d in sens.items())


def layers_table(t: TrialLayers) -> str:
    """A trial's per-layer table, with the sums next to the whole model's measured figures."""
    r = t.result
    lines = [f"trial {t.trial} of {t.run_dir} on {t.target}: test accuracy "
             f"{100 * r['test_accuracy']:.2f}% (val {100 * r['val_accuracy']:.2f}%), "
             f"{r['latency_ms']:.3f} ms "
             f"[{Provenance.from_dict(r['latency_source'])}], {_size(r['size_bytes'])} of "
             f"weights in the compiled library"
             + (f" (ideal {_size(r['ideal_size_bytes'])}, an estimate)"
                if r.get("ideal_size_bytes") else "")]
    has_sens = any(row.sensitivity for row in t.rows)
    timed = any(row.latency_after or row.latency_before for row in t.rows)
    cells = []
    for row in t.rows:
        after = row.latency_after
        cells.append((row.name, _knob_text(row.knobs, row.inputs_pruned),
                      f"{row.params_before:,} -> {row.params_after:,}",
                      f"{_size(row.bytes_before)} -> {_size(row.bytes_after)}",
                      _ms(row.latency_before), _ms(row.latency_after),
                      "" if after is None else after.error or after.source.label,
                      _sens_text(row.sensitivity)))
    titles = ("layer", "knobs", "params", "ideal bytes (est.)", "ms before", "ms after",
              "latency source (after)", "sensitivity: acc change, pts")
    if not has_sens:
        titles, cells = titles[:-1], [c[:-1] for c in cells]
    widths = [max(len(x) for x in col) for col in zip(titles, *cells, strict=False)]
    right = {2, 3, 4, 5}  # numbers align right

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if i in right else v.ljust(w)
                         for i, (v, w) in enumerate(zip(values, widths, strict=True))).rstrip()

    lines += [line(titles), "-" * len(line(titles))]
    lines += [line(c) for c in cells]
    if timed:
        before = [row.latency_before for row in t.rows if row.latency_before]
        after = [row.latency_after for row in t.rows if row.latency_after]
        sum_b = sum(x.median_ms for x in before if not x.error)
        sum_a = sum(x.median_ms for x in after if not x.error)
        base = t.baseline
        whole_b = f"; uncompressed model {base['latency_ms']:.3f} ms" if base else ""
        lines.append(f"sum of layers: {sum_b:.3f} ms before{whole_b}; {sum_a:.3f} ms after; "
                     f"this trial's model {r['latency_ms']:.3f} ms "
                     f"[{Provenance.from_dict(r['latency_source'])}] "
                     f"(the rest: activations, pooling, reshapes, and fusion across layers)")
        lines.append("per-layer latency: each layer compiled alone by TVM for the target with "
                     "its real input shape (captured in the model, batch 1), the run's tuning "
                     "database reused but not extended (kernels not in it run untuned: see the "
                     "source), timed like the whole model (median of repeats)")
    else:
        lines.append(f"per-layer latency: not measured yet; add --latency (compiles and times "
                     f"each layer alone; cached in trials/{t.trial:04d}/layers.json)")
    lines.append("ideal bytes: an ESTIMATE per layer, the weights in the formats the knobs "
                 "count (the sum is the front's ideal size); the compiled library stores what "
                 "the graph reads (the front's size)")
    if has_sens:
        lines.append("sensitivity: accuracy change (points) with only this layer compressed by "
                     "that knob value, before fine-tuning (sensitivity.json); ? = not measured")
    lines += [f"note: {n}" for n in t.notes]
    return "\n".join(lines)


def show(run_dir: Path, trial: int, measure: bool = False) -> str:
    """`search show`: a trial's per-layer table (see trial_layers)."""
    return layers_table(trial_layers(run_dir, trial, measure))
