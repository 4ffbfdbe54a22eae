"""Compile a candidate with TVM (Relax) for the target, with MetaSchedule-tuned kernels.

Untuned TVM on CPU runs naive loops (60x slower than tuned on the default model), so latency that
ranks candidates must come from tuned kernels. Tuning records go to one database per target
(`<cache>/tuning/<target key>/`), reused across trials and runs: a workload seen before (same
shapes, which channel rounding makes common) costs nothing to tune again. A kernel the database
lacks takes a tuned neighbour's schedule where one replays (search.backend.transfer) and is
tuned only where none does.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from search.backend.artifact import WeightBytes, module_weight_bytes
from search.backend.intrinsics import light_tensor_intrinsics
from search.backend.layout import cpu_layout
from search.backend.runner_args import valid_arguments, valid_rpc_arguments
from search.backend.transfer import ScheduleTransfer
from search.core.errors import TrialFailed
from search.devices.target import TargetSpec

_LOG = logging.getLogger(__name__)

def to_relax(model: nn.Module, example: Any) -> Any:
    """torch.export -> Relax IRModule with the weights bound as constants (folded at compile).
    `example`: a tensor or a tuple of every input (batch 1)."""
    from tvm.relax.frontend.torch import from_exported_program

    inputs = example if isinstance(example, tuple) else (example,)
    try:
        ep = torch.export.export(model.eval(), inputs)
        return from_exported_program(ep, keep_params_as_input=False,
                                     unwrap_unit_return_tuple=True)
    except Exception as exc:  # noqa: BLE001 - every export/import failure is reported the same
        raise TrialFailed(f"model does not export to TVM: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc


def _as_export_decomposes(gm: torch.fx.GraphModule, inputs: tuple) -> torch.fx.GraphModule:
    """Write two ops as torch.export's core-ATen decompositions do, so that both imports give
    the same kernels: average pooling to 1x1 as the mean over H and W, and a Linear with a
    bias on a 2-D input as `addmm(bias, x, weight.T)` (TVM adds the bias on the other side)."""
    import torch.nn.functional as F
    from torch.fx.passes.shape_prop import ShapeProp

    ShapeProp(gm).propagate(*inputs)  # each node's output shape (one forward pass)
    graph = gm.graph

    def module(node: torch.fx.Node) -> nn.Module | None:
        return gm.get_submodule(str(node.target)) if node.op == "call_module" else None

    def arg(node: torch.fx.Node, i: int, name: str) -> Any:
        return node.args[i] if len(node.args) > i else node.kwargs.get(name)

    for node in list(graph.nodes):
        m, new = module(node), None
        if (isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1))) or (
                node.target is F.adaptive_avg_pool2d
                and arg(node, 1, "output_size") in (1, (1, 1), [1, 1])):
            with graph.inserting_before(node):
                new = graph.call_function(torch.mean, (node.args[0], [-1, -2]),
                                          {"keepdim": True})
        elif isinstance(m, nn.Linear) and m.bias is not None:
            x = node.args[0]
            meta = x.meta.get("tensor_meta") if isinstance(x, torch.fx.Node) else None
            if meta is not None and len(meta.shape) == 2:
                with graph.inserting_before(node):
                    w = graph.get_attr(f"{node.target}.weight")
                    b = graph.get_attr(f"{node.target}.bias")
                    wt = graph.call_function(torch.permute, (w, [1, 0]))
                    new = graph.call_function(torch.addmm, (b, x, wt))
        if new is not None:
            node.replace_all_uses_with(new)
            graph.erase_node(node)
    gm.recompile()
    return gm


def traced_relax(model: nn.Module, example: Any) -> Any | None:
    """`to_relax`'s module from torch.fx's symbolic trace: 0.1-0.2 s instead of 3.4-4.4 s on
    MobileNetV2 (bench/RESULTS.md 13.29), since it runs neither torch.export nor export's
    second trace to core ATen. For the kernels a prediction costs, not for a build: the two
    imports agree kernel for kernel on our compressed layers (tests/test_predict.py), and a
    caller checks that they agree on its model (`Compiler.same_kernels`) before relying on it.
    None where the model does not trace symbolically (control flow on values) or does not
    import (TVM's fx importer takes no bfloat16 weights): the caller exports it."""
    from tvm.relax.frontend.torch import from_fx

    inputs = example if isinstance(example, tuple) else (example,)
    try:
        gm = _as_export_decomposes(torch.fx.symbolic_trace(model.eval()), inputs)
        shapes = [(tuple(x.shape), str(x.dtype).removeprefix("torch.")) for x in inputs]
        return from_fx(gm, shapes, keep_params_as_input=False, unwrap_unit_return_tuple=True)
    except Exception:  # noqa: BLE001 - any failure: the caller imports with torch.export
        return None


@dataclass(frozen=True)
class Compiled:
    """A compiled candidate and how much of it runs tuned kernels."""

    executable: Any  # tvm.relax.VMExecutable
    tasks: int  # tunable kernels in the graph
    tuned: int  # of which have a tuning record
    new_tasks: int  # tuned during this compile (not found in the database)
    tuning_s: float
    int8_kernels: int = 0  # integer matmuls and convs in the graph (int8 layers lowered)
    weights: WeightBytes = WeightBytes(0)  # the constants the library carries, as it reads them
    transferred: int = 0  # kernels without a record built on a nearby kernel's schedule
    flops: float = 0.0  # its kernels' floating-point and integer ops, as TVM estimates them

    @property
    def fully_tuned(self) -> bool:
        return self.tuned == self.tasks


def _fused(mod: Any, target: Any) -> Any:
    """The fused-TIR form MetaSchedule extracts tasks from (same passes as compile_relax)."""
    import tvm
    from tvm import relax
    from tvm.relax import pipeline

    with target:
        return tvm.transform.Sequential([
            *pipeline.library_dispatch_passes(target),
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
        ])(mod)


class Compiler:
    """Compiles Relax modules for one target, tuning new workloads into its database."""

    def __init__(self, target: TargetSpec, db_dir: Path, trials_per_task: int,
                 log_dir: Path | None = None, seed: int = 0,
                 budget_s: float | None = None, transfer: bool = True) -> None:
        light_tensor_intrinsics()
        from search.backend.int8 import enable_vnni

        enable_vnni()  # TVM 0.27's VNNI intrinsic fails to build as shipped (search.backend.int8)

        self.spec = target
        self.device = target.device()
        self.target = target.tvm()
        self.trials_per_task = trials_per_task
        self.budget_s = budget_s
        self.seed = seed
        db_dir.mkdir(parents=True, exist_ok=True)
        self.db_dir = db_dir
        self.log_dir = log_dir or db_dir / "logs"
        self._stamp: tuple[int, ...] | None = None
        self.database = self.refresh_database()
        self.tuning_s_total = 0.0
        self.tasks_tuned_total = 0
        self._builder: Any = None
        self._runner: Any = None
        # kernels the database lacks take a tuned neighbour's schedule (search.backend.transfer)
        # instead of being tuned in the compile; False: tune them (or leave them untuned)
        self.transfer = ScheduleTransfer() if transfer else None

    def _files_stamp(self) -> tuple[int, ...]:
        stats = [(self.db_dir / f).stat() if (self.db_dir / f).exists() else None
                 for f in ("workloads.json", "records.json")]
        return tuple(v for st in stats for v in ((st.st_size, st.st_mtime_ns) if st else (-1, -1)))

    def refresh_database(self) -> Any:
        """The target's tuning records as on disk now (other workers may have added some).
        Parsing the files takes seconds per thousand kernels (22 s for a 1,400-kernel library),
        so they are read again only when someone else changed them since this process last
        did; call under the database's lock (every writer holds it)."""
        from tvm.s_tir import meta_schedule as ms

        if self._stamp is None or self._stamp != self._files_stamp():
            self.database = ms.database.JSONDatabase(
                path_workload=str(self.db_dir / "workloads.json"),
                path_tuning_record=str(self.db_dir / "records.json"))
            self._stamp = self._files_stamp()
        return self.database

    def _mark_own_writes(self) -> None:
        """What this process wrote under the lock (records, workloads) is in memory already."""
        self._stamp = self._files_stamp()

    def _workers(self) -> tuple[Any, Any]:
        """Builder and runner, created once: each spawns a process that imports TVM (~3 s)."""
        from tvm.s_tir import meta_schedule as ms

        if self._builder is None:
            m = self.spec.measurement
            evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1,
                                                  min_repeat_ms=min(m.min_repeat_ms, 20),
                                                  enable_cpu_cache_flush=False)
            self._builder = _persistent_builder(self.device.cross_compiler)
            if self.device.local:
                self._runner = ms.runner.LocalRunner(timeout_sec=60, evaluator_config=evaluator,
                                                     f_alloc_argument=valid_arguments)
            else:  # candidates are timed on the device, through the tracker's queue
                host, port = self.device.tracker.rsplit(":", 1)
                self._runner = ms.runner.RPCRunner(
                    rpc_config=ms.runner.RPCConfig(tracker_host=host, tracker_port=int(port),
                                                   tracker_key=self.device.key,
                                                   session_timeout_sec=120),
                    evaluator_config=evaluator, max_workers=1,
                    f_alloc_argument=valid_rpc_arguments)
        return self._builder, self._runner

    @property
    def can_tune(self) -> bool:
        """Tuning is on, the run's tuning budget is not spent, and candidates can be timed:
        MetaSchedule times on a device only through a tracker (its RPCRunner needs one)."""
        within_budget = self.budget_s is None or self.tuning_s_total < self.budget_s
        return (self.trials_per_task > 0 and within_budget
                and (self.device.local or bool(self.device.tracker)))

    def _has_record(self, task: Any) -> bool:
        mod = task.dispatched[0]
        return self.database.query_tuning_record(mod, self.target, task.task_name) is not None

    def _tune(self, tasks: list[Any], progress: Any | None, retry: int = 0) -> None:
        from tvm.s_tir import meta_schedule as ms
        from tvm.s_tir.meta_schedule.relax_integration import extracted_tasks_to_tune_contexts

        n = self.trials_per_task
        ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
        ms_logger.setLevel(logging.WARNING)
        for handler in list(ms_logger.handlers):
            # NOTE: MetaSchedule rebuilds its logging config from its handlers' names for each
            # new log folder and crashes on an unnamed one (a host process's: pytest adds one)
            if handler.get_name() is None:
                ms_logger.removeHandler(handler)
        strategy = ms.search_strategy.EvolutionarySearch(
            population_size=64, init_min_unmeasured=16, genetic_num_iters=2)
        contexts, weights = extracted_tasks_to_tune_contexts(
            tasks, work_dir=str(self.log_dir), strategy=strategy, seed=self.seed + retry)
        builder, runner = self._workers()
        callbacks = list(ms.MeasureCallback.create("default"))
        if progress is not None:
            callbacks.append(_progress_callback(progress))
        ms.tune_tasks(
            tasks=contexts, task_weights=weights, work_dir=str(self.log_dir),
            # NOTE: the budget is n per kernel on average; MetaSchedule's gradient scheduler
            # moves trials to the kernels that dominate latency (up to 4n each)
            max_trials_global=n * len(tasks), max_trials_per_task=4 * n, num_trials_per_iter=n,
            builder=builder, runner=runner, database=self.database,
            measure_callbacks=callbacks,
        )

    def _before_fusion(self, mod: Any) -> Any:
        """The passes every build starts with: BatchNorm folded, convs NHWC / HWIO
        (search.backend.layout), then int8 layers as int8 x int8 kernels (search.backend.int8)."""
        from search.backend.int8 import lower_int8

        return lower_int8(cpu_layout(mod), target=self.target)

    def lower(self, mod: Any) -> Any:
        """The fused-TIR form `compile` builds `mod` from (the same layout, int8 and fusion
        passes), without tuning or code generation: its kernels and its constants."""
        return _fused(self._before_fusion(mod), self.target)

    def kernels_of(self, mod: Any, lowered: bool = False) -> list[Any]:
        """The tunable kernels (MetaSchedule tasks) `compile` would build for `mod` (a Relax
        module, or `lower`'s form of one when `lowered`), so a kernel tuned from here is the one
        a trial meets."""
        from tvm.s_tir import meta_schedule as ms

        fused = mod if lowered else self.lower(mod)
        return list(ms.relax_integration.extract_tasks(fused, self.target))

    @staticmethod
    def same_kernels(a: list[Any], b: list[Any]) -> bool:
        """Whether two `kernels_of` lists hold the same kernels, each called as often."""
        from collections import Counter

        from tvm_ffi import structural_hash

        def digests(kernels: list[Any]) -> Counter:
            return Counter((structural_hash(k.dispatched[0]), int(k.weight)) for k in kernels)

        return digests(a) == digests(b)

    def tune(self, kernels: list[Any], progress: Any | None = None) -> int:
        """Tune the kernels (deduplicated by workload) that the database lacks as a compile
        does (`_tune_missing`: once more those with no valid candidate), under the database's
        lock. Returns how many have a record now (a kernel every candidate of which failed
        both times has none: the next call tries again)."""
        from tvm_ffi import structural_hash

        from search.devices.lock import file_lock

        if not self.can_tune or not kernels:
            return 0
        with file_lock(self.db_dir / ".lock"):
            self.refresh_database()  # records of parallel workers too
            todo, seen = [], set()
            for task in kernels:
                digest = structural_hash(task.dispatched[0])
                if digest not in seen and not self._has_record(task):
                    seen.add(digest)
                    todo.append(task)
            if todo:
                start = time.perf_counter()
                self._tune_missing(todo, progress)
                self.tuning_s_total += time.perf_counter() - start
                self.tasks_tuned_total += len(todo)
            self._mark_own_writes()
        return sum(self._has_record(task) for task in todo)

    def compile(self, mod: Any, progress: Any | None = None, transfer: bool = True) -> Compiled:
        """Tune the module's new workloads (if tuning is on), then build with the database.
        Holds the database's lock throughout: parallel workers share it. `transfer=False`:
        tune what the database lacks even where a neighbour's schedule would replay."""
        from search.devices.lock import file_lock

        with file_lock(self.db_dir / ".lock"):
            try:
                return self._compile(mod, progress, transfer)
            finally:
                self._mark_own_writes()  # new workloads and records: in memory already

    def _compile(self, mod: Any, progress: Any | None, transfer: bool = True) -> Compiled:
        from tvm.s_tir import meta_schedule as ms

        from search.backend.int8 import int8_kernels

        try:
            self.refresh_database()  # records tuned by parallel workers too
            mod = self._before_fusion(mod)
            int8_count = len(int8_kernels(mod))
            fused = _fused(mod, self.target)  # `lower`'s form (the build fuses the same way)
            weights = module_weight_bytes(fused)
            tasks = ms.relax_integration.extract_tasks(fused, self.target)
            flops = kernel_flops(tasks)
            # single-trial tasks (reshapes) have nothing to tune but still get a record
            missing = [t for t in tasks if not self._has_record(t)]
            served = [] if self.transfer is None or not transfer else \
                self.transfer.plan(self.database, missing)
            to_tune = [t for t in missing if all(t is not s for s in served)]
            start = time.perf_counter()
            tuned_now = self._tune_missing(to_tune, progress)
            tuning_s = time.perf_counter() - start
            tuned = sum(self._has_record(t) for t in tasks)
            transferred = sum(1 for t in served if not self._has_record(t))
            try:
                ex = ms.relax_integration.compile_relax(self._serving(transferred), mod,
                                                        self.target, None)
            except Exception:  # noqa: BLE001 - a transferred schedule's fault, or the model's
                if not transferred:
                    raise
                # without the transferred schedules: if this fails too, the model is at fault
                # (raised as usual); if not, tune those kernels after all
                ex = ms.relax_integration.compile_relax(self.database, mod, self.target, None)
                _LOG.warning("a build with %d transferred schedules failed; tuning those "
                             "kernels instead", transferred)
                start = time.perf_counter()
                retune = [t for t in served if not self._has_record(t)]
                retuned = self._tune_missing(retune, progress)
                if retuned:
                    tuned_now += retuned
                    ex = ms.relax_integration.compile_relax(self.database, mod, self.target,
                                                            None)
                tuning_s += time.perf_counter() - start
                tuned, transferred = sum(self._has_record(t) for t in tasks), 0
        except TrialFailed:
            raise
        except Exception as exc:  # noqa: BLE001 - a compile error fails the trial, not the study
            if raised_by_us(exc):
                raise  # a bug in our passes (say, a visitor's AttributeError): not a trial's fault
            msg = str(exc).strip().splitlines()
            raise TrialFailed(f"TVM compile failed: {type(exc).__name__}: "
                              f"{msg[-1] if msg else ''}") from exc
        self.tuning_s_total += tuning_s
        self.tasks_tuned_total += tuned_now
        return Compiled(ex, len(tasks), tuned, tuned_now, tuning_s, int8_count, weights,
                        transferred, flops)

    def _tune_missing(self, missing: list[Any], progress: Any | None) -> int:
        """Tune kernels the database lacks (if tuning is on); how many were tuned."""
        if not missing or not self.can_tune:
            return 0
        if progress is not None:
            progress.reset(total=len(missing) * self.trials_per_task)
            progress.set_description(f"tuning {len(missing)} new kernels")
        self._tune(missing, progress)
        # a kernel all of whose candidates failed to build (a build timeout while the machine
        # is loaded) would run its untuned default schedule, often 10x slower: tune those once
        # more before giving up on them
        failed = [t for t in missing if not self._has_record(t)]
        if failed:
            _LOG.warning("%d kernel(s) got no valid candidate; tuning them again", len(failed))
            self._tune(failed, progress, retry=1)  # (other candidates)
        return len(missing)

    def _serving(self, transferred: int) -> Any:
        """The database a build reads: the records, then the transferred schedules."""
        if not transferred or self.transfer is None:
            return self.database
        from tvm.s_tir import meta_schedule as ms

        return ms.database.OrderedUnionDatabase(self.database, self.transfer.database())


