"""A per-target table of layer ops' latencies, each op compiled alone and timed for real: the
integer program's per-layer costs (`ip_cost: measured`, search.study.layer_cost).

The program needs a cost per layer and option that adds up (it is separable by layer), which a
whole-model figure cannot give; a trial's predicted latency is the whole model's kernels
costed from the kernel library instead (search.backend.predict: fusion and layout included).

Decisions:
- A layer op is one call of a Conv2d or Linear (grouped and depthwise convs included), a `Half`
  (a 16-bit layer with its casts and fp32 bias add: TVM fuses those with the op) or an
  `Int8Linear` (the Compiler lowers it to int8 kernels; the key names the target's int8 form,
  `search.backend.int8.int8_kind`). Its key is everything that decides the compiled kernel: op
  kind, hyper-parameters, weight dtype, whether it has a bias, the real input shape and dtype
  (captured by forward hooks). Weight values are not part of it: every kernel here is dense, so
  the op is timed as a fresh module with random weights.
- Ops repeat across layers and options (channels and ranks on the target's granularity): each
  distinct op is compiled and timed once.
- Ops that the table lacks may be tuned together in one MetaSchedule session
  (`tune_together`), then compiled and timed one by one: tuned one at a time, a big op gets
  only the budget of a one-kernel module.
- Each entry says how it was made (`measured:<target>:tuned|untuned|partly-tuned(k/n)`); an
  entry measured untuned is measured again once the compiler tunes.
- One JSON file per target next to its tuning database (`<cache>/tuning/<target key>/
  layers.json`), shared by a run's workers: each update re-reads the file under a lock, merges
  and replaces it atomically (temp file + os.replace); readers never see half a file. An op is
  measured under the device lock, and skipped if another worker measured it meanwhile.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from search.backend.measure import compile_and_time
from search.core.data import as_inputs
from search.devices.lock import device_lock, file_lock
from search.devices.target import Measurement, TargetSpec

KEY_VERSION = "v1"  # bump when the key or how an op is timed changes: old entries are ignored


@dataclass(frozen=True)
class LayerOp:
    """One op of a candidate: its key and how to build it alone (fresh weights)."""

    key: str
    make: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    input_dtype: torch.dtype

    def example(self) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        return torch.randn(self.input_shape, generator=gen).to(self.input_dtype)


# --------------------------------------------------------------------------------------------
# ops of a model


def _tuple(v: Any) -> str:
    return "x".join(str(int(i)) for i in v) if isinstance(v, tuple | list) else str(v)


def _dtype(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def _conv_key(m: nn.Conv2d, bias: bool) -> str:
    return (f"conv2d(out={m.out_channels},k={_tuple(m.kernel_size)},s={_tuple(m.stride)},"
            f"p={_tuple(m.padding)},d={_tuple(m.dilation)},g={m.groups},bias={int(bias)},"
            f"pad={m.padding_mode},w={_dtype(m.weight.dtype)})")


def _linear_key(m: nn.Linear, bias: bool) -> str:
    return f"linear(out={m.out_features},bias={int(bias)},w={_dtype(m.weight.dtype)})"


def _fresh(m: nn.Module, bias: bool) -> nn.Module:
    """A new layer with m's hyper-parameters and default-initialized weights."""
    if isinstance(m, nn.Conv2d):
        new: nn.Module = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride,
                                   m.padding, m.dilation, m.groups, bias, m.padding_mode)
    else:
        new = nn.Linear(m.in_features, m.out_features, bias)
    return new.to(m.weight.dtype)


def _plain_key(m: nn.Module, bias: bool) -> str:
    return _conv_key(m, bias) if isinstance(m, nn.Conv2d) else _linear_key(m, bias)


def _op(m: nn.Module, x: torch.Tensor, int8_kind: str) -> LayerOp:
    shape, dtype = tuple(int(s) for s in x.shape), x.dtype
    where = f"in={_tuple(shape)}:{_dtype(dtype)}"
    if hasattr(m, "latency_op"):  # a module a knob made keys and rebuilds itself
        key, make = m.latency_op(_plain_key, {"int8_kind": int8_kind})
        return LayerOp(f"{KEY_VERSION}|{key}|{where}", make, shape, dtype)
    bias = m.bias is not None
    return LayerOp(f"{KEY_VERSION}|{_plain_key(m, bias)}|{where}", lambda: _fresh(m, bias),
                   shape, dtype)


@torch.no_grad()
def layer_ops(model: nn.Module, example: torch.Tensor, int8_kind: str = "plain"
              ) -> list[LayerOp]:
    """The model's ops in call order (one per call: a layer called twice counts twice), found
    by forward hooks on one run of `example`. A Conv2d/Linear inside a Half is the Half's."""
    wrapped = {id(inner) for m in model.modules() if hasattr(m, "latency_op")
               for inner in m.modules() if inner is not m}
    found: list[LayerOp] = []

    def hook(m: nn.Module, args: tuple[Any, ...], _out: Any) -> None:
        if args and id(m) not in wrapped:  # (a layer called with keywords only is missed)
            found.append(_op(m, args[0], int8_kind))

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, nn.Conv2d | nn.Linear) or hasattr(m, "latency_op")]
    was_training = model.training
    try:
        model.eval()(*as_inputs(example))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return found


