"""Same function: every knob at its identity value, and factorization at full rank, reproduce the
original model, compared with the original (not with the compressed model itself), on layers
that differ in the ways that broke before: channels-last Linears, every conv padding mode,
dilated and strided convs, layers without a bias."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from search.compress.build import build
from search.compress.knob import REGISTRY
from search.compress.lowrank import factorize
from search.compress.policy import LayerPolicy, Policy
from search.compress.precision import Half

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def conv(padding_mode: str = "zeros", bias: bool = True, dilation: int = 1,
         stride: int = 1) -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(6, 10, 3, stride=stride, padding=dilation, dilation=dilation, bias=bias,
                     padding_mode=padding_mode).eval()


def x_image() -> torch.Tensor:
    return torch.randn(2, 6, 9, 11, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("padding_mode", PADDING_MODES)
@pytest.mark.parametrize("split", ["channel", "spatial"])
def test_a_conv_factorized_at_full_rank_is_the_original_for_every_padding_mode(padding_mode,
                                                                               split):
    layer = conv(padding_mode)
    full = min(10 * 3, 6 * 3) if split == "spatial" else min(10, 6 * 9)
    pair = factorize(layer, full, split)
    x = x_image()
    with torch.no_grad():
        assert torch.allclose(pair(x), layer(x), atol=1e-4), (padding_mode, split)


@pytest.mark.parametrize("kwargs", [{"bias": False}, {"dilation": 2}, {"stride": 2},
                                    {"dilation": 2, "padding_mode": "reflect"}])
@pytest.mark.parametrize("split", ["channel", "spatial"])
def test_dilated_strided_and_biasless_convs_factorize_exactly_at_full_rank(kwargs, split):
    layer = conv(**kwargs)
    full = min(10 * 3, 6 * 3) if split == "spatial" else min(10, 6 * 9)
    x = x_image()
    with torch.no_grad():
        assert torch.allclose(factorize(layer, full, split)(x), layer(x), atol=1e-4)


@pytest.mark.parametrize("bias", [True, False])
def test_a_linear_factorized_at_full_rank_is_the_original(bias):
    torch.manual_seed(0)
    layer = nn.Linear(12, 7, bias=bias).eval()
    x = torch.randn(3, 5, 12)
    with torch.no_grad():
        assert torch.allclose(factorize(layer, 7)(x), layer(x), atol=1e-5)


class ChannelsLast(nn.Module):
    """A Linear over the last dimension of a 4-D activation (an MLP-Mixer / ConvNeXt block)."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect")
        self.fc = nn.Linear(8, 8, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).permute(0, 2, 3, 1)  # N, H, W, C
        return self.fc(y).mean(dim=(1, 2))


@pytest.mark.parametrize("half", ["fp16", "bf16"])
def test_a_16_bit_channels_last_linear_adds_its_bias_on_the_channel_axis(half):
    torch.manual_seed(0)
    model = ChannelsLast().eval()
    with torch.no_grad():
        model.fc.bias.mul_(10)  # a bias on the wrong axis shows at once
    x = torch.randn(2, 3, 5, 6)
    built = build(model, Policy({"fc": LayerPolicy(bits=16, half=half)}), (x[:1],))
    assert isinstance(built.fc, Half)
    with torch.no_grad():
        err = float((built(x) - model(x)).abs().max())
    assert err < (5e-2 if half == "bf16" else 5e-3), err


def test_every_knob_at_its_identity_value_reproduces_the_original_exactly():
    torch.manual_seed(0)
    model = ChannelsLast(bias=False).eval()
    x = torch.randn(2, 3, 5, 6)
    identity = LayerPolicy(**{name: knob.identity for name, knob in REGISTRY.items()})
    assert identity.is_identity
    policy = Policy({"conv": identity, "fc": identity})
    built = build(model, policy, (x[:1],), data=(x, torch.zeros(2, dtype=torch.long)))
    with torch.no_grad():
        assert torch.equal(built(x), model(x))
    assert type(built.conv) is nn.Conv2d and type(built.fc) is nn.Linear
