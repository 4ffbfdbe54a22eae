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

from search.backend.compile import Compiler  # noqa: E402
from search.compress.policy import Policy
from search.compress.space import derive_space, uniform
from search.devices.target import load_target  # noqa: E402
from search.study.config import SearchConfig  # noqa: E402
from search.study.evaluate import Evaluator
from search.tasks.digits import digits_resnet

SETTINGS = [  # (row name, uniform policy): each knob at two strengths
    ("rank 0.5", {"rank": 0.5}), ("rank 0.125", {"rank": 0.125}),
    ("threshold 0.4 (soft-threshold rank)", {"threshold": 0.4}),
    ("threshold 0.8", {"threshold": 0.8}),
    ("split 0.25 (kx1 + 1xk)", {"rank": 0.25, "split": "spatial"}),
    ("sparsity 0.25 (channels, l2)", {"sparsity": 0.25}),
    ("sparsity 0.75 (channels, l2)", {"sparsity": 0.75}),
    ("sparsity 0.5, taylor importance", {"sparsity": 0.5, "importance": "taylor"}),
    ("sparsity 0.5, fisher importance", {"sparsity": 0.5, "importance": "fisher"}),
    ("bits 16 (fp16 compute)", {"bits": 16}), ("bits 16 (bf16 compute)", {"bits": 16,
                                                                         "half": "bf16"}),
    ("bits 8 (int8 weight storage)", {"bits": 8}), ("bits 4 (int4 storage)", {"bits": 4}),
    ("bits 2 (ternary)", {"bits": 2}), ("bits 1 (binary)", {"bits": 1}),
    ("rank 0.25 + int4 factors", {"rank": 0.25, "bits": 4}),
    ("prune 0.5 (unstructured)", {"prune": 0.5}), ("prune 0.9", {"prune": 0.9}),
    ("nm 2:4", {"nm": "2:4"}), ("nm 1:4", {"nm": "1:4"}),
    ("share 4 (16 shared values)", {"share": 4}), ("share 2 (4 shared values)", {"share": 2}),
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
    space = derive_space(task.model, task.example, choices={})  # every value of every knob
    config = SearchConfig(finetune_steps=args.steps)  # the study's standard fine-tune (QAT on)
    compiler = Compiler(target, Path(tempfile.mkdtemp()) / "db", args.tune_trials)
    evaluate = Evaluator(task, target, compiler, config)

    def measure(policy: Policy, name: str) -> tuple[str, float, int, float, str]:
        result, _ = evaluate(policy)
        return (name, result.test_accuracy, result.size_bytes, result.latency.median_ms,
                result.latency_source)

    base = measure(Policy(), "uncompressed")
    rows = [measure(uniform(space, **kw), name) for name, kw in SETTINGS]
    print(f"task {task.name} on {target.name}; {args.steps} fine-tune steps; latency median, "
          f"{args.tune_trials} MetaSchedule trials per kernel")
    print(f"{'knob (every layer it applies to)':<36} {'accuracy':>9} {'Δ points':>9} "
          f"{'bytes':>10} {'size ratio':>10} {'ms':>8} {'speed ratio':>11}  source")
    for name, acc, size, lat, src in [base, *rows]:
        print(f"{name:<36} {100 * acc:>8.2f}% {100 * (acc - base[1]):>+9.2f} {size:>10,} "
              f"{size / base[2]:>10.3f} {lat:>8.3f} {base[3] / lat:>10.2f}x  {src}")


if __name__ == "__main__":
    main()
