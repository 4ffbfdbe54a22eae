"""Compile and time: the one path every latency figure is made by (a trial, the per-layer
table's ops, a whole-model check, `search show`): compile with TVM, run once and check the
output against PyTorch's, then time the compiled artifact on the target."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from search.backend.compile import Compiled, to_relax
from search.backend.provenance import Provenance
from search.core.data import as_inputs
from search.core.errors import TrialFailed
from search.devices.device import Device
from search.devices.lock import device_lock
from search.devices.target import Measurement


@dataclass(frozen=True)
class Latency:
    """A measured latency: median over repeats, with the interquartile spread."""

    median_ms: float
    p25_ms: float
    p75_ms: float
    repeats: int
    emulated_by: str | None = None  # e.g. "qemu-aarch64": NOT the device's real latency


@dataclass(frozen=True)
class Timed:
    """A compiled and timed model: its latency, how that was made, and the compile."""

    latency: Latency
    source: Provenance
    compiled: Compiled
    compile_s: float  # compiling, tuning included


def compile_and_time(model: torch.nn.Module, example: Any, compiler: Any, target: Any = None,
                     settings: Measurement | None = None, atol: float = 1e-3,
                     progress: Any | None = None) -> Timed:
    """Compile `model` (with every input of `example`) with `compiler`, check its output against
    PyTorch's within `atol`, and time it on the target, holding the target's device lock (one
    process at a time tunes and times on a device). TrialFailed says why a candidate failed,
    also when a layer the policy made int8 does not compile to an int8 kernel."""
    target = target or compiler.spec
    int8_layers = sum(1 for m in model.modules() if getattr(m, "computes_in_int8", False))
    with torch.no_grad():
        reference = model.eval()(*as_inputs(example))
    mod = to_relax(model, example)
    with device_lock(target):
        start = time.perf_counter()
        compiled = compiler.compile(mod, progress)
        compile_s = time.perf_counter() - start
        if compiled.int8_kernels < int8_layers:
            raise TrialFailed(f"{int8_layers - compiled.int8_kernels} of {int8_layers} int8 "
                              f"layers did not lower to int8 kernels (TVM would compute them "
                              f"on widened int32 operands); not timed as int8")
        latency = run_and_time(compiled.executable, example, reference,
                               settings or target.measurement, target.device(), atol=atol)
    source = Provenance.timed(target.name, compiled.tuned, compiled.tasks, latency.emulated_by)
    return Timed(latency, source, compiled, compile_s)


def run_and_time(executable: Any, example: Any, reference: torch.Tensor,
                 settings: Measurement, device: Device | None = None, atol: float = 1e-3,
                 rtol: float = 1e-2) -> Latency:
    """Run once and compare with `reference` (PyTorch's output), then time with the evaluator.

    On a device over RPC, a dropped session is retried once on a fresh one; a second failure
    fails the trial with its reason (never the study).
    """
    device = device or Device()
    if device.local:
        return _run_and_time(executable, example, reference, settings, None, device, atol, rtol)
    for attempt in (1, 2):
        try:
            session = device.session()
            return _run_and_time(executable, example, reference, settings, session, device,
                                 atol, rtol)
        except TrialFailed:
            raise
        except Exception as exc:  # noqa: BLE001 - a device drop: one retry, then a failed trial
            if attempt == 2:
                raise TrialFailed(f"device {device.describe()} failed twice: "
                                  f"{type(exc).__name__}: {_first_line(exc)}") from exc
    raise AssertionError("unreachable")


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _run_and_time(executable: Any, example: Any, reference: torch.Tensor,
                  settings: Measurement, session: Any, device: Device, atol: float,
                  rtol: float) -> Latency:
    import tvm
    from tvm import relax

    if session is None:
        dev, module = tvm.cpu(), executable
        emulation = None
    else:
        dev, module = session.cpu(), device.load(session, executable)
        emulation = device.emulation(session)
    vm = relax.VirtualMachine(module, dev)
    xs = [tvm.runtime.tensor(t.numpy(), dev) for t in as_inputs(example)]
    try:
        out = vm["main"](*xs).numpy()
    except Exception as exc:  # noqa: BLE001
        if session is not None:
            raise  # maybe the device dropped: the caller retries
        raise TrialFailed(f"compiled model failed to run: {type(exc).__name__}: "
                          f"{_first_line(exc)}") from exc
    ref = reference.detach().float().numpy()
    if out.shape != ref.shape or not np.allclose(out, ref, atol=atol, rtol=rtol):
        err = float(np.abs(out - ref).max()) if out.shape == ref.shape else float("nan")
        raise TrialFailed(f"compiled output differs from PyTorch (max abs error {err:.3g})")
    timer = vm.time_evaluator("main", dev, number=settings.number, repeat=1,
                              min_repeat_ms=settings.min_repeat_ms)
    timer(*xs)  # warm-up: caches, page faults, thread pool
    samples = []
    for _ in range(settings.repeat):
        samples.append(timer(*xs).mean * 1e3)
        if settings.cooldown_ms:
            time.sleep(settings.cooldown_ms / 1e3)
    p25, med, p75 = np.percentile(samples, [25, 50, 75])
    return Latency(float(med), float(p25), float(p75), len(samples), emulation)


