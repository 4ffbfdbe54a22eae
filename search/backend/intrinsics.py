"""Loading only the tensor intrinsics the target needs (TVM imports every one, CUDA's
included, which takes ~66 s and times MetaSchedule's builder out)."""

from __future__ import annotations

import importlib
import os
import sys
import types


def light_tensor_intrinsics() -> None:
    """Register only the CPU tensor intrinsics, skipping the CUDA ones.

    NOTE: `import tvm.s_tir.tensor_intrin` takes ~66 s here (45 s of it CUDA), and MetaSchedule's
    builder imports it in every worker under a 30 s timeout, so every build "times out". Making
    the package importable without its __init__ and loading x86/arm only avoids that. Also used as
    the builder's worker initializer.
    """
    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        return
    import tvm.s_tir

    pkg = types.ModuleType(name)
    pkg.__path__ = [os.path.join(os.path.dirname(tvm.s_tir.__file__), "tensor_intrin")]
    sys.modules[name] = pkg
    for arch in ("x86", "arm_cpu"):
        importlib.import_module(f"{name}.{arch}")
