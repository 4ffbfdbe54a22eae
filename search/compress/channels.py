"""Structured channel pruning over coupled channel groups (Torch-Pruning's DependencyGraph):
the `sparsity` and `importance` knobs.

Channels that must go together (a residual add's inputs, a concatenation's slices, a depthwise
conv and its producer, the BatchNorm/LayerNorm after a layer, a flatten into a Linear) form one
group; a group is named by its root layer and pruned as a unit, so the smaller model is always
consistent. torch-pruning traces autograd (not torch.fx), so any model that runs forward works.

Importance (which channels stay) is a knob:
  l2     - group weight L2 norm (tp.importance.GroupMagnitudeImportance), needs no data;
  taylor - first-order |w * dL/dw| (SNIP-style; tp.importance.GroupTaylorImportance) from the
           gradient of the task's mean loss over a few batches;
  fisher - Optimal Brain Damage sum(w^2 * F), F the diagonal empirical Fisher (squared
           gradients of 8-sample micro-batches, averaged), tp.importance.GroupHessianImportance.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from search.compress.knob import BuildContext, Knob, LayerInfo
from search.core.data import Batch, Inputs, Loss, Split, as_inputs, call, cross_entropy
from search.core.errors import TrialFailed
from search.core.granularity import granularity

IMPORTANCES = ("l2", "taylor", "fisher")  # how the channels that go are chosen
SPARSITIES = (0.0, 0.25, 0.5, 0.75)  # fraction of output channels removed


def round_channels(n: float, multiple: int | None = None) -> int:
    """Round to a multiple (at least one multiple), so compiled workloads repeat across trials;
    by default the target's channel granularity (search.core.granularity)."""
    multiple = multiple or granularity().channels
    return max(multiple, int(n / multiple + 0.5) * multiple)  # half up, not banker's

GRADIENT_IMPORTANCES = ("taylor", "fisher")


@dataclass(frozen=True)
class ChannelGroup:
    """Output channels that are removed together; `root` names the group."""

    root: str  # first (named_modules order) non-depthwise Conv2d/Linear the group output-prunes
    channels: int  # output channels of the root (every output-pruned member has as many)
    members: tuple[str, ...]  # every module (or parameter) the group edits, in or out
    conv_groups: int = 1  # grouped convs in the group: channels go evenly, same slot per group

    @property
    def multiple(self) -> int:
        """Kept channels are a multiple of this: the kernel-friendly multiple and conv groups."""
        return math.lcm(granularity().channels, self.conv_groups)


def _is_root_layer(m: nn.Module) -> bool:
    """Linear, or a Conv2d that is not depthwise (a depthwise conv follows its producer)."""
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and
                                        (m.groups == 1 or m.groups < m.in_channels))


def _conv_groups(m: nn.Module) -> int:
    """Channel groups a grouped (not depthwise) conv imposes: kept channels split evenly."""
    if isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels:
        return m.groups
    return 1


@contextmanager
def _traceable(model: nn.Module) -> Iterator[None]:
    """Autograd on, every parameter requiring grad, training flags restored afterwards.

    NOTE: DependencyGraph traces grad_fns and calls model.eval() without undoing it.
    """
    modes = {m: m.training for m in model.modules()}
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        with torch.enable_grad():
            for p in flags:
                p.requires_grad_(True)
            yield
    finally:
        for m, mode in modes.items():
            m.training = mode
        for p, flag in flags.items():
            p.requires_grad_(flag)


def _graph(model: nn.Module, example: Inputs
           ) -> tuple[tp.DependencyGraph, set, set]:
    """The dependency graph, and the grad_fns of the model's input and outputs in that trace.

    torch-pruning sees neither end: a group that reaches the model's input (a residual add with
    it) or output (the logits' width) is not prunable, so both are marked here. Attention
    modules stay in the graph (not ignored) so the groups that touch them are seen.
    """
    inputs: set = set()
    outputs: set = set()

    def forward(m: nn.Module, xs: Inputs) -> object:
        args = []
        for x in as_inputs(xs):
            if x.is_floating_point():  # an op on a grad-requiring copy: a node for the input
                x = x.detach().clone().requires_grad_(True) * 1.0
                inputs.add(x.grad_fn)
            args.append(x)  # (integer inputs, token ids: no gradient, nothing to mark)
        return m(*args)

    def record(out: object) -> object:
        for o in out if isinstance(out, tuple | list) else [out]:
            if isinstance(o, torch.Tensor) and o.grad_fn is not None:
                outputs.add(o.grad_fn)
        return out

    with _traceable(model):
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=as_inputs(example),
                                                   forward_fn=forward,
                                                   output_transform=record, verbose=False)
    return dg, inputs, outputs


