"""Optuna glue: the storage a run's workers share (SQLite or an RDB URL), the study and its
sampler, and counting its trials."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy

from search.core.errors import UserError

STUDY_NAME = "search"


DIRECTIONS = ["maximize", "minimize", "minimize"]  # accuracy, latency_ms, size_bytes


def storage_url(run_dir: Path, url: str | None) -> str:
    """The run folder's SQLite file unless an Optuna RDB URL (PostgreSQL, MySQL) is given."""
    return url or f"sqlite:///{(run_dir / 'study.db').resolve()}"


def open_storage(url: str, heartbeat_s: int = 20, grace_s: int = 90
                 ) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage with heartbeats: a trial whose worker died (kill -9, a lost machine)
    is failed after `grace_s` without a heartbeat and enqueued again once
    (RetryHeartbeatStaleTrialCallback), by whichever worker next starts a trial."""
    sqlite = url.startswith("sqlite")
    engine = {"connect_args": {"timeout": 60}} if sqlite else {}
    with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.8
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(
            url, engine_kwargs=engine, heartbeat_interval=heartbeat_s, grace_period=grace_s,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=1))
    if sqlite:
        serialize_sqlite(storage.engine)
    return storage


def serialize_sqlite(engine: sqlalchemy.engine.Engine) -> None:
    """Make each SQLite transaction take the write lock at its start (BEGIN IMMEDIATE).
    Optuna hands a waiting (seed) trial to a worker by reading its state `FOR UPDATE` and then
    writing RUNNING; SQLite ignores FOR UPDATE and Python's sqlite3 begins a transaction only
    at the write, so two local workers could both read WAITING and both run the trial
    (optuna/optuna#4002). Serialized, the second one reads RUNNING and moves on. This is
    SQLAlchemy's documented recipe for SQLite transactions; the cost is that transactions of
    one run's workers (all short) wait for each other."""
    @sqlalchemy.event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # sqlite3 emits no BEGIN of its own

    @sqlalchemy.event.listens_for(engine, "begin")
    def _begin_immediate(connection: sqlalchemy.engine.Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # (connections made while Optuna set the storage up start afresh)


def make_sampler(name: str, seed: int, startup_trials: int, shared: bool = True
                 ) -> optuna.samplers.BaseSampler:
    """Optuna's multi-objective TPE (default: models the space after `startup_trials`), random
    search, or NSGA-II (generations of max(4, startup_trials)). TPE and NSGA-II read the
    latency-budget constraint each trial sets (`set_constraint`); random search ignores it.

    `shared`: other processes may run trials of the study at once, so TPE's constant liar
    keeps its proposals away from theirs. It reads the study's trials from the storage once per
    parameter (96 reads a trial on the default task, 0.7 s); in one process nothing else runs,
    its proposals are the same without it, and the trials are read once a trial."""
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, startup_trials))
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials,
                                      constant_liar=shared)


def open_study(url: str, name: str, seed: int, startup_trials: int, create: bool,
               heartbeat_s: int = 20, grace_s: int = 90, sampler: str = "tpe",
               shared: bool = True) -> optuna.Study:
    """The run's study (optuna-dashboard opens it: `optuna-dashboard <storage URL>`);
    `shared`: whether other processes may run its trials at once (see make_sampler)."""
    sampler = make_sampler(sampler, seed, startup_trials, shared)
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


SURPLUS = "surplus"  # fail_reason prefix of a trial that gave itself up (see over_budget)


def failed_for_real(t: optuna.trial.FrozenTrial) -> bool:
    """A FAIL trial that was the candidate's fault. Not: interrupted, lost with a dead worker
    (no reason), stopped by a bug in our code (`internal error: ...`): a resumed run
    evaluates those again; nor a surplus trial, which evaluated nothing."""
    reason = t.user_attrs.get("fail_reason", "interrupted")
    return t.state == optuna.trial.TrialState.FAIL and reason != "interrupted" \
        and not reason.startswith(("internal error", SURPLUS))


def counts(t: optuna.trial.FrozenTrial) -> bool:
    """Whether a trial counts against the trial budget: running, complete, stopped early, or
    failed for a real reason."""
    return t.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.COMPLETE,
                       optuna.trial.TrialState.PRUNED) or failed_for_real(t)


def over_budget(study: optuna.Study, number: int, trials: int) -> bool:
    """Whether the trial budget was already claimed before trial `number` was: the atomic half
    of the budget check. Workers on several hosts check `claimed_count` and then create a
    trial, so two may go ahead at once; the storage numbers trials in the order it creates
    them (each one RUNNING from the start), so counting the claimed trials numbered below
    this one decides which of the two is surplus, the same way on every host."""
    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.number < number and counts(t)) >= trials


def finished_count(study: optuna.Study) -> int:
    """Trials that count against the trial budget: complete, stopped early, or failed for a
    real reason (failed_for_real)."""
    return sum(1 for t in study.get_trials(deepcopy=False)
               if counts(t) and t.state != optuna.trial.TrialState.RUNNING)


def claimed_count(study: optuna.Study) -> int:
    """Finished trials plus those running now (on any worker)."""
    return sum(1 for t in study.get_trials(deepcopy=False) if counts(t))


def has_baseline(study: optuna.Study) -> bool:
    return any(t.user_attrs.get("uncompressed") for t in
               study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
