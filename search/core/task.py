"""A task: the trained model to compress, its data, its metric and an example input.

The built-in default is a real pretrained model (search.tasks: ImageNet MobileNetV2
fine-tuned to a real image set). The digits tasks here (scikit-learn's bundled 8x8 digits,
upsampled to 16x16) are small fixtures for tests: a wide MLP head, residual, MobileNetV2-style
and transformer models. A user's own task is a `Task` object or any `module:function` returning
one.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from search.core.data import Loss, Metric, Split, accuracy, as_inputs, cross_entropy, with_output
from search.core.errors import UserError
from search.core.files import write_atomically

DEFAULT_TASK = "search.tasks:mobilenet_v2"  # ImageNet MobileNetV2 on ELPV
PYTHON_TASK = "python:"  # a run made from a Task object in Python (search.api), not a string


@dataclass
class Task:
    """Everything the search needs to know about a model.

    `train`, `val`, `test`: `(inputs, labels)` tensors or any re-iterable of such batches (a
    torch DataLoader); inputs a tensor or a tuple of tensors. Validation chooses (sensitivity,
    early stopping, the sampler's objective), test reports (the front's accuracy): test must be
    data that chose nothing. `example`: batch 1 of every input, what is compiled and timed.
    `output` selects the tensor to distill and score when the model returns a tuple or dict.
    """

    name: str
    model: nn.Module  # trained, in eval mode
    train: Any  # fine-tuning, channel importance, calibration
    val: Any  # chooses: sensitivity, early stopping, the sampler's objective
    example: Any  # a tensor or tuple of tensors, batch 1
    metric: Metric = accuracy  # outputs, labels -> higher is better
    test: Any = None  # reports: the front's accuracy
    loss: Loss = cross_entropy  # outputs, labels -> scalar (fine-tune, Fisher, importance)
    output: str | int | None = None  # dict key / tuple position of the output to use

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise UserError(f"task {self.name!r}: model must be a torch.nn.Module, got "
                            f"{type(self.model).__name__}")
        try:
            self.example = as_inputs(self.example)
        except TypeError as exc:
            raise UserError(f"task {self.name!r} example: {exc}") from None
        if any(len(t) != 1 for t in self.example):
            raise UserError(f"task {self.name!r}: example must be batch 1 (what is compiled "
                            f"and timed); got batch sizes {[len(t) for t in self.example]}")
        if self.test is None:
            raise UserError(f"task {self.name!r} has no test split: pass Task(test=...), data "
                            f"that chooses nothing, so the front's accuracy is honest")
        self.train = Split(self.train, "train")
        self.val = Split(self.val, "val")
        self.test = Split(self.test, "test")
        self.model = with_output(self.model.eval(), self.output, self.example)


def cache_dir() -> Path:
    """Where trained default models and tuning databases live (SEARCH_CACHE_DIR overrides)."""
    root = os.environ.get("SEARCH_CACHE_DIR") or Path.home() / ".cache" / "search"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def trained_once(model: nn.Module, name: str, key: str,
                 fit: Callable[[nn.Module], object]) -> nn.Module:
    """`model` with the weights `fit` trains, trained once and cached under the task cache by
    `name` and a digest of `key` (every setting that changes the weights); in eval mode."""
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    path = cache_dir() / "tasks" / f"{name}-{digest}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        fit(model)
        write_atomically(path, lambda tmp: torch.save(model.state_dict(), tmp))
    return model.eval()


def resolve_entry_point(spec: str) -> Callable[..., Task]:
    """`module:function` -> the function, or a one-line UserError saying what is wrong."""
    module_name, sep, func_name = spec.partition(":")
    if not sep or not module_name or not func_name:
        raise UserError(f"task entry point {spec!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's to fix
        raise UserError(f"task entry point {spec!r}: cannot import {module_name!r} "
                        f"({type(exc).__name__}: {exc})") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise UserError(f"task entry point {spec!r}: {module_name!r} has no function "
                        f"{func_name!r}")
    return func


def load_task(spec: str | Task = DEFAULT_TASK, **kwargs: object) -> Task:
    """Build a task from its entry point (keyword arguments from the config's `task_args`),
    or take a Task object as it is. A function that rejects its arguments or raises is a
    one-line UserError naming it."""
    if isinstance(spec, Task):
        return spec
    if spec.startswith(PYTHON_TASK):
        raise UserError(f"this run was made from a Task object in Python ({spec[7:]!r}), which "
                        f"cannot be rebuilt from the run folder; pass it again: "
                        f"search.open_front(RUN_FOLDER, task)")
    func = resolve_entry_point(spec)
    try:
        inspect.signature(func).bind(**kwargs)
    except TypeError as exc:
        params = ", ".join(inspect.signature(func).parameters) or "no arguments"
        raise UserError(f"task_args for {spec!r}: {exc} (it takes: {params})") from None
    except ValueError:  # no signature to check (a builtin): let the call say
        pass
    try:
        task = func(**kwargs)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's code: one line, not a traceback
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UserError(f"task entry point {spec!r} raised {type(exc).__name__}: {first}"
                        ) from None
    if not isinstance(task, Task):
        raise UserError(f"task entry point {spec!r} returned {type(task).__name__}, not a Task")
    task.model.eval()
    return task
