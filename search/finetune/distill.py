"""A short, bounded fine-tune by distillation from the uncompressed model, and the metric."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize
from torch import nn

from search.compress.knob import active, weight_layers
from search.compress.policy import Policy
from search.compress.quantize import DropConnect
from search.core.data import (
    Batch,
    Inputs,
    Loss,
    Split,
    call,
    channels_last,
    cross_entropy,
    outputs_of,
)
from search.core.errors import TrialFailed


@dataclass(frozen=True)
class FinetuneOptions:
    """How a candidate is fine-tuned (the config's fine-tune settings)."""

    steps: int = 60  # Adam steps (batch 64 in memory, the DataLoader's own batch): the budget
    alpha: float = 0.7  # weight of distillation from the uncompressed model; 0 = labels only
    qat: bool = True  # train through the layer's weight quantizer (straight-through estimator)
    dropconnect: float = 0.0  # probability of dropping each weight per step (regularizer)
    l1: float = 0.0  # elastic-net penalty on the compressed layers' weights: l1 * sum |w|
    l2: float = 0.0  # ... + l2 * sum w^2


def attach_training_transforms(model: nn.Module, policy: Policy,
                               options: FinetuneOptions) -> list[nn.Parameter]:
    """Register the fine-tune's weight transforms on each compressed layer (after its sparsity
    mask, if any): DropConnect when asked, then each set knob's `train_transform` (a fake
    quantizer for integer bits when `qat`). They are parametrizations, so `apply_precision`
    bakes them in with the masks. Returns the weights the elastic-net penalty applies to."""
    penalized = []
    for name, lp in policy.layers.items():
        if lp.is_identity:
            continue
        for m in weight_layers(model.get_submodule(name)):
            if options.dropconnect > 0:
                parametrize.register_parametrization(m, "weight", DropConnect(options.dropconnect))
            for knob in active(lp):
                transform = knob.train_transform(lp, options)
                if transform is not None:
                    parametrize.register_parametrization(m, "weight", transform)
            penalized.append(m.parametrizations.weight.original
                             if parametrize.is_parametrized(m, "weight") else m.weight)
    return penalized


class Teacher:
    """The uncompressed model's outputs on the training data. In memory they are computed once
    per study and cached by example (eval mode is deterministic); a streamed split (a
    DataLoader) gets them batch by batch, so the training set is never held at once."""

    def __init__(self, model: nn.Module, data: Split, cache_limit_floats: int = 1 << 26,
                 batch: int = 64) -> None:
        self.model = model.eval()
        self.cache: torch.Tensor | None = None
        data = Split(data)
        if data.in_memory:
            first = next(data.batches(1))
            with torch.no_grad():
                per_example = call(self.model, first.inputs).numel()
            if per_example * len(data) <= cache_limit_floats:
                self.cache = outputs_of(self.model, data, batch)[0]

    @torch.no_grad()
    def __call__(self, batch: Batch) -> torch.Tensor:
        if self.cache is not None and batch.index is not None:
            return self.cache[batch.index]
        return call(self.model.eval(), batch.inputs)


def _log_probs(x: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.log_softmax(x.reshape(-1, x.shape[-1]).float() / temperature, dim=-1)


def distill(student: nn.Module, teacher: Teacher | nn.Module, data: Split,
            options: FinetuneOptions,
            loss_fn: Loss = cross_entropy, seed: int = 0, lr: float = 3e-4, batch: int = 64,
            temperature: float = 4.0, penalized: list[nn.Parameter] | None = None,
            on_step: Callable[[int], None] | None = None,
            guard: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext
            ) -> nn.Module:
    """`steps` Adam steps on alpha * KL(teacher || student) at `temperature` + (1-alpha) * the
    task's loss, plus the elastic-net penalty on `penalized` weights.

    Raises TrialFailed on a non-finite loss, so the study records why and goes on.
    `on_step(steps_done)` is called after each step (early stopping, search.study.early_stop);
    whatever it raises ends the fine-tune. Each step runs inside `guard()`: workers pass
    `search.devices.lock.cpu_turn`, so no step runs while a candidate is timed on this CPU.
    """
    if options.steps <= 0:
        return student.eval()
    data = Split(data)
    if not isinstance(teacher, Teacher):
        teacher = Teacher(teacher, data)
    with torch.random.fork_rng():  # dropout, a DataLoader's sampler: torch's global generator,
        torch.manual_seed(seed)  # seeded here, so a fine-tune does not depend on the past
        return _distill(student, teacher, data, options, loss_fn, seed, lr, batch, temperature,
                        penalized, on_step, guard)


def _distill(student: nn.Module, teacher: Teacher, data: Split, options: FinetuneOptions,
             loss_fn: Loss, seed: int, lr: float, batch: int, temperature: float,
             penalized: list[nn.Parameter] | None,
             on_step: Callable[[int], None] | None = None,
             guard: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext
             ) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with channels_last(student) as layout:
        opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr)
        student.train()
        batches = data.cycle(batch, gen)
        for step in range(options.steps):
            with guard():
                _step(student, teacher, next(batches), layout, opt, options, loss_fn,
                      temperature, penalized, step)
                if on_step is not None:
                    on_step(step + 1)
    return student.eval()


def _step(student: nn.Module, teacher: Teacher, b: Batch,
          layout: Callable[[Inputs], Inputs], opt: torch.optim.Optimizer,
          options: FinetuneOptions,
          loss_fn: Loss, temperature: float, penalized: list[nn.Parameter] | None,
          step: int) -> None:
    alpha = options.alpha
    outputs = call(student, layout(b.inputs))
    loss = (1 - alpha) * loss_fn(outputs, b.labels) if alpha < 1 else 0.0
    if alpha > 0:
        soft = _log_probs(teacher(b), temperature)
        kd = F.kl_div(_log_probs(outputs, temperature), soft, log_target=True,
                      reduction="batchmean") * temperature**2
        loss = loss + alpha * kd
    if penalized and (options.l1 or options.l2):
        loss = loss + sum(options.l1 * w.abs().sum() + options.l2 * w.pow(2).sum()
                          for w in penalized)
    if not math.isfinite(loss.item()):
        raise TrialFailed(f"non-finite fine-tune loss ({loss.item()}) at step {step}")
    opt.zero_grad()
    loss.backward()
    opt.step()


def resume_distill(base: nn.Module, policy: Policy, example: Any,
                   state: dict[str, torch.Tensor], teacher: Teacher, data: Split,
                   options: FinetuneOptions, loss_fn: Loss = cross_entropy, seed: int = 1,
                   guard: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext
                   ) -> nn.Module:
    """`options.steps` more steps from a fine-tune's saved weights (`state`, fp32, training
    transforms attached): the policy's structure rebuilt from `base`, the same transforms,
    the weights loaded. A new `seed`, so the steps see other batches than the first ones."""
    from search.compress.build import restructure

    model = restructure(base, policy, example, data, loss_fn)
    penalized = attach_training_transforms(model, policy, options)
    model.load_state_dict(state)
    return distill(model, teacher, data, options, loss_fn, seed=seed, penalized=penalized,
                   guard=guard)