# --------------------------------------------------------------------------------------------
# the table


def _tuned(entry: dict[str, Any]) -> bool:
    """Measured on tuned kernels: its own records, or schedules transferred from a tuned
    neighbour (search.backend.transfer); not measured again once the compiler can tune."""
    return entry["tuning"] == "tuned" or entry["tuning"].startswith("tuned+")


def _tolerance(module: nn.Module, ref: torch.Tensor) -> float:
    """atol for checking a lone op's compiled output (random weights: scale by the output)."""
    base = getattr(module, "tolerance", 1e-3)  # a 16-bit layer rounds differently per runtime
    return base * max(1.0, float(ref.detach().float().abs().max()))


class LatencyTable:
    """Per-layer latencies of one target, in a JSON file shared by processes."""

    def __init__(self, path: Path, target_name: str = "", int8_kind: str = "plain") -> None:
        self.path = Path(path)
        self.target_name = target_name
        self.int8_kind = int8_kind  # the int8 kernel form ops are lowered to (search.compress.int8)
        self.measured = 0  # ops this object compiled and timed (tests, progress)

    @classmethod
    def for_compiler(cls, compiler: Any) -> LatencyTable:
        """The table next to the compiler's tuning database (one per target key)."""
        from search.backend.int8 import int8_kind

        return cls(compiler.db_dir / "layers.json", compiler.spec.name,
                   int8_kind(compiler.target))

    # ---- the file

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            data = {}
        data.setdefault("layers", {})
        return data

    def _update(self, change: Callable[[dict[str, Any]], None]) -> None:
        """Re-read, change and atomically replace the file, under its lock."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(self.path.with_name(self.path.name + ".lock")):
            data = self._read()
            change(data)
            data["version"] = KEY_VERSION
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".layers-", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as handle:
                    json.dump(data, handle, indent=1, sort_keys=True)
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise

    @property
    def layers(self) -> dict[str, dict[str, Any]]:
        return self._read()["layers"]

    # ---- ops

    def measure_ops(self, ops_in: Iterable[LayerOp], compiler: Any,
                    target: TargetSpec | None = None, settings: Measurement | None = None,
                    progress: Any | None = None, together: bool = True) -> list[str]:
        """Compile each op the table lacks as its own module with `compiler` (tuning it into the
        run's database when tuning is on) and time it on the target; an entry measured untuned
        is measured again when the compiler can tune now. `together`: tune the kernels of the
        missing ops in one MetaSchedule session first (else each compile tunes or transfers
        its own, as a trial's compile does: search.backend.transfer). Returns the keys
        measured."""
        from search.backend.compile import to_relax

        target = target or compiler.spec
        settings = settings or target.measurement
        want_tuned = bool(compiler.can_tune)
        ops: dict[str, LayerOp] = {}
        for op in ops_in:
            ops.setdefault(op.key, op)
        layers = self.layers
        todo = [k for k in ops if k not in layers or (want_tuned and not _tuned(layers[k]))]
        if todo and want_tuned and together:
            with device_lock(target):
                tune_together(compiler, [to_relax(ops[k].make().eval(), ops[k].example())
                                         for k in todo], progress)
        done: list[str] = []
        for key in todo:
            op = ops[key]
            entry = self.layers.get(key)  # another worker may have measured it meanwhile
            if entry is not None and (not want_tuned or _tuned(entry)):
                continue
            torch.manual_seed(0)
            module = op.make().eval()
            x = op.example()
            with torch.no_grad():
                atol = _tolerance(module, module(x))
            timed = compile_and_time(module, x, compiler, target, settings, atol,
                                     progress if together else None)  # (else: counts ops)
            latency = timed.latency
            record = {
                "ms": latency.median_ms, "p25_ms": latency.p25_ms, "p75_ms": latency.p75_ms,
                "repeats": latency.repeats, "tuning": timed.source.tuning,
                "kernels": timed.compiled.tasks, "source": timed.source.to_dict(),
                "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            self._update(lambda data, k=key, r=record: data["layers"].__setitem__(k, r))
            self.measured += 1
            done.append(key)
            if progress is not None and not together:
                progress.update(1)
        return done


def tune_together(compiler: Any, mods: list[Any], progress: Any | None = None) -> int:
    """Tune the kernels of several modules in one MetaSchedule session. Returns how many.

    NOTE: compiled one at a time, each op would get the Compiler's budget for a one-kernel
    module (n trials), while in the whole model MetaSchedule's gradient scheduler gives the
    kernels that dominate latency up to 4n: the table then holds under-tuned big ops (measured:
    the digits model's 5120x5120 Linear took 16.4 ms alone vs 13.6 ms for the whole model) and,
    since the database is shared, so do later whole-model compiles. Tuning a candidate's new ops
    together gives them the budget split they get in the whole model.
    """
    if not compiler.can_tune or not mods:
        return 0
    return compiler.tune([k for mod in mods for k in compiler.kernels_of(mod)], progress)
