"""One search run, end to end, in a run folder: check inputs, search, write the front."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from tqdm import tqdm

from search.backend.compile import Compiler
from search.backend.measure import Anchor
from search.core.errors import SearchFailed, UserError
from search.core.files import writable_folder
from search.core.task import PYTHON_TASK, Task, load_task, resolve_entry_point
from search.devices.target import TargetSpec
from search.report.front import write_front
from search.study.artifacts import DEFAULT_FOLDER
from search.study.config import SearchConfig
from search.study.loop import REFERENCE, measure_front, prepare_study, settle, tune_front, work
from search.study.points import RECOVERED
from search.study.recovery import recover_front
from search.study.runfolder import RunInfo, setup_threads, tuning_dir
from search.study.storage import (
    STUDY_NAME,
    failed_for_real,
    finished_count,
    open_storage,
    open_study,
    redact,
)

MIN_FREE_BYTES = 1 << 30  # a run keeps the fine-tuned weights of its trials until the front


def check_out_dir(run_dir: Path, resume: bool, own_storage: bool = True,
                  min_free_bytes: int = MIN_FREE_BYTES) -> None:
    """Fail before any work if the folder would lose a study, cannot be written, or has no
    room for the trials' weights."""
    if resume:
        if not (run_dir / "run.yaml").exists() or (own_storage and
                                                    not (run_dir / "study.db").exists()):
            raise UserError(f"nothing to resume in {str(run_dir)!r} (no run.yaml/study.db); "
                            f"drop --resume to start a new run there")
    elif (run_dir / "study.db").exists() or (run_dir / "run.yaml").exists():
        raise UserError(f"{str(run_dir)!r} already holds a run; pass --resume to continue it, "
                        f"or --out NEW_FOLDER for a new run")
    writable_folder(run_dir, "the run folder")
    free = shutil.disk_usage(run_dir).free
    if free < min_free_bytes:
        raise UserError(f"only {free / 2**20:,.0f} MiB free in {str(run_dir)!r}; a run needs "
                        f"{min_free_bytes / 2**20:,.0f} MiB for its trials' weights: free "
                        f"space or pass --out on another disk")


def check_storage(url: str) -> None:
    """An Optuna RDB URL that cannot be reached is a one-line error before any work."""
    try:
        open_storage(url)
    except ModuleNotFoundError as exc:
        raise UserError(f"storage {redact(url)}: its database driver is not installed "
                        f"({exc.name}); for PostgreSQL: pip install 'psycopg[binary]'") from None
    except Exception as exc:  # noqa: BLE001 - sqlalchemy's errors are many; all mean the same
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot open the study storage {redact(url)}: {first}") from None


def prepare(target_name: str, budget_ms: float, config: SearchConfig, run_dir: Path,
            resume: bool, device: dict[str, str | None] | None = None,
            storage: str | None = None, study: str | None = None,
            artifacts: str | None = None) -> tuple[TargetSpec, RunInfo]:
    """All the checks that need no work: a bad input stops here with one line."""
    config.check("settings")  # again: flags and the Python API set fields after loading
    if storage and artifacts is None:  # workers elsewhere find the store by this path
        artifacts = str((run_dir / DEFAULT_FOLDER).resolve())
    info = RunInfo(target_name, budget_ms, config, device or {}, storage,
                   study or (run_dir.name if storage else STUDY_NAME), artifacts)
    target = info.load_target()
    target.check()  # a device target: the device answers, before anything is trained
    if not config.task.startswith(PYTHON_TASK):
        resolve_entry_point(config.task)
    check_out_dir(run_dir, resume, own_storage=storage is None)
    if storage:
        check_storage(storage)
    info.store(run_dir)  # (one line if it cannot be written)
    info.save(run_dir)
    return target, info


def make_compiler(target: TargetSpec, config: SearchConfig, run_dir: Path,
                  transfer: bool | None = None) -> Compiler:
    return Compiler(target, tuning_dir(target), config.tune_trials_per_task,
                    log_dir=run_dir / "tuning-logs", seed=config.seed,
                    budget_s=config.tuning_budget_s,
                    transfer=config.transfer if transfer is None else transfer)


