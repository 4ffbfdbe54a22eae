"""Transferred schedules vs tuning each kernel vs untuned, on per-layer policies the kernel
library does not cover.

    python bench/bench_transfer.py [--policies 5] [--seed 21] [--out /tmp/bench-transfer.json] \
        [--tuned-db /tmp/bench-transfer-db]
    python bench/bench_transfer.py --analyze /tmp/bench-transfer.json

On target `host`, from a scratch copy of its tuning database (build the library first with
`search tune`; the copy keeps the bench from adding to it), and a second copy that the
policies' kernels are tuned into (`--tuned-db`: kept, so that a second run of the bench with
the same seed reuses those records and takes minutes instead of tuning again): for
`--policies` random per-layer policies of the default task's default space (drawn as a
random sampler draws them, with another seed than `search tune`'s, so many of their kernels
lack a record), the candidate is compiled three ways, one after the other:

1. transferred: kernels without a record replay their nearest tuned kernel's schedule
   (search.backend.transfer), those no schedule fits tuned (what a trial does by default),
2. untuned: those kernels keep TVM's default schedule (`transfer: false`,
   `tune_trials_per_task: 0`),
3. tuned: those kernels tuned first with MetaSchedule (8 trials each, as a trial did before).

Then all three are timed in one process, round by round against the tuned build (the one
timing path: search.backend.measure, the tuned build as the anchor), and each build's output is
checked against PyTorch's. Printed per policy: kernels, how many lacked a record, how many
were transferred, compile seconds with transfer vs tuning seconds, the latencies and their
ratios to tuned. Models are not fine-tuned: latency does not depend on the weight values.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def run(args: argparse.Namespace) -> dict:
    import torch

    from search.backend.compile import Compiler, to_relax
    from search.backend.measure import Anchor, run_and_time
    from search.compress.build import build, output_tolerance
    from search.compress.policy import LayerPolicy, Policy
    from search.compress.space import derive_space
    from search.core.data import as_inputs
    from search.core.task import load_task
    from search.devices.target import load_target
    from search.study.config import SearchConfig
    from search.study.runfolder import tuning_dir

    torch.set_num_threads(1)
    config = SearchConfig()
    task = load_task(args.task)
    spec = load_target("host")
    library = tuning_dir(spec)
    scratch = Path(tempfile.mkdtemp(prefix="bench-transfer-")) / "db"
    shutil.copytree(library, scratch, ignore=shutil.ignore_patterns("logs", ".lock"))
    if not args.tuned_db.exists():
        shutil.copytree(library, args.tuned_db, ignore=shutil.ignore_patterns("logs", ".lock"))
    x = task.example
    space = derive_space(task.model, x, config.space_choices(), config.knobs)
    rng = random.Random(args.seed)
    # as a trial: a kernel no tuned kernel's schedule fits is tuned (into the scratch copy)
    transfer = Compiler(spec, scratch, trials_per_task=8, transfer=True)
    untuned = Compiler(spec, scratch, trials_per_task=0, transfer=False)
    tuner = Compiler(spec, args.tuned_db, trials_per_task=8, transfer=False)
    rows = []
    for i in range(args.policies):
        policy = Policy({ls.name: LayerPolicy(**{k: rng.choice(ls.choices(k))
                                                 for k in config.knobs}) for ls in space})
        model = build(task.model, policy, x, task.train).eval()
        with torch.no_grad():
            reference = model(*as_inputs(x))
        mod = to_relax(model, x)
        plain = untuned.compile(mod)  # (first: the transfer compile tunes what it cannot serve)
        start = time.perf_counter()  # (the first policy's compile: reading the library)
        transfer.transfer.index(transfer.refresh_database())
        index_s = time.perf_counter() - start
        start = time.perf_counter()
        moved = transfer.compile(mod)
        transfer_s = time.perf_counter() - start
        start = time.perf_counter()
        tuned = tuner.compile(mod)
        tune_s = time.perf_counter() - start
        atol = output_tolerance(policy)
        anchor = Anchor((tuned.executable,), x)
        m = spec.measurement
        a = run_and_time(moved.executable, x, reference, m, atol=atol, anchor=anchor)
        b = run_and_time(plain.executable, x, reference, m, atol=atol, anchor=anchor)
        row = {"policy": i, "kernels": moved.tasks, "lacking": moved.tasks - plain.tuned,
               "transferred": moved.transferred, "transfer_compile_s": round(transfer_s, 1),
               "transfer_tuning_s": round(moved.tuning_s, 1),
               "transfer_tuned": moved.new_tasks,
               "tune_compile_s": round(tune_s, 1),
               "read_and_index_s": round(index_s, 1), "tuned_now": tuned.new_tasks,
               "tuned_ms": a.anchor_ms, "transferred_ms": a.median_ms, "untuned_ms": b.median_ms,
               "transferred_ratio": a.ratio, "untuned_ratio": b.ratio}
        rows.append(row)
        print(f"policy {i}: {row['lacking']}/{row['kernels']} kernels lack a record, "
              f"{row['transferred']} transferred; compile {transfer_s:.0f} s with transfer "
              f"(of it {moved.tuning_s:.0f} s tuning {moved.new_tasks}) vs "
              f"{tune_s:.0f} s tuning {tuned.new_tasks}; tuned {a.anchor_ms:.3f} ms, "
              f"transferred {a.median_ms:.3f} ms ({a.ratio:.3f}x), untuned {b.median_ms:.3f} ms "
              f"({b.ratio:.3f}x)", flush=True)
    shutil.rmtree(scratch.parent, ignore_errors=True)
    return {"task": task.name, "library": str(library), "rows": rows}


def analyze(data: dict) -> None:
    rows = data["rows"]
    print(f"\n{len(rows)} per-layer policies, {data['task']}, library {data['library']}")
    print(f"{'':<34} {'median':>8} {'min':>7} {'max':>7}")
    for label, key in (("transferred / tuned latency", "transferred_ratio"),
                       ("untuned / tuned latency", "untuned_ratio"),
                       ("kernels lacking a record", "lacking"),
                       ("of them transferred", "transferred"),
                       ("compile s with transfer", "transfer_compile_s"),
                       ("compile s of the tuned build", "tune_compile_s"),
                       ("  of which kernels tuned now", "tuned_now")):
        vals = [r[key] for r in rows]
        print(f"{label:<34} {statistics.median(vals):>8.3f} {min(vals):>7.3f} {max(vals):>7.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="search.tasks:mobilenet_v2")
    ap.add_argument("--policies", type=int, default=5)
    ap.add_argument("--seed", type=int, default=21)
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench-transfer.json"))
    ap.add_argument("--tuned-db", type=Path, default=Path("/tmp/bench-transfer-db"))
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
