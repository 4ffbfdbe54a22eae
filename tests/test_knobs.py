"""The issue-4 knobs one by one: what each does to the weights, the stored size and the
fine-tune (soft-threshold rank, N:M, int4/ternary/binary, bf16, QAT, DropConnect, elastic net)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from search.compress.build import apply_precision, build, restructure
from search.compress.lowrank import soft_threshold_rank, threshold_rank
from search.compress.policy import LayerPolicy, Policy
from search.compress.precision import Half, precision_of
from search.compress.quantize import nm_mask, quantize
from search.compress.size import model_stats
from search.compress.space import derive_space
from search.devices.target import load_target
from search.finetune.distill import FinetuneOptions, Teacher, attach_training_transforms, distill


def stats(task, policy):
    return model_stats(build(task.model, policy, task.example), policy, task.example)


def test_soft_thresholding_keeps_the_dominant_directions_and_is_a_fixed_point():
    spiky = torch.tensor([10.0, 9.0, 8.0] + [0.1] * 61)
    flat = torch.linspace(1.0, 0.5, 64)
    assert soft_threshold_rank(spiky, 0.5) == 3
    assert soft_threshold_rank(flat, 0.5) == 64  # same threshold, a flat spectrum keeps all
    for tau in (0.2, 0.5, 0.8):  # at the fixed point the survivors survive their own threshold
        k = soft_threshold_rank(spiky, tau)
        assert (spiky[:k] - tau * spiky[:k].mean() > 0).all()
    ranks = [soft_threshold_rank(torch.logspace(0, -3, 64), t) for t in (0.2, 0.4, 0.6, 0.8)]
    assert ranks == sorted(ranks, reverse=True) and ranks[0] > ranks[-1]


def test_a_threshold_policy_factorizes_to_the_thresholded_rank(tiny_task):
    space = {s.name: s for s in derive_space(tiny_task.model, tiny_task.example)}
    taus = space["fc1"].choices("threshold")
    assert taus[0] == 0.0 and len(taus) > 1
    tau = taus[-1]
    policy = Policy({"fc1": LayerPolicy(threshold=tau)})
    model = build(tiny_task.model, policy, tiny_task.example)
    assert isinstance(model.fc1, nn.Sequential)
    assert model.fc1[0].out_features == threshold_rank(tiny_task.model.fc1, tau)
    assert stats(tiny_task, policy).params < stats(tiny_task, Policy()).params


def test_threshold_is_searched_only_when_asked(tiny_task):
    space = derive_space(tiny_task.model, tiny_task.example, knobs=["rank", "bits"])
    assert all(s.choices("threshold") == (0.0,) and s.choices("sparsity") == (0.0,)
               for s in space)


def test_n_m_sparsity_keeps_n_of_every_m_through_the_fine_tune(tiny_task):
    w = torch.randn(8, 12)
    mask = nm_mask(w, 2, 4)
    assert (mask.reshape(8, 3, 4).sum(dim=2) == 2).all()
    kept = (w.abs() * mask).reshape(8, 3, 4)
    dropped = (w.abs() * ~mask).reshape(8, 3, 4)
    assert (kept.max(dim=2).values >= dropped.max(dim=2).values).all()  # the largest stay

    policy = Policy({"fc1": LayerPolicy(nm="2:4")})
    model = restructure(tiny_task.model, policy, tiny_task.example)
    distill(model, Teacher(tiny_task.model, tiny_task.train), tiny_task.train,
            FinetuneOptions(steps=5))
    model = apply_precision(model, policy)
    groups = (model.fc1.weight != 0).reshape(64, -1, 4).sum(dim=2)
    assert (groups <= 2).all()
    dense, sparse = stats(tiny_task, Policy()), model_stats(model, policy, tiny_task.example)
    fc1 = 4096 * 64  # 32-bit values -> half of them at 32 bits + a 2-bit index each
    assert dense.ideal_size_bytes - sparse.ideal_size_bytes == fc1 * 4 - fc1 // 2 * (32 + 2) // 8


@pytest.mark.parametrize("bits, levels", [(8, 255), (4, 15), (2, 3), (1, 2)])
def test_low_bit_weights_have_that_many_values_per_channel(bits, levels):
    torch.manual_seed(0)
    w = torch.randn(16, 300)
    q = quantize(w, bits)
    assert all(len(torch.unique(row)) <= levels for row in q)
    assert (torch.sign(q) * torch.sign(w) >= 0).all()  # never flips a sign
    if bits == 1:
        assert torch.allclose(q.abs(), w.abs().mean(dim=1, keepdim=True).expand_as(q))


def test_fewer_bits_store_fewer_bytes(tiny_task):
    sizes = [stats(tiny_task, Policy({"fc1": LayerPolicy(bits=b)})).ideal_size_bytes
             for b in (32, 16, 8, 4, 2, 1)]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 6
    fc1 = 4096 * 64
    assert sizes[0] - sizes[5] == fc1 * 4 - fc1 // 8 - 64 * 4  # 1 bit + an fp32 scale/channel


def test_low_rank_factors_are_quantized_too(tiny_task):
    low = Policy({"fc1": LayerPolicy(rank=0.25)})
    both = Policy({"fc1": LayerPolicy(rank=0.25, bits=4)})
    model = build(tiny_task.model, both, tiny_task.example)
    for factor in model.fc1:
        assert all(len(torch.unique(row)) <= 15 for row in factor.weight)
    assert stats(tiny_task, both).ideal_size_bytes < stats(tiny_task, low).ideal_size_bytes


def test_bf16_layers_compute_in_bf16_and_the_target_says_where_that_is_software(tiny_task):
    policy = Policy({"fc1": LayerPolicy(bits=16, half="bf16")})
    model = build(tiny_task.model, policy, tiny_task.example)
    assert isinstance(model.fc1, Half) and model.fc1.layer.weight.dtype == torch.bfloat16
    assert precision_of(LayerPolicy(bits=16, half="bf16")) == "bf16"
    pi4 = load_target("raspberry-pi")  # Cortex-A72: no fp16 arithmetic, no bf16
    assert pi4.software_precisions(policy) == ["bf16"]
    assert pi4.software_precisions(Policy({"fc1": LayerPolicy(bits=16)})) == ["fp16"]
    assert load_target("raspberry-pi-5").software_precisions(
        Policy({"fc1": LayerPolicy(bits=16)})) == []


def test_quantization_aware_fine_tune_trains_through_the_quantizer(tiny_task):
    """QAT fine-tunes the network that is deployed: its forward pass sees the quantized
    weights, the latent fp32 weights get their gradient (straight-through), and quantizing
    after it changes nothing. (Accuracy is no test here: at this size and 40 steps it differs
    between seeds more than between QAT and no QAT.)"""
    policy = Policy({"fc1": LayerPolicy(bits=2)})
    teacher = Teacher(tiny_task.model, tiny_task.train)
    (x,), y = tiny_task.val.tensors
    latent, moved = {}, {}
    for qat in (False, True):
        model = restructure(tiny_task.model, policy, tiny_task.example)
        options = FinetuneOptions(steps=40, qat=qat)
        attach_training_transforms(model, policy, options)
        if qat:
            assert len(torch.unique(model.fc1.weight[0])) <= 3  # the forward sees ternary
            plain = restructure(tiny_task.model, policy, tiny_task.example)
            assert_straight_through(model, plain, x[:64], y[:64])
        distill(model, teacher, tiny_task.train, options)
        with torch.no_grad():
            trained = model(x)
        latent[qat] = (model.fc1.parametrizations.weight.original if qat
                       else model.fc1.weight).detach().clone()
        model = apply_precision(model, policy)
        assert all(len(torch.unique(row)) <= 3 for row in model.fc1.weight)
        with torch.no_grad():
            moved[qat] = float((model(x) - trained).abs().max())
    assert not torch.allclose(latent[True], latent[False])  # the quantizer shaped the training
    assert moved[True] < 1e-4 < moved[False], moved  # QAT trained what is deployed; else not


def assert_straight_through(model: nn.Module, plain: nn.Module, x: torch.Tensor,
                            y: torch.Tensor) -> None:
    """The latent weight's gradient is the loss's gradient at the quantized weight (STE): not
    zero (rounding's true gradient), not the gradient at the unquantized weight. `plain`: the
    same untrained model without the quantizer."""
    import torch.nn.functional as F

    model.eval()
    plain.eval()
    w = model.fc1.parametrizations.weight.original
    (through,) = torch.autograd.grad(F.cross_entropy(model(x), y), w)
    assert through.abs().sum() > 0

    def grad_at(weight: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            plain.fc1.weight.copy_(weight)
        return torch.autograd.grad(F.cross_entropy(plain(x), y), plain.fc1.weight)[0]

    torch.testing.assert_close(through, grad_at(model.fc1.weight.detach()))
    assert not torch.allclose(through, grad_at(w.detach()))


def test_dropconnect_is_random_in_training_and_off_in_evaluation(tiny_task):
    policy = Policy({"fc1": LayerPolicy(rank=0.5)})
    model = restructure(tiny_task.model, policy, tiny_task.example)
    attach_training_transforms(model, policy, FinetuneOptions(dropconnect=0.5, qat=False))
    x = tiny_task.val.inputs(4)[0]
    model.train()
    model.drop = nn.Identity()  # only the weight noise remains
    assert not torch.allclose(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))
    model = apply_precision(model, policy)
    assert not any("parametrizations" in n for n, _ in model.named_parameters())


def test_elastic_net_penalty_shrinks_the_compressed_weights(tiny_task):
    policy = Policy({"fc1": LayerPolicy(rank=0.5)})
    teacher = Teacher(tiny_task.model, tiny_task.train)
    norms = []
    for l1 in (0.0, 1e-3):
        model = restructure(tiny_task.model, policy, tiny_task.example)
        options = FinetuneOptions(steps=30, qat=False, l1=l1, l2=l1)
        penalized = attach_training_transforms(model, policy, options)
        assert len(penalized) == 2  # both factors of fc1, nothing else
        distill(model, teacher, tiny_task.train, options, penalized=penalized)
        norms.append(sum(float(m.weight.detach().abs().sum()) for m in model.fc1))
    assert norms[1] < norms[0]


def test_int8_linears_become_integer_layers_that_compile_to_int8_kernels(tiny_task, tmp_path):
    from search.backend.compile import Compiler, to_relax
    from search.backend.int8 import int8_kernels, lower_int8
    from search.backend.measure import run_and_time
    from search.backend.onnx import check_onnx, to_onnx
    from search.compress.int8 import Int8Linear
    from search.devices.target import Measurement

    policy = Policy({"fc1": LayerPolicy(bits=8), "fc2": LayerPolicy(rank=0.5, bits=8)})
    model = build(tiny_task.model, policy, tiny_task.example, tiny_task.train)
    assert isinstance(model.fc1, Int8Linear) and isinstance(model.fc2[1], Int8Linear)
    assert model.fc1.weight_q.dtype == torch.int8
    storage_only = build(tiny_task.model, policy, tiny_task.example)  # no calibration data
    assert isinstance(storage_only.fc1, nn.Linear)
    real, stored = (model_stats(m, policy, tiny_task.example) for m in (model, storage_only))
    assert real.flops == stored.flops
    assert abs(real.ideal_size_bytes - stored.ideal_size_bytes) < 2048
    (x,), y = tiny_task.val.tensors
    agree = (model(x).argmax(1) == tiny_task.model(x).argmax(1)).float().mean()
    assert agree > 0.9  # calibrated 8-bit activations keep the predictions
    lowered = lower_int8(to_relax(model, tiny_task.example), target=load_target("host").tvm())
    assert len(int8_kernels(lowered)) == 3  # fc1 and both factors of fc2
    with torch.no_grad():
        ref = model(*tiny_task.example)
    compiled = Compiler(load_target("host"), tmp_path / "db", trials_per_task=0).compile(
        to_relax(model, tiny_task.example))
    assert run_and_time(compiled.executable, tiny_task.example, ref, Measurement(1, 1, 1),
                        atol=1e-3).median_ms > 0
    to_onnx(model, tiny_task.example, tmp_path / "m.onnx")
    assert check_onnx(tmp_path / "m.onnx", tiny_task.example, ref, atol=1e-3) <= 1e-3