def kernel_flops(kernels: list[Any]) -> float:
    """The ops a model's kernels (MetaSchedule tasks) compute, each times its calls: what a
    compressed model computes less of than the uncompressed one, as TVM counts it."""
    from tvm.s_tir.analysis import estimate_tir_flops

    return sum(int(t.weight) * float(estimate_tir_flops(t.dispatched[0])) for t in kernels)


def raised_by_us(exc: BaseException) -> bool:
    """Whether the innermost frame of an exception is this package's code (a bug to surface),
    rather than TVM's (a compile error of the candidate)."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    package = str(Path(__file__).resolve().parents[1])
    return bool(frames) and str(Path(frames[-1].filename).resolve()).startswith(package)


def _progress_callback(bar: Any) -> Any:
    """A MetaSchedule measure callback that advances a tqdm bar per measured candidate."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class _Progress(PyMeasureCallback):
        def apply(self, task_scheduler: Any, task_id: int, measure_candidates: Any,
                  builder_results: Any, runner_results: Any) -> None:
            bar.update(len(runner_results))

    return _Progress()


def _export_shared(cross_compiler: str | None) -> Any:
    """Builder export: a shared library, cross-compiled for a device (the device needs no gcc)."""

    def export(mod: Any) -> str:
        import tempfile

        path = os.path.join(tempfile.mkdtemp(), "tvm_tmp_mod.so")
        if cross_compiler:
            mod.export_library(path, cc=cross_compiler)
        else:
            mod.export_library(path)
        return path

    return export


