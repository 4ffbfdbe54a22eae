"""A task: the trained model to compress, its data, its metric and an example input.

The built-in default is a CNN on scikit-learn's bundled digits (upsampled to 16x16), with a wide
fully-connected head so that its uncompressed latency sits well above the 5 ms default budget on a
laptop-class CPU. Residual, MobileNetV2-style and transformer tasks on the same data exercise
the other structures users have. A user's own task is any `module:function` returning a `Task`.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from search.errors import UserError
from search.models import DigitsNet, MobileNetTiny, ResNetTiny, TransformerTiny

DEFAULT_TASK = "search.task:digits"


@dataclass
class Task:
    """Everything the search needs to know about a model."""

    name: str
    model: nn.Module  # trained, in eval mode
    train: tuple[torch.Tensor, torch.Tensor]  # inputs, labels (fine-tuning)
    val: tuple[torch.Tensor, torch.Tensor]  # held-out inputs, labels (the metric)
    example: torch.Tensor  # one input, batch 1: what is compiled and timed
    metric: Callable[[torch.Tensor, torch.Tensor], float]  # logits, labels -> higher is better


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == labels).float().mean())


def cache_dir() -> Path:
    """Where trained default models and tuning databases live (SEARCH_CACHE_DIR overrides)."""
    root = os.environ.get("SEARCH_CACHE_DIR") or Path.home() / ".cache" / "search"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def digits_data(seed: int = 0) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """scikit-learn's digits, upsampled to 16x16, split 80/20 stratified by a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    x = (x - 0.3) / 0.4
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_val = train_test_split(np.arange(len(y)), test_size=0.2, random_state=seed,
                                          stratify=y.numpy())
    return (x[idx_train], y[idx_train]), (x[idx_val], y[idx_val])


def train(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], epochs: int,
          seed: int = 0, lr: float = 1e-3, batch: int = 64) -> nn.Module:
    """Plain supervised training (cross-entropy, Adam)."""
    gen = torch.Generator().manual_seed(seed)
    x, y = data
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(batch):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def _digits_task(name: str, make_model: Callable[[], nn.Module], epochs: int, seed: int,
                 key: str) -> Task:
    """Build (seeded) and train a model on digits once; weights are cached under `key`."""
    train_data, val_data = digits_data(seed)
    torch.manual_seed(seed)
    model = make_model()
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    path = cache_dir() / "tasks" / f"{name}-{digest}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        model.eval()
    else:
        train(model, train_data, epochs, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(path)
    return Task(name, model, train_data, val_data, val_data[0][:1].clone(), accuracy)


def digits(width: int = 5120, epochs: int = 4, seed: int = 0) -> Task:
    """The built-in default task; the trained model is cached by its settings."""
    return _digits_task(f"digits-w{width}", lambda: DigitsNet(width), epochs, seed,
                        f"digits-v1-{width}-{epochs}-{seed}")


def digits_resnet(width: int = 32, epochs: int = 6, seed: int = 0) -> Task:
    """A residual network (ResNet-10 style, BatchNorm, projection shortcuts) on digits."""
    return _digits_task(f"resnet-w{width}", lambda: ResNetTiny(width), epochs, seed,
                        f"resnet-v1-{width}-{epochs}-{seed}")


def digits_mobilenet(width: int = 16, epochs: int = 6, seed: int = 0) -> Task:
    """A MobileNetV2-style network (depthwise convolutions, inverted residuals) on digits."""
    return _digits_task(f"mobilenet-w{width}", lambda: MobileNetTiny(width), epochs, seed,
                        f"mobilenet-v1-{width}-{epochs}-{seed}")


def digits_transformer(dim: int = 64, epochs: int = 20, seed: int = 0) -> Task:
    """A transformer encoder (attention + feed-forward Linear layers) over image patches."""
    return _digits_task(f"transformer-d{dim}", lambda: TransformerTiny(dim), epochs, seed,
                        f"transformer-v1-{dim}-{epochs}-{seed}")


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


def load_task(spec: str = DEFAULT_TASK, **kwargs: object) -> Task:
    """Build a task from its entry point; the function's keyword arguments come from the config."""
    task = resolve_entry_point(spec)(**kwargs)
    if not isinstance(task, Task):
        raise UserError(f"task entry point {spec!r} returned {type(task).__name__}, not a Task")
    task.model.eval()
    return task
