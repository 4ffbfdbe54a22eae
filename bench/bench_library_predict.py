"""How well the kernel library's own records predict a whole model's latency.

    SEARCH_CACHE_DIR=/tmp/bench-cache python bench/bench_library_predict.py \
        [--task search.tasks:mobilenet_v2] [--random 12] [--seed 7] [--knobs rank,sparsity,bits] \
        [--out /tmp/bench-lib.json]
    python bench/bench_library_predict.py --analyze /tmp/bench-lib.json

On target `host`, from its tuning database as it is (build it first with `search tune`;
nothing is tuned here): for the uncompressed model, every uniform policy of the default knobs
and `--random` policies drawn from the default space (another seed than `search tune`'s, so some
of their kernels may lack records), the candidate's fused kernels are extracted with the
compiler's own passes (`Compiler.kernels_of`: the fusion and layout the compiled model has)
and the prediction is the sum over kernels of calls x the best tuning record's time (what
MetaSchedule measured when it tuned the kernel, alone). The model is then compiled and timed
whole, alone (interleave off), in the same process. Printed per candidate: sum, measured,
their ratio, kernels without a record; then the error of: the raw sum; the sum scaled by the
uncompressed model's measured / sum (one whole-model timing calibrates); the sum scaled by the
median ratio of all the other candidates (leave-one-out: what many whole-model timings give).
Models are not fine-tuned: latency does not depend on weight values.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def record_sum(compiler, kernels) -> tuple[float, int, int]:
    """(predicted ms, kernels without a record, kernels)."""
    total, missing = 0.0, 0
    for task in kernels:
        rec = compiler.database.query_tuning_record(task.dispatched[0], compiler.target,
                                                    task.task_name)
        secs = [float(s) for s in (rec.run_secs or [])] if rec is not None else []
        if not secs:
            missing += 1
            continue
        total += int(task.weight) * min(secs) * 1e3
    return total, missing, len(kernels)


def run(args: argparse.Namespace) -> dict:
    import torch

    from search.backend.compile import Compiler, to_relax
    from search.backend.measure import compile_and_time
    from search.compress.build import build, output_tolerance
    from search.compress.policy import LayerPolicy, Policy
    from search.compress.space import derive_space
    from search.core.task import load_task
    from search.devices.target import load_target
    from search.jobs.tune import candidate_policies
    from search.study.config import SearchConfig
    from search.study.runfolder import tuning_dir

    torch.set_num_threads(1)
    config = SearchConfig(knobs=args.knobs.split(","))
    task = load_task(args.task)
    spec = load_target("host")
    compiler = Compiler(spec, tuning_dir(spec), trials_per_task=0)
    x = task.example
    space = derive_space(task.model, x, config.space_choices(), config.knobs)
    policies = [("uniform", p) for p in candidate_policies(space, config.knobs, 0)]
    rng = random.Random(args.seed)
    policies += [(f"random-{i}", Policy({ls.name: LayerPolicy(**{
        k: rng.choice(ls.choices(k)) for k in config.knobs}) for ls in space}))
        for i in range(args.random)]
    rows = []
    for name, policy in policies:
        model = build(task.model, policy, x, task.train)
        start = time.perf_counter()
        predicted, missing, kernels = record_sum(compiler, compiler.kernels_of(to_relax(model, x)))
        predict_s = time.perf_counter() - start
        timed = compile_and_time(model, x, compiler, spec, atol=output_tolerance(policy))
        identity = all(lp.is_identity for lp in policy.layers.values())
        row = {"policy": name, "uncompressed": identity, "predicted_ms": predicted,
               "measured_ms": timed.latency.median_ms, "missing": missing, "kernels": kernels,
               "predict_s": round(predict_s, 1)}
        rows.append(row)
        print(f"{name:>10}: sum {predicted:7.3f} ms  measured {row['measured_ms']:7.3f} ms  "
              f"ratio {row['measured_ms'] / max(predicted, 1e-9):5.2f}  "
              f"{missing}/{kernels} kernels without a record  ({predict_s:.1f} s)", flush=True)
    return {"task": task.name, "rows": rows}


def pct(errors: list[float], q: float) -> float:
    errors = sorted(errors)
    return errors[min(len(errors) - 1, round(q * (len(errors) - 1)))]


def analyze(data: dict) -> None:
    rows = data["rows"]
    base = next(r for r in rows if r["uncompressed"])
    full = [r for r in rows if not r["missing"] and not r["uncompressed"]]
    ratio = {id(r): r["measured_ms"] / r["predicted_ms"] for r in full}
    base_ratio = base["measured_ms"] / base["predicted_ms"]
    ways = {
        "raw record sum": [r["predicted_ms"] for r in full],
        "sum x uncompressed's measured/sum": [r["predicted_ms"] * base_ratio for r in full],
        "sum x median ratio of the others": [
            r["predicted_ms"] * statistics.median(v for k, v in ratio.items() if k != id(r))
            for r in full],
    }
    print(f"\n{len(full)} compressed candidates with every kernel recorded "
          f"({sum(1 for r in rows if r['missing'])} with some not: left out); "
          f"uncompressed ratio measured/sum {base_ratio:.3f}")
    print(f"{'predictor':<36} {'median |err|':>12} {'p95 |err|':>10} {'max':>7}")
    for way, predicted in ways.items():
        errs = [abs(p - r["measured_ms"]) / r["measured_ms"]
                for p, r in zip(predicted, full, strict=True)]
        print(f"{way:<36} {statistics.median(errs):>12.1%} {pct(errs, 0.95):>10.1%} "
              f"{max(errs):>7.1%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="search.tasks:mobilenet_v2")
    ap.add_argument("--random", type=int, default=12)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--knobs", default="rank,sparsity,bits",
                    help="the knobs the policies use (int8 kernels tuned before 2026-12-03 "
                         "carried calibration literals: use rank,sparsity on such a library)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench-lib.json"))
    ap.add_argument("--analyze", type=Path)
    args = ap.parse_args()
    if args.analyze:
        analyze(json.loads(args.analyze.read_text()))
        return
    data = run(args)
    args.out.write_text(json.dumps(data, indent=1))
    analyze(data)


if __name__ == "__main__":
    main()