def run_search(run_dir: Path, target: TargetSpec, info: RunInfo, resume: bool,
               show_progress: bool = True, workers: int = 1, task: Task | None = None
               ) -> dict[str, Any]:
    """Run (or resume) the study, in this process or in `workers` worker processes sharing
    its storage, then write and return the front. `task`: a Task object (search.api);
    otherwise the config's entry point builds it."""
    setup_threads(target, workers)
    config = info.config
    # (tqdm.write: a message printed while a bar is drawn gets its own line)
    say: Callable[[str], None] = tqdm.write if show_progress else (lambda _: None)
    start = time.perf_counter()
    say(f"task {config.task}: loading (the default model trains once, then is cached) ...")
    task = task if task is not None else load_task(config.task, **config.task_args)
    say(f"task {task.name} ready in {time.perf_counter() - start:.0f} s; tuning database "
        f"{tuning_dir(target)}")
    url = info.url(run_dir)
    with tqdm(total=0, desc="sensitivity", unit="case", leave=False,
              disable=not show_progress, dynamic_ncols=True) as bar:
        study, space = prepare_study(
            run_dir, task, config, url, info.study, resume, info.to_dict(),
            own_storage=info.storage is None, say=say, progress=bar,
            compiler=lambda: make_compiler(target, config, run_dir),
            bar=lambda n: tqdm(total=n, desc="layer ops", unit="op", leave=False,
                               disable=not show_progress, dynamic_ncols=True))
    trials_bar = tqdm(total=config.trials, desc="trials", unit="trial", position=0,
                      disable=not show_progress, dynamic_ncols=True)
    trials_bar.update(min(finished_count(study), config.trials))
    bad_workers: list[int] = []
    compiler: Compiler | None = None
    anchor: Anchor | None = None  # the trials' (when they ran here): later timings reuse it
    store = info.store(run_dir)

    def work_here() -> None:
        nonlocal compiler, anchor
        compiler = compiler or make_compiler(target, config, run_dir)
        tune_bar = tqdm(total=0, desc="tuning", unit="cand", position=1, leave=False,
                        disable=not show_progress, dynamic_ncols=True)
        try:
            anchor = work(study, space, run_dir, task, target, compiler, info.budget_ms,
                          config, store, on_trial=progress_callback(trials_bar, info),
                          progress=tune_bar) or anchor
        finally:
            tune_bar.close()

    try:
        if workers > 1:
            bad_workers = run_workers(run_dir, info, workers, trials_bar, study)
        else:
            work_here()
        if info.storage and not past_deadline(config, start):  # workers on other hosts
            settle(study, config, work_here, say=say)
    finally:
        trials_bar.close()
    prediction, transfer = None, None
    measure = config.latency == "predicted"  # the front's predicted points: timed whole
    retune = config.transfer and config.tune_trials_per_task > 0  # the figures a user picks
    # from: on their own tuned kernels, not a neighbour's schedules
    # NOTE: each step can move points onto the front the others act on (recovery raises a
    # point's accuracy, a whole-model timing moves its latency): rounds until one changes
    # nothing, so no front point is left predicted, transferred near the budget or unrecovered
    # (each compiler built once: loading the tuning database takes 12-16 s)
    if measure:
        compiler = compiler or make_compiler(target, config, run_dir)  # (the trials' own)
    own_kernels = make_compiler(target, config, run_dir, transfer=False) if retune else None
    for _ in range(FRONT_ROUNDS):
        before = _front_work(study)
        if measure:
            prediction = measure_front(study, run_dir, task, target, compiler, info.budget_ms,
                                       anchor=anchor, say=say)
        if own_kernels is not None:
            transfer = tune_front(study, run_dir, task, target, own_kernels, info.budget_ms,
                                  say=say, anchor=anchor)
        with tqdm(total=0, desc="recovery steps", unit="point", leave=False,
                  disable=not show_progress, dynamic_ncols=True) as bar:
            recover_front(study, run_dir, task, config, info.budget_ms, store, progress=bar,
                          say=say)
        if _front_work(study) == before:
            break
    data = write_front(run_dir, study, info.budget_ms, target.name, store)
    if prediction is not None:
        data["latency_prediction"] = prediction
    if transfer is not None:
        data["transfer"] = transfer
    failure = why_no_result(study)
    # (the reference times the uncompressed model: pointless, and may fail, if it did)
    data["reference"] = reference_latency(
        task, target, config, lambda: make_compiler(target, config, run_dir),
        study.user_attrs.get(REFERENCE), anchor) if data["baseline"] else None
    data["tuning"] = tuning_summary(study, config, tuning_dir(target))
    data["workers"] = workers
    data["wall_s"] = round(time.perf_counter() - start, 1)
    (run_dir / "front.json").write_text(json.dumps(data, indent=1))
    if failure:  # raised after the front is written: whatever finished is kept
        raise SearchFailed(f"{failure}; the trials are in {run_dir / 'front.json'}")
    if bad_workers:
        raise SearchFailed(f"worker(s) {bad_workers} stopped with an error (see "
                           f"{run_dir / 'worker-logs'}); the front of the trials that "
                           f"finished is in {run_dir / 'front.json'}")
    return data


