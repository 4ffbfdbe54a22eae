"""Run a compiled candidate: check its outputs against PyTorch, then time it for real."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from search.data import as_inputs
from search.device import Device
from search.errors import TrialFailed
from search.target import Measurement


@dataclass(frozen=True)
class Latency:
    """A measured latency: median over repeats, with the interquartile spread."""

    median_ms: float
    p25_ms: float
    p75_ms: float
    repeats: int
    emulated_by: str | None = None  # e.g. "qemu-aarch64": NOT the device's real latency


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


def time_onnxruntime(onnx_bytes: bytes, example: Any, settings: Measurement) -> float:
    """The reference runtime: median ms of ONNX Runtime (CPU, one thread) on the same input.

    Timed like the TVM evaluator: warm-up, then `repeat` repeats of at least `min_repeat_ms`.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    feed = onnx_feed(sess, example)
    for _ in range(5):
        sess.run(None, feed)
    samples = []
    for _ in range(settings.repeat):
        n, start = 0, time.perf_counter()
        while n < settings.number or (time.perf_counter() - start) * 1e3 < settings.min_repeat_ms:
            sess.run(None, feed)
            n += 1
        samples.append((time.perf_counter() - start) * 1e3 / n)
    return statistics.median(samples)


def onnx_feed(session: Any, example: Any) -> dict[str, np.ndarray]:
    """Every input of an ONNX Runtime session, by position."""
    inputs = as_inputs(example)
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(inputs):
        raise TrialFailed(f"the ONNX model takes {len(names)} inputs, the task gives "
                          f"{len(inputs)}")
    return {n: t.numpy() for n, t in zip(names, inputs, strict=True)}
