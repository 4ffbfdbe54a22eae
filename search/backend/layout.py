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

import numpy as np

_LOG = logging.getLogger(__name__)


def cpu_layout(mod: Any) -> Any:
    """The module with BatchNorms folded and convolutions in NHWC / HWIO."""
    import tvm
    from tvm import relax
    from tvm.relax.transform.fold_batch_norm_to_conv2d_for_inference import (
        FoldBatchnormToConv2D,
    )

    mod = FoldBatchnormToConv2D()(mod)
    mod = fold_constants(mod)  # (before ConvertLayout: it needs the folded form)
    mod = _clip_as_min_max(mod)
    mod = _fast_gelu(mod)
    try:
        converted = relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "HWIO"]})(mod)
    except tvm.error.InternalError as exc:  # TVM 0.27's pass fails on some graphs (bad_alloc
        # on a factorized patch embedding): an optimization, so the graph compiles as imported
        _LOG.warning("ConvertLayout failed (%s); compiling in NCHW", str(exc).splitlines()[-1])
        return relax.transform.CanonicalizeBindings()(mod)
    converted = fold_constants(converted)
    return relax.transform.CanonicalizeBindings()(converted)


_NUMPY_OPS = {
    "relax.add": lambda a, b: a + b, "relax.subtract": lambda a, b: a - b,
    "relax.multiply": lambda a, b: a * b, "relax.divide": lambda a, b: a / b,
    "relax.sqrt": lambda a: np.sqrt(a), "relax.rsqrt": lambda a: 1 / np.sqrt(a),
    "relax.negative": lambda a: -a,
}


def fold_constants(mod: Any) -> Any:
    """relax.FoldConstant, with the arithmetic of constant weights done in numpy first.

    NOTE: FoldConstant evaluates each constant subexpression by building it with LLVM: on the
    default task (BatchNorms folded into 52 convs, then their weights transposed to HWIO) that
    was 17 s of every compile, most of a trial once its kernels are tuned. The elementwise ops,
    reshapes and transposes BatchNorm folding and ConvertLayout leave are computed here in
    float32 numpy instead (same rounding: one op at a time, in the tensors' dtype); anything
    else is left to FoldConstant."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    def value(expr: Any, fold: Any) -> np.ndarray | float | None:
        if isinstance(expr, relax.Var):
            expr = fold.lookup_binding(expr)
        if isinstance(expr, tvm.ir.expr.Constant):  # a tensor, or a scalar (T.float32(1e-5))
            v = expr.value
            return v.numpy() if hasattr(v, "numpy") else v
        if isinstance(expr, tvm.tirx.FloatImm | tvm.tirx.IntImm):
            return expr.value
        return None

    @mutator
    class Fold(PyExprMutator):
        def _inlined(self, new: Any) -> Any:  # a var bound to a constant: the constant
            bound = self.lookup_binding(new) if isinstance(new, relax.Var) else None
            return bound if isinstance(bound, tvm.ir.expr.Constant) else new

        def visit_var_(self, var: Any) -> Any:
            return self._inlined(super().visit_var_(var))

        def visit_dataflow_var_(self, var: Any) -> Any:
            return self._inlined(super().visit_dataflow_var_(var))

        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if not isinstance(call.op, tvm.ir.Op):
                return call
            name = call.op.name
            if name not in _NUMPY_OPS and name not in ("relax.reshape", "relax.permute_dims",
                                                       "relax.astype"):
                return call
            data = value(call.args[0], self)
            if not isinstance(data, np.ndarray):
                return call
            dtype = data.dtype
            if name == "relax.reshape":
                if not isinstance(call.args[1], relax.ShapeExpr):
                    return call
                out = data.reshape([int(v) for v in call.args[1].values])
            elif name == "relax.astype":
                dtype = np.dtype(str(call.attrs.dtype))
                if not _exact_cast(data.dtype, dtype):
                    return call
                out = data.astype(dtype)
            elif name == "relax.permute_dims":
                axes = call.attrs.axes
                out = np.transpose(data, None if axes is None else [int(a) for a in axes])
            else:
                args = [data] + [value(a, self) for a in call.args[1:]]
                if any(a is None for a in args):
                    return call
                out = _NUMPY_OPS[name](*[a if isinstance(a, np.ndarray) else dtype.type(a)
                                         for a in args])
            return relax.const(np.ascontiguousarray(out).astype(dtype, copy=False))

    fold = Fold(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            fold.builder_.update_func(gv, fold.visit_expr(func))
    mod = relax.transform.DeadCodeElimination()(fold.builder_.get())
    # FoldConstant legalizes every op of the graph to look for constant ones (0.5 s on the
    # default task even when none is left): run only when one is
    return relax.transform.FoldConstant()(mod) if _constant_calls(mod) else mod


def _exact_cast(source: np.dtype, dest: np.dtype) -> bool:
    """Casts numpy computes exactly as TVM does: widening ones (int8 weights to float32, the
    int8 layers' form before search.backend.int8 narrows them again; float16 to float32)."""
    return np.can_cast(source, dest, casting="safe") and dest.kind in "fiu"


def _constant_calls(mod: Any) -> int:
    """Calls of the module's Relax functions whose tensor arguments are all constants."""
    import tvm
    from tvm import relax

    count = 0

    def visit(expr: Any) -> None:
        nonlocal count
        if not isinstance(expr, relax.Call):
            return
        args = [a for arg in expr.args
                for a in (arg.fields if isinstance(arg, relax.Tuple) else [arg])]
        if not any(isinstance(a, relax.Var) for a in args) and \
                any(isinstance(a, tvm.ir.expr.Constant) for a in args):
            count += 1

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return count


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
