"""TVM vs ONNX Runtime on one task, fp32 and int8, with each runtime's costliest ops.

    python bench/bench_speed.py [--task search.tasks:mobilenet_v2] [--trials 8] [--rounds 7]
    python bench/bench_speed.py --task search.tasks:minilm_text
    SEARCH_CACHE_DIR=/tmp/bench-cache python bench/bench_speed.py --db library \
        --uniform rank=0.125                  # a front's policy, on the target's kernel library

Models: the uncompressed model, and its int8 form as the search builds it (bits 8 on every
compressible layer, through search.compress.build: BatchNorm folded, activations calibrated on
256 training inputs).
Runtimes:
- TVM: the search's own Compiler, a fresh tuning database (or `--db library`: the target's
  own, as `search tune` and the runs left it), `--trials` MetaSchedule trials per kernel it
  lacks; `--uniform KNOB=VALUE` adds that uniform policy's model (structure and precision; its
  latency does not depend on the weights);
- ONNX Runtime fp32, on the same ONNX export;
- ONNX Runtime int8 with its own quantizer (bench_real.ort_int8: static QDQ, per channel,
  calibrated on the same 256 training inputs, for a CNN; dynamic for an encoder);
- ONNX Runtime on our int8 export (QuantizeLinear + ConvInteger / MatMulInteger).

Everything is timed in this one process, interleaved round by round (batch 1, one thread; each
figure the median of `--rounds`). Test accuracy: ours in torch (the compiled output is checked
against it), ONNX Runtime's int8 in ONNX Runtime, over the whole test split. Per-op tables: TVM
kernels timed through the VM's instrument hook, ONNX Runtime nodes from its profiler, each the
mean per inference over 30 runs (the hook's own overhead is in TVM's figures: compare shares).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("TVM_NUM_THREADS", "1")
warnings.filterwarnings("ignore", category=FutureWarning)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from bench_real import ort_int8, ort_session, ort_test_accuracy  # noqa: E402

from search.backend.compile import Compiler, to_relax  # noqa: E402
from search.backend.measure import run_and_time  # noqa: E402
from search.backend.onnx import onnx_feed, ort_session_bytes, time_onnxruntime  # noqa: E402
from search.compress.build import build, output_tolerance  # noqa: E402
from search.compress.space import derive_space, uniform  # noqa: E402
from search.core.data import evaluate  # noqa: E402
from search.core.task import load_task  # noqa: E402
from search.devices.target import Measurement, load_target  # noqa: E402
from search.study.runfolder import setup_threads, tuning_dir  # noqa: E402

RUNS = 30


def type_of(knob: str) -> type:
    return int if knob == "bits" else float


def tvm_ops(executable: Any, example: tuple[torch.Tensor, ...]) -> dict[str, float]:
    """Mean microseconds per inference of each kernel (and VM builtin), by name."""
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(executable, tvm.cpu())
    args = [tvm.runtime.tensor(t.numpy()) for t in example]
    for _ in range(5):
        vm["main"](*args)
    spent: dict[str, float] = {}
    start = [0.0]

    def hook(_func: Any, name: str, before: bool, _ret: Any, *_args: Any) -> int:
        if before:
            start[0] = time.perf_counter()
        else:
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - start[0]
        return 0

    vm.set_instrument(hook)
    for _ in range(RUNS):
        vm["main"](*args)
    return {k: v / RUNS * 1e6 for k, v in spent.items()}


def ort_ops(onnx_bytes: bytes, example: tuple[torch.Tensor, ...]) -> dict[str, float]:
    """Mean microseconds per inference of each ONNX Runtime node, by op type and name."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.enable_profiling = True
    opts.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ort")
    sess = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    feed = onnx_feed(sess, example)
    for _ in range(RUNS):
        sess.run(None, feed)
    events = json.loads(Path(sess.end_profiling()).read_text())
    spent: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            key = f"{e['args'].get('op_name', '?')} {e['name'].removesuffix('_kernel_time')}"
            spent[key] = spent.get(key, 0.0) + e["dur"]
    return {k: v / RUNS for k, v in spent.items()}


