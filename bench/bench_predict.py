"""How well the per-layer latency table (search/predict.py) predicts a whole model's latency.

    python bench/bench_predict.py [--task search.tasks:digits] [--trials 8] \
        [--db /tmp/bench-predict]
                                  [--random 3] [--out /tmp/bench-predict.json]
    python bench/bench_predict.py --analyze /tmp/bench-predict.json   # the summary again

On target `host`, MetaSchedule-tuned (`--trials` per kernel, a fresh database under `--db`): the
uncompressed model first (its ops measured one by one, then the model measured whole: the
family's first whole-model record, as a study's baseline trial gives it); then for each policy
(uniform ones, and `--random` drawn from the derived space, as the study's sampler would) the
table measures the ops it lacks, predicts the latency (compiling nothing) and only then is the
model compiled and measured whole. Printed: each pair, the median
and 95th percentile of |predicted - measured| / measured, and what each costs (seconds to measure
the new ops vs to compile, tune and time the whole model). Models are not fine-tuned: latency
does not depend on weight values.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from search.backend.compile import Compiler  # noqa: E402
from search.backend.latency_table import LatencyTable, error_report  # noqa: E402
from search.backend.measure import compile_and_time  # noqa: E402
from search.compress.build import build, output_tolerance  # noqa: E402
from search.compress.policy import LayerPolicy, Policy
from search.compress.space import derive_space, uniform
from search.core.task import load_task  # noqa: E402
from search.devices.target import load_target  # noqa: E402
from search.study.config import SearchConfig  # noqa: E402

UNIFORM = [{"rank": 0.125}, {"rank": 0.25}, {"rank": 0.5}, {"sparsity": 0.5}, {"bits": 16}]


def random_policy(space: list, knobs: list[str], rng: random.Random) -> Policy:
    return Policy({ls.name: LayerPolicy(**{k: rng.choice(ls.choices(k)) for k in knobs})
                   for ls in space})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="search.tasks:digits")
    ap.add_argument("--trials", type=int, default=8, help="MetaSchedule trials per kernel")
    ap.add_argument("--db", type=Path, default=Path("/tmp/bench-predict"),
                    help="tuning database and latency table (emptied first)")
    ap.add_argument("--random", type=int, default=3, help="random policies from the space")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench-predict.json"))
    ap.add_argument("--analyze", type=Path, help="only summarize a saved --out file")
    args = ap.parse_args()
    if args.analyze:
        summarize(json.loads(args.analyze.read_text()))
        return
    torch.set_num_threads(1)

    config = SearchConfig()
    task = load_task(args.task)
    spec = load_target("host")
    shutil.rmtree(args.db, ignore_errors=True)
    compiler = Compiler(spec, args.db, trials_per_task=args.trials, seed=args.seed)
    table = LatencyTable.for_compiler(compiler)
    space = derive_space(task.model, task.example, config.space_choices(), config.knobs)
    rng = random.Random(args.seed)
    policies = [(str(k), uniform(space, **k)) for k in UNIFORM]
    policies += [(f"random-{i}", random_policy(space, config.knobs, rng))
                 for i in range(args.random)]
    x = task.example
    print(f"task {task.name}, target {spec.tvm()}, {args.trials} trials/kernel, db {args.db}")

    def candidate(name: str, policy: Policy) -> dict:
        model = build(task.model, policy, x, task.train)
        start = time.perf_counter()
        new = table.measure_missing(model, x, compiler)
        ops_s = time.perf_counter() - start
        predicted = table.predict(model, x, family=task.name)  # before it is measured whole
        start = time.perf_counter()
        timed = compile_and_time(model, x, compiler, atol=output_tolerance(policy))
        latency, compiled = timed.latency, timed.compiled
        whole_s = time.perf_counter() - start
        row = {"policy": name, "new_ops": len(new), "ops_s": round(ops_s, 1),
               "whole_s": round(whole_s, 1), "whole_kernels": compiled.tasks,
               "whole_new_kernels": compiled.new_tasks, "measured_ms": latency.median_ms,
               "measured_iqr": [latency.p25_ms, latency.p75_ms]}
        sums = table.predict(model, x, family="__none__")  # residual 0: the op sum alone
        row["layer_sum_ms"] = sums.layer_sum_ms
        row["ops"] = len(sums.per_layer)
        row.update(predicted_ms=predicted.ms, residual_ms=predicted.residual_ms,
                   source=predicted.source)
        return row | {"_model": model}

    base = candidate("uncompressed", Policy())
    table.record_whole(base.pop("_model"), x, base["measured_ms"], family=task.name,
                       note="uncompressed")
    base["residual_ms"] = base["measured_ms"] - base["layer_sum_ms"]
    print(f"uncompressed: {base['ops']} ops, sum {base['layer_sum_ms']:.3f} ms, measured "
          f"{base['measured_ms']:.3f} ms -> residual {base['residual_ms']:+.3f} ms "
          f"(ops {base['ops_s']} s, whole {base['whole_s']} s)")
    rows = []
    for name, policy in policies:
        row = candidate(name, policy)
        row.pop("_model")
        rows.append(row)
        err = (row["predicted_ms"] - row["measured_ms"]) / row["measured_ms"]
        print(f"{name:>20}: predicted {row['predicted_ms']:8.3f} ms  measured "
              f"{row['measured_ms']:8.3f} ms  ({err:+.1%})  {row['ops']} ops, "
              f"{row['new_ops']} new in {row['ops_s']} s; whole {row['whole_s']} s "
              f"({row['whole_new_kernels']}/{row['whole_kernels']} kernels tuned)", flush=True)
    data = {"task": task.name, "trials_per_kernel": args.trials, "baseline": base,
            "rows": rows}
    data["errors"] = summarize(data)
    args.out.write_text(json.dumps(data, indent=1))


def summarize(data: dict) -> dict:
    """The error of each way of turning the op sum into a prediction, on the same pairs: as
    the table predicted during the run (the op sum alone while a family has fewer than 3
    whole-model records); the op sum alone; + the uncompressed model's residual; and
    leave-one-out: the residual as the median over all the other whole-model measurements
    (what the table has once several models were measured whole), additive or as a fraction
    of the op sum."""
    base, rows = data["baseline"], data["rows"]
    add = {r["policy"]: r["measured_ms"] - r["layer_sum_ms"] for r in rows}
    frac = {r["policy"]: r["measured_ms"] / r["layer_sum_ms"] - 1 for r in rows}
    add_base = base["measured_ms"] - base["layer_sum_ms"]
    frac_base = base["measured_ms"] / base["layer_sum_ms"] - 1
    ways = {"the table's prediction (as run)": [], "op sum alone": [],
            "sum + the uncompressed model's residual": [],
            "sum + leave-one-out median residual": [],
            "sum x (1 + leave-one-out median fraction)": []}
    for r in rows:
        s, m, k = r["layer_sum_ms"], r["measured_ms"], r["policy"]
        others_add = [add_base] + [v for j, v in add.items() if j != k]
        others_frac = [frac_base] + [v for j, v in frac.items() if j != k]
        ways["the table's prediction (as run)"].append((r["predicted_ms"], m))
        ways["op sum alone"].append((s, m))
        ways["sum + the uncompressed model's residual"].append((s + max(add_base, -0.5 * s), m))
        ways["sum + leave-one-out median residual"].append(
            (s + max(statistics.median(others_add), -0.5 * s), m))
        ways["sum x (1 + leave-one-out median fraction)"].append(
            (s * (1 + statistics.median(others_frac)), m))
    out = {}
    for name, pairs in ways.items():
        rep = error_report(pairs)
        out[name] = rep
        print(f"{name:>42}: median |error| {rep['median_abs_rel_error']:6.1%}  p95 "
              f"{rep['p95_abs_rel_error']:6.1%}  max {rep['max_abs_rel_error']:6.1%}  bias "
              f"{rep['median_rel_error']:+6.1%}  (n={rep['n']})")
    ops_total = sum(r["ops_s"] for r in rows)
    whole_total = sum(r["whole_s"] for r in rows)
    print(f"cost over the {len(rows)} candidates: measuring new ops {ops_total:.0f} s, "
          f"compiling + tuning + timing whole {whole_total:.0f} s")
    return out


if __name__ == "__main__":
    main()
