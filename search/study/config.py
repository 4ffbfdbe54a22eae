"""The search config: one dataclass, read from YAML, overridden by command-line flags."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from search.core.errors import UserError
from search.core.settings import check_fields, read_settings
from search.core.task import DEFAULT_TASK
from search.finetune.distill import FinetuneOptions

SAMPLERS = ("tpe", "random", "nsga2")  # Optuna samplers (search.study.storage makes them)
# keys of earlier versions: a run folder that stored them still loads (they are ignored); a
# config file naming them is told what replaced them
RETIRED = {"recover_one_in": "recovery steps now go to the in-budget points on or near the "
                             "front after the search (recover_steps, recover_margin)"}
_UNITS_MS = {"ms": 1.0, "us": 1e-3, "µs": 1e-3, "s": 1e3}


@dataclass
class SearchConfig:
    """Everything a run needs besides the target and budget."""

    task: str = DEFAULT_TASK  # `module:function` returning a search.core.task.Task
    task_args: dict[str, Any] = field(default_factory=dict)  # keyword arguments for it
    trials: int = 16  # candidates evaluated (the seeds below count)
    timeout: float | None = None  # stop starting new trials after this many seconds
    finetune_steps: int = 60  # distillation steps per candidate (batch 64)
    recover_steps: int = 120  # after the search, more steps for each compressed point within
    recover_margin: float = 0.02  # the budget on the front or this close to it in validation
    # accuracy (0: the front alone; recover_steps 0: off); the sampler saw every short figure
    distill_alpha: float = 0.7  # weight of distillation from the uncompressed model; 0: labels
    qat: bool = True  # fine-tune through the weight quantizer (straight-through estimator)
    dropconnect: float = 0.0  # fine-tune with DropConnect at this rate
    l1: float = 0.0  # elastic-net penalty (l1 * sum|w| + l2 * sum w^2) on compressed layers
    l2: float = 0.0
    tune_trials_per_task: int = 8  # MetaSchedule trials per new kernel; 0 = untuned (labelled)
    tuning_budget_s: float | None = None  # per run: once spent, new kernels stay untuned
    transfer: bool = True  # a kernel the tuning database lacks takes the schedule of its
    # nearest tuned kernel of the same structure (search.backend.transfer) instead of being
    # tuned in the trial (the front points near the budget are tuned at the end, and those
    # points timed again); false: tune it in the trial (tune_trials_per_task)
    seed: int = 0
    heartbeat_s: int = 20  # a worker's running trial writes a heartbeat this often; a trial
    heartbeat_grace_s: int = 90  # without one this long is failed and run again (dead worker)
    startup_trials: int = 6  # trials before TPE models the space (the seeds count)
    interleave: bool = True  # time each candidate round by round with the uncompressed model
    # and report its fastest round (processes agree), the ratio to the model's beside it
    latency: str = "measured"  # measured: every trial compiled and timed whole; predicted: its
    # kernels costed from the kernel library while searching (search.backend.predict; needs
    # interleave, else measured), front points then measured whole
    early_stop: bool = False  # stop fine-tunes a completed trial dominates (study.early_stop)
    sampler: str = "tpe"  # tpe | random | nsga2 (Optuna samplers)
    plugins: list[str] = field(default_factory=list)  # modules imported first: knobs of your own
    # (each registers itself: README "Adding a knob"); every process of the run imports them
    knobs: list[str] = field(default_factory=lambda: ["rank", "sparsity", "bits"])  # searched;
    # the others (search.compress.knobs) are opt-in
    sensitivity: bool = True  # measure each layer x knob value alone first (sensitivity.json)
    sensitivity_max_drop: float | None = 0.10  # and drop values losing more than this (no
    # fine-tune yet, so generous); null: measure and show, do not narrow
    choices: dict[str, list] = field(default_factory=dict)  # knob -> values offered (narrows the
    # derived space; `bits` may widen to 4/2/1); unset knobs: their default_choices
    seeds: list[dict[str, Any]] = field(default_factory=lambda: [
        {},  # the uncompressed model: the baseline point
        {"rank": 0.125},
        {"sparsity": 0.25},  # a light uniform cut: a strong reference (bench/RESULTS.md 9.2)
        {"bits": 8},  # every layer int8 (weights; Linears compute in int8)
    ])  # uniform policies evaluated first, so the front always has reference points
    # integer-program seeds (search.study.allocate): the per-layer choice losing the least
    # accuracy (sensitivity table) under each of these fractions of the uncompressed model's
    # estimated cost, enqueued after `seeds`; [] or sensitivity off: none
    ip_seeds: list[float] = field(default_factory=lambda: [0.45, 0.6, 0.75])
    ip_size: float | None = None  # and weights at most this fraction of the uncompressed bytes
    ip_per: str = "layer"  # layer | block: one choice per block (large models)
    # the program's latency cost: estimate (multiply-adds x a precision factor) | library (each
    # layer's options costed from the target's kernel library: search.study.layer_cost)
    ip_cost: str = "estimate"

    @classmethod
    def load(cls, path: Path | None) -> SearchConfig:
        if path is None:
            return cls()
        data = read_settings(path, "config file", {f.name for f in fields(cls)} | set(RETIRED),
                             "pass an existing YAML file (see configs/default.yaml)")
        retired = sorted(set(data) & set(RETIRED))
        if retired:
            raise UserError(f"config file {path}: {retired[0]} was retired: "
                            f"{RETIRED[retired[0]]}; remove it")
        return cls.from_dict(data, f"config file {path}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> SearchConfig:
        """A checked config from plain settings (a config file, run.yaml): unknown keys and
        wrong types are one-line UserErrors, not a TypeError from the constructor. RETIRED
        keys (a run folder of an earlier version) are dropped."""
        data = {k: v for k, v in data.items() if k not in RETIRED}
        check_fields(cls, data, where)
        config = cls(**data)
        config.check(where)
        return config

    def check(self, where: str = "config") -> None:
        """Types, ranges, knob names and values, as one-line errors naming the key."""
        check_fields(type(self), {f.name: getattr(self, f.name) for f in fields(self)}, where)
        self._check_ranges(where)
        self._import_plugins(where)
        self._check_knobs(where)

    def _import_plugins(self, where: str) -> None:
        import importlib

        for name in self.plugins:
            try:
                importlib.import_module(name)
            except Exception as exc:  # noqa: BLE001 - the user's module: one line, not a trace
                raise UserError(f"{where}: plugins: cannot import {name!r} "
                                f"({type(exc).__name__}: {exc}); give an importable module "
                                f"that registers its knobs") from None

    def _check_ranges(self, where: str) -> None:
        # NOTE: finetune_steps 0 is allowed: candidates scored as compressed, no fine-tune
        for key, low in (("trials", 1), ("finetune_steps", 0), ("tune_trials_per_task", 0),
                         ("recover_steps", 0), ("recover_margin", 0),
                         ("startup_trials", 0), ("seed", 0), ("heartbeat_s", 1)):
            if getattr(self, key) < low:
                raise UserError(f"{where}: {key} must be at least {low}; got "
                                f"{getattr(self, key)}")
        if self.heartbeat_grace_s <= self.heartbeat_s:
            raise UserError(f"{where}: heartbeat_grace_s must be longer than heartbeat_s "
                            f"({self.heartbeat_s}); got {self.heartbeat_grace_s}")
        for key, text, ok in (
                ("timeout", "a positive number of seconds, or null for none",
                 lambda v: v > 0),
                ("tuning_budget_s", "a number of seconds >= 0, or null for no limit",
                 lambda v: v >= 0),
                ("sensitivity_max_drop", "a fraction of accuracy in [0, 1], or null",
                 lambda v: 0 <= v <= 1)):
            value = getattr(self, key)
            if value is not None and not (math.isfinite(value) and ok(value)):
                raise UserError(f"{where}: {key} must be {text}; got {value}")
        for key, text, ok in (("dropconnect", "in [0, 1)", lambda v: 0 <= v < 1),
                              ("distill_alpha", "in [0, 1]", lambda v: 0 <= v <= 1),
                              ("l1", ">= 0", lambda v: v >= 0), ("l2", ">= 0", lambda v: v >= 0)):
            value = getattr(self, key)
            if not (math.isfinite(value) and ok(value)):
                raise UserError(f"{where}: {key} must be a number {text}; got {value}")

    def _check_knobs(self, where: str) -> None:
        from search.compress.knob import knob_names
        from search.compress.policy import LayerPolicy

        KNOBS = knob_names()

        bad = sorted(set(self.knobs) - set(KNOBS))
        if bad or not self.knobs:
            raise UserError(f"{where}: knobs must be a non-empty list of "
                            f"{', '.join(KNOBS)}; got {self.knobs}")
        if self.sampler not in SAMPLERS:
            raise UserError(f"{where}: sampler must be one of {', '.join(SAMPLERS)}; got "
                            f"{self.sampler!r}")
        if self.ip_per not in ("layer", "block"):
            raise UserError(f"{where}: ip_per must be layer or block; got {self.ip_per!r}")
        if self.ip_cost not in ("estimate", "library"):
            raise UserError(f"{where}: ip_cost must be estimate or library; got "
                            f"{self.ip_cost!r}")
        if any(not 0 < f <= 1 for f in self.ip_seeds) or \
                (self.ip_size is not None and not 0 < self.ip_size <= 1):
            raise UserError(f"{where}: ip_seeds and ip_size are fractions in (0, 1]; got "
                            f"{self.ip_seeds}, {self.ip_size}")
        if self.latency not in ("measured", "predicted"):
            raise UserError(f"{where}: latency must be measured or predicted; got "
                            f"{self.latency!r}")
        if "rank" in self.knobs and "threshold" in self.knobs:
            raise UserError(f"{where}: search `rank` (by ratio) or `threshold` (by soft "
                            f"thresholding of singular values), not both")
        for knob, values in self.choices.items():
            if knob not in KNOBS or not values:
                raise UserError(f"{where}: choices must map a knob ({', '.join(KNOBS)}) to a "
                                f"non-empty list of values; got {knob}: {values!r}")
            for v in values:
                try:
                    LayerPolicy(**{knob: v})
                except (ValueError, TypeError) as exc:
                    raise UserError(f"{where}: choices for {knob}: {exc}") from None
        for i, seed in enumerate(self.seeds):
            unknown = sorted(set(seed) - set(KNOBS))
            if unknown:
                raise UserError(f"{where}: seeds[{i}] names unknown knob(s) "
                                f"{', '.join(unknown)}; knobs: {', '.join(KNOBS)}")
            try:
                LayerPolicy(**seed)
            except (ValueError, TypeError) as exc:
                raise UserError(f"{where}: seeds[{i}]: {exc}") from None

    def space_choices(self) -> dict[str, list]:
        """The knob values a search offers: each knob's default choices, overridden by `choices`."""
        from search.compress.space import default_choices

        return {**{k: list(v) for k, v in default_choices().items()}, **(self.choices or {})}

    def finetune_options(self) -> FinetuneOptions:
        return FinetuneOptions(self.finetune_steps, self.distill_alpha, self.qat,
                               self.dropconnect, self.l1, self.l2)


def parse_duration_ms(text: str) -> float:
    """'5ms', '800us', '0.005s' -> milliseconds; anything else is a one-line UserError."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ms|us|µs|s)\s*", text)
    if not match:
        raise UserError(f"budget {text!r} is not a latency: use a number with a unit, "
                        f"e.g. 5ms, 800us or 0.005s")
    value = float(match.group(1)) * _UNITS_MS[match.group(2)]
    if not (math.isfinite(value) and value > 0):
        raise UserError(f"budget {text!r} must be a finite positive latency, e.g. 5ms")
    return value


def parse_timeout_s(text: str) -> float:
    """'90s', '20m', '2h' or plain seconds -> seconds (positive: a zero timeout runs nothing)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|m|h)?\s*", text)
    if not match:
        raise UserError(f"timeout {text!r} is not a duration: use e.g. 600, 90s, 20m or 2h")
    value = float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, None: 1}[match.group(2)]
    if not value > 0:
        raise UserError(f"timeout {text!r} must be positive, e.g. 600, 90s, 20m or 2h")
    return value
