"""The integer program's latency cost from the kernel library (`ip_cost: library`): for each
layer and option, how much the model's kernel sum changes when only that layer takes that
option, its kernels costed by the library's records (search.backend.predict), in place of the
multiply-add estimate.

Why: on MobileNetV2 the estimate (MACs x a per-precision factor) is a poor latency model: seeds
solved for 45-75 % of the estimated cost measured 0.87-0.98 of the uncompressed latency
(bench/RESULTS.md 13.5), because 1x1 and depthwise kernels are memory-bound and a factorized
layer adds a kernel. The library's records time the kernels a compile makes; a count of
multiply-adds does not.

    cost[l, o] = share[l] + delta[l, o]
    share[l]    = the uncompressed model's kernel sum x the layer's part of the estimate
                  (only the sum of the shares matters to the program's limit)
    delta[l, o] = kernel sum of l's window with l at o - the same window uncompressed

Decisions:
- The window: the child of the model's outermost nn.Sequential on the layer's path and the
  child after it (MobileNetV2: the layer's inverted-residual block and the next block),
  compiled alone with the input the uncompressed model gives it. Its kernels form as in the
  whole model (conv + BatchNorm + activation, the residual add fused into the projection
  conv): a layer alone makes other kernels (its epilogue differs), which the library lacks.
  The second child takes the window's output layout change and ends the same way in every
  option, so it cancels in the difference. A layer outside any Sequential is its own window.
- Only the kernels that differ from the uncompressed window are costed (a record, or a
  donor's record x the flops ratio x DONOR_FACTOR, as a predicted latency). A kernel neither
  costs is tuned when the compiler tunes, all of them in one session; an option that still
  has one is left out of the program (counted in what it took): the program chooses among
  options it can cost, and the uncompressed option always can.
- Each option is built as a trial builds it (search.compress.build: restructure, int8
  calibrated on the training split) on the whole model, then its window taken: channel groups
  that reach past the layer are cut as in a trial, and the window holds their other layers.
- Separable by layer, as the program is: two layers' changes are each measured against the
  uncompressed rest. Every seed is then built, fine-tuned and timed whole like any trial.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from torch import nn

from search.backend.compile import to_relax
from search.backend.predict import KernelLibrary
from search.compress.build import build
from search.compress.knob import REGISTRY
from search.compress.policy import LayerPolicy, Policy
from search.core.errors import UserError
from search.core.hooks import layer_inputs
from search.core.task import Task
from search.devices.lock import device_lock
from search.study.allocate import Options


def window_of(model: nn.Module, name: str) -> tuple[str, ...]:
    """The modules compiled for `name`'s cost, in call order (see the module docstring)."""
    parts = name.split(".")
    for i in range(len(parts)):
        prefix = ".".join(parts[:i])
        parent = model.get_submodule(prefix)
        if isinstance(parent, nn.Sequential) and type(parent).forward is nn.Sequential.forward:
            children = list(parent._modules)
            j = children.index(parts[i])
            return tuple(f"{prefix}.{c}" if prefix else c for c in children[j:j + 2])
    return (name,)


def _window(model: nn.Module, names: tuple[str, ...]) -> nn.Module:
    modules = [model.get_submodule(n) for n in names]
    return modules[0] if len(modules) == 1 else nn.Sequential(*modules)


def _digest(kernel: Any) -> int:
    from tvm_ffi import structural_hash

    return int(structural_hash(kernel.dispatched[0]))


class _Costs:
    """Per-call library cost of each distinct kernel (None: neither a record nor a donor)."""

    def __init__(self, library: KernelLibrary) -> None:
        self.library = library
        self.kernels: dict[int, Any] = {}
        self.ms: dict[int, float | None] = {}

    def add(self, kernels: list[Any]) -> Counter[int]:
        """Remember `kernels`; their calls by digest."""
        calls: Counter[int] = Counter()
        for k in kernels:
            d = _digest(k)
            self.kernels.setdefault(d, k)
            calls[d] += int(k.weight)
        return calls

    def unknown(self, digests: set[int]) -> set[int]:
        """Cost `digests` not costed yet; those that stay uncostable."""
        for d in digests - set(self.ms):
            self.ms[d] = self.library.call_ms(self.kernels[d])
        return {d for d in digests if self.ms[d] is None}

    def forget_unknown(self) -> None:
        self.ms = {d: ms for d, ms in self.ms.items() if ms is not None}


