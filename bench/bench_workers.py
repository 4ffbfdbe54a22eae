"""Trials per hour with 1 and with 2 workers on the default task, side by side in one run.

    python bench/bench_workers.py [--trials 8] [--target host]

Each run gets its own cache folder holding only the trained default model (copied from your
cache, trained once if missing), so both start from an empty tuning database and tune what
their trials need. The two workers share one SQLite study, fine-tune in parallel, and take
turns on the device (tuning and timing hold the device lock).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from search.core.task import cache_dir
from search.tasks.digits import digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--target", default="host")
    args = parser.parse_args()
    digits()  # trained and cached once
    root = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump({"trials": args.trials, "sensitivity": False}))
    rows = []
    for workers in (1, 2):
        cache = root / f"cache-{workers}"
        shutil.copytree(cache_dir() / "tasks", cache / "tasks")
        out = root / f"run-{workers}"
        env = {**os.environ, "SEARCH_CACHE_DIR": str(cache)}
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "search", "run", "--target", args.target,
                        "--budget", "5ms", "--config", str(config), "--out", str(out),
                        "--workers", str(workers)], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        front = json.loads((out / "front.json").read_text())
        done = front["trials"]["complete"] + len(front["trials"]["failed"])
        rows.append((workers, done, wall, front["tuning"]["kernels_tuned"],
                     front["tuning"]["seconds"]))
    print(f"default task on {args.target}, {args.trials} trials, fresh tuning database each")
    print(f"{'workers':>7} {'trials':>6} {'wall s':>8} {'trials/h':>9} {'ratio':>6} "
          f"{'kernels tuned':>13} {'tuning s':>9}")
    base = rows[0][1] / rows[0][2]
    for workers, done, wall, kernels, tuning in rows:
        rate = done / wall
        print(f"{workers:>7} {done:>6} {wall:>8.0f} {3600 * rate:>9.1f} {rate / base:>5.2f}x "
              f"{kernels:>13} {tuning:>9.0f}")


if __name__ == "__main__":
    main()
