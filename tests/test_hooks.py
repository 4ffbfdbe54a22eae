"""The one hook loop (search.core.hooks): what it sees, and what it leaves behind."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from search.core.hooks import layer_inputs, watch


class Twice(nn.Module):
    """A layer called twice, an in-place op after it, a BatchNorm frozen in eval."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(3, 3, 1)
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.first(x)
        z = self.conv(y)
        y.add_(1.0)  # in place, after conv saw y
        return self.bn(self.conv(z) + y)


def test_layer_inputs_are_the_first_call_as_the_layer_saw_it():
    model, x = Twice().train(), torch.randn(1, 3, 4, 4)
    seen = layer_inputs(model, x, ["conv", "bn"])
    with torch.no_grad():
        y = model.first(x)
        z = model.conv(y)
    assert torch.equal(seen["conv"], y)  # its first call's input, before the in-place add
    assert torch.allclose(seen["bn"], model.conv(z) + y + 1.0)


def test_every_call_is_seen_and_modes_and_hooks_are_restored():
    model = Twice().train()
    model.bn.eval()
    calls: list[tuple[str, tuple[int, ...]]] = []
    watch(model, torch.randn(2, 3, 5, 5), ["conv"],
          lambda name, _args, out: calls.append((name, tuple(out.shape))), outputs=True)
    assert calls == [("conv", (2, 3, 5, 5))] * 2
    assert model.training and model.conv.training and not model.bn.training
    assert not model.conv._forward_hooks and not model.conv._forward_pre_hooks

    def boom(*_args) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        watch(model, torch.randn(1, 3, 4, 4), ["conv"], boom)
    assert not model.conv._forward_pre_hooks and model.training and not model.bn.training
