"""The Optuna study: propose a per-layer policy, build it, fine-tune, compile, time, record.

Objectives: maximize accuracy, minimize measured latency, minimize stored size; the latency budget
is a constraint (`trial.set_constraint`), so infeasible trials still teach the sampler. A trial
that fails for the candidate's own reason (TrialFailed) is recorded with it (user attr
`fail_reason`) and the study goes on; anything else raised in a trial is a bug and stops the run
(InternalError, its traceback in RUN/error.log).
"""

from __future__ import annotations

import json
import logging
import re
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from torch import nn

from search.compile import Compiler, to_relax
from search.compress import ModelStats, apply_precision, model_stats, output_tolerance, restructure
from search.config import SearchConfig
from search.data import evaluate
from search.early_stop import CURVE_ATTR, Hopeless, StoppedEarly, checkpoints, stopped_attrs
from search.errors import InternalError, TrialFailed, UserError
from search.finetune import Teacher, attach_training_transforms, distill
from search.lock import device_lock
from search.measure import Latency, run_and_time
from search.policy import LayerPolicy, LayerSpace, Policy, derive_space, uniform
from search.predict import LatencyTable, deployed_form, error_report, verify_front
from search.sensitivity import measure_sensitivity, narrow_space, sensitivity_table
from search.target import TargetSpec
from search.task import Task

STUDY_NAME = "search"
TRAINABLE = "trainable.pt"  # a trial's fine-tuned fp32 weights, before precision is applied
DIRECTIONS = ["maximize", "minimize", "minimize"]  # accuracy, latency_ms, size_bytes