def top(ops: dict[str, float], n: int = 10) -> list[str]:
    total = sum(ops.values())
    rows = sorted(ops.items(), key=lambda kv: -kv[1])[:n]
    return [f"{us:7.1f} us {100 * us / total:4.1f}%  {name[:60]}" for name, us in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="search.tasks:mobilenet_v2")
    ap.add_argument("--trials", type=int, default=8, help="MetaSchedule trials per kernel")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calibration", type=int, default=256)
    ap.add_argument("--db", default=None, help="'library': the target's tuning database")
    ap.add_argument("--uniform", action="append", default=[], metavar="KNOB=VALUE")
    args = ap.parse_args()
    target = load_target("host")
    setup_threads(target)
    task = load_task(args.task)
    example = task.example
    policy = uniform(derive_space(task.model, example), bits=8)
    int8 = build(task.model, policy, example, task.train)
    models = {"fp32": task.model, "int8": int8}
    for spec in args.uniform:
        knob, value = spec.split("=")
        models[spec] = build(task.model, uniform(derive_space(task.model, example),
                                                 **{knob: type_of(knob)(value)}),
                             example, task.train)
    db = tuning_dir(target) if args.db == "library" else Path(tempfile.mkdtemp())
    built, refs = {}, {}
    for name, model in models.items():
        compiler = Compiler(target, db, trials_per_task=args.trials)
        start = time.perf_counter()
        compiled = compiler.compile(to_relax(model, example))
        print(f"TVM {name}: {compiled.tasks} kernels, {compiled.tuned} tuned, "
              f"{compiled.int8_kernels} int8, weights {compiled.weights.total / 1024:,.0f} KiB, "
              f"{time.perf_counter() - start:.0f} s to tune and build", flush=True)
        built[name] = compiled.executable
        with torch.no_grad():
            refs[name] = model(*example)
    onnx = {"fp32": ort_session_bytes(task.model, example),
            "ours int8": ort_session_bytes(int8, example)}
    onnx["int8"], how = ort_int8(onnx["fp32"], task, args.calibration)
    print(f"ONNX Runtime int8: {how}", flush=True)
    for name, data in onnx.items():  # every ONNX model runs and gives the torch output
        out = ort_session(data).run(None, onnx_feed(ort_session(data), example))[0]
        ref = refs["int8" if "ours" in name else "fp32"].numpy()
        print(f"ONNX Runtime {name}: max |out - torch {'int8' if 'ours' in name else 'fp32'}| "
              f"= {abs(out - ref).max():.3g}")
    once = Measurement(number=10, repeat=3, min_repeat_ms=100)
    samples: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, ex in built.items():
            atol = 1e-3 if name == "fp32" else output_tolerance(policy)
            lat = run_and_time(ex, example, refs[name], once, atol=atol)
            samples.setdefault(f"TVM {name}", []).append(lat.median_ms)
        for name, data in onnx.items():
            samples.setdefault(f"ONNX Runtime {name}", []).append(
                time_onnxruntime(data, example, once))
    ms = {k: statistics.median(v) for k, v in samples.items()}
    acc = {"fp32 (torch)": evaluate(task.model, task.test, task.metric),
           "ours int8 (torch)": evaluate(int8, task.test, task.metric),
           "ONNX Runtime int8": ort_test_accuracy(onnx["int8"], task)}
    print(f"\ntask {task.name}, {args.trials} trials per kernel, medians of {args.rounds} "
          f"interleaved rounds (batch 1, one thread)")
    for name, value in ms.items():
        print(f"{name:<26} {value:7.3f} ms")
    for spec in args.uniform:
        print(f"TVM {spec} vs TVM fp32: {ms['TVM fp32'] / ms[f'TVM {spec}']:.2f}x; vs ONNX "
              f"Runtime int8: {ms['ONNX Runtime int8'] / ms[f'TVM {spec}']:.2f}x; vs ONNX "
              f"Runtime fp32: {ms['ONNX Runtime fp32'] / ms[f'TVM {spec}']:.2f}x")
    print(f"TVM fp32 vs ONNX Runtime fp32: {ms['ONNX Runtime fp32'] / ms['TVM fp32']:.2f}x; "
          f"TVM int8 vs ONNX Runtime int8: {ms['ONNX Runtime int8'] / ms['TVM int8']:.2f}x; "
          f"TVM int8 vs TVM fp32: {ms['TVM fp32'] / ms['TVM int8']:.2f}x (> 1: ours faster)")
    print("test accuracy: " + ", ".join(f"{k} {v:.4f}" for k, v in acc.items()))
    tables = {"TVM fp32": tvm_ops(built["fp32"], example),
              "ONNX Runtime fp32": ort_ops(onnx["fp32"], example),
              "TVM int8": tvm_ops(built["int8"], example),
              "ONNX Runtime int8": ort_ops(onnx["int8"], example)}
    for name, ops in tables.items():
        print(f"\nten costliest ops, {name} (sum {sum(ops.values()):.0f} us per inference, "
              f"{len(ops)} distinct)")
        print("\n".join(top(ops)))


if __name__ == "__main__":
    main()
