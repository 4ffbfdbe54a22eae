"""One side-by-side table for a finished run of a real task (or any run): the uncompressed model
under torch eager, ONNX Runtime fp32 and int8, tuned TVM; the run's best front point within
`--max-loss` of the uncompressed test accuracy under TVM and ONNX Runtime; and a uniform 30 %
Torch-Pruning channel cut, fine-tuned, compiled, tuned and timed exactly as a trial is.

Every figure is measured here, in this one process (batch 1, one thread, median of repeats,
the run's target measurement settings), except the front point's size, read from front.json.
Ratios are to the uncompressed model under tuned TVM (> 1: faster). The machine is shared:
quote the ratios, not the absolute times.

    python bench/bench_real.py /tmp/exp/mnv2                 # search.tasks:mobilenet_v2
    python bench/bench_real.py runs/minilm --max-loss 0.02   # search.tasks:minilm_text
    python bench/bench_real.py RUN --no-uniform              # skip the 30 % cut (it tunes)

int8 under ONNX Runtime: a model with Conv2d layers gets static QDQ quantization, per channel,
calibrated on --calibration training inputs; one without (an encoder) gets dynamic
quantization (weights QInt8, MatMul/Linear only). Its test accuracy is run in ONNX Runtime on
the same batch-1 graph that is timed, over the whole test split.

The run folder is only read: tuning logs of new kernels (the 30 % cut's) go to a temporary
folder, tuning records to the target's shared database (as a trial's do).
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TVM_NUM_THREADS", "1")
warnings.filterwarnings("ignore", category=FutureWarning)  # torch.export's LeafSpec notice

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from search.api import open_front  # noqa: E402
from search.backend.compile import Compiler  # noqa: E402
from search.backend.measure import compile_and_time  # noqa: E402
from search.backend.onnx import onnx_feed, ort_session_bytes, time_onnxruntime  # noqa: E402
from search.compress.build import output_tolerance  # noqa: E402
from search.compress.channels import channel_groups  # noqa: E402
from search.compress.policy import LayerPolicy, Policy  # noqa: E402
from search.core.data import evaluate  # noqa: E402
from search.core.errors import TrialFailed, UserError  # noqa: E402
from search.core.task import Task  # noqa: E402
from search.devices.lock import device_lock  # noqa: E402
from search.devices.target import Measurement, TargetSpec  # noqa: E402
from search.jobs.run import make_compiler  # noqa: E402
from search.study.evaluate import Evaluator  # noqa: E402
from search.study.runfolder import RunInfo, load_trial_model, setup_threads  # noqa: E402


@dataclass
class Row:
    name: str
    ms: float | None  # None: not measured (see how)
    accuracy: float | None  # test split
    size: str
    how: str


def one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:160]


def cpu_name() -> str:
    import tvm

    llvm = tvm.target.codegen.llvm_get_system_cpu()
    model, flags = platform.processor() or "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16",
                       "avx512_fp16", "amx_int8") if f in flags]
    return f"{model}; llvm cpu {llvm}; {os.cpu_count()} cores; ISA {' '.join(isa) or '?'}"


def time_torch(model: nn.Module, example: tuple[torch.Tensor, ...], settings: Measurement
               ) -> float:
    """Median ms of torch eager at batch 1, timed like time_onnxruntime: warm-up, then `repeat`
    repeats of at least `number` calls and `min_repeat_ms`."""
    model.eval()
    with torch.inference_mode():
        for _ in range(5):
            model(*example)
        samples = []
        for _ in range(settings.repeat):
            n, start = 0, time.perf_counter()
            while n < settings.number or (time.perf_counter() - start) * 1e3 < \
                    settings.min_repeat_ms:
                model(*example)
                n += 1
            samples.append((time.perf_counter() - start) * 1e3 / n)
            if settings.cooldown_ms:
                time.sleep(settings.cooldown_ms / 1e3)
    return statistics.median(samples)


def ort_session(onnx_bytes: bytes) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])


def ort_test_accuracy(onnx_bytes: bytes, task: Task) -> float:
    """The task's metric on the whole test split, run in ONNX Runtime on the timed (batch-1)
    graph, one example at a time."""
    sess = ort_session(onnx_bytes)
    outs, labels = [], []
    for b in task.test.batches(256):
        for i in range(len(b)):
            feed = onnx_feed(sess, tuple(t[i:i + 1] for t in b.inputs))
            outs.append(torch.from_numpy(np.asarray(sess.run(None, feed)[0])))
        labels.append(b.labels)
    return float(task.metric(torch.cat(outs), torch.cat(labels)))


def has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def ort_int8(onnx_bytes: bytes, task: Task, calibration: int) -> tuple[bytes, str]:
    """The fp32 ONNX model quantized by ONNX Runtime: static QDQ per channel, calibrated on
    training inputs, for a CNN; dynamic (weights QInt8) otherwise."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        src, pre, dst = (Path(tmp) / n for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        src.write_bytes(onnx_bytes)
        try:  # ORT's recommended first step (shape inference, graph optimization)
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            note = "pre-processed"
        except Exception as exc:  # noqa: BLE001 - optional step: quantize the raw graph
            pre, note = src, f"no pre-process ({one_line(exc)})"
        if not has_conv(task.model):
            quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8)
            return dst.read_bytes(), f"ort quantize_dynamic (weights QInt8), {note}"
        inputs = task.train.inputs(calibration)
        names = [i.name for i in ort_session(onnx_bytes).get_inputs()]

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.i = 0

            def get_next(self) -> dict[str, np.ndarray] | None:
                if self.i >= len(inputs[0]):
                    return None
                feed = {n: t[self.i:self.i + 1].numpy() for n, t in zip(names, inputs,
                                                                         strict=True)}
                self.i += 1
                return feed

        quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8)
        return dst.read_bytes(), (f"ort quantize_static QDQ per-channel, {len(inputs[0])} "
                                  f"train inputs calibration, {note}")


