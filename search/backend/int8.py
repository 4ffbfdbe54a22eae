"""Real int8 layers in TVM: what the frontend makes of an Int8Linear / Int8Conv2d
(search.compress.int8) rewritten to uint8 x int8 -> int32 kernels. Runs after the CPU layout
passes (search.backend.layout), so convs are NHWC / HWIO and weights folded constants.

What the frontend makes of them: the uint8 activation widened (`astype` to int32 or float32), the
int8 weight widened too, and an fp32 `matmul` / `conv2d` on the widened operands (no int8
kernel, 4x the weight bytes). `lower_int8` replaces each with an int8 form, by target
(`int8_kind`):

- "vnni" (x86 with AVX512-VNNI / AVX-VNNI): Linears and 1x1 stride-1 convs become one TE
  kernel, uint8 activation x int8 weight pre-packed to (N/16, K/4, 16, 4), int32 accumulation,
  in the activation's own shape, whose inner 16x4 block MetaSchedule's x86 "vnni" rules
  tensorize with `dot_16x4_vnni` (vpdpbusd). Other convs: `conv2d(uint8, int8) -> int32`.
  NOTE: TVM 0.27.0's own `dot_16x4_vnni` emits the pre-LLVM-20 signature of
  `llvm.x86.avx512.vpdpbusd.512` (<16 x i32> operands) and its bundled LLVM 22 rejects the
  module ("Call parameter type does not match function signature"), so every tensorized
  candidate fails and tuning silently keeps untensorized ones. `enable_vnni()` re-registers the
  intrinsic with <64 x i8> operands; call it once in the tuning/compiling process.
- "sdot" (aarch64 with +dotprod: Cortex-A76, the Pi 5): the same kernel on a (N/4, K/4, 4, 4)
  layout, which MetaSchedule's Arm "dotprod" rules tensorize with `dot_4x4_i8i8s32_sdot`. sdot
  multiplies int8 by int8, so the activation is shifted to int8 (q - 128, fused into the layer
  before) and 128 * sum_k w[n, k] is added back (a constant, fused after).
- "plain" (any other target, the Pi 4's A72 included): `matmul` / `conv2d` on uint8 x int8 with
  int32 output. No dot-product instruction, but a quarter of the weight bytes, which is what a
  batch-1 layer is bound by.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def int8_kind(target: Any) -> str:
    """Which int8 kernel form suits the target: "vnni" (x86 with AVX512-VNNI or AVX-VNNI, the same
    test MetaSchedule uses to pick its "vnni" schedule rules), "sdot" (aarch64 with +dotprod,
    where its "dotprod" rules apply) or "plain"."""
    import tvm

    if target is None:
        return "plain"
    target = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
    if target.kind.name != "llvm":
        return "plain"
    has = tvm.get_global_func("target.target_has_feature")
    if has("avx512vnni", target) or has("avxvnni", target):
        return "vnni"
    if has("dotprod", target):  # aarch64 with the dot-product extension (Cortex-A76: the Pi 5)
        return "sdot"
    return "plain"


def enable_vnni() -> None:
    """Register a `dot_16x4_vnni` tensor intrinsic that TVM 0.27's LLVM accepts (idempotent).

    Call in the process that tunes and compiles (MetaSchedule tensorizes there; the builder only
    compiles the already-tensorized TIR), before the first tuning. Registers the CPU intrinsics
    first (search.backend.intrinsics.light_tensor_intrinsics): the stock one must exist to be
    overridden.
    """
    global _VNNI_FIXED
    if _VNNI_FIXED:
        return
    import tvm
    from tvm.s_tir import TensorIntrin

    from search.backend.intrinsics import light_tensor_intrinsics

    light_tensor_intrinsics()
    from tvm.s_tir.tensor_intrin import x86

    if tvm.target.codegen.llvm_version_major() >= 20:
        TensorIntrin.register(x86.VNNI_DOT_16x4_INTRIN, x86.dot_product_16x4_u8i8i32_desc,
                              _vnni_impl(), override=True)
    _VNNI_FIXED = True


_VNNI_FIXED = False


def _vnni_impl() -> Any:
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((4,), "uint8", offset_factor=1),
             B: T.Buffer((16, 4), "int8", offset_factor=1),
             C: T.Buffer((16,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            a_u8x64 = T.reinterpret(T.broadcast(a_i32, 16), dtype="uint8x64")
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C.vload([0], dtype="int32x16"), a_u8x64, B.vload([0, 0], dtype="int8x64"),
                dtype="int32x16")

    return impl


def lower_int8(mod: Any, target: Any = None, kind: str | None = None) -> Any:
    """Rewrite the frontend's form of each Int8Linear into an int8 x int8 -> int32 kernel.

    `kind` ("vnni", "sdot" or "plain") defaults to `int8_kind(target)`. Matmuls that are not an
    Int8Linear's (no uint8/int8 activation, no int8-valued constant weight) are left alone.
    Returns a new IRModule (dead widened-weight constants removed).
    """
    from tvm import relax

    kind = kind or int8_kind(target)
    if kind not in ("vnni", "sdot", "plain"):
        raise ValueError(f"unknown int8 kernel kind {kind!r}")
    mod = _Int8Rewriter(mod, kind).transform()
    return relax.transform.DeadCodeElimination()(mod)


def _make_rewriter() -> type:
    import tvm
    from tvm import relax, te
    from tvm.relax.expr_functor import PyExprMutator, mutator

    matmul_op = relax.op.matmul(relax.Var("a", relax.TensorType((1, 1), "int32")),
                                relax.Var("b", relax.TensorType((1, 1), "int32"))).op
    astype_op = relax.op.astype(relax.Var("a", relax.TensorType((1,), "int8")), "int32").op
    permute_op = relax.op.permute_dims(relax.Var("a", relax.TensorType((1, 1), "int8"))).op
    conv_op = tvm.ir.Op.get("relax.nn.conv2d")
    reshape_op = relax.op.reshape(relax.Var("a", relax.TensorType((1, 1), "int8")), (1,)).op

    @mutator
    class Rewriter(PyExprMutator):
        def __init__(self, mod: Any, kind: str) -> None:
            super().__init__(mod)
            self.mod_, self.kind = mod, kind

        def transform(self) -> Any:
            for gv, func in self.mod_.functions_items():
                if isinstance(func, relax.Function):
                    self.builder_.update_func(gv, self.visit_expr(func))
            return self.builder_.get()

        def _value(self, expr: Any) -> Any:
            while isinstance(expr, relax.Var):
                bound = self.lookup_binding(expr)
                if bound is None:
                    break
                expr = bound
            return expr

        def _activation(self, expr: Any) -> Any:
            """x if expr is astype(x: uint8, int32 or float32), or a reshape or transpose of one
            (the frontend flattens a 3-D or higher activation to 2-D before the matmul;
            ConvertLayout transposes a padded input): then the uint8 tensor reshaped or
            transposed the same way; else None."""
            v = self._value(expr)
            if isinstance(v, relax.Call) and v.op == astype_op:
                src = v.args[0]
                if src.ty.dtype == "uint8":
                    return src
            if isinstance(v, relax.Call) and v.op in (reshape_op, permute_op):
                src = self._activation(v.args[0])
                if src is None:
                    return None
                if v.op == reshape_op:
                    return self.builder_.emit(relax.op.reshape(src, v.args[1]))
                return self.builder_.emit(relax.op.permute_dims(src, v.attrs.axes))
            return None

        def _weight(self, expr: Any) -> np.ndarray | None:
            """The (N, K) int8 weight if expr is permute_dims(astype(const int8)) or an int-valued
            (K, N) constant in int8 range, else None."""
            v = self._value(expr)
            if isinstance(v, relax.Call) and v.op == permute_op:
                axes = v.attrs.axes
                if axes is not None and [int(a) for a in axes] != [1, 0]:
                    return None
                inner = self._value(v.args[0])
                if isinstance(inner, relax.Call) and inner.op == astype_op:
                    inner = self._value(inner.args[0])
                if isinstance(inner, tvm.ir.expr.Constant) and inner.value.numpy().ndim == 2:
                    w = inner.value.numpy()
                    return w.astype(np.int8) if _int8_valued(w) else None
                return None
            if isinstance(v, tvm.ir.expr.Constant):
                w = v.value.numpy()
                if w.ndim == 2 and _int8_valued(w):
                    return np.ascontiguousarray(w.T).astype(np.int8)
            return None

        def _conv_weight(self, expr: Any) -> np.ndarray | None:
            """The int8 kernel if expr is astype(const int8) or an int-valued constant in int8
            range (the form FoldConstant leaves), else None."""
            v = self._value(expr)
            if isinstance(v, relax.Call) and v.op == astype_op:
                v = self._value(v.args[0])
            if isinstance(v, tvm.ir.expr.Constant):
                w = v.value.numpy()
                if w.ndim == 4 and _int8_valued(w):
                    return w.astype(np.int8)
            return None

        def _conv(self, call: Any) -> Any:
            """An Int8Conv2d's conv2d(astype(uint8), int8-valued weight) in fp32 -> the same conv
            on uint8 x int8 with int32 accumulation (exactly equal: both pad with integer 0);
            on a "vnni" or "sdot" target a 1x1 stride-1 NHWC conv is the packed dense kernel."""
            x = self._activation(call.args[0])
            w = self._conv_weight(call.args[1]) if x is not None else None
            shape = _static_shape(x) if x is not None else None
            if w is None or not shape:
                return call
            a = call.attrs
            if (self.kind != "plain" and a.data_layout == "NHWC" and a.kernel_layout == "HWIO"
                    and w.shape[:2] == (1, 1) and int(a.groups) == 1 and w.shape[2] % 4 == 0
                    and all(int(v) == 1 for v in (*a.strides, *a.dilation))
                    and all(int(v) == 0 for v in a.padding)):
                acc = self._packed(x, np.ascontiguousarray(w[0, 0].T), shape)
            else:
                acc = self.builder_.emit(relax.op.nn.conv2d(
                    x, relax.const(w, "int8"), strides=a.strides, padding=a.padding,
                    dilation=a.dilation, groups=a.groups, data_layout=a.data_layout,
                    kernel_layout=a.kernel_layout, out_layout=a.out_layout, out_dtype="int32"))
            return relax.op.astype(acc, call.ty.dtype)

        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if call.op == conv_op:
                return self._conv(call)
            if call.op != matmul_op:
                return call
            x = self._activation(call.args[0])
            w = self._weight(call.args[1]) if x is not None else None
            shape = _static_shape(x) if x is not None else None
            if w is None or not shape:
                return call
            n, k = w.shape
            if shape[-1] != k:
                return call
            if self.kind != "plain" and k % 4 == 0:
                acc = self._packed(x, w, shape)
            else:
                acc = self.builder_.emit(relax.op.matmul(
                    x, relax.const(np.ascontiguousarray(w.T), "int8"), out_dtype="int32"))
            return relax.op.astype(acc, call.ty.dtype)

        def _packed(self, x: Any, w: np.ndarray, shape: list[int]) -> Any:
            """x (..., K) uint8 times the int8 weight (N, K) packed to (N/L, K/4, L, 4), in the
            activation's own shape (no reshape: the epilogue fuses into the kernel). Output
            index j reads weight block j // L, lane j % L, as TVM's x86 dense_vnni compute
            does, which MetaSchedule's "vnni" (L = 16, u8 x i8: vpdpbusd) and Arm "dotprod"
            (L = 4, i8 x i8: sdot) rules tensorize. sdot has no uint8 x int8 form, so there
            the activation is shifted to int8 (q - 128) and 128 * sum_k w[n, k] added back."""
            bb = self.builder_
            lanes = 16 if self.kind == "vnni" else 4
            n, k = w.shape
            nl = -(-n // lanes) * lanes
            wp = np.zeros((nl, k), np.int8)
            wp[:n] = w
            packed = np.ascontiguousarray(
                wp.reshape(nl // lanes, lanes, k // 4, 4).transpose(0, 2, 1, 3))
            if self.kind == "sdot":
                x = bb.emit(relax.op.astype(relax.op.subtract(
                    relax.op.astype(x, "int16"), relax.const(128, "int16")), "int8"))

            name = "dense_u8i8i32" if self.kind == "vnni" else "dense_s8i8i32"

            def dense_packed(a: Any, b: Any) -> Any:
                r = te.reduce_axis((0, k), "k")
                return te.compute(
                    (*shape[:-1], n),
                    lambda *i: te.sum(a[(*i[:-1], r)].astype("int32")
                                      * b[i[-1] // lanes, r // 4, i[-1] % lanes, r % 4]
                                      .astype("int32"), axis=r),
                    name=name)

            acc = bb.emit_te(dense_packed, x, relax.const(packed, "int8"),
                             primfunc_name_hint=name)
            if self.kind == "sdot":
                shift = 128 * w.astype(np.int32).sum(axis=1)
                acc = bb.emit(relax.op.add(acc, relax.const(shift.astype(np.int32), "int32")))
            return acc

    return Rewriter


def _static_shape(expr: Any) -> list[int] | None:
    shape = getattr(expr.ty, "shape", None)
    values = getattr(shape, "values", None)
    try:
        return [int(v) for v in values] if values is not None else None
    except TypeError:  # a symbolic dimension
        return None


def _int8_valued(w: np.ndarray) -> bool:
    if w.dtype == np.int8:
        return True
    if np.issubdtype(w.dtype, np.floating) and not np.array_equal(w, np.round(w)):
        return False
    if not (np.issubdtype(w.dtype, np.integer) or np.issubdtype(w.dtype, np.floating)):
        return False
    return bool(w.size) and float(w.min()) >= -128 and float(w.max()) <= 127


class _LazyRewriter:
    cls: type | None = None

    def __call__(self, mod: Any, kind: str) -> Any:
        if self.cls is None:
            self.cls = _make_rewriter()
        return self.cls(mod, kind)


def int8_kernels(mod: Any) -> list[tuple[str, list[str]]]:
    """(op or PrimFunc name, input dtypes) of each integer matmul or conv in the module's Relax
    functions:
    what a test or a report inspects to see that the graph really runs int8."""
    from tvm import relax

    found: list[tuple[str, list[str]]] = []

    def visit(expr: Any) -> None:
        if not isinstance(expr, relax.Call):
            return
        if isinstance(expr.op, tvm_ir_op()) and expr.op.name in ("relax.matmul",
                                                                 "relax.nn.conv2d"):
            dts = [a.ty.dtype for a in expr.args]
            if all(d in ("int8", "uint8") for d in dts):
                found.append((expr.op.name, dts))
        elif isinstance(expr.op, tvm_ir_op()) and expr.op.name == "relax.call_tir":
            gv, args = expr.args[0], expr.args[1]
            dts = [a.ty.dtype for a in args.fields]
            if len(dts) >= 2 and all(d in ("int8", "uint8") for d in dts[:2]):
                found.append((gv.name_hint, dts))

    for _gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return found


def tvm_ir_op() -> type:
    import tvm

    return tvm.ir.Op


_Int8Rewriter = _LazyRewriter()
