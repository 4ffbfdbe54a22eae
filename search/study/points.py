"""The study's results as points a user reads: one per finished candidate, and their Pareto
set (validation accuracy up, latency down, size down)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import optuna

from search.backend.provenance import Provenance
from search.compress.policy import Policy
from search.study.storage import SURPLUS

DUPLICATE_OF = "duplicate_of"  # user attr of a trial that reused an earlier one's figures
POLICY = "policy"  # user attr: the trial's whole policy (every layer, every knob)
# study attr: trial -> the accuracy after the front's recovery steps (search.study.recovery);
# a study attr because a finished trial's attrs are frozen
RECOVERED = "front_recovered"


@dataclass(frozen=True)
class Point:
    """One evaluated candidate, as a user reads it."""

    trial: int
    test_accuracy: float  # fraction, on the test split: the figure reported (it chose nothing)
    val_accuracy: float  # on the validation split: what the search chose by
    latency_ms: float  # median over repeats
    latency_p25_ms: float
    latency_p75_ms: float
    latency_source: Provenance  # how the latency was made
    size_bytes: int  # weight bytes of the compiled artifact (what `export` writes), measured
    params: int
    flops: int
    feasible: bool  # latency within the budget
    policy: dict[str, dict[str, Any]]
    ideal_size_bytes: int | None = None  # estimate: the weights in formats we count but do not
    # write (sparse + Huffman, codebooks, packed sub-8-bit); None in runs before it existed
    recovered_steps: int = 0  # fine-tune steps after the search (accuracy is after them)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "latency_source": self.latency_source.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Point:
        """A point of front.json (also one written before provenance was a record)."""
        known = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in data.items() if k in known},
                      "latency_source": Provenance.from_dict(data["latency_source"])})


def points_of(study: optuna.Study, budget_ms: float, run_dir: Path) -> list[Point]:
    points = []
    measured = study.user_attrs.get("front_measured", {})  # predicted points measured whole
    recovered = study.user_attrs.get(RECOVERED, {})
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        a = dict(t.user_attrs)
        if DUPLICATE_OF in a:  # the same policy as an earlier trial: listed once, as it
            continue
        r = recovered.get(str(t.number))
        if r and "error" not in r:
            a.update(val_accuracy=r["val_accuracy"], test_accuracy=r["test_accuracy"],
                     recovered_steps=r["steps"])
        m = measured.get(str(t.number))
        if m and "error" in m and "predicted_ms" in m:  # a predicted candidate that failed to
            continue  # compile or run whole: not a point (a measured trial would have failed)
        if m and "error" not in m:
            a.update(latency_ms=m["measured_ms"], latency_p25_ms=m["measured_iqr_ms"][0],
                     latency_p75_ms=m["measured_iqr_ms"][1], latency_source=m["source"])
        policy = Policy.from_dict(a[POLICY]) if POLICY in a else \
            Policy.load(run_dir / "trials" / f"{t.number:04d}" / "policy.yaml")  # (before 0.3)
        points.append(Point(t.number, a["test_accuracy"], a["val_accuracy"], a["latency_ms"],
                            a["latency_p25_ms"],
                            a["latency_p75_ms"], Provenance.from_dict(a["latency_source"]),
                            a["size_bytes"],
                            a["params"], a["flops"], a["latency_ms"] <= budget_ms,
                            policy.to_dict(), a.get("ideal_size_bytes"),
                            a.get("recovered_steps") or 0))
    return points


def _dominates(a: Point, b: Point) -> bool:
    ge = (a.val_accuracy >= b.val_accuracy and a.latency_ms <= b.latency_ms
          and a.size_bytes <= b.size_bytes)
    gt = (a.val_accuracy > b.val_accuracy or a.latency_ms < b.latency_ms
          or a.size_bytes < b.size_bytes)
    return ge and gt


def pareto(points: list[Point]) -> list[Point]:
    """Non-dominated points (validation accuracy up, latency down, size down), fastest first:
    validation chooses the front, so its test accuracy is an unbiased report."""
    front = [p for p in points if not any(_dominates(q, p) for q in points)]
    return sorted(front, key=lambda p: p.latency_ms)


def failures_of(study: optuna.Study) -> list[dict[str, Any]]:
    return [{"trial": t.number,
             "reason": t.user_attrs.get("fail_reason", "its worker stopped (no heartbeat); "
                                                        "retried as a new trial")}
            for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,
                                                              optuna.trial.TrialState.PRUNED))
            if not t.user_attrs.get("fail_reason", "").startswith(SURPLUS)]
