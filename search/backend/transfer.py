"""Schedules transferred from the kernel library to kernels it lacks (transfer tuning).

Why: a per-layer policy meets kernel shapes no library holds (a joint per-layer space has far
more shapes than any budget tunes: bench/RESULTS.md 13.6-13.7). Tuning them in the trial costs
~5 s each, 200-270 s for a per-layer MobileNetV2 candidate; left untuned they run TVM's naive
loops, ~3.5x slower than tuned, so neither gives a latency worth ranking candidates by.

How: a MetaSchedule record is a trace of schedule instructions, and it replays on any kernel of
the same loop structure; a tile split that no longer divides the new extent is repaired by the
replay (SamplePerfectTile falls back to a valid factorization). So a kernel without a record
takes the trace of the tuned kernel whose structure is identical (same blocks, loops and
dtypes, shapes aside) and whose extents are nearest (summed |log| ratio, extent by extent): the
first of the nearest few that applies. This is transfer tuning (Gibson & Cano, PACT 2022) on
MetaSchedule's own records. The compiled artifact is real and its latency measured; the
figure's provenance counts the transferred kernels (`tuned+transferred(k/n)`), and a run
tunes the kernels of its front points near the budget before it reports them
(search.study.loop.tune_front).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

TRIES = 4  # nearest donors tried per kernel before giving up on it (each try: one replay)


def replay(trace: Any, sch: Any) -> None:
    """Apply a tuned kernel's trace to another kernel's schedule (raises where it does not fit).
    NOTE: tile splits that no longer divide are repaired by TVM (the whole extent into the
    first such tile); refitting each tile to its gcd with the new extent measured no better
    (bench/RESULTS.md 13.8)."""
    trace.apply_to_schedule(sch, remove_postproc=False)


def _func(mod: Any) -> Any:
    return next(iter(mod.functions.values()))


def kernel_text(mod: Any) -> str:
    """The kernel's TIR, without attributes (extraction and build annotate differently) and with
    its buffer names' numbering dropped (lv33 vs lv145 for the same kernel)."""
    text = _func(mod).script()
    text = "\n".join(line for line in text.splitlines()
                     if "func_attr" not in line and "module_attrs" not in line)
    return re.sub(r"\blv\d+\b", "lv", text)


_DTYPE = re.compile(r"(bfloat|float|uint|int)(\d+)")


def structure(text: str) -> str:
    """The kernel with every number blanked (dtype widths kept): kernels of one structure."""
    return re.sub(r"\d+", "N", _DTYPE.sub(lambda m: m.group(1) + "#" * int(m.group(2)), text))


def extents(text: str) -> tuple[int, ...]:
    """Every number of the kernel in order (shapes, loop extents, paddings): aligned position
    by position between kernels of one structure."""
    return tuple(int(v) for v in re.findall(r"\d+", _DTYPE.sub("", text)))


def distance(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    """How far apart two kernels of one structure are: summed |log| ratio of their extents."""
    return sum(abs(math.log((x + 1) / (y + 1))) for x, y in zip(a, b, strict=True))


@dataclass(frozen=True)
class Donor:
    """A tuned kernel whose trace may serve another."""

    extents: tuple[int, ...]
    trace: Any
    seconds: float  # its record's best time (a tie-breaker only)


class ScheduleTransfer:
    """Finds, replays and serves transferred schedules for one tuning database."""

    def __init__(self) -> None:
        self._donors: dict[str, list[Donor]] = {}
        self._indexed: tuple[Any, int] = (None, -1)  # (the database, its records) indexed
        self._chosen: dict[str, Any] = {}  # kernel text -> the trace it replays

    def index(self, database: Any) -> None:
        """Group the database's best record per workload by structure (again only when the
        database changed: a refresh, or records this process tuned)."""
        stamp = (database, len(database))
        if stamp[0] is self._indexed[0] and stamp[1] == self._indexed[1]:
            return
        records = database.get_all_tuning_records()
        from tvm_ffi import structural_hash

        best: dict[int, tuple[float, Any]] = {}
        for rec in records:
            secs = [float(s) for s in (rec.run_secs or [])]
            if not secs or min(secs) >= 1e9:  # a failed measurement: not a schedule to copy
                continue
            key = structural_hash(rec.workload.mod)
            if key not in best or min(secs) < best[key][0]:
                best[key] = (min(secs), rec)
        donors: dict[str, list[Donor]] = {}
        for secs, rec in best.values():
            text = kernel_text(rec.workload.mod)
            donors.setdefault(structure(text), []).append(Donor(extents(text), rec.trace, secs))
        self._donors, self._indexed = donors, stamp

    def plan(self, database: Any, kernels: list[Any]) -> list[Any]:
        """Choose a replayable donor trace for each kernel (MetaSchedule ExtractedTasks that
        the database lacks); returns those that got one."""
        from tvm.s_tir import Schedule

        if not kernels:
            return []
        self.index(database)
        served = []
        for task in kernels:
            mod = task.dispatched[0]
            text = kernel_text(mod)
            if text not in self._chosen:
                mine = extents(text)
                donors = [d for d in self._donors.get(structure(text), [])
                          if len(d.extents) == len(mine)]
                donors.sort(key=lambda d: (distance(d.extents, mine), d.seconds))
                for donor in donors[:TRIES]:
                    try:
                        replay(donor.trace, Schedule(mod))
                    except Exception:  # noqa: BLE001 - TVM: this trace does not fit; next one
                        continue
                    self._chosen[text] = donor.trace
                    break
            if text in self._chosen:
                served.append(task)
        return served

    def database(self) -> Any:
        """A MetaSchedule database serving the chosen traces (put after the real one in an
        OrderedUnionDatabase: a kernel's own record always wins)."""
        from tvm.s_tir import meta_schedule as ms

        chosen = self._chosen

        def schedule(sch: Any) -> bool:
            trace = chosen.get(kernel_text(sch.mod))
            if trace is None:
                return False
            try:
                replay(trace, sch)
            except Exception:  # noqa: BLE001 - (replayed on this kernel when planned)
                return False
            return True

        return ms.database.ScheduleFnDatabase(schedule)
