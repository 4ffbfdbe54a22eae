"""One search run, end to end, in a run folder: check inputs, search, write the front."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
import yaml
from tqdm import tqdm

from search.compile import Compiler
from search.config import SearchConfig
from search.errors import UserError
from search.front import write_front
from search.study import finished_count, open_study, run_study
from search.target import TargetSpec, load_target
from search.task import Task, cache_dir, load_task, resolve_entry_point


@dataclass(frozen=True)
class RunInfo:
    """What a run folder was made with (run.yaml), so front/export/resume need no flags."""

    target: str
    budget_ms: float
    config: SearchConfig
    device: dict[str, str | None] = dataclasses.field(default_factory=dict)  # --rpc etc.

    def load_target(self) -> TargetSpec:
        return load_target(self.target).with_device(**self.device)

    def save(self, run_dir: Path) -> None:
        data = {"target": self.target, "budget_ms": self.budget_ms,
                "config": dataclasses.asdict(self.config), "device": self.device}
        (run_dir / "run.yaml").write_text(yaml.safe_dump(data, sort_keys=False))

    @classmethod
    def load(cls, run_dir: Path) -> RunInfo:
        path = run_dir / "run.yaml"
        if not path.exists():
            raise UserError(f"{str(run_dir)!r} is not a run folder (no run.yaml); "
                            f"pass the --out folder of a `search run`")
        data = yaml.safe_load(path.read_text())
        return cls(data["target"], float(data["budget_ms"]), SearchConfig(**data["config"]),
                   data.get("device") or {})


def setup_threads(target: TargetSpec) -> None:
    """One thread each for torch and TVM unless the target says otherwise: the machine is shared."""
    os.environ.setdefault("TVM_NUM_THREADS", str(target.threads))
    torch.set_num_threads(1)


def tuning_dir(target: TargetSpec) -> Path:
    return cache_dir() / "tuning" / target.db_key()


def check_out_dir(run_dir: Path, resume: bool) -> None:
    """Fail before any work if the folder would lose a study or cannot be written."""
    if resume:
        if not (run_dir / "study.db").exists():
            raise UserError(f"nothing to resume in {str(run_dir)!r} (no study.db); "
                            f"drop --resume to start a new run there")
        return
    if (run_dir / "study.db").exists():
        raise UserError(f"{str(run_dir)!r} already holds a study; pass --resume to continue it, "
                        f"or --out NEW_FOLDER for a new run")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write the run folder {str(run_dir)!r}: {exc.strerror}") from None


def prepare(target_name: str, budget_ms: float, config: SearchConfig, run_dir: Path,
            resume: bool, device: dict[str, str | None] | None = None
            ) -> tuple[TargetSpec, RunInfo]:
    """All the checks that need no work: a bad input stops here with one line."""
    info = RunInfo(target_name, budget_ms, config, device or {})
    target = info.load_target()
    target.check()  # a device target: the device answers, before anything is trained
    resolve_entry_point(config.task)
    if config.trials < 1:
        raise UserError(f"trials must be at least 1, got {config.trials}")
    check_out_dir(run_dir, resume)
    info.save(run_dir)
    return target, info


def search(run_dir: Path, target: TargetSpec, info: RunInfo, resume: bool,
           show_progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the study, then write and return the front."""
    setup_threads(target)
    config = info.config
    say = print if show_progress else (lambda *a, **k: None)
    start = time.perf_counter()
    say(f"task {config.task}: loading (the default model trains once, then is cached) ...")
    task: Task = load_task(config.task, **config.task_args)
    compiler = Compiler(target, tuning_dir(target), config.tune_trials_per_task,
                        log_dir=run_dir / "tuning-logs", seed=config.seed,
                        budget_s=config.tuning_budget_s)
    say(f"task {task.name} ready in {time.perf_counter() - start:.0f} s; tuning database "
        f"{compiler.db_dir}")
    trials_bar = tqdm(total=config.trials, desc="trials", unit="trial", position=0,
                      disable=not show_progress, dynamic_ncols=True)
    tune_bar = tqdm(total=0, desc="tuning", unit="cand", position=1, leave=False,
                    disable=not show_progress, dynamic_ncols=True)

    def on_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        trials_bar.update(1)
        best = [t for t in study.get_trials(deepcopy=False,
                                            states=(optuna.trial.TrialState.COMPLETE,))
                if t.user_attrs["latency_ms"] <= info.budget_ms]
        if best:
            top = max(best, key=lambda t: (t.user_attrs["accuracy"], -t.user_attrs["latency_ms"]))
            trials_bar.set_postfix_str(
                f"best within budget: #{top.number} {100 * top.user_attrs['accuracy']:.1f}% "
                f"{top.user_attrs['latency_ms']:.2f} ms")

    try:
        if resume:
            trials_bar.update(finished_count(open_study(run_dir, config.seed, 1, create=False)))
        study = run_study(run_dir, task, target, compiler, info.budget_ms, config, resume,
                          on_trial=on_trial, progress=tune_bar)
    finally:
        tune_bar.close()
        trials_bar.close()
    data = write_front(run_dir, study, info.budget_ms, target.name)
    data["reference"] = reference_latency(task, target)
    data["tuning"] = {"seconds": round(compiler.tuning_s_total, 1),
                      "kernels_tuned": compiler.tasks_tuned_total,
                      "trials_per_kernel": config.tune_trials_per_task,
                      "database": str(compiler.db_dir)}
    data["wall_s"] = round(time.perf_counter() - start, 1)
    (run_dir / "front.json").write_text(json.dumps(data, indent=1))
    return data


def reference_latency(task: Task, target: TargetSpec) -> dict[str, Any] | None:
    """The uncompressed model under ONNX Runtime fp32: how good our compiled latency is."""
    from search.export import ort_session_bytes
    from search.measure import time_onnxruntime

    if target.reach != "local":
        return None
    ms = time_onnxruntime(ort_session_bytes(task.model, task.example), task.example,
                          target.measurement)
    return {"uncompressed_onnxruntime_fp32_ms": ms,
            "source": "measured:host:onnxruntime-cpu-1-thread"}
