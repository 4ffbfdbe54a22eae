"""The Optuna study: propose a per-layer policy, build it, fine-tune, compile, time, record.

Objectives: maximize accuracy, minimize measured latency, minimize stored size; the latency budget
is a constraint (`trial.set_constraint`), so infeasible trials still teach the sampler. A failed
trial is recorded with its reason (user attr `fail_reason`) and the study goes on.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from torch import nn

from search.compile import Compiler, to_relax
from search.compress import ModelStats, apply_precision, model_stats, output_tolerance, restructure
from search.config import SearchConfig
from search.errors import TrialFailed
from search.finetune import attach_training_transforms, distill, evaluate, teacher_logits
from search.measure import Latency, run_and_time
from search.policy import LayerPolicy, LayerSpace, Policy, derive_space, uniform
from search.target import TargetSpec
from search.task import Task

STUDY_NAME = "search"
DIRECTIONS = ["maximize", "minimize", "minimize"]  # accuracy, latency_ms, size_bytes


@dataclass(frozen=True)
class TrialResult:
    """What one candidate measured, and how."""

    accuracy: float
    latency: Latency
    latency_source: str  # e.g. measured:host:tuned
    stats: ModelStats
    finetune_s: float
    compile_s: float
    tuning_s: float
    kernels: int  # tunable kernels in the compiled graph
    new_kernels: int  # of which were tuned for this trial (the rest came from the database)


def latency_source(target: str, tuned: int, tasks: int, emulated_by: str | None = None) -> str:
    """How a latency figure was made: measured (or emulated: never the device's figure), on
    which target, and whether its kernels were tuned."""
    kind = "tuned" if tuned == tasks else ("untuned" if tuned == 0 else
                                          f"partly-tuned({tuned}/{tasks})")
    how = f"emulated({emulated_by})" if emulated_by else "measured"
    return f"{how}:{target}:{kind}"


class Evaluator:
    """A policy -> a measured candidate: build, fine-tune, quantize, compile, check, time."""

    def __init__(self, task: Task, target: TargetSpec, compiler: Compiler,
                 config: SearchConfig) -> None:
        self.task = task
        self.target = target
        self.compiler = compiler
        self.config = config
        self.teacher = teacher_logits(task.model, task.train[0])

    def __call__(self, policy: Policy, progress: Any | None = None
                 ) -> tuple[TrialResult, nn.Module]:
        task = self.task
        start = time.perf_counter()
        model = restructure(task.model, policy, task.example, task.train)
        if any(not lp.is_identity for lp in policy.layers.values()):
            options = self.config.finetune_options()
            penalized = attach_training_transforms(model, policy, options)
            distill(model, self.teacher, task.train, options, seed=self.config.seed,
                    penalized=penalized)
        model = apply_precision(model, policy)
        accuracy = evaluate(model, task.val, task.metric)
        finetune_s = time.perf_counter() - start
        stats = model_stats(model, policy, task.example)

        start = time.perf_counter()
        with torch.no_grad():
            reference = model(task.example)
        compiled = self.compiler.compile(to_relax(model, task.example), progress)
        compile_s = time.perf_counter() - start
        latency = run_and_time(compiled.executable, task.example, reference,
                               self.target.measurement, self.target.device(),
                               atol=output_tolerance(policy))
        source = latency_source(self.target.name, compiled.tuned, compiled.tasks,
                                latency.emulated_by)
        return TrialResult(accuracy, latency, source, stats, finetune_s, compile_s,
                           compiled.tuning_s, compiled.tasks, compiled.new_tasks), model


def suggest_policy(trial: optuna.Trial, space: list[LayerSpace], knobs: list[str]) -> Policy:
    """One categorical parameter `<layer>.<knob>` per layer and searched knob; the others stay
    at their identity value."""
    layers = {}
    for ls in space:
        values = {k: trial.suggest_categorical(f"{ls.name}.{k}", ls.choices(k)) for k in knobs}
        layers[ls.name] = LayerPolicy(**values)
    return Policy(layers)


def policy_params(policy: Policy, knobs: list[str]) -> dict[str, Any]:
    return {f"{name}.{k}": getattr(lp, k) for name, lp in policy.layers.items() for k in knobs}


def open_study(run_dir: Path, seed: int, startup_trials: int, create: bool) -> optuna.Study:
    """The run's study in SQLite (optuna-dashboard opens it: `optuna-dashboard sqlite:///...`)."""
    storage = f"sqlite:///{(run_dir / 'study.db').resolve()}"
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials)
    if create:
        return optuna.create_study(study_name=STUDY_NAME, storage=storage, directions=DIRECTIONS,
                                   sampler=sampler)
    return optuna.load_study(study_name=STUDY_NAME, storage=storage, sampler=sampler)


