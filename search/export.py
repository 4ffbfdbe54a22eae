"""Export a chosen front point: ONNX (checked in ONNX Runtime), the TVM library, its policy."""

from __future__ import annotations

import inspect
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from search.data import Inputs, as_inputs
from search.errors import UserError
from search.measure import onnx_feed


@dataclass(frozen=True)
class Exported:
    onnx: Path
    onnx_max_abs_error: float
    tvm_library: Path
    policy: Path


def input_names(model: nn.Module, example: Inputs) -> list[str]:
    """ONNX input names: the forward's own parameter names (input_ids, attention_mask, ...)."""
    try:
        params = [p.name for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    if len(params) >= len(example):
        return params[:len(example)]
    return ["input"] if len(example) == 1 else [f"input{i}" for i in range(len(example))]


def _export(model: nn.Module, example: Any, f: Any) -> None:
    """TorchScript-based exporter: no onnxscript graph rewriting, stable op set 17."""
    inputs = as_inputs(example)
    torch.onnx.export(model.eval(), inputs, f, input_names=input_names(model, inputs),
                      output_names=["output"], opset_version=17, dynamo=False)


def to_onnx(model: nn.Module, example: Any, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            _export(model, example, str(path))
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"model does not export to ONNX: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}") from None


def check_onnx(path: Path, example: Any, reference: torch.Tensor, atol: float) -> float:
    """Run the ONNX file in ONNX Runtime; its output must match PyTorch's."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, onnx_feed(sess, example))[0]
    err = float(np.abs(out - reference.numpy()).max())
    if not err <= atol:
        raise UserError(f"ONNX Runtime output differs from PyTorch by {err:.3g} (> {atol})")
    return err


def ort_session_bytes(model: nn.Module, example: Any) -> bytes:
    """The model as ONNX bytes (for benchmarks that time ONNX Runtime on the same model)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _export(model, example, buf)
    return buf.getvalue()


def export_trial(run_dir: Path, trial: int, out: Path, task: Any = None) -> Exported:
    """Rebuild trial `trial` of a run from its policy and weights (the long fine-tune's, if
    `search finetune` ran), and write it out. `task`: the run's Task (loaded from the run's
    entry point when not given)."""
    import shutil

    from search.compile import Compiler, to_relax
    from search.compress import output_tolerance
    from search.run import RunInfo, setup_threads, tuning_dir
    from search.task import load_task

    info = RunInfo.load(run_dir)
    trial_dir = run_dir / "trials" / f"{trial:04d}"
    target = info.load_target()
    setup_threads(target)
    if task is None:
        task = load_task(info.config.task, **info.config.task_args)
    model, policy = load_trial_model(run_dir, trial, task)
    with torch.no_grad():
        reference = model(*task.example)
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / "model.onnx"
    to_onnx(model, task.example, onnx_path)
    err = check_onnx(onnx_path, task.example, reference, atol=output_tolerance(policy, 1e-4))
    compiler = Compiler(target, tuning_dir(target), trials_per_task=0)  # reuse tuned kernels
    compiled = compiler.compile(to_relax(model, task.example))
    lib = out / f"model_{target.name}.so"
    if target.cross_compiler:
        compiled.executable.export_library(str(lib), cc=target.cross_compiler)
    else:
        compiled.executable.export_library(str(lib))
    shutil.copy(trial_dir / "policy.yaml", out / "policy.yaml")
    return Exported(onnx_path, err, lib, out / "policy.yaml")


def load_trial_model(run_dir: Path, trial: int, task: Any) -> tuple[nn.Module, Any]:
    """A trial's deployed model: rebuilt from its policy, with its fine-tuned weights (those of
    the long fine-tune, `finetuned.pt`, when `search finetune` ran)."""
    from search.compress import build
    from search.policy import Policy

    trial_dir = run_dir / "trials" / f"{trial:04d}"
    if not (trial_dir / "policy.yaml").exists():
        raise UserError(f"run {str(run_dir)!r} has no trial {trial}; "
                        f"pick one from `search front {run_dir}`")
    policy = Policy.load(trial_dir / "policy.yaml")
    model = build(task.model, policy, task.example, task.train, task.loss)
    if all(lp.is_identity for lp in policy.layers.values()):
        pass  # the uncompressed model: the task's own weights
    elif (trial_dir / "finetuned.pt").exists():
        model.load_state_dict(torch.load(trial_dir / "finetuned.pt", weights_only=True))
    elif (trial_dir / "model.pt").exists():
        model.load_state_dict(torch.load(trial_dir / "model.pt", weights_only=True))
    else:
        raise UserError(f"trial {trial} has no saved weights (it failed, or is off the front); "
                        f"pick a trial from `search front {run_dir}`")
    return model.eval(), policy
