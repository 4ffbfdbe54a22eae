"""Which latency estimator makes separate processes agree? Per-round samples, several readings.

    SEARCH_CACHE_DIR=/tmp/bench-cache python bench/bench_estimators.py \
        [--task search.tasks:mobilenet_v2] [--loads 0,0,0,1] [--out /tmp/bench-estimators.json]

Each entry of `--loads` is one fresh process, run one after another, with that many CPU hogs
beside it. Each process compiles from the target's tuning database as it is (nothing tuned)
the uncompressed model twice (the anchor, and a twin: an identical model whose ratio to the
anchor should be 1), a uniform 25 % channel cut and one random policy, then times each against
the anchor in two ways, keeping every round:

- blocks: the evaluator's rounds as a trial times them (the target's `number` runs, at least
  `min_repeat_ms` each), alternating anchor and candidate, 35 rounds;
- short blocks: the same with `min_repeat_ms` 20, 35 rounds;
- single runs: one run of each, alternating, 300 rounds.

The parent then reads each candidate's latency relative to the anchor with several estimators
(the median per-round ratio over the first 7 rounds: what a trial reported until
bench/RESULTS.md 13.18; over all rounds; the fastest over the fastest, what it reports now)
and prints, per estimator, the spread over processes ((max - min) / median). Models are not
fine-tuned: latency does not depend on weight values.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("TVM_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BLOCK_ROUNDS, SINGLE_ROUNDS = 35, 300


def child(task_name: str, seed: int) -> dict:
    import tvm
    from bench_stability import setup
    from tvm import relax

    from search.backend.measure import compile_and_time
    from search.compress.build import build, output_tolerance
    from search.core.data import as_inputs

    task, spec, compiler, policies = setup(task_name, seed)
    x = task.example
    models = [("anchor", policies[0][1]), ("twin", policies[0][1]), *policies[1:]]
    dev = tvm.cpu()
    xs = [tvm.runtime.tensor(t.numpy(), dev) for t in as_inputs(x)]
    vms = {}
    for name, policy in models:
        model = build(task.model, policy, x, task.train)
        timed = compile_and_time(model, x, compiler, spec, atol=output_tolerance(policy))
        vms[name] = relax.VirtualMachine(timed.compiled.executable, dev)
    m = spec.measurement

    def timer(vm, number: int, min_repeat_ms: int):
        ev = vm.time_evaluator("main", dev, number=number, repeat=1, min_repeat_ms=min_repeat_ms)
        ev(*xs)
        return lambda: ev(*xs).mean * 1e3

    rows = {}
    anchor_block = timer(vms["anchor"], m.number, m.min_repeat_ms)
    anchor_single = timer(vms["anchor"], 1, 0)
    anchor_short = timer(vms["anchor"], m.number, 20)
    for name in [n for n, _ in models[1:]]:
        block, single = timer(vms[name], m.number, m.min_repeat_ms), timer(vms[name], 1, 0)
        short = timer(vms[name], m.number, 20)
        rows[name] = {"block": [], "block_anchor": [], "single": [], "single_anchor": [],
                      "short": [], "short_anchor": []}
        for _ in range(BLOCK_ROUNDS):
            rows[name]["block_anchor"].append(anchor_block())
            rows[name]["block"].append(block())
        for _ in range(BLOCK_ROUNDS):
            rows[name]["short_anchor"].append(anchor_short())
            rows[name]["short"].append(short())
        for _ in range(SINGLE_ROUNDS):
            rows[name]["single_anchor"].append(anchor_single())
            rows[name]["single"].append(single())
    return rows


ESTIMATORS = {
    "blocks: median ratio, 7 rounds (a trial's, until 13.18)":
        lambda r: float(np.median(np.array(r["block"][:7]) / r["block_anchor"][:7])),
    "blocks: median ratio, 35 rounds":
        lambda r: float(np.median(np.array(r["block"]) / r["block_anchor"])),
    "blocks: min / min, 7 rounds": lambda r: min(r["block"][:7]) / min(r["block_anchor"][:7]),
    "blocks: min / min, 35 rounds (a trial's now)":
        lambda r: min(r["block"]) / min(r["block_anchor"]),
    "blocks: min / min, 15 rounds": lambda r: min(r["block"][:15]) / min(r["block_anchor"][:15]),
    "blocks: candidate min alone (raw ms), 35 rounds": lambda r: min(r["block"]),
    "short blocks (20 ms): median ratio, 35 rounds":
        lambda r: float(np.median(np.array(r["short"]) / r["short_anchor"])),
    "short blocks (20 ms): min / min, 35 rounds":
        lambda r: min(r["short"]) / min(r["short_anchor"]),
    "single runs: median ratio, 300": lambda r: float(np.median(np.array(r["single"]) /
                                                                r["single_anchor"])),
    "single runs: median / median, 300": lambda r: float(np.median(r["single"]) /
                                                          np.median(r["single_anchor"])),
    "single runs: p10 / p10, 300": lambda r: float(np.percentile(r["single"], 10) /
                                                    np.percentile(r["single_anchor"], 10)),
    "single runs: min / min, 300": lambda r: min(r["single"]) / min(r["single_anchor"]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="search.tasks:mobilenet_v2")
    ap.add_argument("--loads", default="0,0,0,1",
                    help="CPU hogs beside each process, comma separated (one process each)")
    ap.add_argument("--seed", type=int, default=0, help="which random policy")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench-estimators.json"))
    ap.add_argument("--read", type=Path,
                    help="print the table of a saved --out file, timing nothing")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.task, args.seed)))
        return
    if args.read:
        table(json.loads(args.read.read_text()))
        return
    from bench_stability import processes

    runs = []
    for i, hogs, rows in processes(__file__, args.loads, args.task, args.seed):
        runs.append({"process": i, "hogs": hogs, "rows": rows})
        print(f"process {i} ({hogs} hogs) done", flush=True)
    args.out.write_text(json.dumps(runs, indent=1))
    table(runs)


def two_copies(rows: dict, name: str) -> float | None:
    """Two copies of the anchor, re-read from the rounds: the twin (the uncompressed model
    compiled a second time in the same process) as the second copy, each copy taking every
    other of the 35 rounds; the candidate's fastest over the mean of the copies' fastest
    (search.backend.measure.ANCHOR_COPIES). None for the twin itself."""
    if name == "twin" or "twin" not in rows:
        return None
    r, twin = rows[name], rows["twin"]["block"]
    return min(r["block"]) / ((min(r["block_anchor"][::2]) + min(twin[1::2])) / 2)


def table(runs: list[dict]) -> None:
    from bench_stability import spread

    names = list(runs[0]["rows"])
    idle = [r for r in runs if r["hogs"] == 0]
    print(f"\n{'estimator':<56}" + "".join(f"{n:>28}" for n in names))
    for label, f in ESTIMATORS.items():
        if label.startswith("short") and "short" not in runs[0]["rows"][names[0]]:
            continue  # a file saved before that mode was added
        cells = []
        for n in names:
            every = [f(r["rows"][n]) for r in runs]
            quiet = [f(r["rows"][n]) for r in idle]
            cells.append(f"{statistics.median(every):.3f} {spread(quiet):5.1%} "
                         f"{spread(every):5.1%}")
        print(f"{label:<56}" + "".join(f"{c:>28}" for c in cells))
    cells = []
    for n in names:
        every = [two_copies(r["rows"], n) for r in runs]
        quiet = [two_copies(r["rows"], n) for r in idle]
        cells.append("" if None in every else f"{statistics.median(every):.3f} "
                     f"{spread(quiet):5.1%} {spread(every):5.1%}")
    print(f"{'blocks: min / mean of 2 anchor copies (the twin re-read)':<56}"
          + "".join(f"{c:>28}" for c in cells))
    print("(each cell: median over processes, spread over the idle ones, spread over all)")


if __name__ == "__main__":
    main()
