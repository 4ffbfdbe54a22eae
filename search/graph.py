"""Which layer's output channels feed which layer: the dependency graph channel pruning needs.

Traced with torch.fx. A producer is prunable when its output reaches exactly one Conv2d/Linear
through channel-wise ops only (activations, BatchNorm, pooling, dropout, flatten). Anything else
(residual adds, concatenation, reshapes) makes it unprunable here, so an edit is never inconsistent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

_PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.Hardswish,
    nn.Dropout, nn.BatchNorm1d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d,
    nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity,
)
_PASS_FUNCTIONS = {F.relu, torch.relu, torch.flatten, F.max_pool2d, F.avg_pool2d,
                   F.adaptive_avg_pool2d, F.dropout, F.gelu, torch.tanh, torch.sigmoid}
_PASS_METHODS = {"relu", "flatten"}


@dataclass(frozen=True)
class Consumer:
    """The layer whose inputs shrink with a producer's outputs, and what sits between them."""

    name: str
    batchnorms: tuple[str, ...]  # BatchNorm modules between producer and consumer
    per_channel: int  # consumer input features per producer channel (spatial size after flatten)


def _is_layer(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)


def channel_consumers(model: nn.Module, example: torch.Tensor) -> dict[str, Consumer]:
    """Map each prunable producer layer name to its single consumer."""
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - an untraceable model is simply not channel-prunable
        return {}
    modules = dict(model.named_modules())
    result: dict[str, Consumer] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not _is_layer(modules[node.target]):
            continue
        bns: list[str] = []
        cur = node
        consumer = None
        while len(cur.users) == 1:
            nxt = next(iter(cur.users))
            if nxt.op == "call_module":
                mod = modules[nxt.target]
                if _is_layer(mod):
                    consumer = nxt.target
                    break
                if not isinstance(mod, _PASS_MODULES):
                    break
                if isinstance(mod, nn.BatchNorm1d | nn.BatchNorm2d):
                    bns.append(nxt.target)
            elif nxt.op == "call_function" and nxt.target in _PASS_FUNCTIONS:
                pass
            elif nxt.op == "call_method" and nxt.target in _PASS_METHODS:
                pass
            else:
                break
            if nxt.args and nxt.args[0] is not cur:  # the channel tensor must be the main input
                break
            cur = nxt
        if consumer is None:
            continue
        producer = modules[node.target]
        n_out = producer.out_channels if isinstance(producer, nn.Conv2d) else producer.out_features
        cons = modules[consumer]
        n_in = cons.in_channels if isinstance(cons, nn.Conv2d) else cons.in_features
        if n_in % n_out:
            continue
        result[node.target] = Consumer(consumer, tuple(bns), n_in // n_out)
    return result