HEAD_ATTRS = ("num_attention_heads", "num_heads", "n_heads", "n_head")  # HF, timm, GPT-2 ...


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Attention blocks, however the model writes them: nn.MultiheadAttention, or a module
    with a head count holding its own q/k/v Linears (Hugging Face's BertSelfAttention, ...).
    Their projections keep their width: removing channels across heads would make each new
    head a mix of old ones."""
    found = []
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            found.append(m)
        elif any(isinstance(getattr(m, a, None), int) for a in HEAD_ATTRS) and sum(
                isinstance(c, nn.Linear) for c in m.children()) >= 2:
            found.append(m)
    return found


def _analyse(model: nn.Module, example: Inputs
             ) -> tuple[tp.DependencyGraph, dict[str, tuple[ChannelGroup, object]]]:
    """Graph plus root name -> (group, tp group over all channels), prunable groups only."""
    dg, inputs, outputs = _graph(model, example)
    names = {m: n for n, m in model.named_modules()}
    order = {n: i for i, n in enumerate(names.values())}
    param_names = {p: n for n, p in model.named_parameters()}
    inside = {sub for a in attention_modules(model) for sub in a.modules()}
    result: dict[str, tuple[ChannelGroup, object]] = {}
    for group in dg.get_all_groups(root_module_types=(nn.Conv2d, nn.Linear)):
        roots, members, ok, conv_groups = [], [], True, 1
        for dep, _ in group:
            target = dep.target
            module = target.module
            out = dg.is_out_channel_pruning_fn(dep.handler)
            if module in inside or target.grad_fn in inputs or (
                    out and target.grad_fn in outputs):
                ok = False  # attention's projections, the model's input or output width
                break
            if isinstance(module, nn.Module) and module in names:
                members.append(names[module])
                if out and _is_root_layer(module):
                    roots.append(names[module])
                conv_groups = math.lcm(conv_groups, _conv_groups(module))
            elif isinstance(module, nn.Parameter) and module in param_names:
                members.append(param_names[module])
        if not ok or not roots:
            continue
        root = min(roots, key=order.__getitem__)
        layer = model.get_submodule(root)
        n = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
        info = ChannelGroup(root, n, tuple(dict.fromkeys(members)), conv_groups)
        result[root] = (info, group)
    return dg, dict(sorted(result.items(), key=lambda kv: order[kv[0]]))


def group_details(model: nn.Module, example: Inputs) -> dict[str, ChannelGroup]:
    """Every prunable channel group by root name, with the layers it edits."""
    return {root: info for root, (info, _) in _analyse(model, example)[1].items()}


def channel_groups(model: nn.Module, example: Inputs) -> dict[str, int]:
    """Root layer name -> output channels, for every group whose channels can be removed.

    Never the model's output layer, never a group that reaches into nn.MultiheadAttention.
    """
    return {root: info.channels for root, info in group_details(model, example).items()}


def kept_channels(n: int, sparsity: float, multiple: int | None = None) -> int:
    """Channels a group keeps: rounded to the multiple (fast kernels), never more than n."""
    return min(round_channels(n * (1 - sparsity), multiple), n)


def sparsity_choices(channels: int, sparsities: tuple[float, ...],
                     multiple: int | None = None) -> tuple[float, ...]:
    """The sparsities that give distinct kept counts (0.0 first): a root's sparsity knob."""
    seen, result = {channels}, [0.0]
    for s in sparsities:
        kept = kept_channels(channels, s, multiple)
        if s > 0.0 and kept not in seen:
            seen.add(kept)
            result.append(s)
    return tuple(result)


def _gradients(model: nn.Module, data: Split, kinds: set[str], samples: int, batch: int,
               fisher_batch: int, loss_fn: Loss = cross_entropy
               ) -> dict[str, dict[nn.Parameter, torch.Tensor]]:
    """Per importance kind: parameter -> the tensor its scorer reads as `.grad`.

    taylor: gradient of the mean loss over the samples. fisher: mean over micro-batches of the
    squared micro-batch gradient (the empirical Fisher diagonal; exact per-sample Fisher with
    fisher_batch=1, which costs one backward pass per sample - 40 s on the 26M-weight default).
    NOTE: tp's GroupHessianImportance.accumulate_grad keys by parameter but checks by name, so
    it keeps only the last sample; the Fisher is accumulated here instead.
    """
    sample = Split(data).head(samples, seed=0)
    total = len(sample)
    params = list(model.parameters())
    sums = {k: {p: torch.zeros_like(p) for p in params} for k in kinds}

    def grads(b: Batch) -> Iterator[tuple[nn.Parameter, torch.Tensor]]:
        loss = loss_fn(call(model, b.inputs), b.labels)
        for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True), strict=True):
            if g is not None:
                yield p, g

    with _traceable(model):
        model.eval()  # the deployed function: BatchNorm statistics fixed, no dropout
        if "taylor" in kinds:
            for b in sample.batches(batch):
                for p, g in grads(b):
                    sums["taylor"][p].add_(g, alpha=len(b) / total)
        if "fisher" in kinds:
            n = math.ceil(total / fisher_batch)
            for b in sample.batches(fisher_batch):
                for p, g in grads(b):
                    sums["fisher"][p].addcmul_(g, g, value=1.0 / n)
    return sums


