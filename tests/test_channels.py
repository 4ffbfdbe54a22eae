"""Structured channel pruning over coupled groups (search/channels.py, torch-pruning)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from search.compress.channels import (
    IMPORTANCES,
    channel_groups,
    group_details,
    kept_channels,
    prune_channels,
    select_channels,
    sparsity_choices,
)
from search.tasks.digits import DigitsNet, MobileNetTiny, ResNetTiny, TransformerTiny

EXAMPLE = torch.zeros(1, 1, 16, 16)
MODELS = {
    "digits": lambda: DigitsNet(64),
    "resnet": lambda: ResNetTiny(16),
    "mobilenet": lambda: MobileNetTiny(16),
    "transformer": lambda: TransformerTiny(32),
}
GROUPS = {  # root -> channels; never the output layer, never attention or the residual stream
    "digits": {"conv1": 32, "conv2": 64, "fc1": 64, "fc2": 64},
    "resnet": {"stem": 16, "layer1.conv1": 16, "layer2.conv1": 32, "layer2.conv2": 32,
               "layer3.conv1": 64, "layer3.conv2": 64},
    "mobilenet": {"stem": 16, "blocks.0.expand": 64, "blocks.1.expand": 64,
                  "blocks.1.project": 32, "blocks.2.expand": 128, "blocks.3.expand": 128,
                  "blocks.3.project": 64, "head": 128},
    "transformer": {"blocks.0.linear1": 128, "blocks.1.linear1": 128},
}


def make(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 16, 16, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def widths(model: nn.Module) -> dict[str, int]:
    return {n: m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
            for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}


@pytest.mark.parametrize("name", list(MODELS))
def test_groups_of_each_model(name):
    model = make(name)
    assert channel_groups(model, EXAMPLE) == GROUPS[name]
    details = group_details(model, EXAMPLE)
    if name == "resnet":  # the stem and layer1's second conv meet at the identity add
        assert {"stem", "bn", "layer1.conv2", "layer1.bn2"} <= set(details["stem"].members)
        assert "layer2.shortcut.0" in details["layer2.conv2"].members  # projection shortcut
    if name == "mobilenet":  # a depthwise conv follows its expand; the skip couples projects
        assert "blocks.0.depthwise" in details["blocks.0.expand"].members
        assert "blocks.0.project" in details["stem"].members
        assert {"blocks.1.project", "blocks.2.project"} <= set(details["blocks.1.project"].members)
    if name == "transformer":
        assert details["blocks.0.linear1"].members == ("blocks.0.linear1", "blocks.0.linear2")


@pytest.mark.parametrize("importance", IMPORTANCES)
@pytest.mark.parametrize("name", list(MODELS))
def test_half_of_every_group_goes_and_the_model_still_runs_and_exports(name, importance):
    model = make(name)
    pruned = copy.deepcopy(model)
    prune_channels(pruned, {r: (0.5, importance) for r in GROUPS[name]}, EXAMPLE, data())
    assert n_params(pruned) < n_params(model)
    before, after = widths(model), widths(pruned)
    changed = {n for n in before if after[n] != before[n]}
    assert changed and all(after[n] % 8 == 0 for n in changed)
    for root, n in GROUPS[name].items():
        assert after[root] == kept_channels(n, 0.5) or n <= 8
    assert channel_groups(pruned, EXAMPLE).keys() == GROUPS[name].keys()  # same structure
    x = data(4)[0]
    with torch.no_grad():
        y = pruned(x)
    assert y.shape == (4, 10) and torch.isfinite(y).all()
    exported = torch.export.export(pruned.eval(), (EXAMPLE,))
    assert torch.allclose(exported.module()(x[:1]), pruned(x[:1]), atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_zero_sparsity_leaves_the_model_alone(name):
    model = make(name)
    pruned = copy.deepcopy(model)
    prune_channels(pruned, {r: (0.0, "l2") for r in GROUPS[name]}, EXAMPLE)
    x = data(8)[0]
    with torch.no_grad():
        assert torch.equal(pruned(x), model(x))
    assert widths(pruned) == widths(model)


def _zero(model: nn.Module, root: str, idxs: list[int]) -> None:
    """Zero every weight a group's channels touch (tp's own group says which slices)."""
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=EXAMPLE, verbose=False)
    layer = model.get_submodule(root)
    fn = tp.prune_conv_out_channels if isinstance(layer, nn.Conv2d) \
        else tp.prune_linear_out_channels
    with torch.no_grad():
        for dep, ids in dg.get_pruning_group(layer, fn, idxs):
            m = dep.target.module
            if isinstance(m, nn.Conv2d | nn.Linear) and not dg.is_out_channel_pruning_fn(
                    dep.handler):
                if isinstance(m, nn.Conv2d) and m.groups > 1:  # grouped: per-group slices
                    per_in, per_out = m.in_channels // m.groups, m.out_channels // m.groups
                    for c in ids:
                        g, local = divmod(c, per_in)
                        m.weight[g * per_out:(g + 1) * per_out, local] = 0
                else:
                    m.weight[:, ids] = 0
            elif isinstance(m, nn.Conv2d | nn.Linear | nn.BatchNorm2d):
                m.weight[ids] = 0
                if m.bias is not None:
                    m.bias[ids] = 0
    model.train(False)


@pytest.mark.parametrize("name", list(MODELS))
def test_removing_dead_channels_is_exact_through_adds_depthwise_and_batchnorm(name):
    """Zero half of every group's channels in all the layers they touch: l2 pruning must
    remove exactly those, and the smaller model must compute the same function."""
    model = make(name)
    gen = torch.Generator().manual_seed(2)
    dead = {}
    for root, n in GROUPS[name].items():
        dead[root] = sorted(torch.randperm(n, generator=gen)[: n // 2].tolist())
        _zero(model, root, dead[root])
    plan = {r: (0.5, "l2") for r in GROUPS[name]}
    kept = select_channels(model, plan, EXAMPLE)
    for root, n in GROUPS[name].items():
        assert kept[root] == sorted(set(range(n)) - set(dead[root])), root
    pruned = copy.deepcopy(model)
    prune_channels(pruned, plan, EXAMPLE)
    x = data(8)[0]
    with torch.no_grad():
        assert torch.allclose(pruned(x), model(x), atol=1e-5)


def test_the_importance_knob_changes_which_channels_stay():
    model = make("resnet")
    plan_l2 = {r: (0.5, "l2") for r in GROUPS["resnet"]}
    plan_taylor = {r: (0.5, "taylor") for r in GROUPS["resnet"]}
    plan_fisher = {r: (0.5, "fisher") for r in GROUPS["resnet"]}
    l2 = select_channels(model, plan_l2, EXAMPLE)
    taylor = select_channels(model, plan_taylor, EXAMPLE, data())
    fisher = select_channels(model, plan_fisher, EXAMPLE, data())
    assert any(l2[r] != taylor[r] for r in l2)
    assert any(l2[r] != fisher[r] for r in l2)


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 16, 3, padding=1)
        self.b = nn.Conv2d(1, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(32)
        self.c = nn.Conv2d(32, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.c(x)), 1).flatten(1))


class Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 32, 3, padding=1)
        self.g = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.bn = nn.BatchNorm2d(32)
        self.h = nn.Conv2d(32, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.g(F.relu(self.a(x)))))
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.h(x)), 1).flatten(1))


def test_concatenated_producers_are_separate_groups_and_the_consumer_follows():
    torch.manual_seed(0)
    model = Concat().eval()
    assert channel_groups(model, EXAMPLE) == {"a": 16, "b": 16, "c": 16}
    prune_channels(model, {"a": (0.5, "l2"), "b": (0.25, "taylor")}, EXAMPLE, data())
    assert (model.a.out_channels, model.b.out_channels) == (8, 16)
    assert model.bn.num_features == 24 and model.c.in_channels == 24
    assert model(data(2)[0]).shape == (2, 10)


def test_grouped_convs_lose_the_same_slots_in_every_group():
    torch.manual_seed(0)
    model = Grouped().eval()
    details = group_details(model, EXAMPLE)
    assert details["a"].conv_groups == 4 and details["g"].conv_groups == 4
    local = [0, 2, 5, 7]  # the same 4 of 8 slots in each of g's 4 input groups
    dead = [grp * 8 + i for grp in range(4) for i in local]
    _zero(model, "a", dead)
    reference = copy.deepcopy(model)
    prune_channels(model, {"a": (0.5, "l2"), "g": (0.5, "fisher")}, EXAMPLE, data())
    assert model.a.out_channels == 16 and model.g.in_channels == 16 and model.g.groups == 4
    assert model.g.out_channels == 16 and model.bn.num_features == 16
    pruned_a = copy.deepcopy(reference)
    prune_channels(pruned_a, {"a": (0.5, "l2")}, EXAMPLE)
    x = data(4)[0]
    with torch.no_grad():
        assert torch.allclose(pruned_a(x), reference(x), atol=1e-5)
        assert model(x).shape == (4, 10)


def test_bad_plans_are_refused():
    model = make("resnet")
    with pytest.raises(ValueError, match="needs training data"):
        prune_channels(model, {"stem": (0.5, "taylor")}, EXAMPLE)
    with pytest.raises(ValueError, match="importance"):
        prune_channels(model, {"stem": (0.5, "random")}, EXAMPLE)
    for name in ("fc", "layer1.conv2"):  # the output layer; a member, not a root
        with pytest.raises(ValueError, match="not the root"):
            prune_channels(model, {name: (0.5, "l2")}, EXAMPLE)


def test_pruning_leaves_modes_flags_and_gradients_as_they_were():
    model = make("mobilenet").train()
    model.stem.weight.requires_grad_(False)
    prune_channels(model, {r: (0.5, "fisher") for r in GROUPS["mobilenet"]}, EXAMPLE, data())
    assert all(m.training for m in model.modules())
    assert not model.stem.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_sparsity_choices_offer_distinct_kept_counts():
    assert sparsity_choices(16, (0.0, 0.25, 0.5, 0.75)) == (0.0, 0.5)  # 12 -> 16 (rounded), 8
    assert sparsity_choices(64, (0.0, 0.25, 0.5, 0.75)) == (0.0, 0.25, 0.5, 0.75)
    assert sparsity_choices(8, (0.0, 0.25, 0.5, 0.75)) == (0.0,)


class InputAdd(nn.Module):
    """A residual add with the model's own input: the input's width cannot shrink."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(8, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.b(F.relu(self.a(x))) + x)
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.c(x)), 1).flatten(1))


def test_a_group_tied_to_the_model_input_or_output_is_not_offered():
    example = torch.zeros(1, 8, 8, 8)
    assert channel_groups(InputAdd(), example) == {"a": 16, "c": 16}  # not b, not fc
