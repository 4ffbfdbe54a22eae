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
import os
import socket
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import torch

from search.backend.compile import Compiler
from search.backend.measure import Anchor, compile_anchor, compile_and_time
from search.backend.predict import error_report
from search.compress.build import (
    output_tolerance,
)
from search.compress.policy import LayerPolicy, Policy
from search.compress.precision import precision_of
from search.compress.space import LayerSpace, derive_space, uniform
from search.core.data import check_inputs
from search.core.errors import InternalError, TrialFailed, UserError
from search.core.task import Task
from search.devices.target import TargetSpec
from search.study.allocate import allocate, modelled, options_of
from search.study.artifacts import WEIGHTS, ArtifactStore, upload_trial_files
from search.study.config import SearchConfig
from search.study.early_stop import CURVE_ATTR, Hopeless, StoppedEarly, stopped_attrs
from search.study.evaluate import TRAINABLE, Evaluator
from search.study.layer_cost import library_options
from search.study.points import DUPLICATE_OF, POLICY
from search.study.sensitivity import cached_sensitivity, narrow_space, sensitivity_table
from search.study.storage import (
    SURPLUS,
    claimed_count,
    fail_interrupted,
    failed_for_real,
    finished_count,
    has_baseline,
    open_study,
    over_budget,
)


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
                      run_dir: Path, progress: Any | None, store: ArtifactStore
                      ) -> Callable[[optuna.Trial], tuple]:
    knobs = evaluator.config.knobs

    def objective(trial: optuna.Trial) -> tuple[float, float, int]:
        try:
            return evaluate_trial(trial)
        except StoppedEarly as exc:  # Optuna records it PRUNED (see search.study.early_stop)
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
        if over_budget(trial.study, trial.number, evaluator.config.trials):
            raise TrialFailed(f"{SURPLUS}: the study's {evaluator.config.trials} trials were "
                              "claimed by other workers first; nothing was evaluated")
        policy = suggest_policy(trial, space, knobs)
        trial.set_user_attr(POLICY, policy.to_dict())  # the study alone rebuilds the point
        trial.set_user_attr(WORKER, worker_name())
        trial_dir = run_dir / "trials" / f"{trial.number:04d}"
        trial_dir.mkdir(parents=True, exist_ok=True)
        policy.save(trial_dir / "policy.yaml")
        twin = evaluated_twin(trial.study, trial.number, trial.params)
        if twin is not None:
            return reuse(trial, twin, trial_dir)
        trial.set_user_attr("uncompressed", all(lp.is_identity for lp in policy.layers.values()))
        # validation accuracy at the fine-tune's checkpoints: early stopping's history, taken
        # only when it is on (two validation passes a trial, about 1.5 s on the default task)
        curve: dict[str, float] | None = {} if evaluator.config.early_stop else None
        evaluator.reference_ms = trial.study.user_attrs.get(REFERENCE)
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
            "latency_ratio": result.latency.ratio,  # to the uncompressed, timed interleaved
            "latency_raw_ms": result.latency.raw_ms,  # interleaved: its rounds' median
            "latency_source": result.latency_source.to_dict(),
            "params": result.stats.params,
            "flops": result.stats.flops,
            "size_bytes": result.size_bytes,  # measured from the compiled artifact
            "ideal_size_bytes": result.stats.ideal_size_bytes,  # estimate: formats not written
            "weight_dtypes": result.weight_dtypes,
            "finetune_s": round(result.finetune_s, 2),
            "compile_s": round(result.compile_s, 2),
            "tuning_s": round(result.tuning_s, 2),
            "kernels": result.kernels,
            "new_kernels": result.new_kernels,
            "precisions": sorted({precision_of(lp) for lp in policy.layers.values()} | {"fp32"}),
            "software_precisions": evaluator.target.software_precisions(policy),
            **({CURVE_ATTR: curve} if curve is not None else {}),
        }
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        if REFERENCE not in trial.study.user_attrs and evaluator.reference_ms is not None:
            trial.study.set_user_attr(REFERENCE, evaluator.reference_ms)
            trial.study.set_user_attr(REFERENCE + "_trial", trial.number)
        (trial_dir / "result.json").write_text(json.dumps(
            {**attrs, "policy": policy.to_dict()}, indent=1))
        # the trial's files go to the artifact store (every host reads them there); the
        # weights are kept only there, this folder then holds what this host fetches back
        files = [trial_dir / n for n in ("policy.yaml", "result.json", *WEIGHTS)]
        upload_trial_files(store, trial, files)
        for path in files:
            if path.name in WEIGHTS:
                path.unlink(missing_ok=True)
        trial.set_constraint("latency_budget_ms", result.latency.median_ms - budget_ms)
        return result.val_accuracy, result.latency.median_ms, result.size_bytes

    return objective


