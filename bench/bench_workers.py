"""Trials per hour with 1 and with 2 workers on the default task, and whether a second worker
changes the latency measured for the same policies, side by side in one run.

    python bench/bench_workers.py [--trials 8] [--target host] [--budget 1.5ms] [--root DIR]
    python bench/bench_workers.py --trials 4 --root DIR --reuse-warm   # the warm-up again

A warm-up run (1 worker) first fills a tuning database with the kernels of the config's seeds
and first proposals; each measured run then starts from its own copy of that database and of
the trained task (own cache folder), so both time the same tuned kernels and neither pays for
tuning the other did not. The 2-worker run's workers share one SQLite study, fine-tune in
parallel, and take turns on the CPU (compiling, tuning and timing hold the device lock, and
fine-tune steps wait while a candidate is timed: search.devices.lock).

Printed: trials, wall time and trials per hour per run; then, for every policy both runs
evaluated (the uniform seeds at least), the ratio of its latency in the 2-worker run to the
1-worker run: the reported figure (latency_ms: the candidate's fastest round, timed
interleaved with the uncompressed model; before bench/RESULTS.md 13.32, the ratio of the fastest
rounds x the study's reference), the ratio (latency_ratio) and the median of its rounds
(latency_raw_ms); median and worst over the policies.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from search.core.task import DEFAULT_TASK, cache_dir, load_task  # noqa: E402


def run(root: Path, name: str, cache: Path, config: Path, target: str, budget: str,
        workers: int) -> tuple[float, Path]:
    out = root / name
    env = {**os.environ, "SEARCH_CACHE_DIR": str(cache)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "search", "run", "--target", target, "--budget",
                    budget, "--config", str(config), "--out", str(out), "--workers",
                    str(workers)], env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start, out


def trials_of(out: Path) -> dict[str, dict]:
    """Finished, non-duplicate trials by policy (its params as JSON)."""
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{out / 'study.db'}")
    return {json.dumps(t.params, sort_keys=True): t.user_attrs
            for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
            if "duplicate_of" not in t.user_attrs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--target", default="host")
    parser.add_argument("--budget", default="1.5ms")
    parser.add_argument("--root", type=Path, help="work folder [default: a new temp folder]")
    parser.add_argument("--reuse-warm", action="store_true",
                        help="keep ROOT/cache-warm from an earlier call (its warm-up run "
                             "may have been stopped: the records it wrote are kept)")
    args = parser.parse_args()
    load_task(DEFAULT_TASK)  # trained and cached once, copied into each run's cache
    root = args.root or Path(tempfile.mkdtemp(prefix="bench-workers-"))
    root.mkdir(parents=True, exist_ok=True)
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump({"trials": args.trials, "sensitivity": False}))
    warm_cache = root / "cache-warm"
    if not (args.reuse_warm and warm_cache.exists()):
        shutil.copytree(cache_dir() / "tasks", warm_cache / "tasks", dirs_exist_ok=True)
        warm_s, _ = run(root, "warm", warm_cache, config, args.target, args.budget, 1)
        print(f"warm-up run: {warm_s:.0f} s (fills the tuning database both runs copy)")
    for name in ("run-1", "run-2", "cache-1", "cache-2"):
        shutil.rmtree(root / name, ignore_errors=True)
    rows, found = [], {}
    for workers in (1, 2):
        cache = root / f"cache-{workers}"
        shutil.copytree(warm_cache, cache, dirs_exist_ok=True)
        wall, out = run(root, f"run-{workers}", cache, config, args.target, args.budget,
                        workers)
        front = json.loads((out / "front.json").read_text())
        done = front["trials"]["complete"] + len(front["trials"]["failed"])
        found[workers] = trials_of(out)
        rows.append((workers, done, wall, front["tuning"]["kernels_tuned"],
                     front["tuning"]["seconds"]))
    print(f"default task on {args.target}, {args.trials} trials per run, from one warm tuning "
          f"database")
    print(f"{'workers':>7} {'trials':>6} {'wall s':>8} {'trials/h':>9} {'ratio':>6} "
          f"{'kernels tuned':>13} {'tuning s':>9}")
    base = rows[0][1] / rows[0][2]
    for workers, done, wall, kernels, tuning in rows:
        rate = done / wall
        print(f"{workers:>7} {done:>6} {wall:>8.0f} {3600 * rate:>9.1f} {rate / base:>5.2f}x "
              f"{kernels:>13} {tuning:>9.0f}")
    common = sorted(set(found[1]) & set(found[2]))
    print(f"\nthe same policy in both runs ({len(common)} policies): latency, 2-worker run / "
          f"1-worker run")
    print(f"{'figure':<16} {'median':>7} {'worst':>7}  per policy")
    for key in ("latency_ms", "latency_ratio", "latency_raw_ms"):
        ratios = [found[2][p][key] / found[1][p][key] for p in common
                  if found[1][p].get(key) and found[2][p].get(key)]
        if not ratios:
            continue
        worst = max(ratios, key=lambda r: abs(r - 1))
        print(f"{key:<16} {statistics.median(ratios):>7.3f} {worst:>7.3f}  "
              + " ".join(f"{r:.3f}" for r in ratios))
    print(f"(work folder {root})")


if __name__ == "__main__":
    main()
