"""The search config: one dataclass, read from YAML, overridden by command-line flags."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from search.errors import UserError
from search.task import DEFAULT_TASK

_UNITS_MS = {"ms": 1.0, "us": 1e-3, "µs": 1e-3, "s": 1e3}


@dataclass
class SearchConfig:
    """Everything a run needs besides the target and budget."""

    task: str = DEFAULT_TASK  # `module:function` returning a search.task.Task
    task_args: dict[str, Any] = field(default_factory=dict)  # keyword arguments for it
    trials: int = 16  # candidates evaluated (the seeds below count)
    timeout: float | None = None  # stop starting new trials after this many seconds
    finetune_steps: int = 60  # distillation steps per candidate (batch 64)
    tune_trials_per_task: int = 8  # MetaSchedule trials per new kernel; 0 = untuned (labelled)
    tuning_budget_s: float | None = None  # per run: once spent, new kernels stay untuned
    seed: int = 0
    startup_trials: int = 6  # random trials before TPE models the space (after the seeds)
    knobs: list[str] = field(default_factory=lambda: ["rank", "sparsity", "bits"])  # searched;
    # "prune" (unstructured magnitude pruning, stored sparse) is opt-in: no dense speedup
    seeds: list[dict[str, float]] = field(default_factory=lambda: [
        {},  # the uncompressed model: the baseline point
        {"rank": 0.125},
        {"sparsity": 0.5},
        {"bits": 16},
    ])  # uniform policies evaluated first, so the front always has reference points

    @classmethod
    def load(cls, path: Path | None) -> SearchConfig:
        if path is None:
            return cls()
        if not path.exists():
            raise UserError(f"config file {str(path)!r} does not exist; pass an existing YAML "
                            f"file (see configs/default.yaml)")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"config file {path} is not valid YAML: "
                            f"{str(exc).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise UserError(f"config file {path} must hold a mapping of settings")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"config file {path}: unknown setting(s) {', '.join(unknown)}; "
                            f"known: {', '.join(sorted(known))}")
        config = cls(**data)
        from search.policy import KNOBS

        bad = sorted(set(config.knobs) - set(KNOBS))
        if bad or not config.knobs:
            raise UserError(f"config file {path}: knobs must be a non-empty list of "
                            f"{', '.join(KNOBS)}; got {config.knobs}")
        return config


def parse_duration_ms(text: str) -> float:
    """'5ms', '800us', '0.005s' -> milliseconds; anything else is a one-line UserError."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ms|us|µs|s)\s*", text)
    if not match:
        raise UserError(f"budget {text!r} is not a latency: use a number with a unit, "
                        f"e.g. 5ms, 800us or 0.005s")
    value = float(match.group(1)) * _UNITS_MS[match.group(2)]
    if value <= 0:
        raise UserError(f"budget {text!r} must be positive")
    return value


def parse_timeout_s(text: str) -> float:
    """'90s', '20m', '2h' or plain seconds -> seconds."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|m|h)?\s*", text)
    if not match:
        raise UserError(f"timeout {text!r} is not a duration: use e.g. 600, 90s, 20m or 2h")
    return float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, None: 1}[match.group(2)]
