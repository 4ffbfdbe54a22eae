"""TVM fp32 vs ONNX Runtime fp32 on the default task, with and without the CPU layout passes.

    python bench/bench_layout.py [--task search.tasks:mobilenet_v2] [--trials 8] [--rounds 11]

Compiles the uncompressed model twice with the search's own Compiler, each into a fresh tuning
database at `--trials` MetaSchedule trials per kernel: once as PyTorch's graph reaches TVM
(NCHW, BatchNorm kernels apart), once through search.backend.layout (BatchNorm folded, NHWC /
HWIO). Then times both libraries and ONNX Runtime fp32 in this one process, interleaved round
by round (each figure a median of `--rounds`), and prints the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import search.backend.compile as compile_module  # noqa: E402
from search.backend.compile import Compiler, to_relax  # noqa: E402
from search.backend.measure import run_and_time  # noqa: E402
from search.backend.onnx import ort_session_bytes, time_onnxruntime  # noqa: E402
from search.core.task import load_task  # noqa: E402
from search.devices.target import Measurement, load_target  # noqa: E402
from search.study.runfolder import setup_threads  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="search.tasks:mobilenet_v2")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=11)
    args = ap.parse_args()
    target = load_target("host")
    setup_threads(target)
    task = load_task(args.task)
    with torch.no_grad():
        reference = task.model(*task.example)
    built = {}
    for name, layout in (("NCHW as imported", False), ("BN folded, NHWC/HWIO", True)):
        if not layout:
            saved, compile_module.cpu_layout = compile_module.cpu_layout, lambda mod: mod
        try:
            compiler = Compiler(target, Path(tempfile.mkdtemp()), trials_per_task=args.trials)
            start = time.perf_counter()
            compiled = compiler.compile(to_relax(task.model, task.example))
            print(f"{name}: {compiled.tasks} kernels, tuned {compiled.tuned}, "
                  f"{time.perf_counter() - start:.0f} s to tune and build", flush=True)
            built[name] = compiled.executable
        finally:
            if not layout:
                compile_module.cpu_layout = saved
    onnx = ort_session_bytes(task.model, task.example)
    once = Measurement(number=10, repeat=3, min_repeat_ms=100)
    samples: dict[str, list[float]] = {name: [] for name in [*built, "ONNX Runtime fp32"]}
    for _ in range(args.rounds):
        for name, ex in built.items():
            lat = run_and_time(ex, task.example, reference, once, atol=1e-4)
            samples[name].append(lat.median_ms)
        samples["ONNX Runtime fp32"].append(time_onnxruntime(onnx, task.example, once))
    ort = statistics.median(samples["ONNX Runtime fp32"])
    print(f"\ntask {task.name}, {args.trials} trials per kernel, medians of {args.rounds} "
          f"interleaved rounds")
    for name, values in samples.items():
        ms = statistics.median(values)
        print(f"{name:<22} {ms:8.3f} ms   ONNX Runtime / this: {ort / ms:5.2f}x")


if __name__ == "__main__":
    main()
