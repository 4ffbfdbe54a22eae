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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from search.data import as_inputs
from search.errors import TrialFailed, UserError
from search.policy import LayerPolicy, Policy

Objectives = tuple[float, float, float]  # accuracy (up), latency_ms (down), size_bytes (down)
LAYERS_FORMAT = 1  # layers.json


# --- hypervolume ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Reference:
    """The worst corner of the box a hypervolume is measured in (the ideal corner is accuracy
    1.0, latency 0, size 0). Each objective is scaled to [0, 1] between the two, so a
    hypervolume is the fraction of that box the front dominates: 0 (nothing better than the
    reference) to 1 (a perfect, free, instant model)."""

    accuracy: float  # 0.0: any model counts
    latency_ms: float  # the uncompressed model's (see reference_for)
    size_bytes: float


def objectives(point: Mapping[str, Any]) -> Objectives:
    """A front.json point (or baseline) as (accuracy, latency_ms, size_bytes)."""
    return float(point["test_accuracy"]), float(point["latency_ms"]), float(point["size_bytes"])


def _losses(p: Objectives, ref: Reference) -> tuple[float, float, float]:
    """Minimized, scaled objectives: 0 is ideal, 1 is the reference."""
    acc, lat, size = p
    return (1.0 - acc) / (1.0 - ref.accuracy), lat / ref.latency_ms, size / ref.size_bytes


def hypervolume(points: Iterable[Objectives], reference: Reference) -> float:
    """The normalized hypervolume of (accuracy up, latency down, size down) points: the fraction
    of the box between the ideal corner and `reference` that some point dominates. Points at or
    beyond the reference in any objective add nothing; dominated points add nothing."""
    # NOTE: Optuna 5 has no public hypervolume function (only plot_hypervolume_history, which
    # needs plotly and a study); its exact WFG implementation (a dedicated 3-D sweep for our
    # three objectives) is private. The test of a hand-computed front guards this import.
    from optuna._hypervolume import compute_hypervolume

    inside = [loss for loss in (_losses(p, reference) for p in points)
              if all(v < 1.0 for v in loss)]
    if not inside:
        return 0.0
    return float(compute_hypervolume(np.array(inside, dtype=float), np.ones(3)))


def reference_for(*fronts: Mapping[str, Any]) -> Reference:
    """One reference for all the given front.json's: accuracy 0; the largest uncompressed
    latency and size among their baselines (the same model measured in each run: the max makes
    the reference symmetric and keeps every baseline inside the box). A run without a
    baseline falls back to its slowest / largest front point."""
    lat = size = 0.0
    for data in fronts:
        base = data.get("baseline")
        rows = [base] if base else list(data.get("points") or [])
        for row in rows:
            lat = max(lat, float(row["latency_ms"]))
            size = max(size, float(row["size_bytes"]))
    if lat <= 0 or size <= 0:
        raise UserError("cannot place a hypervolume reference: no baseline and no front points")
    return Reference(0.0, lat, size)


def dominates(a: Objectives, b: Objectives) -> bool:
    """a is at least as good as b everywhere and better somewhere."""
    at_least = a[0] >= b[0] and a[1] <= b[1] and a[2] <= b[2]
    return at_least and (a[0] > b[0] or a[1] < b[1] or a[2] < b[2])


# --- comparing two runs -----------------------------------------------------------------------

@dataclass(frozen=True)
class Comparison:
    """Two runs' fronts against one reference."""

    run_a: str
    run_b: str
    target_a: str
    target_b: str
    task_a: str
    task_b: str
    reference: Reference
    hypervolume_a: float
    hypervolume_b: float
    points_a: int
    points_b: int
    a_dominated_by_b: list[int]  # trials of A's front that some point of B's front dominates
    b_dominated_by_a: list[int]
    common: list[tuple[int, int]]  # (trial in A, trial in B) with the same policy
    warnings: list[str] = field(default_factory=list)


def load_front(run_dir: Path) -> tuple[Any, dict[str, Any]]:
    """(RunInfo, front.json) of a finished run folder, or a one-line UserError."""
    from search.run import RunInfo

    info = RunInfo.load(run_dir)
    path = run_dir / "front.json"
    if not path.exists():
        raise UserError(f"no front.json in {str(run_dir)!r}: the run has not finished a study "
                        f"yet (resume it with `search run --out {run_dir} --resume`)")
    return info, read_front_json(path)