def _scorer(kind: str) -> tp.importance.Importance:
    if kind == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if kind == "taylor":
        return tp.importance.GroupTaylorImportance()
    return tp.importance.GroupHessianImportance()


def _prune_indices(imp: torch.Tensor, keep: int, ch_groups: int) -> list[int]:
    """The lowest-importance channels; with conv groups, the same positions in every group."""
    n = len(imp)
    if ch_groups == 1:
        return sorted(torch.argsort(imp)[: n - keep].tolist())
    size = n // ch_groups
    local = torch.argsort(imp.view(ch_groups, size).mean(dim=0))[: size - keep // ch_groups]
    return sorted((local[None, :] + torch.arange(ch_groups)[:, None] * size).reshape(-1).tolist())


def _choose(model: nn.Module, plan: Mapping[str, tuple[float, str]], example: Inputs,
            data: Split | None, samples: int, batch: int, fisher_batch: int,
            loss: Loss = cross_entropy) -> tuple[tp.DependencyGraph, dict[str, list[int]]]:
    """The graph and, per planned root, the channel indices to remove (scored, not yet cut).

    Every group is scored on the unpruned model; groups never share output channels, so one
    group's indices stay valid while another group is cut.
    """
    for name, (sparsity, kind) in plan.items():
        if kind not in IMPORTANCES:
            raise ValueError(f"importance of {name!r} must be one of {IMPORTANCES}, got {kind!r}")
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity of {name!r} must be in [0, 1), got {sparsity}")
    active = {name: v for name, v in plan.items() if v[0] > 0.0}
    kinds = {kind for _, kind in active.values() if kind in GRADIENT_IMPORTANCES}
    if kinds and data is None:
        raise ValueError(f"importance {sorted(kinds)} needs training data")
    dg, groups = _analyse(model, example)
    for name in active:
        if name not in groups:
            raise ValueError(f"layer {name!r} is not the root of a prunable channel group")
    grads = _gradients(model, data, kinds, samples, batch, fisher_batch, loss) \
        if kinds and data is not None else {}
    params = list(model.parameters())
    saved = {p: p.grad for p in params}
    chosen: dict[str, list[int]] = {}
    try:
        for name, (sparsity, kind) in active.items():
            info, group = groups[name]
            keep = kept_channels(info.channels, sparsity, info.multiple)
            if keep >= info.channels:
                continue
            for p in params:  # tp's scorers read the gradient statistic from .grad
                p.grad = grads[kind][p] if kind in grads else None
            imp = _scorer(kind)(group)
            chosen[name] = _prune_indices(imp.detach().cpu(), keep, info.conv_groups)
    finally:
        for p, g in saved.items():
            p.grad = g
    return dg, chosen


def select_channels(model: nn.Module, plan: Mapping[str, tuple[float, str]],
                    example: Inputs, data: Split | None = None, samples: int = 64,
                    batch: int = 32, fisher_batch: int = 8, loss: Loss = cross_entropy
                    ) -> dict[str, list[int]]:
    """Root name -> the root's output channels that prune_channels would keep (model untouched)."""
    _, chosen = _choose(model, plan, example, data, samples, batch, fisher_batch, loss)
    channels = channel_groups(model, example)
    return {name: sorted(set(range(channels[name])) - set(idxs)) for name, idxs in chosen.items()}


def prune_channels(model: nn.Module, plan: Mapping[str, tuple[float, str]],
                   example: Inputs, data: Split | None = None, samples: int = 64,
                   batch: int = 32, fisher_batch: int = 8, loss: Loss = cross_entropy) -> None:
    """Remove channels in place: root name -> (sparsity, importance in IMPORTANCES).

    Kept per group: min(round_channels(n * (1 - sparsity)), n). `data` (x, y) feeds the gradient
    importances: `samples` examples, the task's loss, in eval mode. Parameters of pruned layers are
    new nn.Parameter objects (an optimizer built before holds stale ones).
    """
    dg, chosen = _choose(model, plan, example, data, samples, batch, fisher_batch, loss)
    if not chosen:
        return
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    before = _output_shapes(model, example)
    for name, idxs in chosen.items():
        layer = model.get_submodule(name)
        fn = tp.prune_conv_out_channels if isinstance(layer, nn.Conv2d) \
            else tp.prune_linear_out_channels
        dg.get_pruning_group(layer, fn, idxs).prune(record_history=False)
    for n, p in model.named_parameters():  # tp's new Parameters default to requires_grad
        p.requires_grad_(n not in frozen)
    try:
        after = _output_shapes(model, example)
    except RuntimeError as exc:  # a module torch-pruning does not know was left unpruned
        raise TrialFailed(f"channel pruning left an inconsistent model: {exc}") from exc
    if after != before:
        raise TrialFailed(f"channel pruning changed the output shapes {before} -> {after}")


def _output_shapes(model: nn.Module, example: Inputs) -> list[tuple[int, ...]]:
    modes = {m: m.training for m in model.modules()}
    try:
        with torch.no_grad():
            out = model.eval()(*as_inputs(example))
    finally:
        for m, mode in modes.items():
            m.training = mode
    outs = out if isinstance(out, tuple | list) else [out]
    return [tuple(o.shape) for o in outs if isinstance(o, torch.Tensor)]


# --- the knobs --------------------------------------------------------------------------------

class Sparsity(Knob):
    name = "sparsity"
    values = SPARSITIES
    bounds = (0.0, 1.0)
    doc = "fraction of a channel group's output channels physically removed"

    def survey(self, model: nn.Module, example: Inputs) -> Mapping[str, ChannelGroup]:
        return group_details(model, example)

    def offered(self, layer: LayerInfo, offered: Mapping[str, tuple]) -> tuple:
        """Only on the root layer of a channel group, never on the model's output."""
        group = layer.survey.get(self.name)
        return sparsity_choices(group.channels, self.values, group.multiple) if group \
            else self.values[:1]

    def restructure(self, model: nn.Module, policy: object, ctx: BuildContext) -> None:
        plan = {n: (lp.sparsity, lp.importance) for n, lp in policy.layers.items()
                if lp.sparsity}
        if plan:
            prune_channels(model, plan, ctx.example, ctx.data, loss=ctx.loss or cross_entropy)

    def label(self, lp: object) -> str:
        return f"s{lp.sparsity:g}" if lp.sparsity > 0 else ""


class Importance(Knob):
    name = "importance"
    values = IMPORTANCES
    needs = (("sparsity", "harshest"),)
    doc = "which channels go: weight L2 norm, first-order Taylor, or Fisher (OBD)"

    def offered(self, layer: LayerInfo, offered: Mapping[str, tuple]) -> tuple:
        return self.values if len(offered.get("sparsity", ())) > 1 else self.values[:1]

    def label(self, lp: object) -> str:
        return lp.importance if lp.importance != "l2" and lp.sparsity > 0 else ""


SPARSITY = Sparsity()
IMPORTANCE = Importance()
