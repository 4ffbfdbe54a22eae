"""Run a compiled candidate: check its outputs against PyTorch, then time it for real."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from search.errors import TrialFailed
from search.target import Measurement


@dataclass(frozen=True)
class Latency:
    """A measured latency: median over repeats, with the interquartile spread."""

    median_ms: float
    p25_ms: float
    p75_ms: float
    repeats: int


def run_and_time(executable: Any, example: torch.Tensor, reference: torch.Tensor,
                 settings: Measurement, atol: float = 1e-3, rtol: float = 1e-2) -> Latency:
    """Run once and compare with `reference` (PyTorch's output), then time with the evaluator."""
    import tvm
    from tvm import relax

    dev = tvm.cpu()
    vm = relax.VirtualMachine(executable, dev)
    x = tvm.runtime.tensor(example.numpy(), dev)
    try:
        out = vm["main"](x).numpy()
    except Exception as exc:  # noqa: BLE001
        raise TrialFailed(f"compiled model failed to run: {type(exc).__name__}: {exc}") from exc
    ref = reference.detach().float().numpy()
    if out.shape != ref.shape or not np.allclose(out, ref, atol=atol, rtol=rtol):
        err = float(np.abs(out - ref).max()) if out.shape == ref.shape else float("nan")
        raise TrialFailed(f"compiled output differs from PyTorch (max abs error {err:.3g})")
    timer = vm.time_evaluator("main", dev, number=settings.number, repeat=1,
                              min_repeat_ms=settings.min_repeat_ms)
    timer(x)  # warm-up: caches, page faults, thread pool
    samples = []
    for _ in range(settings.repeat):
        samples.append(timer(x).mean * 1e3)
        if settings.cooldown_ms:
            time.sleep(settings.cooldown_ms / 1e3)
    p25, med, p75 = np.percentile(samples, [25, 50, 75])
    return Latency(float(med), float(p25), float(p75), len(samples))


def time_onnxruntime(onnx_bytes: bytes, example: torch.Tensor, settings: Measurement) -> float:
    """The reference runtime: median ms of ONNX Runtime (CPU, one thread) on the same input.

    Timed like the TVM evaluator: warm-up, then `repeat` repeats of at least `min_repeat_ms`.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: example.numpy()}
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
