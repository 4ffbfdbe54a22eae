"""Real int8 Linear: torch reference, int8 ops in the lowered graph, compiled output = torch."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from search.backend.compile import to_relax
from search.backend.int8 import enable_vnni, int8_kernels, int8_kind, lower_int8
from search.compress.int8 import ActQuant, Int8Linear, calibrate, quantize_layers


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 40)  # 40 outputs: not a multiple of the VNNI tile (16)
        self.fc2 = nn.Linear(40, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    fp32 = Mlp().eval()
    batches = [torch.randn(8, 64) for _ in range(4)]
    acts = calibrate(fp32, ["fc1", "fc2"], batches)
    return fp32, quantize_layers(copy.deepcopy(fp32), acts), acts


def test_calibration_gives_uint8_ranges(models):
    _, _, acts = models
    assert acts["fc1"].scale > 0 and 0 < acts["fc1"].zero_point < 255  # signed input
    assert acts["fc2"].zero_point == 0  # post-ReLU input: the whole uint8 range is positive


def test_int8_linear_matches_fp32_within_quantization_error(models):
    fp32, q, acts = models
    x = torch.randn(4, 64)
    with torch.no_grad():
        ref, out = fp32(x), q(x)
    # error budget: half an activation step and half a weight step per product, summed over K
    w = fp32.fc1.weight
    bound = 64 * (acts["fc1"].scale / 2 * w.abs().max() + x.abs().max() * w.abs().max() / 254)
    with torch.no_grad():
        assert (q.fc1(x) - fp32.fc1(x)).abs().max() <= bound
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()
    assert isinstance(q.fc1, Int8Linear) and q.fc1.weight_q.dtype == torch.int8


def test_int8_linear_is_integer_arithmetic():
    lin = nn.Linear(8, 3)
    q = Int8Linear(lin, ActQuant(0.1, 7))
    x = torch.randn(2, 8)
    qx = q.quantize_input(x)
    assert qx.dtype == torch.uint8
    acc = qx.to(torch.int64) @ q.weight_q.to(torch.int64).t()
    expect = acc.double() * q.scale.double() + q.bias.double()
    assert torch.allclose(q(x).double(), expect, atol=1e-5)


@pytest.mark.parametrize("kind", ["plain", "vnni", "sdot"])
def test_lowered_graph_runs_int8_and_matches_torch(models, kind):
    import tvm
    from tvm import relax

    _, q, _ = models
    x = torch.randn(2, 64)
    mod = to_relax(q, x)
    assert int8_kernels(mod) == []  # the frontend widens both operands: no int8 kernel yet
    lowered = lower_int8(mod, kind=kind)
    kernels = int8_kernels(lowered)
    assert len(kernels) == 2
    for _name, dtypes in kernels:  # (sdot: the activation shifted to int8)
        assert [str(d) for d in dtypes[:2]] == ["int8" if kind == "sdot" else "uint8", "int8"]
    if kind == "plain":
        assert all(name == "relax.matmul" for name, _ in kernels)
    # no widened (int32/float) copy of an int8 weight is left in the graph
    text = lowered.script(show_meta=False)
    assert "permute_dims" not in text
    enable_vnni()
    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    ex = tvm.compile(lowered, target=target)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x.numpy())).numpy()
    with torch.no_grad():
        ref = q(x).numpy()
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_fp32_graph_is_left_alone(models):
    fp32, _, _ = models
    x = torch.randn(1, 64)
    mod = to_relax(fp32, x)
    assert tvm_equal(lower_int8(mod, kind="vnni"), mod)


def tvm_equal(a, b) -> bool:
    import tvm_ffi

    return tvm_ffi.structural_equal(a["main"], b["main"])


def test_int8_kind_per_target():
    assert int8_kind({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76",
                      "mattr": ["+neon", "+dotprod"]}) == "sdot"
    assert int8_kind({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72",
                      "mattr": ["+neon"]}) == "plain"
    assert int8_kind({"kind": "llvm", "mcpu": "cascadelake"}) == "vnni"
    assert int8_kind({"kind": "llvm", "mcpu": "haswell"}) == "plain"


class Encoder(nn.Module):
    """Linears on 3-D activations (batch, tokens, features), as in a transformer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 48)
        self.fc2 = nn.Linear(48, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x))).mean(dim=1)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    fp32 = Encoder().eval()
    batches = [torch.randn(4, 8, 64) for _ in range(4)]
    return quantize_layers(copy.deepcopy(fp32), calibrate(fp32, ["fc1", "fc2"], batches))


@pytest.mark.parametrize("kind", ["vnni", "sdot", "plain"])
def test_int8_linears_on_3d_activations_lower_to_int8_kernels(encoder, kind):
    x = torch.randn(1, 8, 64)
    lowered = lower_int8(to_relax(encoder, (x,)), kind=kind)
    assert len(int8_kernels(lowered)) == 2  # the frontend's reshape to 2-D is looked through


def test_compiled_3d_int8_encoder_matches_torch_and_counts_its_int8_kernels(encoder, tmp_path):
    from search.backend.compile import Compiler
    from search.backend.measure import compile_and_time
    from search.devices.target import Measurement, load_target

    compiler = Compiler(load_target("host"), tmp_path / "db", trials_per_task=0)
    timed = compile_and_time(encoder, (torch.randn(1, 8, 64),), compiler,
                             settings=Measurement(1, 1, 1), atol=1e-4)
    assert timed.compiled.int8_kernels == 2 and timed.latency.median_ms > 0


def test_an_int8_layer_the_lowering_misses_fails_the_trial_with_that_reason(encoder, tmp_path,
                                                                          monkeypatch):
    import search.backend.int8
    from search.backend.compile import Compiler
    from search.backend.measure import compile_and_time
    from search.core.errors import TrialFailed
    from search.devices.target import Measurement, load_target

    monkeypatch.setattr(search.backend.int8, "lower_int8", lambda mod, **kw: mod)
    compiler = Compiler(load_target("host"), tmp_path / "db", trials_per_task=0)
    with pytest.raises(TrialFailed, match="2 of 2 int8 layers did not lower to int8 kernels"):
        compile_and_time(encoder, (torch.randn(1, 8, 64),), compiler,
                         settings=Measurement(1, 1, 1), atol=1e-4)
