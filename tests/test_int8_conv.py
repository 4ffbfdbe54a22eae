"""Real int8 convolutions: torch reference, BatchNorm folding, int8 kernels in the compiled graph
(the 1x1 convs as packed VNNI dense kernels where the CPU has VNNI), compiled output = torch."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from search.backend.compile import to_relax
from search.backend.int8 import int8_kernels, lower_int8
from search.backend.layout import cpu_layout
from search.compress.int8 import (
    ActQuant,
    Int8Conv2d,
    calibrate,
    fold_batchnorm,
    int8_convertible,
    quantize_layers,
)


class Net(nn.Module):
    """A MobileNet-like stack: padded stem on a signed input (zero point != 0), depthwise 3x3
    and 1x1 pointwise on post-ReLU inputs (zero point 0), BatchNorm after each conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False),
                                nn.BatchNorm2d(16), nn.ReLU6())
        self.pw = nn.Sequential(nn.Conv2d(16, 24, 1, bias=False), nn.BatchNorm2d(24))
        self.head = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pw(self.dw(self.stem(x))).mean((2, 3)))


CONVS = ["stem.0", "dw.0", "pw.0"]


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    fp32 = Net()
    for m in fp32.modules():  # BatchNorms with statistics of their own, so folding matters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    fp32.eval()
    q = copy.deepcopy(fp32)
    for name in CONVS:
        assert fold_batchnorm(q, name)
    acts = calibrate(q, CONVS, [torch.randn(8, 3, 24, 24) for _ in range(4)])
    return fp32, quantize_layers(q, acts), acts


@pytest.mark.parametrize("lp", [{"bits": 16}, {"bits": 16, "half": "bf16"},
                                {"rank": 0.5, "bits": 8}, {"rank": 0.5, "bits": 16}])
def test_a_16_bit_or_factorized_layer_leaves_no_batchnorm_kernel_behind(nets, lp):
    """TVM folds a BatchNorm only right after an fp32 conv: behind a 16-bit conv or a factorized
    pair it stayed a kernel of its own (35 on a 16-bit MobileNetV2). The build folds it first."""
    from search.compress.build import build
    from search.compress.policy import LayerPolicy, Policy
    from search.core.data import Split

    fp32 = nets[0]
    x = torch.randn(1, 3, 24, 24)
    data = Split((torch.randn(64, 3, 24, 24), torch.zeros(64, dtype=torch.long)), "train")
    policy = Policy({name: LayerPolicy(**lp) for name in ("stem.0", "pw.0")})
    built = build(fp32, policy, x, data).eval()
    assert not any(isinstance(m, nn.BatchNorm2d) for name, m in built.named_modules()
                   if name.startswith(("stem", "pw")))
    graph = cpu_layout(to_relax(built, x)).script()
    assert graph.count("R.nn.batch_norm(") == 0
    with torch.no_grad():  # the same function still (up to the layers' rounding)
        ref, out = fp32(x), built(x)
    assert (out - ref).abs().max() <= 0.25 * ref.abs().max()


def test_batchnorm_is_folded_into_the_conv_and_replaced_by_identity():
    torch.manual_seed(1)
    net = Net()
    net.stem[1].running_mean.uniform_(-1, 1)
    net.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = net(x)
        assert fold_batchnorm(net, "stem.0")
        assert isinstance(net.stem[1], nn.Identity)
        torch.testing.assert_close(net(x), ref, atol=1e-5, rtol=1e-5)
    assert not fold_batchnorm(net, "head")  # no BatchNorm follows


def test_calibration_sees_a_signed_stem_and_post_relu_inner_inputs(nets):
    _, _, acts = nets
    assert acts["stem.0"].zero_point > 0  # a normalized image: negative values
    assert acts["dw.0"].zero_point == 0 and acts["pw.0"].zero_point == 0  # after ReLU6


def test_int8_conv_is_integer_arithmetic_with_zero_point_padding():
    torch.manual_seed(2)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    q = Int8Conv2d(conv, ActQuant(0.05, 90))
    x = torch.randn(1, 4, 9, 9)
    qx = q.quantize_input(x).to(torch.int64)
    padded = F.pad(qx, (1, 1, 1, 1), value=90)  # zero in the float domain = the zero point
    acc = F.conv2d(padded.double(), q.weight_q.double(), stride=2)  # exact: small integers
    expect = acc * q.scale.double().view(1, -1, 1, 1) + q.bias.double().view(1, -1, 1, 1)
    torch.testing.assert_close(q(x).double(), expect, atol=1e-4, rtol=1e-5)
    # and it is the fp32 conv within the quantization error (inputs inside the calibrated range)
    x = x.clamp(-4.4, 8.2)
    with torch.no_grad():
        err = (q(x) - conv(x)).abs().max()
    assert err < 0.05 * conv(x).abs().max()


def test_int8_net_keeps_its_accuracy_against_fp32(nets):
    fp32, q, _ = nets
    x = torch.randn(16, 3, 24, 24)
    with torch.no_grad():
        ref, out = fp32(x), q(x)
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()
    assert all(isinstance(q.get_submodule(n), Int8Conv2d) for n in CONVS)


