from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from search.compress.build import build, output_tolerance, restructure
from search.compress.lowrank import factorize, factorized_rank
from search.compress.policy import LayerPolicy, Policy
from search.compress.precision import Half
from search.compress.size import model_stats


def stats(task, policy):
    return model_stats(build(task.model, policy, task.example), policy, task.example)


def test_low_rank_replaces_the_layer_by_two_smaller_ones(tiny_task):
    base = stats(tiny_task, Policy())
    policy = Policy({"fc1": LayerPolicy(rank=0.25), "conv2": LayerPolicy(rank=0.25)})
    model = build(tiny_task.model, policy, tiny_task.example)
    fc1 = model.fc1
    assert isinstance(fc1, nn.Sequential) and fc1[0].out_features == 16  # 64 * 0.25
    assert isinstance(model.conv2, nn.Sequential) and model.conv2[1].kernel_size == (1, 1)
    low = model_stats(model, policy, tiny_task.example)
    assert low.params < base.params and low.flops < base.flops
    assert low.ideal_size_bytes < base.ideal_size_bytes


@pytest.mark.parametrize("layer, split", [
    (nn.Linear(48, 40), "channel"), (nn.Conv2d(8, 16, 3, padding=1), "channel"),
    (nn.Conv2d(8, 16, 3, padding=1), "spatial"),
    (nn.Conv2d(8, 16, (3, 5), stride=(2, 1), padding=(1, 2)), "spatial"),
])
def test_factorization_at_full_rank_is_exact(layer, split):
    torch.manual_seed(0)
    x = torch.randn(2, 48) if isinstance(layer, nn.Linear) else torch.randn(2, 8, 9, 9)
    pair = factorize(layer, factorized_rank(layer, 1.0, split), split)
    assert torch.allclose(pair(x), layer(x), atol=1e-4)
    if split == "spatial":  # kx1 then 1xk
        assert pair[0].kernel_size[1] == 1 and pair[1].kernel_size[0] == 1


def test_channel_pruning_removes_the_weakest_channels_for_real(tiny_task):
    model = copy.deepcopy(tiny_task.model)
    with torch.no_grad():  # make half of conv1's channels dead: removing them changes nothing
        model.conv1.weight[16:] = 0
        model.conv1.bias[16:] = -1.0  # relu(negative) == 0 downstream
        model.conv2.weight[:, 16:] = 0  # (the group's norm counts what reads them too)
    policy = Policy({"conv1": LayerPolicy(sparsity=0.5)})
    pruned = restructure(model, policy, tiny_task.example)
    assert pruned.conv1.out_channels == 16 and pruned.conv2.in_channels == 16
    x = tiny_task.val.inputs(8)[0]
    assert torch.allclose(pruned(x), model(x), atol=1e-5)
    assert model_stats(pruned, policy, x).params < model_stats(model, Policy(), x).params


def test_pruning_through_flatten_shrinks_the_linear_inputs(tiny_task):
    policy = Policy({"conv2": LayerPolicy(sparsity=0.25), "fc1": LayerPolicy(sparsity=0.5)})
    model = build(tiny_task.model, policy, tiny_task.example)
    assert model.conv2.out_channels == 48 and model.fc1.in_features == 48 * 8 * 8
    assert model.fc1.out_features == 32 and model.fc2.in_features == 32
    assert model(*tiny_task.example).shape == (1, 10)


def test_precision_halves_or_quarters_the_stored_bytes(tiny_task):
    full = stats(tiny_task, Policy({"fc1": LayerPolicy()}))
    half = stats(tiny_task, Policy({"fc1": LayerPolicy(bits=16)}))
    int8 = stats(tiny_task, Policy({"fc1": LayerPolicy(bits=8)}))
    fc1_weight = 4096 * 64
    # (the bias stays fp32)
    assert full.ideal_size_bytes - half.ideal_size_bytes == fc1_weight * 2 + 64 * 2 - 64 * 2
    # (+ per-channel scales)
    assert full.ideal_size_bytes - int8.ideal_size_bytes == fc1_weight * 3 - 64 * 4
    model = build(tiny_task.model, Policy({"fc1": LayerPolicy(bits=16)}), tiny_task.example)
    assert isinstance(model.fc1, Half) and model.fc1.layer.weight.dtype == torch.float16
    q = build(tiny_task.model, Policy({"fc1": LayerPolicy(bits=8)}), tiny_task.example)
    w = q.fc1.weight
    scale = w.abs().amax(dim=1, keepdim=True) / 127
    assert torch.allclose(w / scale, (w / scale).round(), atol=1e-3)  # 255 levels per channel


def test_magnitude_pruning_zeros_weights_survives_fine_tune_and_stores_sparse(tiny_task):
    from search.compress.build import apply_precision
    from search.finetune.distill import FinetuneOptions, Teacher, distill

    policy = Policy({"fc1": LayerPolicy(prune=0.9), "conv2": LayerPolicy(prune=0.5)})
    model = restructure(tiny_task.model, policy, tiny_task.example)
    distill(model, Teacher(tiny_task.model, tiny_task.train), tiny_task.train,
            FinetuneOptions(steps=5))
    model = apply_precision(model, policy)  # the masks become plain zeros here
    assert sorted(dict(model.fc1.named_parameters())) == ["bias", "weight"]  # masks baked in
    zeros = float((model.fc1.weight == 0).float().mean())
    assert zeros >= 0.9 - 1e-3 and float((model.conv2.weight == 0).float().mean()) >= 0.5 - 1e-3
    base = model_stats(tiny_task.model, Policy(), tiny_task.example)
    pruned = model_stats(model, policy, tiny_task.example)
    assert pruned.ideal_size_bytes < base.ideal_size_bytes  # counted sparse
    assert pruned.params == base.params


