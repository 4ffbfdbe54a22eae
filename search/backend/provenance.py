"""Where a latency figure came from: the one record every figure carries (trial attributes,
front.json, the per-layer table, `search show`), so a user always reads how it was made."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

METHODS = ("measured", "emulated", "predicted")


def tuning_label(tuned: int, tasks: int, transferred: int = 0) -> str:
    """tuned / untuned / partly-tuned(k/n): how many of the compiled kernels were tuned;
    `+transferred(t/n)` where t more ran a tuned neighbour's schedule (search.backend.transfer).
    """
    if transferred:
        own = "" if tuned + transferred == tasks else f"partly-tuned({tuned}/{tasks})+"
        return f"{own or 'tuned+'}transferred({transferred}/{tasks})"
    if tuned == tasks:
        return "tuned"
    return "untuned" if tuned == 0 else f"partly-tuned({tuned}/{tasks})"


@dataclass(frozen=True)
class Provenance:
    """How a latency was made.

    method: "measured" (the compiled artifact run and timed on the target), "emulated" (timed
    under an emulator: never the device's figure), or "predicted" (summed from the per-layer
    latency table: an estimate). tuning: how many kernels were tuned, or for a reference figure
    the runtime that made it (e.g. onnxruntime-cpu-1-thread).
    """

    method: str
    target: str
    tuning: str
    emulator: str | None = None  # the emulator, when method is "emulated"
    # a prediction: the kernels' ratio to the uncompressed model's times this reference latency
    # of it (ms), the study's, measured once (a measured figure is its own: None)
    reference_ms: float | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")

    @classmethod
    def timed(cls, target: str, tuned: int, tasks: int, emulated_by: str | None = None,
              transferred: int = 0) -> Provenance:
        """A figure timed on the compiled artifact (or under an emulator)."""
        return cls("emulated" if emulated_by else "measured", target,
                   tuning_label(tuned, tasks, transferred), emulated_by)

    @property
    def estimate(self) -> bool:
        return self.method == "predicted"

    @property
    def transferred(self) -> bool:
        """Some kernels ran a neighbour's schedule, not their own tuned one."""
        return "transferred(" in self.tuning

    @property
    def label(self) -> str:
        """Short text for tables and CSV, e.g. measured:host:tuned."""
        how = f"emulated({self.emulator})" if self.method == "emulated" else self.method
        ratio = "" if self.reference_ms is None else \
            f" (ratio to uncompressed x {self.reference_ms:.3f} ms)"
        return f"{how}:{self.target}:{self.tuning}{ratio}"

    def __str__(self) -> str:
        return self.label

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Provenance:
        """From to_dict's form; a run folder written before this record (a label string) is
        read by its label, once, here."""
        if isinstance(data, Provenance):
            return data
        if isinstance(data, str):
            how, _, rest = data.partition(":")
            target, _, tuning = rest.partition(":")
            emulator = how[len("emulated("):-1] if how.startswith("emulated(") else None
            return cls("emulated" if emulator else how, target, tuning, emulator)
        if not isinstance(data, dict):
            raise ValueError(f"a latency provenance is a mapping, got {type(data).__name__}")
        return cls(str(data["method"]), str(data["target"]), str(data["tuning"]),
                   data.get("emulator"), data.get("reference_ms"))