@dataclass(frozen=True)
class TrialResult:
    """What one candidate measured, and how."""

    val_accuracy: float  # chose: the study's objective
    test_accuracy: float  # reports: the front's figure (data that chose nothing)
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
        self.teacher = Teacher(task.model, task.train)
        # predicted latency while searching: a per-layer table next to the tuning database
        self.table = LatencyTable.for_compiler(compiler) if config.latency == "predicted" \
            else None
        # the last candidate's fine-tuned weights before precision is applied (fp32, training
        # transforms attached): what `search finetune` continues from
        self.trainable: dict[str, torch.Tensor] | None = None

    def __call__(self, policy: Policy, progress: Any | None = None,
                 hopeless: Hopeless | None = None, curve: dict[str, float] | None = None
                 ) -> tuple[TrialResult, nn.Module]:
        """`curve` collects the validation accuracy at the fine-tune's checkpoints; with
        `hopeless` (and a predicted latency) a dominated candidate raises StoppedEarly."""
        task = self.task
        model = restructure(task.model, policy, task.example, task.train, task.loss)
        identity = all(lp.is_identity for lp in policy.layers.values())
        predicted, known, table_s = None, None, 0.0
        if self.table is not None:  # latency and size are known before the fine-tune
            start = time.perf_counter()
            shape = deployed_form(model, policy, task.train)
            self.table.measure_missing(shape, task.example, self.compiler, self.target,
                                       progress=progress)
            predicted = self.table.predict(shape, task.example, family=task.name)
            known = model_stats(shape, policy, task.example)
            table_s = time.perf_counter() - start
        start = time.perf_counter()
        if not identity:
            options = self.config.finetune_options()
            penalized = attach_training_transforms(model, policy, options)
            on_step = None
            if curve is not None and hopeless is not None and predicted is not None:
                on_step = hopeless.on_step(model, task.val, task.metric, options.steps,
                                           predicted.ms, known.size_bytes, curve)
            elif curve is not None:
                on_step = checkpoints(model, task.val, task.metric, options.steps, curve)
            distill(model, self.teacher, task.train, options, task.loss, seed=self.config.seed,
                    penalized=penalized, on_step=on_step)
            self.trainable = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            self.trainable = None
        model = apply_precision(model, policy, task.train)
        val_accuracy = evaluate(model, task.val, task.metric)
        test_accuracy = evaluate(model, task.test, task.metric)
        finetune_s = time.perf_counter() - start
        stats = model_stats(model, policy, task.example)
        if predicted is not None and not identity:  # (the baseline is measured whole below)
            latency = Latency(predicted.ms, predicted.ms, predicted.ms, 0)
            return TrialResult(val_accuracy, test_accuracy, latency, predicted.source, stats,
                               finetune_s, table_s,
                               0.0, len(predicted.per_layer), 0), model

        with torch.no_grad():
            reference = model(*task.example)
        mod = to_relax(model, task.example)
        with device_lock(self.target):  # one trial at a time tunes and times on a device
            start = time.perf_counter()
            compiled = self.compiler.compile(mod, progress)
            compile_s = time.perf_counter() - start
            latency = run_and_time(compiled.executable, task.example, reference,
                                   self.target.measurement, self.target.device(),
                                   atol=output_tolerance(policy))
        source = latency_source(self.target.name, compiled.tuned, compiled.tasks,
                                latency.emulated_by)
        if self.table is not None:  # the uncompressed model: a record for the residual
            self.table.record_whole(model, task.example, latency.median_ms, family=task.name,
                                    note="uncompressed")
        return TrialResult(val_accuracy, test_accuracy, latency, source, stats, finetune_s,
                           compile_s,
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


def storage_url(run_dir: Path, url: str | None) -> str:
    """The run folder's SQLite file unless an Optuna RDB URL (PostgreSQL, MySQL) is given."""
    return url or f"sqlite:///{(run_dir / 'study.db').resolve()}"


def open_storage(url: str, heartbeat_s: int = 20, grace_s: int = 90
                 ) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage with heartbeats: a trial whose worker died (kill -9, a lost machine)
    is failed after `grace_s` without a heartbeat and enqueued again once
    (RetryFailedTrialCallback), by whichever worker next starts a trial."""
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.8
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url, engine_kwargs=engine, heartbeat_interval=heartbeat_s, grace_period=grace_s,
            heartbeat_stale_trial_callback=optuna.storages.RetryFailedTrialCallback(
                max_retry=1))




def make_sampler(name: str, seed: int, startup_trials: int) -> optuna.samplers.BaseSampler:
    """Optuna's multi-objective TPE (default: models the space after `startup_trials`), random
    search, or NSGA-II (generations of max(4, startup_trials)). TPE and NSGA-II read the
    latency-budget constraint each trial sets (`set_constraint`); random search ignores it."""
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, startup_trials))
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials)


def open_study(url: str, name: str, seed: int, startup_trials: int, create: bool,
               heartbeat_s: int = 20, grace_s: int = 90, sampler: str = "tpe") -> optuna.Study:
    """The run's study (optuna-dashboard opens it: `optuna-dashboard <storage URL>`)."""
    sampler = make_sampler(sampler, seed, startup_trials)
    storage = open_storage(url, heartbeat_s, grace_s)
    if create:
        return optuna.create_study(study_name=name, storage=storage, directions=DIRECTIONS,
                                   sampler=sampler)
    try:
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    except KeyError:
        raise UserError(f"no study {name!r} in {redact(url)}; start one with `search run "
                        f"--storage URL --study {name}`") from None


def redact(url: str) -> str:
    """A storage URL without its password, for messages."""
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def fail_interrupted(study: optuna.Study) -> int:
    """Trials left RUNNING by a killed run are failed, so a resumed run does not count them.
    Only for a run's own storage: with shared storage another machine may be running them
    (heartbeats catch the dead ones there)."""
    n = 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        # NOTE: Optuna has no public setter for a user attr of a trial it is not running
        study._storage.set_trial_user_attr(t._trial_id, "fail_reason", "interrupted")
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        n += 1
    return n


def failed_for_real(t: optuna.trial.FrozenTrial) -> bool:
    """A FAIL trial that was the candidate's fault. Not: interrupted, lost with a dead worker
    (no reason), or stopped by a bug in our code (`internal error: ...`): a resumed run
    evaluates those again."""
    reason = t.user_attrs.get("fail_reason", "interrupted")
    return t.state == optuna.trial.TrialState.FAIL and reason != "interrupted" \
        and not reason.startswith("internal error")


def finished_count(study: optuna.Study) -> int:
    """Trials that count against the trial budget: complete, stopped early, or failed for a
    real reason (failed_for_real)."""
    done = 0
    for t in study.get_trials(deepcopy=False):
        if t.state == optuna.trial.TrialState.COMPLETE:
            done += 1
        elif t.state == optuna.trial.TrialState.PRUNED:  # stopped early (search.early_stop)
            done += 1
        elif failed_for_real(t):
            done += 1
    return done


def claimed_count(study: optuna.Study) -> int:
    """Finished trials plus those running now (on any worker)."""
    running = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))
    return finished_count(study) + running