WORKER = "worker"  # user attr: the host and process that ran the trial


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


REFERENCE = "reference_latency_ms"  # study attr: the uncompressed model's latency ratios scale


def evaluated_twin(study: optuna.Study, number: int, params: dict[str, Any]
                   ) -> optuna.trial.FrozenTrial | None:
    """An earlier trial of the same policy that finished (complete, or failed for the
    candidate's own reason), itself not a reuse: the sampler may propose a policy again."""
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                      optuna.trial.TrialState.FAIL)):
        if t.number != number and t.params == params and DUPLICATE_OF not in t.user_attrs \
                and (t.state == optuna.trial.TrialState.COMPLETE or failed_for_real(t)):
            return t
    return None


def reuse(trial: optuna.Trial, twin: optuna.trial.FrozenTrial, trial_dir: Path
          ) -> tuple[float, float, int]:
    """The same policy again: its figures are the twin's (recorded with `duplicate_of`, so the
    sampler learns the value and the front lists the point once), nothing is rebuilt."""
    trial.set_user_attr(DUPLICATE_OF, twin.number)
    if twin.state != optuna.trial.TrialState.COMPLETE:
        raise TrialFailed(f"same policy as trial {twin.number}, which failed: "
                          f"{twin.user_attrs.get('fail_reason', '?')}")
    for key, value in twin.user_attrs.items():
        trial.set_user_attr(key, value)
    trial.set_user_attr(DUPLICATE_OF, twin.number)
    for key, value in twin.constraints.items():
        trial.set_constraint(key, value)
    (trial_dir / "result.json").write_text(json.dumps({DUPLICATE_OF: twin.number}, indent=1))
    return tuple(twin.values)  # type: ignore[return-value]


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
                  say: Callable[[str], None] = lambda _: None, progress: Any | None = None,
                  sampler_seed: int | None = None,
                  compiler: Callable[[], Any] | None = None,
                  bar: Callable[[int], Any] | None = None
                  ) -> tuple[optuna.Study, list[LayerSpace]]:
    """Create the study (seeded; the run's settings, sensitivity and search space stored as
    study user attrs, so a worker elsewhere joins from the storage alone) or reopen it.
    `compiler` makes the compiler whose kernel library costs the program (`ip_cost: library`);
    `bar(total)` a progress bar for it. `own_storage`: the run's own, whose trials only this
    process runs (its sampler then needs no constant liar: search.study.storage.make_sampler)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(url, name, config.seed if sampler_seed is None else sampler_seed,
                       config.startup_trials, create=not resume,
                       heartbeat_s=config.heartbeat_s, grace_s=config.heartbeat_grace_s,
                       sampler=config.sampler, shared=not own_storage)
    if resume:
        stored = study.user_attrs.get("space")  # (runs before 0.2 did not store it)
        space = [LayerSpace.from_dict(d) for d in stored] if stored else \
            derive_space(task.model, task.example, config.space_choices(), config.knobs)
        if own_storage:
            fail_interrupted(study)
        if study.user_attrs.get("run") != run_info:  # (--resume --trials N): workers follow
            study.set_user_attr("run", run_info)
        if not has_baseline(study):
            enqueue_seeds(study, space, config, only_baseline=True)
    else:
        space = derive_space(task.model, task.example, config.space_choices(), config.knobs)
        seeds: list[Any] = []  # integer-program seeds (they need the sensitivity table)
        if config.sensitivity:
            sens = cached_sensitivity(task, space, config.knobs, seed=config.seed,
                                      progress=progress, say=say)
            sens.save(run_dir / "sensitivity.json")
            study.set_user_attr("sensitivity", sens.to_dict())
            say(sensitivity_table(sens))
            if config.sensitivity_max_drop is not None:
                space = narrow_space(space, sens, config.sensitivity_max_drop)
            options, cost = None, {"source": "estimate: multiply-adds x precision factor"}
            if config.ip_seeds and config.ip_cost == "library" and compiler is not None:
                say("costing each layer's options from the kernel library for the integer "
                    "program ...")
                options, cost = library_options(
                    task, modelled(config.knobs),
                    options_of(task.model, task.example, space, modelled(config.knobs), sens),
                    compiler(), progress=bar)
            seeds = allocate(task.model, task.example, space, config.knobs, sens,
                             config.ip_seeds, config.ip_size, config.ip_per, options) \
                if config.ip_seeds else []
            study.set_user_attr("ip_cost", cost)
            study.set_user_attr("ip_seeds", [
                {"latency_fraction": a.latency_fraction, "predicted_drop": a.predicted_drop,
                 "cost_fraction": a.cost_fraction, "cost_source": cost["source"],
                 "bytes_fraction": a.bytes_fraction}
                for a in seeds])
            what = "library's" if options else "estimated"
            for a in seeds:
                say(f"integer-program seed for {a.latency_fraction:.0%} of the {what} cost: "
                    f"summed sensitivity {a.predicted_drop:+.3f}, weights "
                    f"{a.bytes_fraction:.0%} of the uncompressed")
        with warnings.catch_warnings():  # "experimental" in Optuna 5
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(["val_accuracy", "latency_ms", "size_bytes"])  # dashboards
        study.set_user_attr("run", run_info)
        study.set_user_attr("space", [ls.to_dict() for ls in space])
        enqueue_seeds(study, space, config)
        room = config.trials - len(config.seeds)
        for a in seeds[:max(room, 0)]:
            study.enqueue_trial(policy_params(a.policy, config.knobs), skip_if_exists=True,
                                user_attrs={"seed": f"ip:{a.latency_fraction:g}"})
    (run_dir / "space.json").write_text(json.dumps([ls.to_dict() for ls in space], indent=1))
    return study, space


class _QuietFailures(logging.Filter):
    """Optuna logs every failed trial with its traceback. A candidate's own failure
    (TrialFailed) keeps Optuna's one-line warning; the two warnings of a failure that stops the
    run are dropped: the CLI says it in one line (a bug's traceback is in RUN/error.log), and
    so are those of a surplus trial (see over_budget)."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: str | None = None  # the bug's second warning, logged right after

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, InternalError | UserError) or \
                (isinstance(exc, TrialFailed) and str(exc).startswith(SURPLUS)):
            # (the run stops and the CLI says why; a surplus trial evaluated nothing)
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
         store: ArtifactStore,
         on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
         progress: Any | None = None) -> Anchor | None:
    """Run trials until the study has `config.trials` finished or claimed (by any worker) or
    `config.timeout` passed. Several processes may call this on one study: Optuna's storage
    hands each waiting (seed) trial to one of them, and trial numbers are the storage's.
    Returns the anchor the trials were timed against, if one was compiled (the run's later
    timings reuse it: compiling it again costs ~10 s)."""
    evaluator = Evaluator(task, target, compiler, config)
    objective = objective_factory(evaluator, space, budget_ms, run_dir, progress, store)
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
    return evaluator.compiled_anchor


