"""Hypervolume after N trials: the default sampler (multi-objective TPE) vs random search vs
NSGA-II, same seeds, same trial count, one run, one tuning database.

    python bench/bench_samplers.py [--task search.tasks:digits_resnet] [--trials 16]

The hypervolume is `search.report.show.hypervolume` (accuracy, latency, size; one reference for all
three runs: the largest uncompressed latency and size among them), computed over the complete
trials after each count in --checkpoints.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import optuna

from search.api import search
from search.jobs.run import prepare
from search.report.compare import hypervolume, reference_for
from search.study.config import SearchConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="search.tasks:digits_resnet")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--budget-ms", type=float, default=0.5)
    parser.add_argument("--checkpoints", default="6,10,16")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-samplers-"))
    fronts, studies = {}, {}
    for sampler in ("tpe", "random", "nsga2"):
        config = SearchConfig(task=args.task, trials=args.trials, sampler=sampler)
        out = root / sampler
        target, info = prepare("host", args.budget_ms, config, out, resume=False)
        fronts[sampler] = search(out, target, info, resume=False, show_progress=False)
        studies[sampler] = optuna.load_study(study_name="search",
                                             storage=f"sqlite:///{out / 'study.db'}")
    ref = reference_for(*fronts.values())
    checkpoints = [int(c) for c in args.checkpoints.split(",")]
    print(f"task {args.task} on host, {args.trials} trials per sampler (4 seeds first), "
          f"reference: accuracy 0, {ref.latency_ms:.3f} ms, {ref.size_bytes:,.0f} bytes")
    print(f"{'sampler':<8} " + " ".join(f"{f'HV@{n}':>8}" for n in checkpoints)
          + f" {'front':>6} {'best acc within budget':>23}")
    for sampler, study in studies.items():
        done = sorted((t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE),
                      key=lambda t: t.number)
        hvs = [hypervolume([tuple(t.values) for t in done if t.number < n], ref)
               for n in checkpoints]
        feasible = [t.values[0] for t in done if t.values[1] <= args.budget_ms]
        best = f"{100 * max(feasible):.2f}%" if feasible else "none"
        print(f"{sampler:<8} " + " ".join(f"{hv:>8.4f}" for hv in hvs)
              + f" {len(fronts[sampler]['points']):>6} {best:>23}")


if __name__ == "__main__":
    main()
