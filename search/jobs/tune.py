"""The per-target kernel library: the kernels a task's search space can produce, tuned ahead of
time (`search tune`) into the target's tuning database, which every run and sweep on that target
shares, so a trial rarely meets a kernel it must tune first.

How the kernels are found: a joint per-layer space has far more kernel shapes than any budget
tunes (a 1x1 conv's fused kernel depends on its input and output channels, rank, precision and
the next layer's precision), so the library covers the candidates a search proposes first and
their neighbourhood: every uniform policy the space offers (one knob at one value on every
layer: the seeds and the integer program's building blocks) and `samples` random policies (as
the sampler's startup trials draw them). Each candidate is built in its deployed form (int8
calibrated, channels and ranks at the target's granularity) and its fused kernels extracted
with the Compiler's own passes; distinct kernels (by workload) are then tuned in order of their
estimated share of the latency (FLOPs x calls, averaged over the candidates: an estimate that
only orders the work), a chunk at a time, until the budget is spent. Re-running resumes: a
kernel with a record is skipped. A trial's kernel that the library lacks replays the schedule
of the library's nearest kernel of its structure (search.backend.transfer): the library's
breadth of structures and shapes, more than its exact coverage, is what trials draw on.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

from search.backend.compile import Compiler, to_relax
from search.backend.predict import deployed_form
from search.compress.build import restructure
from search.compress.policy import LayerPolicy, Policy
from search.compress.space import LayerSpace, uniform
from search.core.task import Task

CHUNK = 24  # kernels per MetaSchedule session: the budget is checked between sessions


@dataclass(frozen=True)
class LibraryKernel:
    """One distinct kernel the sampled candidates use."""

    name: str  # MetaSchedule's task name (e.g. fused_conv2d_add_clip)
    share: float  # estimated: FLOPs x calls, averaged over the candidates (orders the work)
    candidates: int  # how many sampled candidates use it
    task: Any  # the ExtractedTask


@dataclass(frozen=True)
class LibraryReport:
    """What `search tune` did."""

    candidates: int
    kernels: int  # distinct kernels the candidates use
    had_records: int  # of which were in the database before
    tuned: int  # tuned now
    covered_share: float  # estimated share of the candidates' FLOPs now on tuned kernels
    seconds: float
    stopped: str  # "done" (every kernel has a record) or "budget"

    def summary(self) -> str:
        return (f"{self.candidates} candidates use {self.kernels} distinct kernels: "
                f"{self.had_records} were tuned before, {self.tuned} tuned now "
                f"({self.seconds:.0f} s); {100 * self.covered_share:.1f}% of their estimated "
                f"FLOPs now run on tuned kernels ({self.stopped})")


def candidate_policies(space: list[LayerSpace], knobs: list[str], samples: int,
                       seed: int = 0) -> list[Policy]:
    """Every uniform policy of each searched knob's values, then `samples` random policies
    (each layer's value of each knob drawn uniformly, as a random sampler would)."""
    policies: list[Policy] = []
    for knob in knobs:
        values = sorted({v for ls in space for v in ls.choices(knob)}, key=str)
        for v in values:
            p = uniform(space, **{knob: v})
            if p not in policies:
                policies.append(p)
    rng = random.Random(seed)
    for _ in range(samples):
        policies.append(Policy({ls.name: LayerPolicy(**{k: rng.choice(ls.choices(k))
                                                         for k in knobs})
                                for ls in space}))
    return policies


def plan(task: Task, policies: list[Policy], compiler: Compiler,
         progress: Any | None = None) -> list[LibraryKernel]:
    """The distinct kernels of the candidates, largest estimated share first."""
    from tvm.s_tir.analysis import estimate_tir_flops
    from tvm_ffi import structural_hash

    found: dict[int, list[Any]] = {}  # digest -> [task, summed share, candidates]
    for policy in policies:
        model = deployed_form(restructure(task.model, policy, task.example, task.train,
                                          task.loss), policy, task.train)
        seen = set()
        for kernel in compiler.kernels_of(to_relax(model, task.example)):
            digest = structural_hash(kernel.dispatched[0])
            try:
                flops = float(estimate_tir_flops(kernel.dispatched[0]))
            except Exception:  # noqa: BLE001 - a kernel TVM cannot count: order it last
                flops = 0.0
            entry = found.setdefault(digest, [kernel, 0.0, 0])
            entry[1] += flops * kernel.weight
            if digest not in seen:
                entry[2] += 1
                seen.add(digest)
        if progress is not None:
            progress.update(1)
    n = max(len(policies), 1)
    kernels = [LibraryKernel(k.task_name, share / n, count, k)
               for k, share, count in found.values()]
    return sorted(kernels, key=lambda k: -k.share)


def build_library(compiler: Compiler, kernels: list[LibraryKernel], candidates: int,
                  budget_s: float | None, progress: Any | None = None,
                  chunk: int = CHUNK) -> LibraryReport:
    """Tune the kernels lacking a record, largest share first, `chunk` per MetaSchedule session,
    until the budget (seconds; None: all) is spent."""
    start = time.perf_counter()
    compiler.refresh_database()
    had = sum(compiler._has_record(k.task) for k in kernels)
    todo = [k for k in kernels if not compiler._has_record(k.task)]
    tuned, stopped = 0, "done"
    for i in range(0, len(todo), chunk):
        if budget_s is not None and time.perf_counter() - start >= budget_s:
            stopped = "budget"
            break
        tuned += compiler.tune([k.task for k in todo[i:i + chunk]], progress)
        if progress is not None:
            progress.set_postfix_str(f"{had + tuned}/{len(kernels)} kernels tuned")
    compiler.refresh_database()
    total = sum(k.share for k in kernels) or 1.0
    covered = sum(k.share for k in kernels if compiler._has_record(k.task)) / total
    return LibraryReport(candidates, len(kernels), had, tuned, covered,
                         time.perf_counter() - start, stopped)


def tune_target(target_name: str, config: Any, samples: int = 24,
                budget_s: float | None = None, show_progress: bool = True) -> LibraryReport:
    """`search tune`: build the kernel library of the config's task on a target."""
    from tqdm import tqdm

    from search.compress.space import derive_space
    from search.core.granularity import use_granularity
    from search.core.task import load_task
    from search.devices.target import load_target
    from search.study.runfolder import setup_threads, tuning_dir

    if samples < 0:
        from search.core.errors import UserError

        raise UserError(f"--samples must be >= 0, got {samples}")
    target = load_target(target_name)
    target.check()
    use_granularity(target.granularity)
    setup_threads(target)
    task = load_task(config.task, **config.task_args)
    space = derive_space(task.model, task.example, config.space_choices(), config.knobs)
    policies = candidate_policies(space, config.knobs, samples, config.seed)
    compiler = Compiler(target, tuning_dir(target), max(config.tune_trials_per_task, 1),
                        seed=config.seed)
    with tqdm(total=len(policies), desc="candidates", unit="model",
              disable=not show_progress, dynamic_ncols=True) as bar:
        kernels = plan(task, policies, compiler, bar)
    with tqdm(total=0, desc="tuning", unit="cand", disable=not show_progress,
              dynamic_ncols=True) as bar:
        return build_library(compiler, kernels, len(policies), budget_s, bar)
