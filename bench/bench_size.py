"""What each knob does to the size of the artifact, against the ideal size the knobs count.

    python bench/bench_size.py                                  # the default task (MobileNetV2)
    python bench/bench_size.py --task search.tasks:minilm_text  # the built-in encoder

For uniform policies of each knob on a real pretrained model: the weight bytes of the compiled
TVM library, read back from the written file (the front's size_bytes), by dtype, beside the
ideal size (the estimate of formats counted but not written). No tuning: sizes do not depend
on it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from search.backend.artifact import library_weight_bytes  # noqa: E402
from search.backend.compile import Compiler, to_relax  # noqa: E402
from search.compress.build import build  # noqa: E402
from search.compress.size import model_stats  # noqa: E402
from search.compress.space import derive_space, uniform  # noqa: E402
from search.core.task import load_task  # noqa: E402
from search.devices.target import load_target  # noqa: E402

POLICIES = {
    "uncompressed": {},
    "rank 0.5": {"rank": 0.5},
    "sparsity 0.25": {"sparsity": 0.25},
    "bits 16 (fp16)": {"bits": 16},
    "bits 16 (bf16)": {"bits": 16, "half": "bf16"},
    "bits 8": {"bits": 8},
    "bits 4": {"bits": 4},
    "prune 0.9": {"prune": 0.9},
    "nm 2:4": {"nm": "2:4"},
    "share 2": {"share": 2},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="search.tasks:mobilenet_v2")
    args = ap.parse_args()
    task = load_task(args.task)
    compiler = Compiler(load_target("host"), Path(tempfile.mkdtemp()), trials_per_task=0)
    space = derive_space(task.model, task.example, choices={})
    base = None
    print(f"task {task.name}: weight bytes of the written TVM library vs the ideal estimate")
    print(f"{'policy':<16} {'library KiB':>12} {'x smaller':>9} {'ideal KiB (est.)':>17}  dtypes")
    for name, knobs in POLICIES.items():
        policy = uniform(space, **knobs)
        model = build(task.model, policy, task.example, task.train, task.loss)
        compiled = compiler.compile(to_relax(model, task.example))
        with tempfile.TemporaryDirectory() as d:
            lib = Path(d) / "m.so"
            compiled.executable.export_library(str(lib))
            written = library_weight_bytes(lib)
        assert written.total == compiled.weights.total
        ideal = model_stats(model, policy, task.example).ideal_size_bytes
        base = base or written.total
        dtypes = ", ".join(f"{k} {v / 1024:,.0f}" for k, v in sorted(written.by_dtype.items())
                           if v >= 1024)
        print(f"{name:<16} {written.total / 1024:>12,.0f} {base / written.total:>8.2f}x "
              f"{ideal / 1024:>17,.0f}  {dtypes}", flush=True)


if __name__ == "__main__":
    main()