FRONT_ROUNDS = 4  # rounds of timing, retuning and recovering the front (each usually ends it)


def _front_work(study: optuna.Study) -> str:
    """What the front's steps wrote so far (the points timed again whole, retuned, given
    recovery steps): a round that changes it, a row replaced included, may change the front."""
    attrs = study.user_attrs
    return json.dumps([attrs.get("front_measured"), attrs.get(RECOVERED)], sort_keys=True)


def past_deadline(config: SearchConfig, start: float) -> bool:
    return config.timeout is not None and time.perf_counter() - start >= config.timeout


def why_no_result(study: optuna.Study) -> str | None:
    """Why a finished study has nothing to pick from, in one line, or None if it has:
    the uncompressed baseline failed, or every compressed candidate did."""
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    trials = [t for t in study.get_trials(deepcopy=False)
              if t.state in done or failed_for_real(t)]
    base = [t for t in trials if t.user_attrs.get("uncompressed")]
    if base and not any(t.state == optuna.trial.TrialState.COMPLETE for t in base):
        return (f"the uncompressed model (trial {base[0].number}) failed, so there is no "
                f"baseline: {base[0].user_attrs.get('fail_reason', '?')}")
    compressed = [t for t in trials if not t.user_attrs.get("uncompressed")]
    if compressed and all(t.state == optuna.trial.TrialState.FAIL for t in compressed):
        reasons = Counter(t.user_attrs["fail_reason"] for t in compressed)
        reason, n = reasons.most_common(1)[0]
        return (f"every candidate failed ({len(compressed)} compressed trials); the most "
                f"common reason ({n} of them): {reason}")
    return None


def progress_callback(bar: tqdm, info: RunInfo
                      ) -> Callable[[optuna.Study, optuna.trial.FrozenTrial], None]:
    """Advance the trials bar and show the best point within the budget so far."""

    def on_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        bar.update(1)
        best = [t for t in study.get_trials(deepcopy=False,
                                            states=(optuna.trial.TrialState.COMPLETE,))
                if t.user_attrs["latency_ms"] <= info.budget_ms]
        if best:
            top = max(best, key=lambda t: (t.values[0], -t.user_attrs["latency_ms"]))
            bar.set_postfix_str(
                f"best within budget: #{top.number} val {100 * top.values[0]:.1f}% "
                f"{top.user_attrs['latency_ms']:.2f} ms")

    return on_trial


def run_workers(run_dir: Path, info: RunInfo, workers: int, bar: tqdm,
                study: optuna.Study) -> list[int]:
    """`workers` processes (`search worker`) on this machine, on the run's storage; this one
    watches the study. A worker that fails does not stop the others; returns the ids of those
    that failed (the run then ends non-zero, after its front is written)."""
    url = info.url(run_dir)
    log_dir = run_dir / "worker-logs"
    log_dir.mkdir(exist_ok=True)
    procs = []
    for i in range(workers):
        log = open(log_dir / f"worker-{i}.log", "w")  # noqa: SIM115 - closed below
        cmd = [sys.executable, "-m", "search", "worker", info.study, "--storage", url,
               "--out", str(run_dir), "--worker-id", str(i),
               "--artifacts", info.artifact_location(run_dir)]
        env = {**os.environ, "SEARCH_WORKERS_HERE": str(workers)}  # torch threads per worker
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env),
                      log))
    try:
        while any(p.poll() is None for p, _ in procs):
            time.sleep(2)
            bar.n = min(finished_count(study), bar.total)
            bar.refresh()
    except KeyboardInterrupt:
        for p, _ in procs:
            p.send_signal(signal.SIGINT)
        for p, _ in procs:
            p.wait(timeout=60)
        raise
    finally:
        for _, log in procs:
            log.close()
    return [i for i, (p, _) in enumerate(procs) if p.returncode not in (0, None)]


def joined_run(study_name: str, url: str, run_dir: Path, artifacts: str | None = None,
               device: dict[str, str | None] | None = None) -> tuple[RunInfo, dict[str, Any]]:
    """The settings of a study on shared storage (its `run` attr), as seen from this host:
    the storage URL this host reaches it by, this host's path to the artifact store and
    device if given. Saved as `run_dir`/run.yaml, so front/export/show work from that folder.
    Returns them and the study's own `run` attr."""
    check_storage(url)
    probe = open_study(url, study_name, 0, 1, create=False)
    run = probe.user_attrs.get("run")
    if not run:
        raise UserError(f"study {study_name!r} was not made by `search run` (no run settings)")
    info = dataclasses.replace(RunInfo.from_dict(run, f"study {study_name!r}: run settings"),
                               storage=url, study=study_name)
    if artifacts:
        info = dataclasses.replace(info, artifacts=artifacts)
    if device:
        info = dataclasses.replace(info, device={**info.device, **device})
    run_dir.mkdir(parents=True, exist_ok=True)
    info.store(run_dir)  # (one line if this host cannot reach it)
    if not (run_dir / "run.yaml").exists():  # (a local worker shares the driver's folder)
        info.save(run_dir)
    return info, run


