"""The weight bytes of a compiled artifact, measured from it (not from a model's policy).

What TVM writes into a library is the constant pool of the final Relax module: every weight in
the dtype the graph reads it (an int8 weight as int8, a 16-bit layer's as fp16, a weight whose
decode the graph does not do as fp32). `module_weight_bytes` sums those constants in a module;
`library_weight_bytes` reads them back from an exported library file, by the header TVM writes
before each serialized tensor, so a test can check the two agree.
"""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TENSOR_MAGIC = 0xDD5E40F096B4A13F  # TVM's serialized-tensor magic (runtime/tensor.h)
_DTYPE_CODES = {0: "int", 1: "uint", 2: "float", 4: "bfloat"}


@dataclass(frozen=True)
class WeightBytes:
    """Bytes of the constants an artifact carries, in total and by dtype."""

    total: int
    by_dtype: dict[str, int] = field(default_factory=dict)


def module_weight_bytes(mod: Any) -> WeightBytes:
    """The constants of a Relax module's functions (each counted once)."""
    import tvm
    from tvm import relax

    seen: dict[tuple, Any] = {}  # content -> tensor: the VM's constant pool keeps equal
    # constants once (two BatchNorms folded to the same shift are one tensor in the library)

    def visit(expr: Any) -> None:
        if isinstance(expr, tvm.ir.expr.GenericConst):  # a tensor constant (not an IntImm)
            array = expr.value.numpy()
            seen.setdefault((array.dtype.str, array.shape, array.tobytes()), expr.value)

    for _gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    by_dtype: Counter[str] = Counter()
    for data in seen.values():
        n = 1
        for d in data.shape:
            n *= int(d)
        dtype = str(data.dtype)
        by_dtype[dtype] += n * _bits(dtype) // 8
    return WeightBytes(sum(by_dtype.values()), dict(by_dtype))


def _bits(dtype: str) -> int:
    digits = "".join(ch for ch in dtype if ch.isdigit())
    return int(digits) if digits else 8  # bool


def library_weight_bytes(path: Path) -> WeightBytes:
    """The serialized tensors of an exported TVM library (its constant pool), read from the
    file: after each magic number come a reserved word, the device, ndim, dtype (code, bits,
    lanes), the shape and the data's byte size."""
    blob = Path(path).read_bytes()
    magic = struct.pack("<Q", TENSOR_MAGIC)
    by_dtype: Counter[str] = Counter()
    at = blob.find(magic)
    while at >= 0:
        ndim, = struct.unpack_from("<i", blob, at + 24)
        code, bits, lanes = struct.unpack_from("<BBH", blob, at + 28)
        size_at = at + 32 + 8 * ndim
        if 0 <= ndim <= 8 and code in _DTYPE_CODES and size_at + 8 <= len(blob):
            nbytes, = struct.unpack_from("<q", blob, size_at)
            name = _DTYPE_CODES[code] + str(bits) + (f"x{lanes}" if lanes > 1 else "")
            by_dtype["bool" if (code, bits) == (1, 1) else name] += nbytes
        at = blob.find(magic, at + 8)
    return WeightBytes(sum(by_dtype.values()), dict(by_dtype))
