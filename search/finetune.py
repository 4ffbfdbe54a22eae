"""A short, bounded fine-tune by distillation from the uncompressed model, and the metric."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize
from torch import nn

from search.errors import TrialFailed
from search.policy import Policy
from search.quantize import DropConnect, FakeQuant


@dataclass(frozen=True)
class FinetuneOptions:
    """How a candidate is fine-tuned (the config's fine-tune settings)."""

    steps: int = 60  # Adam steps, batch 64: the budget
    alpha: float = 0.7  # weight of distillation from the uncompressed model; 0 = labels only
    qat: bool = True  # train through the layer's weight quantizer (straight-through estimator)
    dropconnect: float = 0.0  # probability of dropping each weight per step (regularizer)
    l1: float = 0.0  # elastic-net penalty on the compressed layers' weights: l1 * sum |w|
    l2: float = 0.0  # ... + l2 * sum w^2


def attach_training_transforms(model: nn.Module, policy: Policy,
                               options: FinetuneOptions) -> list[nn.Parameter]:
    """Register the fine-tune's weight transforms on each compressed layer (after its sparsity
    mask, if any): a fake quantizer for integer bits when `qat`, DropConnect when asked. They
    are parametrizations, so `apply_precision` bakes them in with the masks. Returns the
    weights the elastic-net penalty applies to."""
    from search.compress import weight_layers

    penalized = []
    for name, lp in policy.layers.items():
        if lp.is_identity:
            continue
        for m in weight_layers(model.get_submodule(name)):
            if options.dropconnect > 0:
                parametrize.register_parametrization(m, "weight", DropConnect(options.dropconnect))
            if options.qat and lp.bits <= 8 and not lp.share:
                parametrize.register_parametrization(m, "weight", FakeQuant(lp.bits))
            penalized.append(m.parametrizations.weight.original
                             if parametrize.is_parametrized(m, "weight") else m.weight)
    return penalized


@torch.no_grad()
def teacher_logits(teacher: nn.Module, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """The uncompressed model's logits on the training inputs, computed once per study."""
    teacher.eval()
    return torch.cat([teacher(x[i:i + batch]) for i in range(0, len(x), batch)])


def distill(student: nn.Module, teacher: torch.Tensor, data: tuple[torch.Tensor, torch.Tensor],
            options: FinetuneOptions, seed: int = 0, lr: float = 3e-4, batch: int = 64,
            temperature: float = 4.0, penalized: list[nn.Parameter] | None = None,
            on_step: Callable[[int], None] | None = None) -> nn.Module:
    """`steps` Adam steps on alpha * KL(teacher || student) at `temperature` + (1-alpha) * CE,
    plus the elastic-net penalty on `penalized` weights.

    `teacher` holds the teacher's logits on `data` (eval mode is deterministic, so they are
    computed once, not per step). Raises TrialFailed on a non-finite loss, so the study
    records why and goes on. `on_step(steps_done)` is called after each step (early stopping,
    search.early_stop); whatever it raises ends the fine-tune.
    """
    if options.steps <= 0:
        return student.eval()
    with torch.random.fork_rng():  # dropout etc. draw from torch's global generator:
        torch.manual_seed(seed)  # seeded here, a trial's fine-tune does not depend on the past
        return _distill(student, teacher, data, options, seed, lr, batch, temperature, penalized,
                        on_step)


def _distill(student: nn.Module, teacher: torch.Tensor,
             data: tuple[torch.Tensor, torch.Tensor], options: FinetuneOptions, seed: int,
             lr: float, batch: int, temperature: float,
             penalized: list[nn.Parameter] | None,
             on_step: Callable[[int], None] | None = None) -> nn.Module:
    steps, alpha = options.steps, options.alpha
    x, y = data
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    student.train()
    order = torch.randperm(len(y), generator=gen)
    pos = 0
    for step in range(steps):
        if pos + batch > len(order):
            order, pos = torch.randperm(len(y), generator=gen), 0
        idx = order[pos:pos + batch]
        pos += batch
        soft = F.log_softmax(teacher[idx] / temperature, dim=1)
        logits = student(x[idx])
        kd = F.kl_div(F.log_softmax(logits / temperature, dim=1), soft, log_target=True,
                      reduction="batchmean") * temperature**2
        loss = alpha * kd + (1 - alpha) * F.cross_entropy(logits, y[idx])
        if penalized and (options.l1 or options.l2):
            loss = loss + sum(options.l1 * w.abs().sum() + options.l2 * w.pow(2).sum()
                              for w in penalized)
        if not math.isfinite(loss.item()):
            raise TrialFailed(f"non-finite fine-tune loss ({loss.item()}) at step {step}")
        opt.zero_grad()
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step(step + 1)
    return student.eval()


@torch.no_grad()
def evaluate(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor],
             metric: Callable[[torch.Tensor, torch.Tensor], float], batch: int = 256) -> float:
    """The task's metric on held-out data, in eval mode."""
    model.eval()
    x, y = data
    logits = torch.cat([model(x[i:i + batch]) for i in range(0, len(y), batch)])
    return metric(logits, y)
