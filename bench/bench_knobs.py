"""Every knob at two strengths on the residual model: accuracy after the standard fine-tune,
stored bytes and tuned latency on the target, as ratios to the uncompressed model, in one run.

    python bench/bench_knobs.py [--target host] [--tune-trials 8]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "1")

import torch  # noqa: E402

from search.compile import Compiler, to_relax  # noqa: E402
from search.compress import apply_precision, model_stats, output_tolerance, restructure  # noqa: E402,E501
from search.finetune import FinetuneOptions, distill, evaluate, teacher_logits  # noqa: E402
from search.measure import run_and_time  # noqa: E402
from search.policy import Policy, derive_space, uniform  # noqa: E402
from search.study import latency_source  # noqa: E402
from search.target import load_target  # noqa: E402
from search.task import digits_resnet  # noqa: E402

SETTINGS = [
    ("rank 0.5", {"rank": 0.5}), ("rank 0.125", {"rank": 0.125}),
    ("sparsity 0.25", {"sparsity": 0.25}), ("sparsity 0.75", {"sparsity": 0.75}),
    ("bits 16", {"bits": 16}), ("bits 8", {"bits": 8}),
    ("prune 0.5", {"prune": 0.5}), ("prune 0.9", {"prune": 0.9}),
    ("share 4", {"share": 4}), ("share 2", {"share": 2}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="host")
    parser.add_argument("--tune-trials", type=int, default=8)
    parser.add_argument("--steps", type=int, default=60, help="fine-tune steps (the default)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    target = load_target(args.target)
    task = digits_resnet()
    space = derive_space(task.model, task.example)
    teacher = teacher_logits(task.model, task.train[0])
    compiler = Compiler(target, Path(tempfile.mkdtemp()) / "db", args.tune_trials)

    def measure(policy: Policy, name: str) -> tuple[str, float, int, float, str]:
        model = restructure(task.model, policy, task.example, task.train)
        if policy != Policy():
            distill(model, teacher, task.train, FinetuneOptions(steps=args.steps))
        model = apply_precision(model, policy)
        acc = evaluate(model, task.val, task.metric)
        size = model_stats(model, policy, task.example).size_bytes
        with torch.no_grad():
            ref = model(task.example)
        c = compiler.compile(to_relax(model, task.example))
        lat = run_and_time(c.executable, task.example, ref, target.measurement,
                           atol=output_tolerance(policy)).median_ms
        return name, acc, size, lat, latency_source(target.name, c.tuned, c.tasks)

    base = measure(Policy(), "uncompressed")
    rows = [measure(uniform(space, **kw), name) for name, kw in SETTINGS]
    print(f"task {task.name} on {target.name}; {args.steps} fine-tune steps; latency median, "
          f"{args.tune_trials} MetaSchedule trials per kernel")
    print(f"{'knob (every layer it applies to)':<34} {'accuracy':>9} {'Δ points':>9} "
          f"{'bytes':>10} {'size ratio':>10} {'ms':>8} {'speed ratio':>11}  source")
    for name, acc, size, lat, src in [base, *rows]:
        print(f"{name:<34} {100 * acc:>8.2f}% {100 * (acc - base[1]):>+9.2f} {size:>10,} "
              f"{size / base[2]:>10.3f} {lat:>8.3f} {base[3] / lat:>10.2f}x  {src}")


if __name__ == "__main__":
    main()
