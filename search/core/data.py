"""A task's data however the user holds it: tensors in memory, or any re-iterable of batches.

Every stage (sensitivity, channel importance, calibration, fine-tune, evaluation) reads a split
through `Split.batches`, so nothing needs the whole training set in memory at once: a torch
DataLoader is iterated, never materialized. Inputs are a tensor or a tuple of tensors (integer
token ids and attention masks included); a model is always called as `model(*inputs)`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from search.core.errors import UserError

Inputs = tuple[torch.Tensor, ...]


def as_inputs(x: Any) -> Inputs:
    """A tensor or a tuple/list of tensors -> a tuple of tensors."""
    if isinstance(x, torch.Tensor):
        return (x,)
    if isinstance(x, tuple | list) and x and all(isinstance(t, torch.Tensor) for t in x):
        return tuple(x)
    raise TypeError(f"inputs must be a tensor or a tuple of tensors, got {_kind(x)}")


def check_inputs(split: Split, example: Any, n: int = 15) -> list[Inputs]:
    """Up to `n` single inputs of `split` shaped like `example` (a compiled model takes only
    its example's shapes) and finite (runtimes differ in how NaN passes a max or a ReLU):
    compiled outputs are compared with PyTorch's on these and the example
    (search.compress.build.output_error)."""
    shapes = [t.shape for t in as_inputs(example)]
    out = []
    for batch in split.head(n).batches(1):
        inputs = as_inputs(batch.inputs)
        if [t.shape for t in inputs] == shapes and all(
                bool(t.isfinite().all()) for t in inputs if t.is_floating_point()):
            out.append(inputs)
    return out


def _kind(x: Any) -> str:
    if isinstance(x, tuple | list):
        return f"{type(x).__name__} of ({', '.join(type(v).__name__ for v in x[:4])})"
    return type(x).__name__


def call(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    return model(*inputs)


def take(inputs: Inputs, idx: torch.Tensor | slice) -> Inputs:
    return tuple(t[idx] for t in inputs)


def concat(parts: list[Inputs]) -> Inputs:
    return tuple(torch.cat(ts) for ts in zip(*parts, strict=True))


@dataclass(frozen=True)
class Batch:
    inputs: Inputs
    labels: torch.Tensor
    index: torch.Tensor | None = None  # positions in an in-memory split (teacher cache key)

    def __len__(self) -> int:
        return len(self.labels)


class Split:
    """One split of a task: `(inputs, labels)` tensors, or a re-iterable of such batches."""

    def __init__(self, data: Any, name: str = "data") -> None:
        self.name = name
        self.tensors: tuple[Inputs, torch.Tensor] | None = None
        self.stream: Iterable | None = None
        if isinstance(data, Split):
            self.tensors, self.stream = data.tensors, data.stream
            return
        if isinstance(data, tuple | list) and len(data) == 2 and \
                isinstance(data[1], torch.Tensor):
            try:
                inputs = as_inputs(data[0])
            except TypeError as exc:
                raise UserError(f"task {name}: {exc}") from None
            n = len(data[1])
            if any(len(t) != n for t in inputs):
                raise UserError(f"task {name}: inputs have {[len(t) for t in inputs]} rows but "
                                f"labels {n}; each input needs one row per label")
            self.tensors = (inputs, data[1])
        elif isinstance(data, Iterable) and not isinstance(data, str | bytes | torch.Tensor):
            if iter(data) is data:
                raise UserError(f"task {name}: an iterator can be read only once; pass a "
                                f"re-iterable (a torch DataLoader, a list of batches)")
            self.stream = data
        else:
            raise UserError(f"task {name}: expected (inputs, labels) tensors or a re-iterable "
                            f"of (inputs, labels) batches (a torch DataLoader), got {_kind(data)}")

    @property
    def in_memory(self) -> bool:
        return self.tensors is not None

    def __len__(self) -> int:
        if self.tensors is not None:
            return len(self.tensors[1])
        return sum(len(b) for b in self.batches())

    def batches(self, size: int = 64, shuffle: bool = False,
                generator: torch.Generator | None = None) -> Iterator[Batch]:
        """One pass. In memory: batches of `size` (shuffled with `generator` if asked);
        streamed: the iterable's own batches (its own sampler shuffles)."""
        if self.tensors is not None:
            inputs, labels = self.tensors
            n = len(labels)
            order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
            for idx in order.split(size):
                yield Batch(take(inputs, idx), labels[idx], idx)
            return
        for i, item in enumerate(self.stream or ()):
            if not (isinstance(item, tuple | list) and len(item) == 2):
                raise UserError(f"task {self.name}: batch {i} is {_kind(item)}; each batch must "
                                f"be (inputs, labels)")
            try:
                yield Batch(as_inputs(item[0]), item[1])
            except TypeError as exc:
                raise UserError(f"task {self.name}: batch {i}: {exc}") from None

    def cycle(self, size: int, generator: torch.Generator) -> Iterator[Batch]:
        """Batches forever (a fine-tune's step budget may exceed one pass)."""
        while True:
            empty = True
            for b in self.batches(size, shuffle=True, generator=generator):
                empty = False
                yield b
            if empty:
                raise UserError(f"task {self.name} has no batches")

    def head(self, n: int, seed: int | None = None) -> Split:
        """The first `n` examples (a seeded sample of them in memory if `seed` is given), in
        memory: the small subsets sensitivity, calibration and importance scoring use."""
        if self.tensors is not None:
            inputs, labels = self.tensors
            if seed is None:
                idx: torch.Tensor | slice = slice(0, n)
            else:
                idx = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:n]
            return Split((take(inputs, idx), labels[idx]), self.name)
        parts, labels, got = [], [], 0
        for b in self.batches():
            parts.append(b.inputs)
            labels.append(b.labels)
            got += len(b)
            if got >= n:
                break
        if not parts:
            raise UserError(f"task {self.name} has no batches")
        inputs = take(concat(parts), slice(0, n))
        return Split((inputs, torch.cat(labels)[:n]), self.name)

    def inputs(self, n: int) -> Inputs:
        """The inputs of the first `n` examples."""
        split = self.head(n)
        assert split.tensors is not None
        return split.tensors[0]


