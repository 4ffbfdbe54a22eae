"""Run a compiled candidate: check its outputs against PyTorch, then time it for real."""

from __future__ import annotations

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