def library_options(task: Task, knobs: list[str], options: Options, compiler: Any,
                    progress: Callable[[int], Any] | None = None
                    ) -> tuple[Options, dict[str, Any]]:
    """`options` with each cost replaced by the library's (ms; see the module docstring), and
    what it took. `progress(total)` may return a tqdm-like bar, updated per option built."""
    library = KernelLibrary(compiler)
    costs = _Costs(library)
    identity = tuple(REGISTRY[k].identity for k in knobs)
    model = task.model.eval()
    windows = {name: window_of(model, name) for name in options}
    inputs = layer_inputs(model, task.example, sorted({w[0] for w in windows.values()}))

    def kernels(m: nn.Module, w: tuple[str, ...]) -> Counter[int]:
        return costs.add(compiler.kernels_of(to_relax(_window(m, w).eval(), inputs[w[0]])))

    whole = costs.add(compiler.kernels_of(to_relax(model, task.example)))
    base = {w: kernels(model, w) for w in set(windows.values())}
    todo = [(n, v) for n, vs in options.items() for v in vs if v != identity]
    bar = progress(len(todo)) if progress is not None and todo else None
    changed: dict[tuple[str, tuple], tuple[Counter[int], Counter[int]]] = {}
    try:
        for name, values in todo:
            lp = LayerPolicy(**dict(zip(knobs, values, strict=True)))
            built = build(task.model, Policy({name: lp}), task.example, task.train, task.loss)
            now, was = kernels(built, windows[name]), base[windows[name]]
            changed[(name, values)] = (now - was, was - now)  # (kernels added, removed)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    every = set(whole) | {d for added, removed in changed.values() for d in added | removed}
    missing = costs.unknown(every)
    tuned = 0
    if missing and compiler.can_tune:
        bar = progress(len(missing)) if progress is not None else None
        try:
            with device_lock(compiler.spec):
                tuned = compiler.tune([costs.kernels[d] for d in missing], bar)
        finally:
            if bar is not None:
                bar.close()
        costs.forget_unknown()
        missing = costs.unknown(every)
    if set(whole) & missing:
        raise UserError(f"ip_cost: library: the kernel library of target "
                        f"{compiler.spec.name!r} lacks kernels of the uncompressed model; build "
                        f"it with `search tune --target {compiler.spec.name}` or set "
                        f"tune_trials_per_task above 0 (or use ip_cost: estimate)")
    total = sum(n * costs.ms[d] for d, n in whole.items())  # type: ignore[operator]
    estimated = sum(opts[identity][1] for opts in options.values()) or 1.0
    costed: Options = {}
    left_out = 0
    for name, values_of in options.items():
        share = total * values_of[identity][1] / estimated
        costed[name] = {}
        for values, (drop, _estimate, size) in values_of.items():
            added, removed = changed.get((name, values), (Counter(), Counter()))
            if any(costs.ms[d] is None for d in added | removed):
                left_out += 1
                continue
            delta = sum(n * costs.ms[d] for d, n in added.items()) - \
                sum(n * costs.ms[d] for d, n in removed.items())  # type: ignore[operator]
            costed[name][values] = (drop, share + delta, size)
    return costed, {"source": f"library:{compiler.spec.name}:kernel sums of each layer's "
                              f"window (records; donors x the flops ratio)",
                    "options": len(todo) + len(options), "left_out": left_out,
                    "kernels": len(costs.kernels), "tuned_now": tuned,
                    "uncompressed_kernel_ms": total}
