"""Predicted latency from the kernel library: a candidate's own compiled kernels, each costed
by the tuning database's record of it, summed, as a ratio to the uncompressed model's sum.

    predicted ratio = sum(calls x t(kernel), candidate's kernels) / the same sum, uncompressed
    predicted ms    = predicted ratio x the study's reference (the uncompressed model measured)
    t(kernel)       = its record's best time; without one, DONOR_FACTOR x the record of the
                      tuned kernel of its structure with the nearest extents (the donor
                      schedule transfer replays: search.backend.transfer) x their flops ratio

Why this form (bench/RESULTS.md 13.21):
- The kernels are the compiled model's own (`Compiler.kernels_of`: the layout, int8 and fusion
  passes a build runs), so fusion and layout are modelled by construction; a per-op table timed
  each op alone, beside the others' fusion (section 6: p95 error 47 %).
- A record times a kernel alone and warm; the whole model adds the VM's calls and the copies
  between kernels (a record sum was 0.56-0.9 of the whole). Those costs scale with the model,
  so a ratio to the uncompressed model's sum cancels most of them, as the trials' own figures
  are ratios to it (search.backend.measure).
- A kernel the library lacks is costed from its donor, not left out: a per-layer policy meets
  kernel shapes no library holds (13.21: 20-40 of a random policy's ~90 kernels), and a
  compile runs the donor's schedule on it. So the prediction is of the figure a trial would
  measure (transferred schedules included); the front's points are then measured whole as a
  trial is, and tuned where they ran transferred schedules (search.study.loop.tune_front).
- Compiles nothing: extracting the kernels is the compiler's passes on the model (about 1 s on
  MobileNetV2, imported by torch.fx's trace where that gives export's kernels:
  search.backend.compile.traced_relax), no code generation, no timing. A kernel that has
  neither a record nor a donor is reported (`unknown`), for the caller to tune or to measure
  the model whole.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from search.backend.artifact import WeightBytes, module_weight_bytes
from search.backend.provenance import Provenance, tuning_label
from search.devices.lock import device_lock

SECONDS_FAILED = 1e9  # MetaSchedule's run time of a build or run that failed
# a kernel costed from a donor counts this x the donor's record scaled by flops: it runs the
# donor's schedule, not one tuned for its shapes, and small kernels do not shrink with their
# flops; least squares over 23 policies of the default task on `host` (bench/RESULTS.md 13.21:
# 1.85; fitted leaving each policy out, its error: median 2.1 %, p95 5.3 %; at 1: p95 8.5 %)
DONOR_FACTOR = 1.85


@dataclass(frozen=True)
class Donor:
    extents: tuple[int, ...]
    ms: float  # its record's best time
    flops: float


@dataclass(frozen=True)
class KernelSum:
    """A model's kernels costed from the library."""

    own_ms: float  # sum of calls x record, over the kernels with their own record
    donor_ms: float  # sum of calls x donor record x flops ratio, over the others
    kernels: int  # distinct kernels
    calls: int
    own: int  # kernels costed by their own record
    donors: int  # kernels costed by a neighbour's record x the flops ratio
    unknown: tuple[Any, ...] = ()  # kernels (MetaSchedule tasks) with neither

    @property
    def ms(self) -> float:
        """The model's kernel cost (records: each kernel alone, warm)."""
        return self.own_ms + DONOR_FACTOR * self.donor_ms

    @property
    def complete(self) -> bool:
        return not self.unknown


@dataclass(frozen=True)
class Prediction:
    """A latency predicted from the library: an estimate, labelled so."""

    ms: float  # ratio x the reference
    ratio: float  # the candidate's kernel sum / the uncompressed model's
    kernels: KernelSum
    source: Provenance  # predicted, on which target, kernels costed by own records / donors
    weights: WeightBytes  # the constants its library would carry (measured, not estimated)


def _best_ms(record: Any) -> float | None:
    secs = [float(s) for s in (record.run_secs or [])] if record is not None else []
    return min(secs) * 1e3 if secs and min(secs) < SECONDS_FAILED else None