FRONT_KEYS = {"target": str, "budget_ms": (int, float), "baseline": (dict, type(None)),
              "points": list, "trials": dict}  # what the table, show and compare read


def read_front_json(path: Path) -> dict[str, Any]:
    """front.json, checked enough that its readers cannot crash on it: a damaged one is a
    one-line UserError saying how to write it again."""
    again = f"run `search run --out {path.parent} --resume` to write it again"
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} cannot be read ({exc}); {again}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object; {again}")
    for key, kind in FRONT_KEYS.items():
        if not isinstance(data.get(key), kind):
            raise UserError(f"{path}: {key} is missing or has the wrong type; {again}")
    counts = data["trials"]
    if not (isinstance(counts.get("complete"), int) and isinstance(counts.get("failed"), list)):
        raise UserError(f"{path}: trials must hold complete and failed; {again}")
    for p in [*data["points"], *([data["baseline"]] if data["baseline"] else [])]:
        if not (isinstance(p, dict) and POINT_KEYS <= set(p) and isinstance(p["policy"], dict)
                and isinstance(p["trial"], int)):
            raise UserError(f"{path}: a point lacks some of {', '.join(sorted(POINT_KEYS))}; "
                            f"{again}")
    return data


POINT_KEYS = {"trial", "test_accuracy", "val_accuracy", "latency_ms", "latency_p25_ms",
              "latency_p75_ms", "latency_source", "size_bytes", "feasible", "policy"}


def _task_label(info: Any) -> str:
    args = info.config.task_args
    return info.config.task + (f" {json.dumps(args, sort_keys=True)}" if args else "")


def _policy_key(policy: Mapping[str, Any]) -> str:
    """A policy as a canonical string: layers left at the identity do not count."""
    layers = Policy.from_dict(policy).to_dict()
    return json.dumps({k: v for k, v in layers.items() if v}, sort_keys=True)


def _kind(source: str) -> str:
    """measured:host:tuned -> measured/tuned: how comparable two latencies are."""
    parts = source.split(":")
    return f"{parts[0]}/{parts[-1]}" if len(parts) >= 3 else source


def compare(run_a: Path, run_b: Path, force: bool = False) -> Comparison:
    """Compare two runs' fronts. Runs of different targets or tasks measure different things:
    refused unless `force` (then said in `warnings`)."""
    info_a, front_a = load_front(run_a)
    info_b, front_b = load_front(run_b)
    task_a, task_b = _task_label(info_a), _task_label(info_b)
    warnings = []
    for what, a, b in (("targets", info_a.target, info_b.target), ("tasks", task_a, task_b)):
        if a != b:
            if not force:
                raise UserError(f"the runs have different {what} ({a} vs {b}): their fronts "
                                f"are not comparable; pass --force to compare anyway")
            warnings.append(f"different {what} ({a} vs {b}): compared anyway (--force)")
    kinds_a = {_kind(p["latency_source"]) for p in front_a["points"]}
    kinds_b = {_kind(p["latency_source"]) for p in front_b["points"]}
    if kinds_a != kinds_b:
        warnings.append(f"latencies were made differently ({', '.join(sorted(kinds_a))} vs "
                        f"{', '.join(sorted(kinds_b))}): untuned or emulated figures are "
                        f"not the same scale as tuned ones")
    ref = reference_for(front_a, front_b)
    pts_a = {p["trial"]: objectives(p) for p in front_a["points"]}
    pts_b = {p["trial"]: objectives(p) for p in front_b["points"]}
    keys_b = {_policy_key(p["policy"]): p["trial"] for p in front_b["points"]}
    common = [(p["trial"], keys_b[k]) for p in front_a["points"]
              if (k := _policy_key(p["policy"])) in keys_b]
    return Comparison(
        str(run_a), str(run_b), info_a.target, info_b.target, task_a, task_b, ref,
        hypervolume(pts_a.values(), ref), hypervolume(pts_b.values(), ref),
        len(pts_a), len(pts_b),
        [t for t, p in pts_a.items() if any(dominates(q, p) for q in pts_b.values())],
        [t for t, p in pts_b.items() if any(dominates(q, p) for q in pts_a.values())],
        common, warnings)