def _persistent_builder(cross_compiler: str | None, recycle_after: int = 25,
                        build_timeout_s: float = 30) -> Any:
    """MetaSchedule's LocalBuilder, but its worker process is kept between batches.

    NOTE: LocalBuilder starts a new process per batch (against a worker memory leak); that costs
    ~3 s of Python + TVM import per tuned kernel here, more than building the candidates. We keep
    one worker and recycle it every `recycle_after` batches instead. A candidate whose build
    takes over `build_timeout_s` (heavily unrolled code: LLVM can take minutes) is dropped, so
    it never becomes the record every later compile pays for.
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder import local_builder as lb
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    export = _export_shared(cross_compiler)

    @derived_object
    class _Builder(PyBuilder):
        def __init__(self) -> None:
            super().__init__()
            self.pool: Any = None
            self.uses = 0

        def build(self, build_inputs: list[Any]) -> list[Any]:
            if self.pool is None or self.uses >= recycle_after:
                if self.pool is not None:
                    self.pool.shutdown()
                self.pool = PopenPoolExecutor(max_workers=1, timeout=build_timeout_s,
                                              initializer=light_tensor_intrinsics)
                self.uses = 0
            self.uses += 1
            args = [(None, export, b.mod, b.target, lb._serialize_params(b.params))
                    for b in build_inputs]
            results = []
            for r in self.pool.map_with_error_catching(lambda x: lb._worker_func(*x), args):
                if r.status == StatusKind.COMPLETE:
                    results.append(BuilderResult(r.value, None))
                else:
                    results.append(BuilderResult(None, f"build failed: {r.status}: {r.value}"))
            return results

    return _Builder()
