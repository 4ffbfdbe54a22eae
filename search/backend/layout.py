"""Graph passes before TVM compiles a model for a CPU: the layout its kernels vectorize in.

Measured on the default task (MobileNetV2, bench/RESULTS.md section 11): PyTorch's graph reaches
TVM as NCHW convolutions each followed by its own BatchNorm kernel, so 57 kernels where ONNX
Runtime runs 34 fused ones, and NCHW / OIHW puts a reduction innermost, which LLVM does not
vectorize in fp32. The passes, in order:

1. fold each BatchNorm into the conv before it (TVM's FoldBatchnormToConv2D), then constants;
2. rewrite clip(x, lo, hi) (ReLU6) as minimum(maximum(x, lo), hi): relax.clip has no layout
   rule, so ConvertLayout would wrap every ReLU6 in two transposes;
3. convert convolutions to NHWC activations and HWIO weights (output channels innermost in
   every operand: contiguous 16-lane FMAs), fold the converted weights, tidy the bindings;
4. GELU as x * (0.5 + 0.5 * erf(x / sqrt 2)) with TVM's own polynomial `topi.fast_erf`
   (max error ~1e-6): relax.nn.gelu lowers to a scalar libm erff call per element, which LLVM
   cannot vectorize (on MiniLM, 2.0 of 10.8 ms in one GELU kernel per layer).
"""

from __future__ import annotations

import logging
from typing import Any

_LOG = logging.getLogger(__name__)


def cpu_layout(mod: Any) -> Any:
    """The module with BatchNorms folded and convolutions in NHWC / HWIO."""
    import tvm
    from tvm import relax
    from tvm.relax.transform.fold_batch_norm_to_conv2d_for_inference import (
        FoldBatchnormToConv2D,
    )

    mod = FoldBatchnormToConv2D()(mod)
    mod = relax.transform.FoldConstant()(mod)  # (before ConvertLayout: it needs the folded form)
    mod = _clip_as_min_max(mod)
    mod = _fast_gelu(mod)
    try:
        converted = relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "HWIO"]})(mod)
    except tvm.error.InternalError as exc:  # TVM 0.27's pass fails on some graphs (bad_alloc
        # on a factorized patch embedding): an optimization, so the graph compiles as imported
        _LOG.warning("ConvertLayout failed (%s); compiling in NCHW", str(exc).splitlines()[-1])
        return relax.transform.CanonicalizeBindings()(mod)
    converted = relax.transform.FoldConstant()(converted)
    return relax.transform.CanonicalizeBindings()(converted)


def _rewrite_calls(mod: Any, op_name: str, rewrite: Any) -> Any:
    """The module with each call of `op_name` replaced by `rewrite(builder, call)` (which may
    emit bindings and TE functions, or return the call unchanged)."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    op = tvm.ir.Op.get(op_name)

    @mutator
    class Rewriter(PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if isinstance(call.op, tvm.ir.Op) and call.op.same_as(op):
                return rewrite(self.builder_, call)
            return call

    rewriter = Rewriter(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
    return rewriter.builder_.get()


def _clip_as_min_max(mod: Any) -> Any:
    from tvm import relax

    def rewrite(_bb: Any, call: Any) -> Any:
        x, dtype = call.args[0], call.args[0].ty.dtype
        lo, hi = float(call.args[1].value), float(call.args[2].value)
        return relax.op.minimum(relax.op.maximum(x, relax.const(lo, dtype)),
                                relax.const(hi, dtype))

    return _rewrite_calls(mod, "relax.clip", rewrite)


def _fast_gelu(mod: Any) -> Any:
    from tvm import relax, topi

    def rewrite(bb: Any, call: Any) -> Any:
        x = call.args[0]
        dtype = x.ty.dtype
        if dtype != "float32":
            return call
        scaled = bb.emit(relax.op.multiply(x, relax.const(0.7071067811865476, dtype)))
        erf = bb.emit_te(topi.fast_erf, scaled, primfunc_name_hint="fast_erf")
        half = relax.const(0.5, dtype)
        return relax.op.multiply(x, relax.op.add(half, relax.op.multiply(half, erf)))

    return _rewrite_calls(mod, "relax.nn.gelu", rewrite)