def run_worker(study_name: str, url: str, run_dir: Path, worker_id: int = 0,
               device: dict[str, str | None] | None = None, artifacts: str | None = None
               ) -> int:
    """Join a study from its storage alone (its user attrs hold the run's settings) and run
    trials until it has enough. Returns how many trials this worker finished."""
    info, run = joined_run(study_name, url, run_dir, artifacts, device)
    target = info.load_target()
    target.check()
    setup_threads(target)
    config = info.config  # the run's seed: fine-tunes seed from it and the policy alone
    task = load_task(config.task, **config.task_args)
    study, space = prepare_study(run_dir, task, config, url, study_name, resume=True,
                                 run_info=run, own_storage=False,
                                 sampler_seed=config.seed + worker_id)
    before = finished_count(study)
    work(study, space, run_dir, task, target, make_compiler(target, config, run_dir),
         info.budget_ms, config, info.store(run_dir))
    return finished_count(study) - before


def refresh_front(run_dir: Path, info: RunInfo) -> dict[str, Any]:
    """The front recomputed from the study as it is now (the trials of every host and worker
    included), written into `run_dir` like a run's; what only the run itself measured (the
    ONNX Runtime reference, workers, wall time) is kept from its front.json if there is one."""
    check_storage(info.url(run_dir))
    study = open_study(info.url(run_dir), info.study, 0, 1, create=False)
    target = info.load_target()
    old: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        old = json.loads((run_dir / "front.json").read_text())
    data = write_front(run_dir, study, info.budget_ms, target.name, info.store(run_dir))
    data["tuning"] = tuning_summary(study, info.config, tuning_dir(target))
    for key in ("reference", "workers", "wall_s", "latency_prediction", "transfer",
                "latency_table"):  # (latency_table: runs before search.backend.predict)
        if isinstance(old, dict) and key in old:
            data[key] = old[key]
    data.setdefault("reference", None)
    data["running"] = len(study.get_trials(deepcopy=False,
                                           states=(optuna.trial.TrialState.RUNNING,)))
    (run_dir / "front.json").write_text(json.dumps(data, indent=1))
    return data


def tuning_summary(study: optuna.Study, config: SearchConfig, db_dir: Path) -> dict[str, Any]:
    """Tuning done for this run, summed over its trials (whichever worker ran them)."""
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return {"seconds": round(sum(t.user_attrs.get("tuning_s", 0.0) for t in done), 1),
            "kernels_tuned": sum(t.user_attrs.get("new_kernels", 0) for t in done),
            "trials_per_kernel": config.tune_trials_per_task, "database": str(db_dir)}


def reference_latency(task: Task, target: TargetSpec, config: SearchConfig,
                      compiler: Callable[[], Compiler], reference_ms: float | None,
                      anchor: Anchor | None = None) -> dict[str, Any] | None:
    """The uncompressed model under ONNX Runtime fp32: how good our compiled latency is. Timed
    as the trials are, so the front compares like with like: round by round with the
    uncompressed TVM model (its fastest round; `reference_ms` set: the trials were timed so),
    or alone (the median of its rounds) where trials were timed alone. `anchor`: the one the
    trials were timed against, if this process has it (else one is compiled)."""
    from search.backend.measure import compile_anchor, time_against_anchor
    from search.backend.onnx import ort_session_bytes, ort_timer, time_onnxruntime
    from search.backend.provenance import Provenance

    if target.reach != "local":
        return None
    onnx = ort_session_bytes(task.model, task.example)
    source = Provenance("measured", target.name, "onnxruntime-cpu-1-thread")
    if not (config.interleave and reference_ms):
        return {"uncompressed_onnxruntime_fp32_ms": time_onnxruntime(onnx, task.example,
                                                                     target.measurement),
                "timing": "alone", "source": source.to_dict()}
    anchor = anchor or compile_anchor(task.model, task.example, compiler(), target)
    latency = time_against_anchor(ort_timer(onnx, task.example, target.measurement), anchor,
                                  target)
    return {"uncompressed_onnxruntime_fp32_ms": latency.median_ms,
            "timing": "interleaved", "ratio": float(latency.ratio), "source": source.to_dict()}
