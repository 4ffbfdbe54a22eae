"""Export a chosen front point: the TVM library (the artifact the front measured: its weight
bytes are read back from the file), an ONNX model checked in ONNX Runtime, and its policy.

The folder is written whole or not at all: files go to a sibling `.partial` folder that
replaces the destination only when every file is written and checked.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from search.backend.artifact import WeightBytes, library_weight_bytes
from search.backend.onnx import check_onnx, to_onnx
from search.compress.precision import Half
from search.core.data import check_inputs
from search.study.runfolder import load_trial_model


@dataclass(frozen=True)
class Exported:
    tvm_library: Path
    weight_bytes: WeightBytes  # read back from the library file: the front's size_bytes
    onnx: Path
    onnx_max_abs_error: float
    policy: Path
    notes: list[str] = field(default_factory=list)  # how the ONNX form differs, if it does


def onnx_form(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """The model in a form ONNX Runtime's CPU provider runs: bf16 layers (it has no bf16
    MatMul or Conv) become fp32 layers holding the same bf16-rounded weights. Returns the model
    (a copy when changed) and a note per change."""
    halves = [(name, m) for name, m in model.named_modules()
              if isinstance(m, Half) and m.dtype == torch.bfloat16]
    if not halves:
        return model, []
    model = copy.deepcopy(model)
    for name, _ in halves:
        half = model.get_submodule(name)
        layer = half.layer.float()
        layer.bias = half.bias
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, layer)
    return model, [f"{len(halves)} bf16 layer(s) exported as fp32 layers with the same "
                   f"bf16-rounded weights (ONNX Runtime's CPU provider has no bf16 MatMul/Conv); "
                   f"the TVM library computes them in bf16"]


def export_trial(run_dir: Path, trial: int, out: Path, task: Any = None) -> Exported:
    """Rebuild trial `trial` of a run from its policy and weights (the long fine-tune's, if
    `search finetune` ran), and write it out. `task`: the run's Task (loaded from the run's
    entry point when not given)."""
    from search.backend.compile import Compiler, to_relax
    from search.compress.build import output_tolerance
    from search.core.task import load_task
    from search.study.runfolder import RunInfo, setup_threads, tuning_dir

    info = RunInfo.load(run_dir)
    target = info.load_target()
    setup_threads(target)
    if task is None:
        task = load_task(info.config.task, **info.config.task_args)
    model, policy = load_trial_model(run_dir, trial, task)
    checks = check_inputs(task.train, task.example)
    with torch.no_grad():
        reference = model(*task.example)
        more = [(x, model(*x)) for x in checks]
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        compiler = Compiler(target, tuning_dir(target), trials_per_task=0)  # reuse tuned kernels
        compiled = compiler.compile(to_relax(model, task.example))
        lib_name = f"model_{target.name}.so"
        if target.cross_compiler:
            compiled.executable.export_library(str(partial / lib_name), cc=target.cross_compiler)
        else:
            compiled.executable.export_library(str(partial / lib_name))
        weights = library_weight_bytes(partial / lib_name)
        runnable, notes = onnx_form(model)
        to_onnx(runnable, task.example, partial / "model.onnx")
        err = check_onnx(partial / "model.onnx", task.example, reference,
                         atol=output_tolerance(policy, 1e-4), more=more)
        policy.save(partial / "policy.yaml")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return Exported(out / lib_name, weights, out / "model.onnx", err, out / "policy.yaml", notes)
