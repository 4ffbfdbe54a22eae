"""Does a candidate's latency agree across processes and load? Raw time vs ratio to the anchor.

    SEARCH_CACHE_DIR=/tmp/bench-cache python bench/bench_stability.py \
        [--task search.tasks:mobilenet_v2] [--loads 0,0,1,2] [--copies 1,2,1,2] \
        [--out /tmp/bench-stability.json]

Each entry of `--loads` is one fresh process, run one after another, with that many CPU hogs
(`while True: pass` processes) running beside it. Each process compiles, from the target's
tuning database as it is (nothing tuned: run `search tune` first, or the kernels run untuned),
the uncompressed model (the anchor), a uniform 25 % channel cut and one random policy from the
default space, and times each candidate twice: alone (the median of its repeats: what
`interleave: false` reports) and round by round with the anchor (its fastest round, what
`interleave: true` reports, beside the median of those rounds and the fastest-round ratio to
the anchor, the figure before bench/RESULTS.md 13.32). Printed per process: those figures;
then, per candidate, the spread over processes ((max - min) / median) of the alone median, the
ratio and the fastest round. Models are not fine-tuned: latency does not depend on weight
values. `--copies` (one entry per process) sets how many copies of the anchor that process
compiles and times in turn (search.backend.measure.ANCHOR_COPIES; default: what ships); the
spreads are then given per number of copies.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

HOG = "while True: pass"


def setup(task_name: str, seed: int) -> tuple:
    """What both stability benches time: the task, the host target, a compiler on its library
    as it is (nothing tuned), and the uncompressed model, a uniform 25 % channel cut and one
    random policy of the default space, by name."""
    import torch

    from search.backend.compile import Compiler
    from search.compress.policy import LayerPolicy, Policy
    from search.compress.space import derive_space, uniform
    from search.core.task import load_task
    from search.devices.target import load_target
    from search.study.config import SearchConfig
    from search.study.runfolder import tuning_dir

    torch.set_num_threads(1)
    config = SearchConfig()
    task = load_task(task_name)
    spec = load_target("host")
    compiler = Compiler(spec, tuning_dir(spec), trials_per_task=0)  # the library as it is
    space = derive_space(task.model, task.example, config.space_choices(), config.knobs)
    rng = random.Random(seed)
    sampled = Policy({ls.name: LayerPolicy(**{k: rng.choice(ls.choices(k))
                                              for k in config.knobs}) for ls in space})
    policies = [("uncompressed", Policy()), ("sparsity=0.25", uniform(space, sparsity=0.25)),
                (f"random-{seed}", sampled)]
    return task, spec, compiler, policies


def child(task_name: str, seed: int, copies: int | None = None) -> dict:
    """One process: compile the anchor and the candidates, time each alone and interleaved."""
    import search.backend.measure as measure
    from search.backend.measure import compile_anchor, compile_and_time
    from search.compress.build import build, output_tolerance

    if copies is not None:
        measure.ANCHOR_COPIES = copies
    task, spec, compiler, policies = setup(task_name, seed)
    x = task.example
    anchor = compile_anchor(task.model, x, compiler, spec)
    rows = {}
    for name, policy in policies:
        model = build(task.model, policy, x, task.train)
        tol = output_tolerance(policy)
        alone = compile_and_time(model, x, compiler, spec, atol=tol)
        paired = compile_and_time(model, x, compiler, spec, atol=tol, anchor=anchor)
        rows[name] = {"alone_ms": alone.latency.median_ms,
                      "interleaved_ms": paired.latency.raw_ms,  # the median of its rounds
                      "fastest_ms": paired.latency.median_ms,  # what a trial reports
                      "anchor_ms": paired.latency.anchor_ms, "ratio": paired.latency.ratio,
                      "kernels": alone.compiled.tasks, "source": alone.source.label}
    return rows


def processes(script: str, loads: str, task: str, seed: int, copies: str | None = None
              ) -> Iterator[tuple[int, int, dict]]:
    """Run `script --child` once per entry of `loads` (comma-separated CPU hogs beside it), one
    after another: (process number, hogs, the child's JSON result)."""
    hogs_of = [int(h) for h in loads.split(",")]
    copies_of = copies.split(",") if copies else [None] * len(hogs_of)
    if len(copies_of) != len(hogs_of):
        raise SystemExit("--copies needs one entry per --loads entry")
    for i, (hogs, n) in enumerate(zip(hogs_of, copies_of, strict=True)):
        procs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(hogs)]
        try:
            done = subprocess.run([sys.executable, script, "--child", "--task", task,
                                   "--seed", str(seed), *(["--copies", n] if n else [])],
                                  capture_output=True, text=True, check=True)
        finally:
            for p in procs:
                p.kill()
        yield i, hogs, json.loads(done.stdout.strip().splitlines()[-1])


def spread(values: list[float]) -> float:
    return (max(values) - min(values)) / statistics.median(values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="search.tasks:mobilenet_v2")
    ap.add_argument("--loads", default="0,0,1,2",
                    help="CPU hogs beside each process, comma separated (one process each)")
    ap.add_argument("--seed", type=int, default=0, help="which random policy")
    ap.add_argument("--copies", default=None,
                    help="anchor copies per process, comma separated (default: what ships)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench-stability.json"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.task, args.seed,
                              int(args.copies) if args.copies else None)))
        return
    runs = []
    copies = args.copies.split(",") if args.copies else None
    for i, hogs, rows in processes(__file__, args.loads, args.task, args.seed, args.copies):
        runs.append({"process": i, "hogs": hogs, "rows": rows,
                     "copies": int(copies[i]) if copies else None})
        for name, r in rows.items():
            print(f"process {i} ({hogs} hogs) {name:>14}: alone {r['alone_ms']:7.3f} ms  "
                  f"interleaved: candidate {r['interleaved_ms']:7.3f} ms "
                  f"(fastest {r['fastest_ms']:7.3f}), anchor "
                  f"{r['anchor_ms']:7.3f} ms, ratio {r['ratio']:.3f}  [{r['source']}]",
                  flush=True)
    args.out.write_text(json.dumps(runs, indent=1))
    for n in sorted({r["copies"] for r in runs}, key=lambda c: c or 0):
        print(f"\nanchor copies: {n or 'as shipped'}")
        report([r for r in runs if r["copies"] == n])


def report(runs: list[dict]) -> None:
    """Per candidate, the spread over processes of the raw and the ratio figures."""
    print("spread over processes, (max - min) / median:")
    for name in runs[0]["rows"]:
        alone = [r["rows"][name]["alone_ms"] for r in runs]
        ratio = [r["rows"][name]["ratio"] for r in runs]
        quiet = [r["rows"][name] for r in runs if r["hogs"] == 0]
        fastest = [r["rows"][name]["fastest_ms"] for r in runs if "fastest_ms" in r["rows"][name]]
        print(f"  {name:>14}: alone {spread(alone):6.1%}   ratio {spread(ratio):6.1%}   "
              f"fastest {spread(fastest) if len(fastest) > 1 else float('nan'):6.1%}   "
              f"(idle processes only: alone "
              f"{spread([q['alone_ms'] for q in quiet]) if len(quiet) > 1 else float('nan'):6.1%}"
              f", ratio "
              f"{spread([q['ratio'] for q in quiet]) if len(quiet) > 1 else float('nan'):6.1%})")


if __name__ == "__main__":
    main()