def select(outputs: Any, selector: str | int | None) -> torch.Tensor:
    """The one output tensor to distill and score: `selector` names a dict key or a tuple
    position; by default a tensor itself, a dict's "logits" (else its first value), a tuple's
    first element."""
    if isinstance(outputs, torch.Tensor) and selector is None:
        return outputs
    if hasattr(outputs, "keys") and not isinstance(outputs, torch.Tensor):
        keys = list(outputs.keys())
        key = selector if selector is not None else ("logits" if "logits" in keys else keys[0])
        if key not in keys:
            raise UserError(f"task output {selector!r} is not one of the model's outputs {keys}")
        return outputs[key]
    if isinstance(outputs, tuple | list):
        pos = 0 if selector is None else selector
        if not isinstance(pos, int) or not -len(outputs) <= pos < len(outputs):
            raise UserError(f"task output {selector!r}: the model returns a tuple of "
                            f"{len(outputs)}; give a position")
        return outputs[pos]
    raise UserError(f"task output {selector!r}: the model returns {type(outputs).__name__}, "
                    f"which has no outputs to select from")


_SELECTED: dict[tuple[type, str | int | None], type] = {}


def with_output(model: nn.Module, selector: str | int | None, example: Inputs) -> nn.Module:
    """The model, returning only the selected output tensor: what is distilled, scored,
    compiled, timed and exported. Unchanged when it already returns one tensor.

    NOTE: the model's class is swapped for a subclass whose forward selects, rather than
    wrapping it, so layer names (the policy's keys) and state_dict keys stay the user's.
    """
    if type(model) in _SELECTED.values():  # selected already
        return model
    with torch.no_grad():
        out = model.eval()(*example)
    if isinstance(out, torch.Tensor) and selector is None:
        return model
    if not isinstance(select(out, selector), torch.Tensor):
        raise UserError(f"task output {selector!r} is not a tensor")
    base = type(model)
    key = (base, selector)
    if key not in _SELECTED:
        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
            return select(base.forward(self, *args, **kwargs), selector)

        _SELECTED[key] = type(base.__name__, (base,), {
            "forward": forward, "__module__": base.__module__,
            "__qualname__": base.__qualname__, "_selected_output": selector})
    model.__class__ = _SELECTED[key]
    return model


def cross_entropy(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The default loss: mean cross-entropy over the last dimension."""
    return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), labels.reshape(-1))


def accuracy(outputs: torch.Tensor, labels: torch.Tensor) -> float:
    """The default metric: top-1 accuracy over the last dimension."""
    return float((outputs.argmax(dim=-1) == labels).float().mean())


Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Metric = Callable[[torch.Tensor, torch.Tensor], float]


@contextlib.contextmanager
def channels_last(model: nn.Module) -> Iterator[Callable[[Inputs], Inputs]]:
    """Run a convolutional model in channels-last memory format: oneDNN's CPU convolutions
    run a MobileNetV2 training step (batch 64, 64 px, two threads) in 0.20 s instead of 0.32 s,
    and an evaluation pass over 525 images in 0.48 s instead of 0.71 s. Yields the conversion
    for a batch's inputs (4-D float tensors); the weights go back to the usual contiguous
    format afterwards (same values), so export and saving see no change. Inside another such
    block (an evaluation during a fine-tune) the model is left as it is. Not for a model with
    16-bit float convolutions: channels-last made an evaluation pass of a MobileNetV2 whose
    layers were nearly all fp16 slower (1.13 s instead of 0.62 s), so it stays contiguous."""
    four = [p for p in model.parameters() if p.dim() == 4]
    if not four or any(t.dim() == 4 and t.dtype in (torch.float16, torch.bfloat16)
                       for t in (*model.parameters(), *model.buffers())):
        yield lambda inputs: inputs
        return
    inner = all(p.is_contiguous(memory_format=torch.channels_last) for p in four) and \
        not all(p.is_contiguous() for p in four)
    if not inner:
        model.to(memory_format=torch.channels_last)
    try:
        yield lambda inputs: tuple(
            t.contiguous(memory_format=torch.channels_last)
            if t.dim() == 4 and t.is_floating_point() else t for t in inputs)
    finally:
        if not inner:
            model.to(memory_format=torch.contiguous_format)


@torch.no_grad()
def outputs_of(model: nn.Module, data: Split, batch: int = 64
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's outputs and the labels over one pass of a split, in eval mode, convolutions
    in channels-last memory (`channels_last`).

    NOTE: batches of 64, not larger: a CNN's activations then stay in cache (MobileNetV2 at
    64 px evaluates 256 images 4x faster in batches of 64 than in one of 256)."""
    data = Split(data)
    model.eval()
    outs, labels = [], []
    with channels_last(model) as layout:
        for b in data.batches(batch):
            outs.append(call(model, layout(b.inputs)))
            labels.append(b.labels)
    if not outs:
        raise UserError(f"task {data.name} has no batches")
    return torch.cat(outs), torch.cat(labels)


def evaluate(model: nn.Module, data: Split, metric: Metric, batch: int = 64) -> float:
    """The task's metric on a split, in eval mode."""
    return float(metric(*outputs_of(model, data, batch)))