def kib(n: int | None) -> str:
    return "" if n is None else f"{n / 1024:,.0f} KiB"


def tvm_time(compiler: Compiler, model: nn.Module, example: tuple[torch.Tensor, ...],
             target: TargetSpec, atol: float) -> tuple[float, str]:
    """Compile with the run's tuning database (records reused) and time as a trial is."""
    timed = compile_and_time(model, example, compiler, target, atol=atol)
    lat, compiled, source = timed.latency, timed.compiled, timed.source
    new = f", {compiled.new_tasks} tuned now" if compiled.new_tasks else ""
    return lat.median_ms, (f"TVM {source}, kernels {compiled.tuned}/{compiled.tasks} from db"
                           f"{new}; IQR {lat.p25_ms:.3f}-{lat.p75_ms:.3f}")


def local_time(fn: Callable[[], float], target: TargetSpec) -> float:
    with device_lock(target):  # never beside a trial's timing on this machine
        return fn()


def uniform_cut(task: Task, sparsity: float) -> Policy:
    """`sparsity` of the channels of every prunable root (a channel group's first layer)."""
    LayerPolicy(sparsity=sparsity)  # raises if the knob refuses the value
    roots = channel_groups(task.model, task.example)
    return Policy({name: LayerPolicy(sparsity=sparsity) for name in roots})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished `search run` folder (front.json)")
    parser.add_argument("--max-loss", type=float, default=0.01,
                        help="test accuracy the front point may lose [0.01 = 1 point]")
    parser.add_argument("--sparsity", type=float, default=0.3,
                        help="the uniform channel cut's sparsity [0.3]")
    parser.add_argument("--no-uniform", action="store_true",
                        help="skip the uniform cut (it fine-tunes and may tune new kernels)")
    parser.add_argument("--calibration", type=int, default=256,
                        help="training inputs calibrating ONNX Runtime's static int8 [256]")
    args = parser.parse_args()

    try:
        front = open_front(args.run)
    except UserError as exc:
        sys.exit(f"error: {exc}")
    info = RunInfo.load(args.run)
    target = info.load_target()
    if target.reach != "local":
        sys.exit(f"error: run target {target.name} is reached by {target.reach}; this bench "
                 f"times torch and ONNX Runtime on this machine, so it needs a local target")
    setup_threads(target)
    config = info.config
    task = front.task
    example = task.example
    settings = target.measurement
    base = front.baseline
    if base is None:
        sys.exit(f"error: {args.run}/front.json has no baseline (uncompressed) trial")
    counts = front.data.get("trials", {})
    failed = counts.get("failed", "?")
    failed = len(failed) if isinstance(failed, list) else failed
    print(f"run {args.run}: task {config.task} ({task.name}), target {target.name} "
          f"({target.tvm()}), budget {info.budget_ms:g} ms; trials asked {config.trials}, "
          f"complete {counts.get('complete', '?')}, failed {failed}")
    print(f"machine: {cpu_name()}; torch {torch.__version__}, threads torch "
          f"{torch.get_num_threads()} / TVM {os.environ.get('TVM_NUM_THREADS')}; timing: batch 1, "
          f"median of {settings.repeat} repeats (each >= {settings.number} calls and "
          f">= {settings.min_repeat_ms} ms)", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="bench_real-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    # the run's compiler settings (its tuning database, trials per kernel, seed, budget), with
    # MetaSchedule's logs here instead of in the run folder
    compiler = make_compiler(target, config, tmp)
    model = task.model.eval()
    rows: list[Row] = []
    base_size = kib(base.size_bytes)

    def step(what: str) -> None:
        print(f"  measuring: {what} ...", file=sys.stderr, flush=True)

    # 4 first: the reference of every ratio
    step("uncompressed, TVM")
    tvm_ms, how = tvm_time(compiler, model, example, target, 1e-3)
    tvm_row = Row("uncompressed, TVM (run's tuning db)", tvm_ms, base.test_accuracy, base_size,
                  f"{how}; acc: trial {base.trial} (front.json)")

    step("uncompressed, torch eager")
    torch_acc = evaluate(model, task.test, task.metric)
    rows.append(Row("uncompressed, torch eager", local_time(
        lambda: time_torch(model, example, settings), target), torch_acc, base_size,
        "torch eager, inference_mode, 1 thread; acc: torch on test split"))

    step("uncompressed, ONNX Runtime fp32")
    onnx = ort_session_bytes(model, example)
    rows.append(Row("uncompressed, ONNX Runtime fp32", local_time(
        lambda: time_onnxruntime(onnx, example, settings), target),
        ort_test_accuracy(onnx, task), f"{kib(len(onnx))} onnx",
        "ORT CPU EP 1 thread, opset 17; acc: ORT on test split"))

    step("uncompressed, ONNX Runtime int8 (quantizing)")
    try:
        q, qhow = ort_int8(onnx, task, args.calibration)
        rows.append(Row("uncompressed, ONNX Runtime int8", local_time(
            lambda: time_onnxruntime(q, example, settings), target),
            ort_test_accuracy(q, task), f"{kib(len(q))} onnx",
            f"{qhow}; ORT 1 thread; acc: ORT int8 on test split"))
    except Exception as exc:  # noqa: BLE001 - a quantizer failure is a row, not a crash
        rows.append(Row("uncompressed, ONNX Runtime int8", None, None, "",
                        f"failed: {one_line(exc)}"))
    rows.append(tvm_row)

    # 5: the front's fastest point within max-loss of the uncompressed TEST accuracy
    others = [p for p in front.points if p.trial != base.trial]
    within = [p for p in others if p.test_accuracy >= base.test_accuracy - args.max_loss]
    if within:
        best = min(within, key=lambda p: p.latency_ms)
        pick = (f"fastest front point within {100 * args.max_loss:g} pt of "
                f"{100 * base.test_accuracy:.2f}%")
    elif others:
        best = max(others, key=lambda p: p.test_accuracy)
        pick = (f"NO front point within {100 * args.max_loss:g} pt of "
                f"{100 * base.test_accuracy:.2f}%: the most accurate one instead")
    else:
        best, pick = None, "the front holds only the uncompressed model"
    print(f"front point: {pick}" + ("" if best is None else
          f": trial {best.trial} ({100 * best.test_accuracy:.2f}%, search measured "
          f"{best.latency_ms:.3f} ms {best.latency_source})"), flush=True)
    if best is not None:
        small, policy = load_trial_model(args.run, best.trial, task)
        label = f"front trial {best.trial}"
        step(f"{label}, TVM")
        try:
            ms, how = tvm_time(compiler, small, example, target, output_tolerance(policy))
        except TrialFailed as exc:
            ms, how = None, f"TVM failed: {exc}"
        rows.append(Row(f"{label}, TVM (run's tuning db)", ms, best.test_accuracy,
                        kib(best.size_bytes),
                        f"{how}; acc+size: front.json (search: {best.latency_ms:.3f} ms)"))
        step(f"{label}, ONNX Runtime fp32")
        try:
            small_onnx = ort_session_bytes(small, example)
            ms = local_time(lambda: time_onnxruntime(small_onnx, example, settings), target)
            rows.append(Row(f"{label}, ONNX Runtime fp32", ms, best.test_accuracy,
                            f"{kib(len(small_onnx))} onnx",
                            "ORT CPU EP 1 thread (the deployed graph as exported); "
                            "acc: front.json"))
        except Exception as exc:  # noqa: BLE001 - int8 layers may not export or run
            rows.append(Row(f"{label}, ONNX Runtime fp32", None, None, "",
                            f"not run: {one_line(exc)}"))

    # 6: a uniform channel cut, evaluated exactly as a trial is
    if not args.no_uniform:
        label = f"uniform {100 * args.sparsity:g}% channel cut"
        step(f"{label} (fine-tune {config.finetune_steps} steps, compile, tune "
             f"{config.tune_trials_per_task}/kernel, time)")
        try:
            policy = uniform_cut(task, args.sparsity)
            evaluator = Evaluator(task, target, compiler,
                                  dataclasses.replace(config, latency="measured",
                                                      early_stop=False))
            start = time.perf_counter()
            result, cut = evaluator(policy)
            wall = time.perf_counter() - start
            rows.append(Row(label, result.latency.median_ms, result.test_accuracy,
                            kib(result.size_bytes),
                            f"Evaluator: {len(policy.layers)} roots, fine-tune "
                            f"{config.finetune_steps} steps, TVM {result.latency_source}, "
                            f"{result.new_kernels}/{result.kernels} kernels tuned now "
                            f"({result.tuning_s:.0f} s), {wall:.0f} s in all; "
                            f"val {100 * result.val_accuracy:.2f}%"))
        except (TrialFailed, ValueError, UserError) as exc:
            rows.append(Row(label, None, None, "", f"failed: {one_line(exc)}"))

    print()
    name_w = max(len(r.name) for r in rows)
    print(f"{'configuration':<{name_w}}  {'median ms':>9}  {'vs TVM':>7}  {'test %':>6}  "
          f"{'size':>14}  how measured")
    for r in rows:
        ms = f"{r.ms:9.3f}" if r.ms is not None else f"{'-':>9}"
        ratio = f"{tvm_ms / r.ms:6.2f}x" if r.ms else f"{'-':>7}"
        acc = f"{100 * r.accuracy:6.2f}" if r.accuracy is not None else f"{'-':>6}"
        print(f"{r.name:<{name_w}}  {ms}  {ratio}  {acc}  {r.size:>14}  {r.how}")
    if ":tuned" not in tvm_row.how:
        print("NOTE: the uncompressed model's TVM kernels are not all tuned (see its row), so "
              "the ratios are to a slow reference: tune the run (tune_trials_per_task > 0)")
    print("vs TVM: the uncompressed model's TVM median divided by the row's (> 1: faster). "
          "size: stored weight bytes at the policy's precision (front.json / model_stats), or "
          "the ONNX file. All latencies measured in this process, one after another, on a "
          "shared machine: compare ratios, not absolute times.")


if __name__ == "__main__":
    main()