def comparison_table(c: Comparison) -> str:
    """The comparison as a terminal table."""
    ref = c.reference
    width = max(len(c.run_a), len(c.run_b), 3)
    header = (f"{'run':<{width}}  {'target':<12} {'front':>5} {'hypervolume':>11} "
              f"{'dominated by the other':>22}")
    lines = [f"warning: {w}" for w in c.warnings]
    lines += [header, "-" * len(header)]
    for run, target, n, hv, beaten in (
            (c.run_a, c.target_a, c.points_a, c.hypervolume_a, c.a_dominated_by_b),
            (c.run_b, c.target_b, c.points_b, c.hypervolume_b, c.b_dominated_by_a)):
        trials = f" ({', '.join(f'#{t}' for t in beaten)})" if beaten else ""
        lines.append(f"{run:<{width}}  {target:<12} {n:>5} {hv:>11.4f} "
                     f"{len(beaten):>3} of {n}{trials}")
    lo, hi = sorted((c.hypervolume_a, c.hypervolume_b))
    if lo == hi:
        lines.append("larger hypervolume: neither")
    else:
        ratio = f" ({hi / lo:.2f}x)" if lo > 0 else ""
        lines.append(f"larger hypervolume: {'A' if c.hypervolume_a > lo else 'B'}{ratio}")
    same = ", ".join(f"A#{a}=B#{b}" for a, b in c.common) or "none"
    lines.append(f"same policy on both fronts: {same}")
    lines.append(f"hypervolume: the fraction of the box from (accuracy 1, 0 ms, 0 bytes) to the "
                 f"reference (accuracy {ref.accuracy:g}, {ref.latency_ms:.3f} ms, "
                 f"{ref.size_bytes:,.0f} bytes: the larger uncompressed model of the two runs) "
                 f"that the front dominates; each axis linear.")
    return "\n".join(lines)


# --- one trial, layer by layer ----------------------------------------------------------------

@dataclass(frozen=True)
class LayerTiming:
    """One layer compiled alone by TVM for the run's target and timed like a whole model."""

    median_ms: float
    p25_ms: float
    p75_ms: float
    source: str  # e.g. measured:host:untuned (partly-tuned: kernels missing from the database)
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
    from search.compress import layer_bytes

    return layer_bytes(module, lp)


def _params(module: nn.Module) -> int:
    from search.compress import layer_params

    return layer_params(module)


def _inputs(model: nn.Module, names: Sequence[str], example: torch.Tensor
            ) -> dict[str, torch.Tensor]:
    """Each named layer's real input in one forward pass of the model (first call only)."""
    seen: dict[str, torch.Tensor] = {}

    def capture(name: str) -> Any:
        def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...]) -> None:
            seen.setdefault(name, inp[0].detach().clone())
        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(capture(n)) for n in names]
    try:
        with torch.no_grad():
            model.eval()(*as_inputs(example))
    finally:
        for h in handles:
            h.remove()
    return seen


def _time_layer(module: nn.Module, x: torch.Tensor, compiler: Any, target: Any,
                atol: float) -> LayerTiming:
    """Compile one layer as its own model (tuning database reused, never extended) and time
    it; a layer that fails alone is reported, not raised."""
    from search.compile import to_relax
    from search.lock import device_lock
    from search.measure import run_and_time
    from search.study import latency_source

    shape = list(x.shape)
    try:
        with torch.no_grad():
            reference = module.eval()(x)
        compiled = compiler.compile(to_relax(module, x))
        with device_lock(target):  # not while a run's trial is timing on the same device
            lat = run_and_time(compiled.executable, x, reference, target.measurement,
                               target.device(), atol=atol)
    except TrialFailed as exc:
        return LayerTiming(math.nan, math.nan, math.nan, "failed", shape, str(exc))
    source = latency_source(target.name, compiled.tuned, compiled.tasks, lat.emulated_by)
    return LayerTiming(lat.median_ms, lat.p25_ms, lat.p75_ms, source, shape)


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
    return {name: {k: LayerTiming(**v) if v else None for k, v in t.items()}
            for name, t in data.get("layers", {}).items()}