def has_baseline(study: optuna.Study) -> bool:
    return any(t.user_attrs.get("uncompressed") for t in
               study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


def enqueue_seeds(study: optuna.Study, space: list[LayerSpace], config: SearchConfig,
                  only_baseline: bool = False) -> None:
    if only_baseline:
        if config.seeds:
            enqueue_baseline(study, policy_params(uniform(space, **config.seeds[0]),
                                                  config.knobs))
        return
    for seed in config.seeds[:config.trials]:
        study.enqueue_trial(policy_params(uniform(space, **seed), config.knobs),
                            skip_if_exists=True)


def enqueue_baseline(study: optuna.Study, params: dict[str, Any]) -> None:
    """A resumed run without a finished baseline runs it again, unless it is queued or running,
    or failed for the candidate's own reason (it would fail again). Not skip_if_exists: that
    would skip a baseline interrupted or stopped by a bug since fixed."""
    trials = study.get_trials(deepcopy=False)
    waiting = (optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING)
    if any(t.state in waiting and t.system_attrs.get("fixed_params", t.params) == params
           for t in trials):
        return
    if any(t.user_attrs.get("uncompressed") and failed_for_real(t) for t in trials):
        return
    study.enqueue_trial(params)


def objective_factory(evaluator: Evaluator, space: list[LayerSpace], budget_ms: float,
                      run_dir: Path, progress: Any | None) -> Callable[[optuna.Trial], tuple]:
    knobs = evaluator.config.knobs

    def objective(trial: optuna.Trial) -> tuple[float, float, int]:
        try:
            return evaluate_trial(trial)
        except StoppedEarly as exc:  # Optuna records it PRUNED (see search.early_stop)
            for key, value in stopped_attrs(exc).items():
                trial.set_user_attr(key, value)
            trial.set_constraint("latency_budget_ms", exc.latency_ms - budget_ms)
            raise
        except TrialFailed as exc:
            trial.set_user_attr("fail_reason", str(exc))
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", "interrupted")
            raise
        except UserError as exc:  # bad input found late: it stops the run, in one line
            trial.set_user_attr("fail_reason", str(exc))
            raise
        except Exception as exc:  # a bug, not the candidate's fault: stop the run (see errors)
            log = save_traceback(run_dir, trial.number, exc)
            trial.set_user_attr("fail_reason", f"internal error: {type(exc).__name__}: "
                                               f"{first_line(exc)}")
            raise InternalError(trial.number, exc, log) from exc

    def evaluate_trial(trial: optuna.Trial) -> tuple[float, float, int]:
        policy = suggest_policy(trial, space, knobs)
        trial_dir = run_dir / "trials" / f"{trial.number:04d}"
        trial_dir.mkdir(parents=True, exist_ok=True)
        policy.save(trial_dir / "policy.yaml")
        trial.set_user_attr("uncompressed", all(lp.is_identity for lp in policy.layers.values()))
        curve: dict[str, float] = {}
        hopeless = Hopeless(trial.study) if evaluator.config.early_stop else None
        result, model = evaluator(policy, progress, hopeless, curve)
        if not trial.user_attrs["uncompressed"]:  # the uncompressed weights are the task's
            torch.save(model.state_dict(), trial_dir / "model.pt")
            if evaluator.trainable is not None:  # for a longer fine-tune later
                torch.save(evaluator.trainable, trial_dir / TRAINABLE)
        attrs = {
            "val_accuracy": result.val_accuracy,
            "test_accuracy": result.test_accuracy,
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
            CURVE_ATTR: curve,
        }
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        (trial_dir / "result.json").write_text(json.dumps(
            {**attrs, "policy": policy.to_dict()}, indent=1))
        trial.set_constraint("latency_budget_ms", result.latency.median_ms - budget_ms)
        return result.val_accuracy, result.latency.median_ms, result.stats.size_bytes

    return objective


ERROR_LOG = "error.log"


def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else ""


def save_traceback(run_dir: Path, trial: int, exc: BaseException) -> Path:
    """Append the full traceback to RUN/error.log: the one-line message points there."""
    log = run_dir / ERROR_LOG
    text = "".join(traceback.format_exception(exc))
    with open(log, "a") as f:
        f.write(f"--- trial {trial}, {time.strftime('%Y-%m-%d %H:%M:%S')}\n{text}\n")
    return log


def prepare_study(run_dir: Path, task: Task, config: SearchConfig, url: str, name: str,
                  resume: bool, run_info: dict[str, Any], own_storage: bool,
                  say: Callable[[str], None] = lambda _: None, progress: Any | None = None
                  ) -> tuple[optuna.Study, list[LayerSpace]]:
    """Create the study (seeded; the run's settings, sensitivity and search space stored as
    study user attrs, so a worker elsewhere joins from the storage alone) or reopen it."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(url, name, config.seed, config.startup_trials, create=not resume,
                       heartbeat_s=config.heartbeat_s, grace_s=config.heartbeat_grace_s,
                       sampler=config.sampler)
    if resume:
        stored = study.user_attrs.get("space")  # (runs before 0.2 did not store it)
        space = [LayerSpace.from_dict(d) for d in stored] if stored else \
            derive_space(task.model, task.example, config.space_choices(), config.knobs)
        if own_storage:
            fail_interrupted(study)
        if not has_baseline(study):
            enqueue_seeds(study, space, config, only_baseline=True)
    else:
        space = derive_space(task.model, task.example, config.space_choices(), config.knobs)
        if config.sensitivity:
            sens = measure_sensitivity(task, space, config.knobs, seed=config.seed,
                                       progress=progress)
            sens.save(run_dir / "sensitivity.json")
            study.set_user_attr("sensitivity", sens.to_dict())
            say(sensitivity_table(sens))
            if config.sensitivity_max_drop is not None:
                space = narrow_space(space, sens, config.sensitivity_max_drop)
        with warnings.catch_warnings():  # "experimental" in Optuna 5
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(["val_accuracy", "latency_ms", "size_bytes"])  # dashboards
        study.set_user_attr("run", run_info)
        study.set_user_attr("space", [ls.to_dict() for ls in space])
        enqueue_seeds(study, space, config)
    (run_dir / "space.json").write_text(json.dumps([ls.to_dict() for ls in space], indent=1))
    return study, space


class _QuietFailures(logging.Filter):
    """Optuna logs every failed trial with its traceback. A candidate's own failure
    (TrialFailed) keeps Optuna's one-line warning; the two warnings of a failure that stops the
    run are dropped: the CLI says it in one line (a bug's traceback is in RUN/error.log)."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: str | None = None  # the bug's second warning, logged right after

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, InternalError | UserError):  # (the run stops; the CLI says why)
            self.pending = f"Trial {record.getMessage().split()[1]} failed with value"
            return False
        if isinstance(exc, TrialFailed):
            record.exc_info = None
        if self.pending and record.getMessage().startswith(self.pending):
            self.pending = None
            return False
        return True


_QUIET_FAILURES = _QuietFailures()


def work(study: optuna.Study, space: list[LayerSpace], run_dir: Path, task: Task,
         target: TargetSpec, compiler: Compiler, budget_ms: float, config: SearchConfig,
         on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
         progress: Any | None = None) -> None:
    """Run trials until the study has `config.trials` finished or claimed (by any worker) or
    `config.timeout` passed. Several processes may call this on one study: Optuna's storage
    hands each waiting (seed) trial to one of them, and trial numbers are the storage's."""
    evaluator = Evaluator(task, target, compiler, config)
    objective = objective_factory(evaluator, space, budget_ms, run_dir, progress)
    callbacks = [on_trial] if on_trial else []
    deadline = None if config.timeout is None else time.monotonic() + config.timeout
    logging.getLogger("optuna.study._optimize").addFilter(_QUIET_FAILURES)  # (idempotent)
    while True:
        with warnings.catch_warnings():  # "experimental" since Optuna 2.9
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # a dead worker's trial: failed, re-run
        if claimed_count(study) >= config.trials:
            break
        if deadline is not None and time.monotonic() >= deadline:
            break
        # NOTE: only a candidate's own failure is caught (recorded FAIL, the study goes on);
        # anything else is recorded FAIL by Optuna and raised: a bug stops the run
        study.optimize(objective, n_trials=1, catch=(TrialFailed,), callbacks=callbacks)


def measure_front(study: optuna.Study, run_dir: Path, task: Task, target: TargetSpec,
                  compiler: Compiler, budget_ms: float, rounds: int = 5) -> dict[str, Any]:
    """Compile and time whole each front point whose latency was predicted, until the front
    (recomputed with the measured figures) has none left; report the table's error on them.
    The figures are a study user attr (`front_measured`: a finished trial's attrs are frozen),
    which `search.front.points_of` reads in place of the predicted ones."""
    from search.export import load_trial_model
    from search.front import pareto, points_of

    table = LatencyTable.for_compiler(compiler)
    measured: dict[str, Any] = dict(study.user_attrs.get("front_measured", {}))
    for _ in range(rounds):
        todo = [p for p in pareto(points_of(study, budget_ms, run_dir))
                if p.latency_source.startswith("predicted") and str(p.trial) not in measured]
        if not todo:
            break
        items = []
        for p in todo:
            model, policy = load_trial_model(run_dir, p.trial, task)
            items.append((p.trial, model, p.latency_ms, output_tolerance(policy)))
        new_rows, _ = verify_front(items, task.example, table, compiler, target, task.name)
        for row in new_rows:
            measured[str(row["point"])] = row
        study.set_user_attr("front_measured", measured)
    done = [r for r in measured.values() if "error" not in r]
    report = error_report((r["predicted_ms"], r["measured_ms"]) for r in done)
    study.set_user_attr("latency_table_error", report)
    return {"points": list(measured.values()), "error": report}
