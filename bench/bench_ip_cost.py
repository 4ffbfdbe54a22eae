"""Where the integer program's seeds land: solved with the estimated cost (multiply-adds x a
precision factor) and with the kernel library's (each layer's options costed from the target's
tuning records: search.study.layer_cost), each seed built and timed whole against the
uncompressed model.

    python bench/bench_ip_cost.py [--task search.tasks:mobilenet_v2] [--fractions 0.3,0.45,0.6,0.75]

The default config's space, knobs and sensitivity table (seed 0: cached after a first run) and
the target's tuning database (build the library first with `search tune`); seeds are timed
untrained (latency does not depend on the weights), interleaved with the uncompressed model
(the fastest-round ratio, as a trial's figure). Printed: per cost and fraction, the summed
sensitivity the program predicts, the cost fraction it solved for, and the latency measured
(ratio to the uncompressed model); and what the library's costs took.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "1")  # as the host target times (targets/host.yaml)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="search.tasks:mobilenet_v2")
    ap.add_argument("--fractions", default="0.3,0.45,0.6,0.75")
    args = ap.parse_args()

    from tqdm import tqdm

    from search.backend.measure import compile_anchor, compile_and_time
    from search.compress.build import build, output_tolerance
    from search.compress.space import derive_space
    from search.core.task import load_task
    from search.devices.target import load_target
    from search.jobs.run import make_compiler
    from search.study.allocate import allocate, modelled, options_of
    from search.study.config import SearchConfig
    from search.study.layer_cost import library_options
    from search.study.sensitivity import cached_sensitivity, narrow_space

    config = SearchConfig()
    task = load_task(args.task)
    target = load_target("host")
    compiler = make_compiler(target, config, Path("/tmp/bench-ip-cost"))
    space = derive_space(task.model, task.example, config.space_choices(), config.knobs)
    sens = cached_sensitivity(task, space, config.knobs, seed=0, say=print)
    space = narrow_space(space, sens, config.sensitivity_max_drop)
    knobs = modelled(config.knobs)
    estimate = options_of(task.model, task.example, space, knobs, sens)
    start = time.perf_counter()
    library, how = library_options(task, knobs, estimate, compiler,
                                   progress=lambda n: tqdm(total=n, desc="options"))
    print(f"library costs: {how['options']} options ({how['left_out']} left out), "
          f"{how['kernels']} distinct kernels, {how['tuned_now']} tuned now, in "
          f"{time.perf_counter() - start:.0f} s")
    fractions = [float(f) for f in args.fractions.split(",")]
    anchor = compile_anchor(task.model, task.example, compiler)
    print(f"{'cost':<9} {'fraction':>8} {'summed drop':>12} {'cost solved':>12} "
          f"{'measured / uncompressed':>24} {'weights':>8}")
    errors: dict[str, list[float]] = {}
    for name, options in (("estimate", None), ("library", library)):
        for a in allocate(task.model, task.example, space, config.knobs, sens, fractions,
                          options=options):
            model = build(task.model, a.policy, task.example, task.train, task.loss)
            timed = compile_and_time(model, task.example, compiler, target,
                                     atol=output_tolerance(a.policy), anchor=anchor)
            ratio = timed.latency.ratio
            errors.setdefault(name, []).append(abs(ratio - a.cost_fraction) / ratio)
            print(f"{name:<9} {a.latency_fraction:>8.2f} {a.predicted_drop:>12.4f} "
                  f"{a.cost_fraction:>12.3f} {ratio:>24.3f} {a.bytes_fraction:>8.0%}",
                  flush=True)
    for name, errs in errors.items():
        print(f"{name}: |measured - solved| / measured, median {statistics.median(errs):.1%}, "
              f"max {max(errs):.1%}")


if __name__ == "__main__":
    main()
