"""A short, bounded fine-tune by distillation from the uncompressed model, and the metric."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from search.errors import TrialFailed


@torch.no_grad()
def teacher_logits(teacher: nn.Module, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """The uncompressed model's logits on the training inputs, computed once per study."""
    teacher.eval()
    return torch.cat([teacher(x[i:i + batch]) for i in range(0, len(x), batch)])


def distill(student: nn.Module, teacher: torch.Tensor, data: tuple[torch.Tensor, torch.Tensor],
            steps: int, seed: int = 0, lr: float = 3e-4, batch: int = 64,
            temperature: float = 4.0, alpha: float = 0.7) -> nn.Module:
    """`steps` Adam steps on alpha * KL(teacher || student) at `temperature` + (1-alpha) * CE.

    `teacher` holds the teacher's logits on `data` (eval mode is deterministic, so they are
    computed once, not per step). Raises TrialFailed on a non-finite loss, so the study
    records why and goes on.
    """
    if steps <= 0:
        return student.eval()
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
        if not math.isfinite(loss.item()):
            raise TrialFailed(f"non-finite fine-tune loss ({loss.item()}) at step {step}")
        opt.zero_grad()
        loss.backward()
        opt.step()
    return student.eval()


@torch.no_grad()
def evaluate(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor],
             metric: Callable[[torch.Tensor, torch.Tensor], float], batch: int = 256) -> float:
    """The task's metric on held-out data, in eval mode."""
    model.eval()
    x, y = data
    logits = torch.cat([model(x[i:i + batch]) for i in range(0, len(y), batch)])
    return metric(logits, y)