def _sensitivity(run_dir: Path) -> dict[tuple[str, str, str], float]:
    """(layer, knob, value as JSON) -> accuracy drop, from the run's sensitivity.json (a
    search.sensitivity.Sensitivity, or a bare list of its records)."""
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
    trial_dir = run_dir / "trials" / f"{trial:04d}"
    if not (trial_dir / "policy.yaml").exists():
        raise UserError(f"run {str(run_dir)!r} has no trial {trial}; pick one from "
                        f"`search front {run_dir}`")
    if not (trial_dir / "result.json").exists():
        failed = {f["trial"]: f["reason"] for f in front.get("trials", {}).get("failed", [])}
        if trial in failed:
            raise UserError(f"trial {trial} failed, so it has nothing to show: {failed[trial]}")
        raise UserError(f"trial {trial} has no result (it is running, or was interrupted)")
    path = trial_dir / "result.json"
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
    from search.compress import build
    from search.export import load_trial_model
    from search.policy import compressible_layers
    from search.run import setup_threads
    from search.task import load_task

    info, front = load_front(run_dir)
    result = _trial_files(run_dir, trial, front)
    trial_dir = run_dir / "trials" / f"{trial:04d}"
    notes = []
    target = info.load_target()
    setup_threads(target)
    task = load_task(info.config.task, **info.config.task_args)
    policy = Policy.load(trial_dir / "policy.yaml")
    if all(lp.is_identity for lp in policy.layers.values()) or (trial_dir / "model.pt").exists():
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
    from search.compile import Compiler
    from search.compress import output_tolerance
    from search.run import tuning_dir

    # NOTE: trials_per_task=0 uses the run's tuning database as it is: kernels the search tuned
    # are reused; a layer compiled alone fuses differently (no following activation), so some
    # of its kernels may be missing there and run untuned; its source says so.
    compiler = Compiler(target, tuning_dir(target), trials_per_task=0)
    names = [row.name for row in rows]
    x_before, x_after = _inputs(original, names, example), _inputs(model, names, example)
    out: dict[str, dict[str, LayerTiming | None]] = {}
    for row in rows:
        name = row.name
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
             f"[{r['latency_source']}], {_size(r['size_bytes'])}"]
    has_sens = any(row.sensitivity for row in t.rows)
    timed = any(row.latency_after or row.latency_before for row in t.rows)
    cells = []
    for row in t.rows:
        after = row.latency_after
        cells.append((row.name, _knob_text(row.knobs, row.inputs_pruned),
                      f"{row.params_before:,} -> {row.params_after:,}",
                      f"{_size(row.bytes_before)} -> {_size(row.bytes_after)}",
                      _ms(row.latency_before), _ms(row.latency_after),
                      "" if after is None else after.error or after.source,
                      _sens_text(row.sensitivity)))
    titles = ("layer", "knobs", "params", "stored bytes", "ms before", "ms after",
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
                     f"this trial's model {r['latency_ms']:.3f} ms [{r['latency_source']}] "
                     f"(the rest: activations, pooling, reshapes, and fusion across layers)")
        lines.append("per-layer latency: each layer compiled alone by TVM for the target with "
                     "its real input shape (captured in the model, batch 1), the run's tuning "
                     "database reused but not extended (kernels not in it run untuned: see the "
                     "source), timed like the whole model (median of repeats)")
    else:
        lines.append(f"per-layer latency: not measured yet; add --latency (compiles and times "
                     f"each layer alone; cached in trials/{t.trial:04d}/layers.json)")
    if has_sens:
        lines.append("sensitivity: accuracy change (points) with only this layer compressed by "
                     "that knob value, before fine-tuning (sensitivity.json); ? = not measured")
    lines += [f"note: {n}" for n in t.notes]
    return "\n".join(lines)


def show(run_dir: Path, trial: int, measure: bool = False) -> str:
    """`search show`: a trial's per-layer table (see trial_layers)."""
    return layers_table(trial_layers(run_dir, trial, measure))
