"""The integer program's latency cost, measured: each layer's op(s) under each of its options,
compiled alone with the run's compiler and timed on the target (the per-layer latency table,
search.backend.latency_table), in place of the multiply-add estimate.

Why: on MobileNetV2 the estimate (MACs x a per-precision factor) is a poor latency model: seeds
solved for 45-75 % of the estimated cost measured 0.87-0.98 of the uncompressed latency
(bench/RESULTS.md 13.5), because 1x1 and depthwise kernels are memory-bound and a factorized
layer adds a kernel. A timed op says that; a count of multiply-adds does not.

Decisions:
- One option of one layer is built as the whole model with only that layer changed
  (`search.compress.build`: the same restructure and precision steps a trial takes, int8
  calibrated on the training split), and the ops at that layer's name are timed with the input
  the uncompressed model gives it. So the cost of pruning a layer's output channels is its own
  op's; the next layer's narrower input is not credited to it (the program is separable by
  layer, as the estimate is).
- Ops repeat across layers and options (channels and ranks on the target's granularity): each
  distinct op is compiled and timed once and kept in the table next to the tuning database,
  shared by every later run on the target. Kernels compile as a trial's do (their own records,
  or schedules transferred from a tuned neighbour, the rest tuned).
- The cost is still a sum of ops timed alone: activations, the VM's calls and the copies
  between kernels are left out (13.6: a record sum was 0.56 of the whole). The seeds it gives
  are built and timed whole like any trial.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from search.backend.latency_table import LatencyTable, LayerOp, layer_ops
from search.compress.build import build
from search.compress.knob import REGISTRY
from search.compress.policy import LayerPolicy, Policy
from search.core.hooks import layer_inputs
from search.core.task import Task
from search.study.allocate import Options


def option_ops(task: Task, knobs: list[str], options: Options, int8_kind: str
               ) -> dict[tuple[str, tuple], list[LayerOp]]:
    """(layer, option values) -> the ops that layer becomes under that option."""
    inputs = layer_inputs(task.model, task.example, list(options))
    identity = tuple(REGISTRY[k].identity for k in knobs)
    out: dict[tuple[str, tuple], list[LayerOp]] = {}
    for name, values_of in options.items():
        for values in values_of:
            if values == identity:
                model = task.model
            else:
                lp = LayerPolicy(**dict(zip(knobs, values, strict=True)))
                model = build(task.model, Policy({name: lp}), task.example, task.train,
                              task.loss)
            out[(name, values)] = layer_ops(model.get_submodule(name), inputs[name], int8_kind)
    return out


def measured_options(task: Task, knobs: list[str], options: Options, compiler: Any,
                     progress: Callable[[int], Any] | None = None
                     ) -> tuple[Options, dict[str, Any]]:
    """`options` with each cost replaced by the summed measured latency (ms) of the layer's
    ops under that option; and what it took (ops, newly measured, the label of the figures).
    `progress(total)` may return a tqdm-like bar, updated per op measured."""
    table = LatencyTable.for_compiler(compiler)
    ops = option_ops(task, knobs, options, table.int8_kind)
    distinct = {op.key: op for found in ops.values() for op in found}
    todo = [op for key, op in distinct.items() if key not in table.layers]
    bar = progress(len(todo)) if progress is not None and todo else None
    try:
        measured = table.measure_ops(todo, compiler, progress=bar, together=False)
    finally:
        if bar is not None:
            bar.close()
    layers = table.layers
    costed: Options = {}
    for name, values_of in options.items():
        costed[name] = {values: (drop, sum(float(layers[op.key]["ms"])
                                           for op in ops[(name, values)]), size)
                        for values, (drop, _estimate, size) in values_of.items()}
    labels = sorted({layers[key]["tuning"] for key in distinct})
    return costed, {"source": f"measured:{compiler.spec.name}:layer ops alone",
                    "ops": len(distinct), "measured_now": len(measured),
                    "tuning": labels}