class KernelLibrary:
    """Costs kernels from one compiler's tuning database (indexed again when it grows)."""

    def __init__(self, compiler: Any) -> None:
        self.compiler = compiler
        self._donors: dict[str, list[Donor]] = {}
        self._stamp: tuple[Any, int] = (None, -1)
        # each kernel's cost by its structural hash, until the database grows: the trials of a
        # study meet the same kernels again, and a database query costs 3 ms (0.3 s a model)
        self._costs: dict[int, tuple[bool, float] | None] = {}

    def _index(self) -> None:
        from tvm.s_tir.analysis import estimate_tir_flops
        from tvm_ffi import structural_hash

        from search.backend.transfer import extents, kernel_text, structure

        database = self.compiler.database
        stamp = (database, len(database))
        if stamp[0] is self._stamp[0] and stamp[1] == self._stamp[1]:
            return
        best: dict[int, tuple[float, Any]] = {}
        for rec in database.get_all_tuning_records():
            ms = _best_ms(rec)
            if ms is None:
                continue
            key = structural_hash(rec.workload.mod)
            if key not in best or ms < best[key][0]:
                best[key] = (ms, rec.workload.mod)
        donors: dict[str, list[Donor]] = {}
        for ms, mod in best.values():
            text = kernel_text(mod)
            donors.setdefault(structure(text), []).append(
                Donor(extents(text), ms, float(estimate_tir_flops(mod))))
        self._donors, self._stamp, self._costs = donors, stamp, {}

    def _lookup(self, task: Any) -> tuple[bool, float] | None:
        """One call of a kernel: (costed by a donor?, ms before DONOR_FACTOR); None when it
        has neither a record nor a donor. The index must be current (`_index`)."""
        from tvm_ffi import structural_hash

        mod = task.dispatched[0]
        key = structural_hash(mod)
        if key not in self._costs:
            self._costs[key] = self._cost(task)
        return self._costs[key]

    def _cost(self, task: Any) -> tuple[bool, float] | None:
        from tvm.s_tir.analysis import estimate_tir_flops

        from search.backend.transfer import distance, extents, kernel_text, structure

        mod = task.dispatched[0]
        ms = _best_ms(self.compiler.database.query_tuning_record(
            mod, self.compiler.target, task.task_name))
        if ms is not None:
            return False, ms
        text = kernel_text(mod)
        mine = extents(text)
        near = [d for d in self._donors.get(structure(text), []) if len(d.extents) == len(mine)]
        if not near:
            return None
        donor = min(near, key=lambda d: (distance(d.extents, mine), d.ms))
        scale = float(estimate_tir_flops(mod)) / donor.flops if donor.flops > 0 else 1.0
        return True, donor.ms * scale

    def call_ms(self, task: Any) -> float | None:
        """What one call of a kernel costs (as `KernelSum.ms` counts it); None: unknown."""
        self._index()
        got = self._lookup(task)
        return None if got is None else got[1] * (DONOR_FACTOR if got[0] else 1.0)

    def kernel_sum(self, kernels: list[Any]) -> KernelSum:
        """Cost `kernels` (what `Compiler.kernels_of` extracts from a model)."""
        self._index()
        own_ms, donor_ms, calls, own, donated, unknown = 0.0, 0.0, 0, 0, 0, []
        for task in kernels:
            n = int(task.weight)
            calls += n
            got = self._lookup(task)
            if got is None:
                unknown.append(task)
            elif got[0]:
                donor_ms, donated = donor_ms + n * got[1], donated + 1
            else:
                own_ms, own = own_ms + n * got[1], own + 1
        return KernelSum(own_ms, donor_ms, len(kernels), calls, own, donated, tuple(unknown))

    def model_sum(self, mod: Any) -> KernelSum:
        """Cost a Relax module's kernels (search.backend.compile.to_relax)."""
        return self.kernel_sum(self.compiler.kernels_of(mod))

    def predict(self, mod: Any, base: KernelSum, reference_ms: float, target: Any,
                progress: Any | None = None) -> Prediction | None:
        """The latency of a Relax module as its kernel sum over `base` (the uncompressed
        model's) times `reference_ms` (that model measured). Kernels no record or donor costs
        are tuned first when the compiler tunes (as its compile would, under the device lock);
        None where some stay unknown: the caller measures the model whole instead. The
        compiler's passes run once: the kernels and the weights' bytes come from one form."""
        fused = self.compiler.lower(mod)
        kernels = self.compiler.kernels_of(fused, lowered=True)
        got = self.kernel_sum(kernels)
        if got.unknown and self.compiler.can_tune:
            with device_lock(target):
                self.compiler.tune(list(got.unknown), progress)
            got = self.kernel_sum(kernels)
        if got.unknown or not base.complete or base.ms <= 0:
            return None
        ratio = got.ms / base.ms
        source = Provenance("predicted", target.name,
                            tuning_label(got.own, got.kernels, got.donors), None,
                            float(reference_ms))
        return Prediction(ratio * float(reference_ms), ratio, got, source,
                          module_weight_bytes(fused))


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
