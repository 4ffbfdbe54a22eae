"""Devices as files: `targets/<name>.yaml` names the TVM target and how to time on it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from search.errors import UserError

TARGETS_DIR = Path(__file__).resolve().parent.parent / "targets"


@dataclass(frozen=True)
class Measurement:
    """Time-evaluator settings: what makes a latency figure trustworthy (cf. MetaSchedule)."""

    number: int = 10  # runs averaged into one repeat
    repeat: int = 7  # repeats: the median and spread are over these
    min_repeat_ms: int = 50  # a repeat lasts at least this long (number grows to fit)
    cooldown_ms: int = 0  # pause between repeats (thermal throttling on small boards)


@dataclass(frozen=True)
class TargetSpec:
    """One device."""

    name: str
    description: str
    tvm_target: Any  # a TVM tag string, or the JSON-dict form
    threads: int = 1
    reach: str = "local"  # how the device is reached; only "local" in this release
    measurement: Measurement = field(default_factory=Measurement)

    def tvm(self) -> Any:
        """The tvm.target.Target; `mcpu: host` means this machine's CPU."""
        import tvm

        spec = self.tvm_target
        if isinstance(spec, dict):
            spec = dict(spec)
            if spec.get("mcpu") == "host":
                spec["mcpu"] = tvm.target.codegen.llvm_get_system_cpu()
            spec.setdefault("num-cores", self.threads)
        return tvm.target.Target(spec)

    def key(self) -> str:
        """A stable id of the compiled-for target: the tuning database is kept per key."""
        text = json.dumps(str(self.tvm()), sort_keys=True)
        return f"{self.name}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"


def available() -> list[str]:
    return sorted(p.stem for p in TARGETS_DIR.glob("*.yaml"))


def load_target(name_or_path: str) -> TargetSpec:
    """A target by name (targets/NAME.yaml) or by path to a YAML file."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.exists()):
        path = TARGETS_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise UserError(f"unknown target {name_or_path!r}: choose one of "
                        f"{', '.join(available())}, or pass a path to a target YAML file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
        measurement = Measurement(**(data.pop("measurement", None) or {}))
        data.setdefault("name", path.stem)
        spec = TargetSpec(measurement=measurement, **data)
    except (TypeError, yaml.YAMLError) as exc:
        raise UserError(f"target file {path}: {exc}") from None
    if spec.reach != "local":
        raise UserError(f"target {spec.name!r} is reached by {spec.reach!r}; this release "
                        f"measures on this machine only (reach: local)")
    return spec