def test_reflect_padding_is_not_made_an_int8_conv():
    assert int8_convertible(nn.Conv2d(3, 3, 3, padding=1))
    assert not int8_convertible(nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"))
    assert not int8_convertible(nn.Conv2d(3, 3, 3, padding="same"))
    with pytest.raises(ValueError, match="numeric zero padding"):
        Int8Conv2d(nn.Conv2d(3, 3, 3, padding=1, padding_mode="circular"), 0.1)


def test_state_dict_restores_the_zero_point_used_for_padding(nets):
    _, q, _ = nets
    other = Int8Conv2d(nn.Conv2d(3, 16, 3, 2, 1), ActQuant(0.1, 3))
    other.load_state_dict(q.stem[0].state_dict())
    assert other.pad_value == int(q.stem[0].zero_point) != 3
    x = torch.randn(1, 3, 12, 12)
    torch.testing.assert_close(other(x), q.stem[0](x))


@pytest.mark.parametrize("kind", ["vnni", "sdot", "plain"])
def test_every_int8_conv_lowers_to_an_int8_kernel(nets, kind):
    _, q, _ = nets
    x = torch.randn(1, 3, 24, 24)
    assert int8_kernels(cpu_layout(to_relax(q, x))) == []  # as imported: fp32 convs
    kernels = int8_kernels(lower_int8(cpu_layout(to_relax(q, x)), kind=kind))
    names = sorted(name for name, _ in kernels)
    assert len(kernels) == 3
    for name, dtypes in kernels:  # (sdot's dense kernel: the activation shifted to int8)
        assert [str(d) for d in dtypes[:2]] == ["int8" if "s8" in name else "uint8", "int8"]
    if kind != "plain":  # the 1x1 conv is the packed dense kernel, the others int8 convs
        dense = "dense_u8i8i32" if kind == "vnni" else "dense_s8i8i32"
        assert names == [dense, "relax.nn.conv2d", "relax.nn.conv2d"]
    else:
        assert names == ["relax.nn.conv2d"] * 3


def test_compiled_int8_convs_match_torch_and_carry_int8_weights(nets, tmp_path):
    from search.backend.compile import Compiler
    from search.backend.measure import compile_and_time
    from search.devices.target import Measurement, load_target

    fp32, q, _ = nets
    x = torch.randn(1, 3, 24, 24)
    compiler = Compiler(load_target("host"), tmp_path / "db", trials_per_task=0)
    timed = compile_and_time(q, x, compiler, settings=Measurement(1, 1, 1), atol=1e-4)
    assert timed.compiled.int8_kernels == 3
    full = compile_and_time(fp32, x, compiler, settings=Measurement(1, 1, 1), atol=1e-4)
    conv_weights = sum(fp32.get_submodule(n).weight.numel() for n in CONVS)
    # each conv weight is one byte instead of four in the library
    saved = full.compiled.weights.total - timed.compiled.weights.total
    assert saved >= 3 * conv_weights - 4 * 2 * 56  # (less the per-channel scales and biases)


def test_bits_8_on_a_conv_builds_an_int8_conv_with_its_batchnorm_folded():
    from search.compress.build import build
    from search.compress.space import derive_space, uniform

    torch.manual_seed(3)
    net = Net().eval()
    x = torch.randn(1, 3, 24, 24)
    data = (torch.randn(32, 3, 24, 24), torch.randint(0, 5, (32,)))
    policy = uniform(derive_space(net, x), bits=8)
    built = build(net, policy, x, data=data)
    assert isinstance(built.stem[0], Int8Conv2d) and isinstance(built.stem[1], nn.Identity)
    assert isinstance(built.pw[0], Int8Conv2d)
    with torch.no_grad():
        ref, out = net(data[0]), built(data[0])
    assert (out - ref).abs().max() <= 0.1 * ref.abs().max()
    assert built.stem[0].weight_q.dtype == torch.int8


def test_onnx_form_runs_integer_operators_with_8_bit_weights_in_onnx_runtime(nets, tmp_path):
    import onnx

    from search.backend.onnx import check_onnx, to_onnx

    _, q, _ = nets
    q = copy.deepcopy(q)
    q.head = quantize_layers(nn.Sequential(q.head), {"0": ActQuant(0.02, 0)})[0]
    x = torch.randn(1, 3, 24, 24)
    with torch.no_grad():
        ref = q(x)
    to_onnx(q, x, tmp_path / "m.onnx")
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("ConvInteger") == 3 and ops.count("MatMulInteger") == 1
    assert ops.count("QuantizeLinear") == 4 and "Conv" not in ops and "MatMul" not in ops
    # the weights: 8-bit initializers (uint8, zero point 128: ONNX Runtime's u8 x u8 kernels
    # do not saturate on CPUs without VNNI), read by the integer ops directly
    inits = {i.name: i for i in graph.initializer}
    weights = [inits[n.input[1]] for n in graph.node
               if n.op_type in ("ConvInteger", "MatMulInteger")]
    assert len(weights) == 4 and {w.data_type for w in weights} == {onnx.TensorProto.UINT8}
    # nothing wider than the 8-bit weights is stored for them (no widened copy)
    wide = [i for i in graph.initializer if i.data_type != onnx.TensorProto.UINT8
            and np.prod(i.dims) >= 16 * 3 * 9]
    assert wide == []
    assert check_onnx(tmp_path / "m.onnx", x, ref, atol=1e-4) <= 1e-4


@pytest.mark.parametrize("kind", ["vnni", "sdot", "plain"])
def test_each_int8_form_computes_what_torch_does(nets, kind):
    """Each form's arithmetic (sdot's shift by 128 included), compiled here untuned."""
    import tvm
    from tvm import relax

    from search.backend.int8 import enable_vnni

    _, q, _ = nets
    x = torch.randn(1, 3, 24, 24)
    lowered = lower_int8(cpu_layout(to_relax(q, x)), kind=kind)
    enable_vnni()
    ex = tvm.compile(lowered, target=tvm.target.Target({"kind": "llvm"}))
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy())).numpy()
    with torch.no_grad():
        np.testing.assert_allclose(out, q(x).numpy(), atol=1e-4, rtol=1e-5)
