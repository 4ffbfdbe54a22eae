"""Devices as files: `targets/<name>.yaml` names the TVM target and how to time on it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from search.core.errors import UserError
from search.core.granularity import Granularity
from search.devices.device import SERVER_HINT, Device

TARGETS_DIR = Path(__file__).resolve().parents[2] / "targets"


@dataclass(frozen=True)
class Measurement:
    """Time-evaluator settings: what makes a latency figure trustworthy (cf. MetaSchedule)."""

    number: int = 10  # runs averaged into one repeat
    repeat: int = 7  # repeats: the median and spread are over these
    min_repeat_ms: int = 50  # a repeat lasts at least this long (number grows to fit)
    cooldown_ms: int = 0  # pause between repeats (thermal throttling on small boards)
    rounds: int = 35  # interleaved with the uncompressed model: repeats of each, alternating;
    # the candidate's fastest is its figure (a shared machine's least-disturbed round)


@dataclass(frozen=True)
class TargetSpec:
    """One device."""

    name: str
    description: str
    tvm_target: Any  # a TVM tag string, or the JSON-dict form
    threads: int = 1
    cross_compiler: str | None = None  # for a device of another architecture
    rpc: str | None = None  # HOST:PORT of the device's `python -m tvm.exec.rpc_server`
    tracker: str | None = None  # HOST:PORT of a TVM RPC tracker (a pool of devices) ...
    key: str | None = None  # ... and the key its devices registered with
    measurement: Measurement = field(default_factory=Measurement)
    # channel counts and ranks are multiples of these on this target: bounds the kernel shapes
    # a search can produce (the kernel library, `search tune`, covers them)
    granularity: Granularity = field(default_factory=Granularity)

    def device(self) -> Device:
        return Device(self.rpc, self.tracker, self.key, self.cross_compiler)

    @property
    def reach(self) -> str:
        return self.device().describe()

    def with_device(self, rpc: str | None = None, tracker: str | None = None,
                    key: str | None = None) -> TargetSpec:
        """Command-line --rpc / --tracker --key override the file."""
        if rpc:
            return replace(self, rpc=rpc, tracker=None)
        if tracker:
            return replace(self, rpc=None, tracker=tracker, key=key or self.key)
        return self

    def check(self) -> None:
        """A cross-compiled target cannot run here: it needs a device, and the device answers."""
        dev = self.device()
        if self.cross_compiler and dev.local:
            raise UserError(f"target {self.name!r} runs on a device: pass --rpc HOST:PORT or "
                            f"--tracker HOST:PORT --key KEY (on the device: {SERVER_HINT})")
        dev.check_reachable(self.name)

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

    def hardware_precisions(self) -> dict[str, bool]:
        """Which 16-bit float and int8 dot-product arithmetic the target's CPU has (LLVM's
        feature list for the target). Where it has none, LLVM emulates the precision with
        conversions to fp32, which is slower: the search measures it, and the result says so."""
        from tvm.target.codegen import target_has_features

        target = self.tvm()
        arm = "aarch64" in str(target.attrs.get("mtriple", "")) or "arm" in str(target.keys)

        def has(*features: str) -> bool:
            return any(target_has_features(f, target) for f in features)

        if arm:
            return {"fp16": has("fullfp16"), "bf16": has("bf16"), "int8-dot": has("dotprod")}
        return {"fp16": has("avx512fp16"), "bf16": has("avx512bf16", "amx-bf16"),
                "int8-dot": has("avx512vnni", "avxvnni")}

    def software_precisions(self, policy: Any) -> list[str]:
        """The 16-bit precisions a policy uses that this target computes in software."""
        native = self.hardware_precisions()
        used = {lp.half for lp in policy.layers.values() if lp.bits == 16}
        return sorted(p for p in used if not native.get(p, False))

    def db_key(self) -> str:
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
    return parse_target(path)


def parse_target(path: Path) -> TargetSpec:
    """A target YAML file, checked by field type and range: a bad one is a one-line UserError
    naming the key, before anything is built."""
    from search.core.settings import check_fields, read_settings

    where = f"target file {path}"
    data = read_settings(path, "target file", {f.name for f in fields(TargetSpec)},
                         f"see {TARGETS_DIR / 'host.yaml'}")
    data.setdefault("name", path.stem)
    timing = data.pop("measurement", None) or {}
    if not isinstance(timing, dict):
        raise UserError(f"{where}: measurement must be a mapping (number, repeat, "
                        f"min_repeat_ms, cooldown_ms); got {timing!r}")
    check_fields(Measurement, timing, f"{where}: measurement")
    grain = data.pop("granularity", None) or {}
    if not isinstance(grain, dict):
        raise UserError(f"{where}: granularity must be a mapping {{channels: 8, rank: 8}}; got "
                        f"{grain!r}")
    check_fields(Granularity, grain, f"{where}: granularity")
    if any(v < 1 for v in grain.values()):
        raise UserError(f"{where}: granularity values must be >= 1; got {grain!r}")
    check_fields(TargetSpec, data, where)
    if not isinstance(data.get("tvm_target"), str | dict):
        raise UserError(f"{where}: tvm_target must be a TVM tag (a string) or the JSON-dict "
                        f"form {{kind: llvm, mtriple: ..., mcpu: ...}}; got "
                        f"{data.get('tvm_target')!r}")
    spec = TargetSpec(measurement=Measurement(**timing), granularity=Granularity(**grain), **data)
    m = spec.measurement
    if spec.threads < 1 or m.number < 1 or m.repeat < 1 or m.rounds < 1 \
            or m.min_repeat_ms < 0 or m.cooldown_ms < 0:
        raise UserError(f"{where}: need threads, measurement.number, measurement.repeat and "
                        f"measurement.rounds >= 1, min_repeat_ms and cooldown_ms >= 0")
    return spec
