"""Small tasks for the tests: entry points as a user would write them (`tests.tasks:tiny`)."""

from __future__ import annotations

import torch

from search.data import Split
from search.task import Task, digits


def tiny(width: int = 64) -> Task:
    """The default digits task with a narrow head: trains in seconds."""
    return digits(width=width, epochs=2)


def nan_data() -> Task:
    """Like `tiny`, but its fine-tuning data holds NaN: every fine-tune fails, on purpose."""
    task = tiny()
    (x,), y = task.train.tensors
    x = x.clone()
    x[:, 0, 0, 0] = float("nan")
    task.train = Split((x, y), "train")
    return task


def not_a_task() -> int:
    return 42


def make_input(n: int = 1) -> torch.Tensor:
    return torch.zeros(n, 1, 16, 16)
