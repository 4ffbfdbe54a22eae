"""One forward pass that watches named layers: the hook loop shared by the integer program's
cost (each layer's output positions, its real input for per-layer timing) and `search show`
(each layer's input before and after compression)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from search.core.data import as_inputs

# (layer name, its positional args, its output or None before the call)
OnCall = Callable[[str, tuple[Any, ...], Any], None]


def watch(model: nn.Module, example: Any, names: Sequence[str], on_call: OnCall, *,
          outputs: bool = False) -> None:
    """Run `example` through `model` once (eval, no grad; each module's training mode
    restored after), calling `on_call` at every call of every named layer: before it
    (`outputs` False, the output None) or after it. The hooks are gone afterwards, whatever
    happened."""
    def hook_for(name: str) -> Any:
        if outputs:
            return lambda _m, args, out: on_call(name, args, out)
        return lambda _m, args: on_call(name, args, None)

    handles = [model.get_submodule(n).register_forward_hook(hook_for(n)) if outputs
               else model.get_submodule(n).register_forward_pre_hook(hook_for(n))
               for n in names]
    modes = {m: m.training for m in model.modules()}  # (a frozen BatchNorm may differ)
    try:
        with torch.no_grad():
            model.eval()(*as_inputs(example))
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode


def layer_inputs(model: nn.Module, example: Any, names: Sequence[str]
                 ) -> dict[str, torch.Tensor]:
    """The first input each named layer gets on one run of `example`, copied (an in-place op
    later in the pass leaves it as the layer saw it)."""
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str, args: tuple[Any, ...], _out: Any) -> None:
        if name not in seen:
            seen[name] = args[0].detach().clone()

    watch(model, example, names, keep)
    return seen
