"""The inputs MetaSchedule's runner times a candidate kernel on (it runs in the runner's worker
process, so this module imports only TVM and numpy).

TVM's default fills every argument with random values; an integer argument of a gather (an
embedding's `take`) then holds indices out of range and the run crashes, so such kernels never
get a tuning record. Here integer tensors are zeros, a valid index for any gather, and the
timing of integer arithmetic does not depend on the values; floats stay random.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def valid_arguments(device: Any, args_info: Any, alloc_repeat: int) -> list[Any]:
    """MetaSchedule's `f_alloc_argument` for the LocalRunner: random floats, zero integers."""
    from tvm.s_tir.meta_schedule.utils import get_global_func_with_default_on_worker

    random_fill = get_global_func_with_default_on_worker(
        "tvm.contrib.random.random_fill_for_measure", None)
    return _allocate(random_fill, device, args_info, alloc_repeat)


def valid_rpc_arguments(session: Any, device: Any, args_info: Any,
                        alloc_repeat: int) -> list[Any]:
    """The same for the RPCRunner (tensors on the remote device, its random fill)."""
    from tvm.s_tir.meta_schedule.utils import get_global_func_on_rpc_session

    random_fill = get_global_func_on_rpc_session(
        session, "tvm.contrib.random.random_fill_for_measure",
        "the RPC server needs TVM's random contrib (USE_RANDOM)")
    return _allocate(random_fill, device, args_info, alloc_repeat)


def _allocate(random_fill: Any, device: Any, args_info: Any, alloc_repeat: int) -> list[Any]:
    from tvm.s_tir.meta_schedule.runner.utils import alloc_argument_common

    def fill(arg: Any) -> None:
        dtype = str(arg.dtype)
        if dtype.startswith(("int", "uint", "bool")):
            arg.copyfrom(np.zeros(tuple(int(d) for d in arg.shape), dtype=dtype))
        else:
            random_fill(arg)

    return alloc_argument_common(fill, device, args_info, alloc_repeat)
