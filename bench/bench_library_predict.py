"""How well the kernel library's own records predict a model's latency (its ratio to the
uncompressed model, what a trial reports).

    python bench/bench_library_predict.py [--task search.tasks:mobilenet_v2] [--random 12] \
        [--seed 7] [--knobs rank,sparsity,bits] [--out /tmp/bench-lib.json]
    python bench/bench_library_predict.py --runs RUN_DIR [RUN_DIR ...]   # compiles nothing
    python bench/bench_library_predict.py --analyze /tmp/bench-lib.json

On target `host`, from its tuning database as it is (build it first with `search tune`;
nothing is tuned here). A candidate's fused kernels are extracted with the compiler's own
passes (`Compiler.kernels_of`: the fusion and layout the compiled model has) and its sum is,
over kernels, calls x the best tuning record's time (what MetaSchedule measured when it tuned
the kernel, alone); a kernel without a record takes the nearest tuned kernel of its structure
(the donor schedule transfer replays, search.backend.transfer) scaled by their flops ratio.
The predicted ratio is the candidate's sum over the uncompressed model's, raw, and times the
median measured / predicted of the other candidates (leave-one-out: what the whole-model
timings of a run give).

Measured: by default, the uncompressed model, every uniform policy of the default knobs and
`--random` policies drawn from the default space at the target's granularity (with `--seed 0`,
`search tune`'s own random policies, whose kernels the library holds; another seed: some of
their kernels lack records and run transferred schedules) are compiled (transfer on, as a
trial) and timed as a trial is, interleaved with the uncompressed
model (the ratio of fastest rounds), in this process. With `--runs`, the policies and ratios
are the runs' trials' own (the median where several runs timed one policy). Models are not
fine-tuned: latency does not depend on weight values.
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


def predict(library, model, x) -> dict:
    """The candidate's kernel sum (search.backend.predict) as a row's fields."""
    from search.backend.compile import to_relax

    got = library.model_sum(to_relax(model, x))
    return {"ms": got.ms, "own_ms": got.own_ms, "donor_ms": got.donor_ms,
            "kernels": got.kernels, "calls": got.calls,
            "missing": got.kernels - got.own, "orphans": len(got.unknown)}


def from_runs(args: argparse.Namespace) -> dict:
    """Policies and their latencies as the runs' trials measured them (interleaved with the
    uncompressed model: the ratio of fastest rounds), predicted from the tuning database."""
    import optuna
    import torch

    from search.backend.compile import Compiler
    from search.backend.predict import KernelLibrary
    from search.compress.build import build
    from search.compress.policy import Policy
    from search.core.task import load_task
    from search.devices.target import load_target
    from search.study.runfolder import tuning_dir

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(1)
    task = load_task(args.task)
    spec = load_target("host")
    compiler = Compiler(spec, tuning_dir(spec), trials_per_task=0)
    library = KernelLibrary(compiler)
    seen: dict[str, dict] = {}
    for run in args.runs:
        study = optuna.load_study(study_name=None, storage=f"sqlite:///{run / 'study.db'}")
        front = {p["trial"] for p in json.loads((run / "front.json").read_text())["points"]} \
            if (run / "front.json").exists() else set()
        for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
            a = t.user_attrs
            if a.get("latency_ratio") is None or "policy" not in a:
                continue
            key = json.dumps(a["policy"], sort_keys=True)
            row = seen.setdefault(key, {"policy": a["policy"], "ratios": [], "runs": [],
                                        "front": False,
                                        "uncompressed": bool(a.get("uncompressed"))})
            row["ratios"].append(float(a["latency_ratio"]))
            row["runs"].append(f"{run.name}#{t.number}")
            row["front"] |= t.number in front
    rows = []
    for row in seen.values():
        model = build(task.model, Policy.from_dict(row["policy"]), task.example, task.train)
        start = time.perf_counter()
        got = predict(library, model, task.example)
        row.update(got, predict_s=round(time.perf_counter() - start, 1),
                   measured_ratio=statistics.median(row["ratios"]))
        rows.append(row)
        print(f"{','.join(row['runs'])[:40]:<40} measured {row['measured_ratio']:.3f} "
              f"(runs {min(row['ratios']):.3f}-{max(row['ratios']):.3f})  sum {got['ms']:7.3f} ms"
              f"  {got['calls']} calls, {got['missing']} without a record ({got['orphans']} "
              f"without a donor)  {row['predict_s']} s", flush=True)
    return {"task": task.name, "runs": [str(r) for r in args.runs], "rows": rows}


def analyze_runs(data: dict) -> None:
    """Each way predicts the ratio to the uncompressed model (what a trial reports)."""
    from search.backend.predict import DONOR_FACTOR, error_report

    rows = data["rows"]
    for r in rows:  # (files written before own_ms was kept: ms was own + donors at 1x)
        r.setdefault("own_ms", r["ms"] - r.get("donor_ms", 0.0))
        r.setdefault("donor_ms", 0.0)
    base = next(r for r in rows if r["uncompressed"])
    rest = [r for r in rows if not r["uncompressed"] and not r["orphans"]]

    def at(factor: float):
        return lambda r: (r["own_ms"] + factor * r["donor_ms"]) / base["own_ms"]

    def fitted(r):  # the donor factor by least squares over the other policies
        others = [o for o in rest if o is not r and o["donor_ms"] > 0]
        if not others:
            return at(1.0)(r)
        factor = sum(o["donor_ms"] * (o["measured_ratio"] * base["own_ms"] - o["own_ms"])
                     for o in others) / sum(o["donor_ms"] ** 2 for o in others)
        return at(factor)(r)

    def corrected(r):  # x the median measured / predicted of the other policies
        shipped = at(DONOR_FACTOR)
        return shipped(r) * statistics.median(o["measured_ratio"] / shipped(o)
                                              for o in rest if o is not r)

    ways = {"donors at 1x their scaled record": at(1.0),
            f"donors x {DONOR_FACTOR} (search.backend.predict)": at(DONOR_FACTOR),
            "donor factor fitted on the others": fitted,
            f"x {DONOR_FACTOR}, x median correction": corrected}
    spreads = [(max(r["ratios"]) - min(r["ratios"])) / r["measured_ratio"] for r in rows
               if len(r["ratios"]) > 1]
    print(f"\n{len(rest)} compressed policies ({sum(r['front'] for r in rest)} on a front; "
          f"{sum(1 for r in rows if r['orphans'])} with a kernel no record or donor costs, "
          f"left out: a trial tunes it)"
          + (f"; the runs' own spread of one policy's ratio: median "
             f"{statistics.median(spreads):.1%}" if spreads else ""))
    print(f"{'predicted ratio':<44} {'points':>6} {'median |err|':>12} {'p95 |err|':>10} "
          f"{'max':>7} {'bias':>7}")
    for way, f in ways.items():
        for name, sel in (("all", rest), ("front", [r for r in rest if r["front"]])):
            if sel:
                e = error_report((f(r), r["measured_ratio"]) for r in sel)
                print(f"{way:<44} {name:>6} {e['median_abs_rel_error']:>12.1%} "
                      f"{e['p95_abs_rel_error']:>10.1%} {e['max_abs_rel_error']:>7.1%} "
                      f"{e['median_rel_error']:>+7.1%}")


def run(args: argparse.Namespace) -> dict:
    import torch

    from search.backend.compile import Compiler
    from search.backend.measure import compile_anchor, compile_and_time
    from search.backend.predict import KernelLibrary
    from search.compress.build import build, output_tolerance
    from search.compress.policy import LayerPolicy, Policy
    from search.compress.space import derive_space
    from search.core.granularity import use_granularity
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
    use_granularity(spec.granularity)  # the shapes `search tune` and a run produce
    space = derive_space(task.model, x, config.space_choices(), config.knobs)
    policies = [("uniform", p) for p in candidate_policies(space, config.knobs, 0)]
    rng = random.Random(args.seed)
    policies += [(f"random-{i}", Policy({ls.name: LayerPolicy(**{
        k: rng.choice(ls.choices(k)) for k in config.knobs}) for ls in space}))
        for i in range(args.random)]
    library = KernelLibrary(compiler)
    anchor = compile_anchor(task.model, x, compiler, spec)
    rows = []
    for name, policy in policies:
        model = build(task.model, policy, x, task.train)
        start = time.perf_counter()
        got = predict(library, model, x)
        predict_s = time.perf_counter() - start
        timed = compile_and_time(model, x, compiler, spec, atol=output_tolerance(policy),
                                 anchor=anchor)
        identity = all(lp.is_identity for lp in policy.layers.values())
        row = {"policy": name, "uncompressed": identity, "predicted_ms": got["ms"],
               "measured_ms": timed.latency.median_ms, "measured_ratio": timed.latency.ratio,
               "ratios": [timed.latency.ratio], "runs": [name], "front": False,
               "transferred": timed.compiled.transferred, **got,
               "predict_s": round(predict_s, 1)}
        rows.append(row)
        print(f"{name:>10}: sum {got['ms']:7.3f} ms  measured ratio {row['measured_ratio']:.3f} "
              f"({row['measured_ms']:.3f} ms, {row['transferred']} kernels transferred)  "
              f"{got['missing']}/{got['kernels']} kernels without a record, "
              f"{got['orphans']} without a donor  ({predict_s:.1f} s)", flush=True)
    return {"task": task.name, "rows": rows, "runs": []}


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
    ap.add_argument("--runs", type=Path, nargs="+",
                    help="run folders: predict their trials' policies and compare with the "
                         "ratios the trials measured (compiles nothing)")
    args = ap.parse_args()
    if args.analyze:
        data = json.loads(args.analyze.read_text())
        analyze_runs(data)
        return
    if args.runs:
        data = from_runs(args)
        args.out.write_text(json.dumps(data, indent=1))
        analyze_runs(data)
        return
    data = run(args)
    args.out.write_text(json.dumps(data, indent=1))
    analyze_runs(data)


if __name__ == "__main__":
    main()
