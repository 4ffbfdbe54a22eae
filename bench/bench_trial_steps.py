"""Where a trial on predicted latencies spends its seconds, step by step (bench/RESULTS.md 13.26).

    python bench/bench_trial_steps.py [--task search.tasks:mobilenet_v2] [--policies 3] \
        [--seed 1] [--trials 10]

On target `host`, from its kernel library as it is (nothing tuned). For `--policies` random
per-layer policies of the default space: each step of `latency: predicted` timed alone
(restructure, the deployed form, torch.fx's trace and import as shipped, then torch.export and
TVM's import with its core-ATen decompositions as before 13.29,
the compiler's passes, task extraction, the library's sum), then one evaluation pass over the
validation and the test split. Then TPE's draw of the space's knobs (independent, as shipped,
and multivariate) over `--trials` trials of a throwaway SQLite study. Models are not
fine-tuned: the steps' times do not depend on weight values.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def prediction_steps(task, compiler, policies) -> dict[str, list[float]]:
    import torch
    from tvm.relax.frontend.torch import from_exported_program
    from tvm.s_tir import meta_schedule as ms

    from search.backend.compile import _fused, traced_relax
    from search.backend.int8 import lower_int8
    from search.backend.layout import cpu_layout
    from search.backend.predict import KernelLibrary, deployed_form
    from search.compress.build import restructure

    library = KernelLibrary(compiler)
    inputs = task.example if isinstance(task.example, tuple) else (task.example,)
    steps: dict[str, list[float]] = {}

    def timed(name, f, *args, **kw):
        start = time.perf_counter()
        out = f(*args, **kw)
        steps.setdefault(name, []).append(time.perf_counter() - start)
        return out

    for policy in policies:
        model = timed("restructure", restructure, task.model, policy, task.example, task.train,
                      task.loss)
        deployed = timed("deployed form", deployed_form, model, policy, task.train).eval()
        timed("torch.fx trace + TVM import (shipped, where it agrees)", traced_relax, deployed,
              task.example)
        ep = timed("torch.export", torch.export.export, deployed, inputs)
        ep = timed("run_decompositions (core ATen)", ep.run_decompositions)
        mod = timed("TVM import", from_exported_program, ep, keep_params_as_input=False,
                    unwrap_unit_return_tuple=True, run_ep_decomposition=False)
        mod = timed("layout pass", cpu_layout, mod)
        mod = timed("int8 lowering", lower_int8, mod, target=compiler.target)
        fused = timed("legalize + fusion", _fused, mod, compiler.target)
        kernels = timed("task extraction", lambda f: list(
            ms.relax_integration.extract_tasks(f, compiler.target)), fused)
        timed("library sum", library.kernel_sum, kernels)
    return steps


def evaluation_passes(task, policies) -> dict[str, list[float]]:
    from search.compress.build import apply_precision, restructure
    from search.core.data import evaluate

    steps: dict[str, list[float]] = {}
    for policy in policies:
        model = apply_precision(restructure(task.model, policy, task.example, task.train,
                                            task.loss), policy, task.train)
        for name, split in (("validation pass", task.val), ("test pass", task.test)):
            start = time.perf_counter()
            evaluate(model, split, task.metric)
            steps.setdefault(name, []).append(time.perf_counter() - start)
    return steps


def tpe_draws(space, knobs: list[str], trials: int, multivariate: bool) -> list[float]:
    """Seconds per trial to suggest every layer's knobs (after 3 random startup trials)."""
    import optuna

    from search.study.loop import suggest_policy

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        sampler = optuna.samplers.TPESampler(seed=0, n_startup_trials=3,
                                             multivariate=multivariate)
        study = optuna.create_study(storage=f"sqlite:///{tmp}/s.db", sampler=sampler,
                                    directions=["maximize", "minimize", "minimize"])
        times = []
        for i in range(trials):
            trial = study.ask()
            start = time.perf_counter()
            suggest_policy(trial, space, knobs)
            times.append(time.perf_counter() - start)
            study.tell(trial, [0.5 + 0.01 * i, 1.0 - 0.01 * i, 1e6])
    return times[3:]


def main() -> None:
    import random
    import warnings

    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="search.tasks:mobilenet_v2")
    ap.add_argument("--policies", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--trials", type=int, default=10)
    args = ap.parse_args()

    from search.backend.compile import Compiler
    from search.compress.policy import LayerPolicy, Policy
    from search.compress.space import derive_space
    from search.core.task import load_task
    from search.devices.target import load_target
    from search.study.config import SearchConfig
    from search.study.runfolder import tuning_dir

    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)  # as a trial's fine-tune and evaluation
    config = SearchConfig()
    task = load_task(args.task)
    spec = load_target("host")
    compiler = Compiler(spec, tuning_dir(spec), trials_per_task=0)
    space = derive_space(task.model, task.example, config.space_choices(), config.knobs)
    rng = random.Random(args.seed)
    policies = [Policy({ls.name: LayerPolicy(**{k: rng.choice(ls.choices(k))
                                                for k in config.knobs}) for ls in space})
                for _ in range(args.policies)]
    knobs = sum(len([k for k in config.knobs if len(ls.choices(k)) > 1]) for ls in space)
    rows = {**prediction_steps(task, compiler, policies), **evaluation_passes(task, policies)}
    rows[f"TPE draw of {knobs} knobs, independent (shipped)"] = \
        tpe_draws(space, config.knobs, args.trials, False)
    rows[f"TPE draw of {knobs} knobs, multivariate"] = \
        tpe_draws(space, config.knobs, args.trials, True)
    print(f"\n{'step':<56} {'median s':>9} {'min':>7} {'max':>7}")
    for name, times in rows.items():
        print(f"{name:<56} {statistics.median(times):9.2f} {min(times):7.2f} {max(times):7.2f}")


if __name__ == "__main__":
    main()