def test_weight_sharing_leaves_2_to_the_b_values_and_counts_codes_not_floats(tiny_task):
    policy = Policy({"fc1": LayerPolicy(share=2), "fc2": LayerPolicy(share=4, prune=0.5)})
    model = build(tiny_task.model, policy, tiny_task.example)
    assert len(torch.unique(model.fc1.weight)) <= 4
    fc2 = model.fc2.weight
    assert len(torch.unique(fc2[fc2 != 0])) <= 16 and float((fc2 == 0).float().mean()) >= 0.5
    base = model_stats(tiny_task.model, Policy(), tiny_task.example)
    shared = model_stats(model, policy, tiny_task.example)
    fc1 = 4096 * 64
    # fc1 alone goes from 32 to 2 bits per weight (+ a 4-value codebook)
    assert base.ideal_size_bytes - shared.ideal_size_bytes >= fc1 * 4 - fc1 // 4 - 16
    x = tiny_task.val.inputs(64)[0]
    agree = (model(x).argmax(1) == tiny_task.model(x).argmax(1)).float().mean()
    assert agree > 0.5  # 4 shared values still carry the layer (no fine-tune here)


def test_output_tolerance_grows_with_the_layers_that_round_differently():
    assert output_tolerance(Policy({})) == 1e-3
    assert output_tolerance(Policy({"a": LayerPolicy(rank=0.5)})) == 1e-3  # exact in fp32
    one = output_tolerance(Policy({"a": LayerPolicy(bits=8)}))
    assert one == pytest.approx(5e-2)
    four = output_tolerance(Policy({n: LayerPolicy(bits=8) for n in "abcd"}))
    assert four == pytest.approx(2 * one)  # independent rounding: in quadrature
    mixed = output_tolerance(Policy({"a": LayerPolicy(bits=16, half="bf16"),
                                     "b": LayerPolicy(bits=8, rank=0.5)}))
    assert mixed == pytest.approx((0.1 ** 2 + 0.05 ** 2) ** 0.5)


def test_a_conv_model_fine_tunes_in_channels_last_and_comes_back_contiguous():
    """The fine-tune runs convolutions in channels-last memory (oneDNN's fast CPU path): the
    model sees channels-last batches and weights during the steps, and its weights come back
    in the usual layout, with a pruning mask and a fake quantizer still applied."""
    from search.finetune.distill import (
        FinetuneOptions,
        Teacher,
        attach_training_transforms,
        distill,
    )

    seen: list[tuple[bool, bool]] = []

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append((x.is_contiguous(memory_format=torch.channels_last),
                         self.conv.weight.is_contiguous(memory_format=torch.channels_last)))
            return self.conv(x)

    torch.manual_seed(0)
    teacher = nn.Sequential(Probe(), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                            nn.Linear(8, 3)).eval()
    data = (torch.randn(32, 3, 8, 8), torch.randint(0, 3, (32,)))
    student = copy.deepcopy(teacher)
    policy = Policy({"0.conv": LayerPolicy(prune=0.5, bits=8)})
    student = restructure(student, policy, data[0][:1])
    options = FinetuneOptions(steps=3)
    attach_training_transforms(student, policy, options)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    seen.clear()
    distill(student, Teacher(teacher, data), data, options, batch=8)
    assert seen[-3:] == [(True, True)] * 3  # the three steps (eval passes may follow)
    state = student.state_dict()
    assert all(v.is_contiguous() for v in state.values())
    assert any(not torch.equal(before[k], v) for k, v in state.items())  # it trained
    mask = [v for k, v in state.items() if "mask" in k]
    assert mask and all(torch.equal(before_v, v) for before_v, v in
                        zip([before[k] for k in state if "mask" in k], mask, strict=True))


def test_an_evaluation_runs_channels_last_without_autograd_and_leaves_the_layout_as_it_was():
    """Evaluation passes (every trial's validation and test accuracy) take oneDNN's
    channels-last path too; inside a fine-tune (early stopping's checkpoints) the model stays
    channels-last for the steps that follow."""
    from search.core.data import channels_last, outputs_of

    seen: list[bool] = []

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x.is_contiguous(memory_format=torch.channels_last))
            return self.conv(x).mean((2, 3))

    torch.manual_seed(0)
    model = Probe()
    data = (torch.randn(20, 3, 8, 8), torch.randint(0, 3, (20,)))
    expected = model(data[0])
    out, labels = outputs_of(model, data, batch=8)
    assert seen[1:] == [True] * 3 and not out.requires_grad and torch.equal(labels, data[1])
    assert torch.allclose(out, expected.detach(), atol=1e-5)
    assert model.conv.weight.is_contiguous()
    with channels_last(model):
        outputs_of(model, data, batch=8)
        assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)
        assert not model.conv.weight.is_contiguous()
    assert model.conv.weight.is_contiguous()
    # 16-bit float convolutions run slower channels-last on CPU: such a model stays as it is
    half = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1).half())
    with channels_last(half) as layout:
        assert half[0].weight.is_contiguous() and layout((data[0],))[0].is_contiguous()
