"""Hypervolume at equal wall time: ours (TPE after the integer-program seeds) vs TPE alone,
random search, NSGA-II and the sensitivity-threshold baseline, several seeds each, one run.

    SEARCH_CACHE_DIR=/tmp/bench-cache python bench/bench_hypervolume.py \
        [--task search.tasks:mobilenet_v2] [--budget 0.6ms] [--wall 300] [--seeds 0,1,2] \
        [--startup 2] [--parallel 1] [--root /tmp/bench-hv]
    python bench/bench_hypervolume.py --analyze /tmp/bench-hv      # the table again

Each (method, seed) is one `search run` (the Python API, in its own process; `--parallel` of
them at once, then one torch thread each, sharing the target's tuning database: build the
kernel library first with `search tune`; each seed's methods in a rotated order, so that no
method always meets the untuned kernels first; the sensitivity table measured once per seed,
then cached) with the default config but for `seeds: [{}]` (the uncompressed baseline only:
the uniform seeds are the same trials in every method and would spend a short wall on work
that tells the methods apart in nothing), `startup_trials: --startup` (Optuna's TPE and
NSGA-II sample their startup trials exactly as RandomSampler does with the same seed, so with
the default 6 a run of a few trials would compare random search with itself), and:

- ours: the integer-program seeds, then TPE
- tpe: `ip_seeds: []` (TPE alone)
- random: `ip_seeds: []`, `sampler: random`
- nsga2: `ip_seeds: []`, `sampler: nsga2`
- threshold: the AMC-style "uniform allocation scaled by sensitivity" baseline
  (`search.study.allocate.by_threshold`: each layer takes its cheapest option whose own
  sensitivity drop is at most t, for thresholds t tracing the family), enqueued in place of
  the integer-program seeds; random proposals if time is left.

Every run gets as many trials as fit in its timeout (--wall + 30 s from its first trial). The
hypervolume is `search.report.compare`'s (test accuracy, measured latency, size; one
reference for all runs: accuracy 0, the largest uncompressed latency and size among them) over
the trials completed within --wall seconds of the baseline's completion (the sensitivity table
and the baseline are the same work in every run), the baseline included, duplicates and
failures left out. Printed: per run, the hypervolume, the trials done, the best test accuracy
within the budget, and the median seconds, tuning seconds and newly tuned kernels of its
trials after the baseline; per method, the medians over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

METHODS = {
    "ours": {},
    "tpe": {"ip_seeds": []},
    "random": {"ip_seeds": [], "sampler": "random"},
    "nsga2": {"ip_seeds": [], "sampler": "nsga2"},
    "threshold": {"sampler": "random"},  # its seeds replace the integer program's (below)
}
# thresholds on a layer's own summed accuracy drop, coarse to fine so that any cut-off in wall
# time has the family's spread (0.3 .. 0.001 metric units)
THRESHOLDS = [0.05, 0.01, 0.2, 0.003, 0.02, 0.1, 0.001, 0.3, 0.007, 0.03, 0.15, 0.002]


def one(method: str, seed: int, task: str, budget: str, wall: float, startup: int,
        out: Path) -> None:
    """One run, in this process."""
    import search.jobs.run as run
    import search.study.loop as loop
    from search.api import search
    from search.study.allocate import Allocation, by_threshold

    if method == "threshold":
        def thresholds(model, example, space, knobs, sens, *_args, **_kwargs):
            return [Allocation(t, p, 0.0, 0.0, 0.0)
                    for t, p in by_threshold(model, example, space, knobs, sens, THRESHOLDS)]

        loop.allocate = thresholds  # the bench's baseline, enqueued where the IP seeds go
    # the front's retiming on tuned kernels (tune_front) comes after the wall and changes no
    # trial within it: minutes per run that tell the methods apart in nothing
    run.tune_front = lambda *_args, **_kwargs: None
    # the study's timeout counts from its first trial; the cut (analyze) from the baseline's end
    search(task, "host", budget, trials=200, out=out, progress=False, seed=seed,
           timeout=wall + 30, seeds=[{}], startup_trials=startup, **METHODS[method])


def analyze(root: Path, budget_ms: float, wall: float) -> None:
    import optuna

    from search.report.compare import Reference, hypervolume, reference_for
    from search.study.loop import REFERENCE
    from search.study.points import DUPLICATE_OF

    runs = {}
    for folder in sorted(p for p in root.iterdir() if (p / "front.json").exists()):
        method, seed = folder.name.rsplit("-", 1)
        front = json.loads((folder / "front.json").read_text())
        study = optuna.load_study(study_name="search",
                                  storage=f"sqlite:///{folder / 'study.db'}")
        runs[(method, int(seed))] = (front, study)
    if not runs:
        raise SystemExit(f"no finished runs in {root}")
    ref = reference_for(*(front for front, _ in runs.values()))
    print(f"reference: accuracy 0, {ref.latency_ms:.3f} ms, {ref.size_bytes:,.0f} bytes; "
          f"wall {wall:.0f} s per run; budget {budget_ms} ms")
    print("HV: (test accuracy, latency in ms, size); HV/ref: the same with each latency over its "
          "own run's reference (the uncompressed model's, measured once per run), a ratio that "
          "load on the machine moves less")
    print(f"{'method':<10} {'seed':>4} {'ref ms':>7} {'HV':>7} {'HV/ref':>7} {'trials':>7} "
          f"{'best test % in budget':>22} {'s per trial':>12} {'tuning s':>9} "
          f"{'new kernels':>12}  failed (reason)")
    ratio_ref = Reference(0.0, 1.0, ref.size_bytes)
    summary: dict[str, list[tuple[float, int, float, float]]] = {}
    for (method, seed), (_, study) in sorted(runs.items()):
        complete = sorted((t for t in study.trials
                           if t.state == optuna.trial.TrialState.COMPLETE
                           and DUPLICATE_OF not in t.user_attrs), key=lambda t: t.number)
        if not complete:
            continue
        start = complete[0].datetime_complete  # the baseline: the same work in every run
        done = [t for t in complete
                if (t.datetime_complete - start).total_seconds() <= wall]
        points = [(t.user_attrs["test_accuracy"], t.user_attrs["latency_ms"],
                   t.user_attrs["size_bytes"]) for t in done]
        hv = hypervolume(points, ref)
        anchor_ms = float(study.user_attrs.get(REFERENCE) or points[0][1])
        hv_ratio = hypervolume([(a, lat / anchor_ms, b) for a, lat, b in points], ratio_ref)
        feasible = [p[0] for p in points if p[1] <= budget_ms]
        best = max(feasible) if feasible else float("nan")
        summary.setdefault(method, []).append((hv, len(done), best, hv_ratio))
        searched = done[1:]  # the baseline is the same work in every run
        cost = "".join(
            f" {statistics.median(f(t) for t in searched) if searched else float('nan'):>{w}.0f}"
            for f, w in ((lambda t: (t.datetime_complete - t.datetime_start).total_seconds(), 12),
                         (lambda t: t.user_attrs.get("tuning_s", 0.0), 9),
                         (lambda t: t.user_attrs.get("new_kernels", 0), 12)))
        failed = [t.user_attrs.get("fail_reason", "?") for t in study.trials
                  if t.state == optuna.trial.TrialState.FAIL and t.datetime_complete
                  and (t.datetime_complete - start).total_seconds() <= wall]
        why = f"  {len(failed)}" + (f" ({'; '.join(sorted(set(failed)))})" if failed else "")
        print(f"{method:<10} {seed:>4} {anchor_ms:>7.3f} {hv:>7.4f} {hv_ratio:>7.4f} "
              f"{len(done):>7} {100 * best:>21.2f}%{cost}{why}")
    print(f"\nmedian over seeds:\n{'method':<10} {'HV':>7} {'(min-max)':>15} {'HV/ref':>7} "
          f"{'(min-max)':>15} {'trials':>7} {'best test % in budget':>22}")
    for method, rows in summary.items():
        hvs, ratios = [r[0] for r in rows], [r[3] for r in rows]
        print(f"{method:<10} {statistics.median(hvs):>7.4f} "
              f"{f'({min(hvs):.4f}-{max(hvs):.4f})':>15} {statistics.median(ratios):>7.4f} "
              f"{f'({min(ratios):.4f}-{max(ratios):.4f})':>15} "
              f"{statistics.median(r[1] for r in rows):>7.0f} "
              f"{100 * statistics.median(r[2] for r in rows):>21.2f}%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="search.tasks:mobilenet_v2")
    ap.add_argument("--budget", default="0.6ms")
    ap.add_argument("--wall", type=float, default=300, help="seconds of search per run")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--startup", type=int, default=2, help="startup_trials of every run")
    ap.add_argument("--parallel", type=int, default=1,
                    help="runs at once (each then gets one torch thread)")
    ap.add_argument("--root", type=Path, default=Path("/tmp/bench-hv"))
    ap.add_argument("--analyze", type=Path, help="only the table of a finished --root")
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "SEED"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    budget_ms = float(args.budget.removesuffix("ms"))
    if args.one:
        one(args.one[0], int(args.one[1]), args.task, args.budget, args.wall, args.startup,
            args.root / f"{args.one[0]}-{args.one[1]}")
        return
    if args.analyze:
        analyze(args.analyze, budget_ms, args.wall)
        return
    args.root.mkdir(parents=True, exist_ok=True)
    methods, seeds = args.methods.split(","), args.seeds.split(",")
    # each seed's methods in a rotated order (a run that goes first tunes kernels the later
    # ones find: no method always first), each seed's first run first (it measures the seed's
    # sensitivity table, which the cache then gives the others)
    jobs = [(methods[(i + j) % len(methods)], seed)
            for i in range(len(methods)) for j, seed in enumerate(seeds)]

    env = dict(os.environ)
    if args.parallel > 1:  # runs side by side: one core each
        env.setdefault("SEARCH_TORCH_THREADS", "1")

    def launch(job: tuple[str, str]) -> str:
        method, seed = job
        if (args.root / f"{method}-{seed}" / "front.json").exists():
            return f"{method}-{seed}: finished before, kept"  # a bench run again goes on
        start = time.perf_counter()
        log = args.root / f"{method}-{seed}.log"
        with open(log, "w") as f:
            code = subprocess.call([sys.executable, __file__, "--one", method, seed,
                                    "--task", args.task, "--budget", args.budget,
                                    "--wall", str(args.wall), "--startup", str(args.startup),
                                    "--root", str(args.root)],
                                   stdout=f, stderr=subprocess.STDOUT, env=env)
        return f"{method}-{seed}: exit {code} in {time.perf_counter() - start:.0f} s ({log})"

    with ThreadPoolExecutor(args.parallel) as pool:
        for line in pool.map(launch, jobs):
            print(line, flush=True)
    analyze(args.root, budget_ms, args.wall)


if __name__ == "__main__":
    main()
