"""Side-by-side latency of the default task: uncompressed under TVM untuned / tuned, ONNX Runtime
fp32 / int8 (dynamic quantization), and a run's best front point within 1 accuracy point.

All figures come from this one process, timed the same way (median of repeats, one thread), and
are printed as ratios to the uncompressed model under tuned TVM.

    python bench/bench_default.py --run runs/host-5ms
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "1")

import torch  # noqa: E402

from search.backend.compile import Compiler, to_relax  # noqa: E402
from search.backend.measure import run_and_time
from search.backend.onnx import ort_session_bytes, time_onnxruntime
from search.compress.build import output_tolerance  # noqa: E402
from search.core.task import load_task  # noqa: E402
from search.devices.target import load_target  # noqa: E402
from search.study.runfolder import RunInfo, load_trial_model, tuning_dir


def ort_int8(onnx_bytes: bytes) -> bytes:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(onnx_bytes)
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
        return dst.read_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a finished `search run` folder")
    parser.add_argument("--max-loss", type=float, default=0.01,
                        help="accuracy loss allowed for the front point [0.01 = 1 point]")
    args = parser.parse_args()
    torch.set_num_threads(1)

    info = RunInfo.load(args.run)
    target = load_target(info.target)
    task = load_task(info.config.task, **info.config.task_args)
    front = json.loads((args.run / "front.json").read_text())
    base_acc = front["baseline"]["accuracy"]
    ok = [p for p in front["points"] if p["accuracy"] >= base_acc - args.max_loss]
    best = min(ok, key=lambda p: p["latency_ms"])

    small, policy = load_trial_model(args.run, best["trial"], task)
    model = task.model.eval()
    with torch.no_grad():
        ref, ref_small = model(*task.example), small(*task.example)

    untuned = Compiler(target, Path(tempfile.mkdtemp()) / "empty-db", trials_per_task=0)
    tuned = Compiler(target, tuning_dir(target), trials_per_task=info.config.tune_trials_per_task)
    rows: list[tuple[str, float, str]] = []
    c = untuned.compile(to_relax(model, task.example))
    rows.append(("uncompressed, TVM untuned",
                 run_and_time(c.executable, task.example, ref, target.measurement).median_ms,
                 "untuned"))
    c = tuned.compile(to_relax(model, task.example))
    lat_tuned = run_and_time(c.executable, task.example, ref, target.measurement).median_ms
    rows.append(("uncompressed, TVM tuned", lat_tuned, f"tuned {c.tuned}/{c.tasks}"))
    onnx = ort_session_bytes(model, task.example)
    rows.append(("uncompressed, ONNX Runtime fp32",
                 time_onnxruntime(onnx, task.example, target.measurement), "ort"))
    rows.append(("uncompressed, ONNX Runtime int8 (dynamic)",
                 time_onnxruntime(ort_int8(onnx), task.example, target.measurement), "ort"))
    c = tuned.compile(to_relax(small, task.example))
    rows.append((f"front trial {best['trial']} (acc {100 * best['accuracy']:.2f}% vs "
                 f"{100 * base_acc:.2f}%), TVM tuned",
                 run_and_time(c.executable, task.example, ref_small, target.measurement,
                              atol=output_tolerance(policy)).median_ms,
                 f"tuned {c.tuned}/{c.tasks}"))
    rows.append((f"front trial {best['trial']}, ONNX Runtime fp32",
                 time_onnxruntime(ort_session_bytes(small, task.example), task.example,
                                  target.measurement), "ort"))

    print(f"target {target.name} ({target.tvm()}), task {task.name}, one thread, batch 1")
    print(f"{'configuration':<58} {'median ms':>10} {'vs TVM tuned':>13}  kernels")
    for name, ms, how in rows:
        print(f"{name:<58} {ms:>10.3f} {lat_tuned / ms:>12.2f}x  {how}")
    print("(vs TVM tuned: > 1 means faster than the uncompressed model compiled with tuned TVM)")


if __name__ == "__main__":
    main()