def running_elsewhere(study: optuna.Study) -> int:
    """Trials claimed by workers (on any host) and not finished; a dead worker's trials are
    failed here once their heartbeat is stale (and queued again by Optuna's
    RetryHeartbeatStaleTrialCallback)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))


def settle(study: optuna.Study, config: SearchConfig, again: Callable[[], None],
           poll_s: float = 2.0, say: Callable[[str], None] = lambda _: None) -> None:
    """Wait until every claimed trial has finished or been failed by its heartbeat, so the
    front is whole: a trial still running on another host is waited for; one that died there
    and was queued again is run here (`again`)."""
    told, idle = False, False
    while True:
        running = running_elsewhere(study)
        if claimed_count(study) < config.trials and not idle:
            before = finished_count(study)
            again()
            idle = finished_count(study) == before  # nothing ran (the timeout): just wait
            continue
        if not running:
            return
        if not told:
            say(f"waiting for {running} trial(s) still running on other workers ...")
            told = True
        time.sleep(poll_s)


def _time_whole(point: Any, task: Task, run_dir: Path, compiler: Compiler,
                target: TargetSpec, anchor: Anchor, checks: Any, was: str) -> dict[str, Any]:
    """A front point compiled and timed whole as the trials are (its fastest round, round by
    round with the uncompressed model): a `front_measured` row, `was` naming the
    figure it replaces (predicted_ms, transferred_ms)."""
    from search.study.runfolder import load_trial_model

    model, policy = load_trial_model(run_dir, point.trial, task)
    row: dict[str, Any] = {"point": point.trial, was: point.latency_ms}
    try:
        timed = compile_and_time(model, task.example, compiler, target,
                                 atol=output_tolerance(policy), anchor=anchor, checks=checks)
    except TrialFailed as exc:
        return {**row, "error": str(exc)}
    latency, source = timed.latency, timed.source
    # (interleaved: its ratio to the uncompressed model's fastest round beside it, now)
    ratio = {"measured_ratio": latency.ratio, "anchor_ms": latency.anchor_ms} \
        if latency.ratio is not None else {}
    return {**row, "measured_ms": latency.median_ms,
            "measured_iqr_ms": [latency.p25_ms, latency.p75_ms], **ratio,
            "rel_error": (point.latency_ms - latency.median_ms) / latency.median_ms,
            "tuning_s": round(timed.compiled.tuning_s, 1), "source": source.to_dict()}


def measure_front(study: optuna.Study, run_dir: Path, task: Task, target: TargetSpec,
                  compiler: Compiler, budget_ms: float, rounds: int = 5,
                  anchor: Anchor | None = None, say: Callable[[str], None] = lambda _: None
                  ) -> dict[str, Any]:
    """Compile and time whole, as the trials are, each front point whose latency was
    predicted, until the front (recomputed with the measured figures) has none left; report
    the prediction's error on them. The figures are a study user attr (`front_measured`: a
    finished trial's attrs are frozen), which `search.report.front.points_of` reads in place
    of the predicted ones; `front_predicted` keeps each row as measured here (tune_front may
    replace the figure), and the error is over those. A point that fails whole is no point
    (points_of). `anchor`: the one the trials were timed against, if this process has it."""
    from search.study.points import pareto, points_of

    measured: dict[str, Any] = dict(study.user_attrs.get("front_measured", {}))
    checked: dict[str, Any] = dict(study.user_attrs.get("front_predicted", {}))  # (kept when
    # tune_front replaces a point's figure with its tuned kernels')
    checks = check_inputs(task.train, task.example)
    timed = False
    for _ in range(rounds):
        todo = [p for p in pareto(points_of(study, budget_ms, run_dir))
                if p.latency_source.estimate and str(p.trial) not in checked]
        if not todo:
            break
        timed = True
        say(f"timing {len(todo)} front point(s) whole (their latency was predicted) ...")
        anchor = anchor or compile_anchor(task.model, task.example, compiler, target)
        for p in todo:
            row = _time_whole(p, task, run_dir, compiler, target, anchor, checks,
                              "predicted_ms")
            measured[str(p.trial)] = checked[str(p.trial)] = row
        study.set_user_attr("front_measured", measured)
        study.set_user_attr("front_predicted", checked)
    done = [r for r in checked.values() if "error" not in r]
    report = error_report((r["predicted_ms"], r["measured_ms"]) for r in done)
    # the predicted ratio (predicted_ms / the reference) against the ratio measured beside
    # the uncompressed model: the prediction's own error, without how far that model's
    # figure moved since the reference was taken (the machine's drift, 13.32's 14 %)
    reference = study.user_attrs.get(REFERENCE)
    report["ratio"] = error_report(
        (r["predicted_ms"] / reference, r["measured_ratio"]) for r in done
        if reference and r.get("measured_ratio")) if reference else {"n": 0}
    study.set_user_attr("latency_prediction_error", report)
    if timed and report["n"]:
        said = f"{100 * report['median_abs_rel_error']:.1f}% median, " \
            f"{100 * report['p95_abs_rel_error']:.1f}% p95 in ms"
        if report["ratio"]["n"]:
            said += f"; {100 * report['ratio']['median_abs_rel_error']:.1f}% median, " \
                f"{100 * report['ratio']['p95_abs_rel_error']:.1f}% p95 as ratios to the " \
                f"uncompressed model timed beside each"
        say(f"the predicted latencies of {report['n']} front point(s), against the points "
            f"timed whole: off by {said}")
    return {"points": list(checked.values()), "error": report}


# front points this far over the budget are retimed too: transferred schedules measured up to
# 1.32x slower than the point's own tuned kernels (bench/RESULTS.md 13.8), so such a point may
# be feasible once tuned
RETIME_MARGIN = 1.35


def tune_front(study: optuna.Study, run_dir: Path, task: Task, target: TargetSpec,
               compiler: Compiler, budget_ms: float, rounds: int = 5,
               say: Callable[[str], None] = lambda _: None, anchor: Anchor | None = None
               ) -> dict[str, Any]:
    """Tune the kernels of each front point that ran transferred schedules
    (search.backend.transfer), within the budget or RETIME_MARGIN of it, and time it again
    whole, as in the search (round by round with the uncompressed model, times the study's
    reference), until such front points have none left; report how far the transferred
    figures were from the tuned ones. `compiler` must
    tune and not transfer; `anchor`: the one the trials were timed against, if this process
    has it. The figures go where measure_front's do (`front_measured`), so the
    front, the table and `export` then agree on tuned kernels."""
    from search.study.points import pareto, points_of

    measured: dict[str, Any] = dict(study.user_attrs.get("front_measured", {}))
    checks = check_inputs(task.train, task.example)
    told = False
    for _ in range(rounds):
        todo = [p for p in pareto(points_of(study, budget_ms, run_dir))
                if p.latency_ms <= RETIME_MARGIN * budget_ms and p.latency_source.transferred
                and not {"error", "retune_error"} & set(measured.get(str(p.trial), {}))]
        if not todo:
            break
        if not told:
            say(f"tuning the kernels of {len(todo)} front point(s) that ran transferred "
                f"schedules, and timing them again ...")
            told = True
        anchor = anchor or compile_anchor(task.model, task.example, compiler, target)
        for p in todo:
            row = _time_whole(p, task, run_dir, compiler, target, anchor, checks,
                              "transferred_ms")
            earlier = measured.get(str(p.trial))
            if "error" in row and earlier is not None:  # (its whole figure stands)
                row = {**earlier, "retune_error": row["error"]}
            measured[str(p.trial)] = row
        study.set_user_attr("front_measured", measured)
    done = [r for r in measured.values() if "error" not in r and "transferred_ms" in r]
    report = error_report((r["transferred_ms"], r["measured_ms"]) for r in done)
    study.set_user_attr("transfer_error", report)
    if told and report["n"]:
        say(f"{report['n']} front point(s) retimed on their own tuned kernels: the transferred "
            f"schedules' figures were off by {100 * report['median_rel_error']:+.1f}% (median; "
            f"largest {100 * report['max_abs_rel_error']:.1f}%); the front reports the tuned "
            f"figures")
    return {"points": [r for r in measured.values() if "transferred_ms" in r], "error": report}
