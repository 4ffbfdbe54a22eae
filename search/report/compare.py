"""Comparing fronts: the normalized hypervolume of each against one shared reference, and which
points one front has that the other does not (`search compare`)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from search.backend.provenance import Provenance
from search.compress.policy import Policy
from search.core.errors import UserError

Objectives = tuple[float, float, float]  # accuracy (up), latency_ms (down), size_bytes (down)


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
    from search.study.runfolder import RunInfo

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


def _kind(source: Any) -> str:
    """measured/tuned, predicted/untuned, ...: how comparable two latencies are."""
    p = Provenance.from_dict(source)
    return f"{p.method}/{p.tuning}"


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
