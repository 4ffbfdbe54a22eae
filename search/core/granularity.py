"""The channel and rank granularity of the target a process builds candidates for.

Channel counts and ranks are rounded to a multiple so compiled kernels repeat across trials and
runs (the kernel library covers a bounded set of shapes: search.jobs.tune). The multiple is the
target's (its YAML `granularity`), set once per process by whatever loads the run's target
(`use_granularity`); 8 until then. A process-wide value rather than an argument because every
knob rounds through it and a policy's ratios must build the same model wherever it is rebuilt
for that target (export, recover, workers).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Granularity:
    channels: int = 8  # kept channel counts are multiples of this
    rank: int = 8  # low-rank ranks are multiples of this


_CURRENT = [Granularity()]


def granularity() -> Granularity:
    return _CURRENT[0]


def use_granularity(g: Granularity) -> None:
    _CURRENT[0] = g