def fail_interrupted(study: optuna.Study) -> int:
    """Trials left RUNNING by a killed run are failed, so a resumed run does not count them."""
    n = 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        # NOTE: Optuna has no public setter for a user attr of a trial it is not running
        study._storage.set_trial_user_attr(t._trial_id, "fail_reason", "interrupted")
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        n += 1
    return n


def finished_count(study: optuna.Study) -> int:
    """Trials that count against the trial budget: complete, or failed for a real reason."""
    done = 0
    for t in study.get_trials(deepcopy=False):
        if t.state == optuna.trial.TrialState.COMPLETE:
            done += 1
        elif t.state == optuna.trial.TrialState.FAIL and \
                t.user_attrs.get("fail_reason") != "interrupted":
            done += 1
    return done


def has_baseline(study: optuna.Study) -> bool:
    return any(t.user_attrs.get("uncompressed") for t in
               study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


def enqueue_seeds(study: optuna.Study, space: list[LayerSpace], config: SearchConfig,
                  only_baseline: bool = False) -> None:
    for seed in config.seeds[:1] if only_baseline else config.seeds:
        study.enqueue_trial(policy_params(uniform(space, **seed), config.knobs),
                            skip_if_exists=True)


def objective_factory(evaluator: Evaluator, space: list[LayerSpace], budget_ms: float,
                      run_dir: Path, progress: Any | None) -> Callable[[optuna.Trial], tuple]:
    knobs = evaluator.config.knobs

    def objective(trial: optuna.Trial) -> tuple[float, float, int]:
        try:
            return evaluate_trial(trial)
        except TrialFailed as exc:
            trial.set_user_attr("fail_reason", str(exc))
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", "interrupted")
            raise
        except Exception as exc:
            trial.set_user_attr("fail_reason", f"{type(exc).__name__}: {exc}")
            raise

    def evaluate_trial(trial: optuna.Trial) -> tuple[float, float, int]:
        policy = suggest_policy(trial, space, knobs)
        trial_dir = run_dir / "trials" / f"{trial.number:04d}"
        trial_dir.mkdir(parents=True, exist_ok=True)
        policy.save(trial_dir / "policy.yaml")
        trial.set_user_attr("uncompressed", all(lp.is_identity for lp in policy.layers.values()))
        result, model = evaluator(policy, progress)
        if not trial.user_attrs["uncompressed"]:  # the uncompressed weights are the task's
            torch.save(model.state_dict(), trial_dir / "model.pt")
        attrs = {
            "accuracy": result.accuracy,
            "latency_ms": result.latency.median_ms,
            "latency_p25_ms": result.latency.p25_ms,
            "latency_p75_ms": result.latency.p75_ms,
            "latency_repeats": result.latency.repeats,
            "latency_source": result.latency_source,
            "params": result.stats.params,
            "flops": result.stats.flops,
            "size_bytes": result.stats.size_bytes,
            "finetune_s": round(result.finetune_s, 2),
            "compile_s": round(result.compile_s, 2),
            "tuning_s": round(result.tuning_s, 2),
            "kernels": result.kernels,
            "new_kernels": result.new_kernels,
            "precisions": sorted({lp.precision for lp in policy.layers.values()} | {"fp32"}),
            "software_precisions": evaluator.target.software_precisions(policy),
        }
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        (trial_dir / "result.json").write_text(json.dumps(
            {**attrs, "policy": policy.to_dict()}, indent=1))
        trial.set_constraint("latency_budget_ms", result.latency.median_ms - budget_ms)
        return result.accuracy, result.latency.median_ms, result.stats.size_bytes

    return objective


def run_study(run_dir: Path, task: Task, target: TargetSpec, compiler: Compiler,
              budget_ms: float, config: SearchConfig, resume: bool,
              on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
              progress: Any | None = None) -> optuna.Study:
    """Create (or resume) the study and run trials until `config.trials` have finished."""
    space = derive_space(task.model, task.example, config.space_choices(), config.knobs)
    (run_dir / "space.json").write_text(json.dumps([asdict(s) for s in space], indent=1))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(run_dir, config.seed, config.startup_trials, create=not resume)
    if resume:
        fail_interrupted(study)
        if not has_baseline(study):
            enqueue_seeds(study, space, config, only_baseline=True)
    else:
        enqueue_seeds(study, space, config)
    remaining = config.trials - finished_count(study)
    if remaining <= 0:
        return study
    evaluator = Evaluator(task, target, compiler, config)
    callbacks = [on_trial] if on_trial else []
    study.optimize(objective_factory(evaluator, space, budget_ms, run_dir, progress),
                   n_trials=remaining, timeout=config.timeout, catch=(Exception,),
                   callbacks=callbacks)
    return study
