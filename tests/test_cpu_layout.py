"""The CPU graph passes (search.backend.layout) change how a model is computed, not what."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from search.backend.compile import to_relax
from search.backend.layout import cpu_layout


def run(mod, x: torch.Tensor) -> np.ndarray:
    import tvm
    from tvm import relax

    ex = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))
    return relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy())).numpy()


def test_gelu_is_computed_with_the_polynomial_erf_and_matches_torch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 4)).eval()
    x = torch.randn(2, 8, 16) * 4  # far into both tails
    mod = cpu_layout(to_relax(model, x))
    text = mod.script(show_meta=False)
    assert "R.nn.gelu" not in text and "fast_erf" in text  # no scalar libm erff per element
    with torch.no_grad():
        np.testing.assert_allclose(run(mod, x), model(x).numpy(), atol=1e-5, rtol=1e-5)


def test_tanh_gelu_and_bn_relu6_convs_keep_their_outputs():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.GELU(approximate="tanh"),
                          ).eval()
    model[1].running_mean.uniform_(-1, 1)
    x = torch.randn(1, 3, 12, 12)
    mod = cpu_layout(to_relax(model, x))
    assert "batch_norm" not in mod.script(show_meta=False)  # folded into the (biasless) conv
    with torch.no_grad():
        np.testing.assert_allclose(run(mod, x), model(x).numpy(), atol=1e-5, rtol=1e-5)


def test_weights_are_folded_in_numpy_and_leave_tvm_nothing_to_fold():
    """BatchNorm folding, the HWIO transposes and an int8 layer's widened weights are computed
    in numpy (TVM's FoldConstant builds each with LLVM, and legalizes the whole graph to look
    for them): what is left is a graph TVM's own folding would not change, and that computes
    what the model does."""
    from tvm import ir, relax

    from search.backend.layout import fold_constants
    from search.compress.int8 import ActQuant, Int8Conv2d

    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                          nn.ReLU(), Int8Conv2d(nn.Conv2d(8, 16, 1), ActQuant(0.05, 0))).eval()
    model[1].running_mean.uniform_(-1, 1)
    x = torch.randn(1, 3, 10, 10)
    imported = to_relax(model, x)
    assert "R.astype(metadata" in imported.script(show_meta=False)  # int8 weight, widened
    for mod in (fold_constants(imported), cpu_layout(imported)):
        ir.assert_structural_equal(relax.transform.FoldConstant()(mod), mod)
        assert "R.astype(metadata" not in mod.script(show_meta=False)
    with torch.no_grad():
        np.testing.assert_allclose(run(cpu_layout(imported), x), model(x).numpy(), atol=1e-4,
                                   rtol=1e-4)
