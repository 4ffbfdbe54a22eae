"""The Python API: `search(task, target=..., budget=...)` -> a `Front`. The CLI is a thin layer
over these calls.

    from search import Task, search

    front = search(task, target="host", budget="5ms", trials=24, out="runs/x")
    print(front.table())
    best = front.points[0]                  # fastest first; .test_accuracy, .latency_ms, ...
    model = front.model(best.trial)         # the compressed torch.nn.Module
    front.export(best.trial, "deploy/")     # ONNX + TVM library + policy
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from torch import nn

from search.core.errors import UserError
from search.core.task import PYTHON_TASK, Task, load_task
from search.jobs.run import prepare, run_search
from search.report.export import Exported, export_trial
from search.report.front import table
from search.report.recover import Finetuned, finetune_trial
from search.study.config import SearchConfig, parse_duration_ms
from search.study.points import Point
from search.study.runfolder import RunInfo, load_trial_model, setup_threads


def _budget_ms(budget: str | float) -> float:
    if isinstance(budget, int | float) and not isinstance(budget, bool):
        if not budget > 0 or budget != budget or budget == float("inf"):
            raise UserError(f"budget must be a finite positive number of ms, got {budget}")
        return float(budget)
    if not isinstance(budget, str):
        raise UserError(f"budget must be a duration like '5ms' or a number of ms, got "
                        f"{type(budget).__name__}")
    return parse_duration_ms(budget)


def _config(config: SearchConfig | str | Path | None, settings: dict[str, Any]) -> SearchConfig:
    if isinstance(config, SearchConfig):
        cfg = dataclasses.replace(config)
    elif config is None:
        cfg = SearchConfig()
    else:
        cfg = SearchConfig.load(Path(config))
    known = {f.name for f in fields(SearchConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise UserError(f"unknown setting(s) {', '.join(unknown)}; known: "
                        f"{', '.join(sorted(known))}")
    cfg = dataclasses.replace(cfg, **settings)
    cfg.check("settings")
    return cfg


def search(task: Task | str | None = None, target: str = "host", budget: str | float = "5ms",
           *, trials: int | None = None, out: str | Path | None = None,
           config: SearchConfig | str | Path | None = None, resume: bool = False,
           workers: int = 1, storage: str | None = None, study: str | None = None,
           device: dict[str, str] | None = None, artifacts: str | None = None,
           progress: bool = True, **settings: Any) -> Front:
    """Search compression policies for `task` on `target` within `budget`, and return the front.

    Args:
        task: a Task, or an entry point 'package.module:function' returning one (workers on
            other machines need the string form); None: the config's task.
        target: a device name (`search targets`) or a target YAML path.
        budget: latency per input, '5ms' / '800us' / '0.005s', or a number of milliseconds.
        trials: candidates evaluated, seeds included (default: the config's, 16).
        out: the run folder (default runs/TARGET-BUDGET); it must not hold a run unless
            `resume`.
        config: a SearchConfig, or a YAML file (configs/default.yaml lists every key);
            `settings` override single keys (finetune_steps=30, knobs=[...], ...).
        workers / storage / study / device / artifacts: as `search run --workers/--storage/
            --study/--rpc/--artifacts`.
    """
    if resume:
        if out is None:
            raise UserError("resume=True needs out=RUN_FOLDER (the folder of the run to continue)")
        info = RunInfo.load(Path(out))
        cfg = dataclasses.replace(info.config, **settings)
        target, budget_ms = info.target, info.budget_ms
        device = device or info.device
        storage, study = storage or info.storage, study or info.study
        artifacts = artifacts or info.artifacts
    else:
        cfg = _config(config, settings)
        budget_ms = _budget_ms(budget)
    if isinstance(task, Task):
        if workers > 1 or storage:
            raise UserError("workers and shared storage need the task as an entry point "
                            "('package.module:function'): other processes must build it too")
        cfg = dataclasses.replace(cfg, task=f"{PYTHON_TASK}{task.name}", task_args={})
    elif isinstance(task, str):
        cfg = dataclasses.replace(cfg, task=task)
    elif task is not None:
        raise UserError(f"task must be a Task or an entry point string, got "
                        f"{type(task).__name__}")
    if trials is not None:
        cfg.trials = trials
    if workers < 1:
        raise UserError(f"workers must be at least 1, got {workers}")
    run_dir = Path(out) if out is not None else \
        Path("runs") / f"{Path(target).stem}-{budget if isinstance(budget, str) else budget_ms}"
    spec, info = prepare(target, budget_ms, cfg, run_dir, resume=resume, device=device,
                         storage=storage, study=study, artifacts=artifacts)
    data = run_search(run_dir, spec, info, resume, show_progress=progress, workers=workers,
                      task=task if isinstance(task, Task) else None)
    return Front(run_dir, data, task if isinstance(task, Task) else None)


def open_front(run_dir: str | Path, task: Task | None = None) -> Front:
    """A finished run's front, from its folder. `task`: the Task object, for runs made from
    one in Python (runs made from an entry point rebuild their task themselves)."""
    run_dir = Path(run_dir)
    RunInfo.load(run_dir)
    path = run_dir / "front.json"
    if not path.exists():
        raise UserError(f"no front.json in {str(run_dir)!r}: the run has not finished")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); run `search run --out {run_dir} "
                        f"--resume` to write it again") from None
    return Front(run_dir, data, task)


def shared_front(storage: str, study: str, out: str | Path | None = None,
                 artifacts: str | None = None, task: Task | None = None) -> Front:
    """The front of a study on shared storage as it is now (every worker's trials), written
    into `out` (default runs/STUDY); its points' files come from the artifact store."""
    from search.jobs.run import joined_run, refresh_front

    run_dir = Path(out) if out is not None else Path("runs") / study
    info, _ = joined_run(study, storage, run_dir, artifacts)
    return Front(run_dir, refresh_front(run_dir, info), task)


@dataclass
class Front:
    """A run's Pareto front: its points (fastest first), the uncompressed baseline, and what a
    user does with a point (look at it, fine-tune it longer, export it)."""

    run_dir: Path
    data: dict[str, Any]  # front.json
    task_object: Task | None = None

    @property
    def points(self) -> list[Point]:
        return [self._point(p) for p in self.data["points"]]

    @property
    def baseline(self) -> Point | None:
        base = self.data.get("baseline")
        return self._point(base) if base else None

    def _point(self, raw: dict[str, Any]) -> Point:
        try:
            return Point.from_dict(raw)
        except TypeError:
            raise UserError(f"{self.run_dir / 'front.json'} was written by another version of "
                            f"search; write it again: search run --out {self.run_dir} "
                            f"--resume") from None

    def table(self) -> str:
        """The terminal table `search run` prints."""
        return table(self.data)

    @property
    def task(self) -> Task:
        if self.task_object is None:
            config = RunInfo.load(self.run_dir).config
            self.task_object = load_task(config.task, **config.task_args)
        return self.task_object

    def model(self, trial: int) -> nn.Module:
        """The trial's compressed model, as deployed (eval mode)."""
        return load_trial_model(self.run_dir, trial, self.task)[0]

    def finetune(self, trial: int, steps: int) -> Finetuned:
        """More distillation steps for a chosen point; `export` then writes the result."""
        info = RunInfo.load(self.run_dir)
        setup_threads(info.load_target())
        return finetune_trial(self.run_dir, trial, steps, self.task, info.config)[0]

    def export(self, trial: int, folder: str | Path | None = None) -> Exported:
        """ONNX (checked in ONNX Runtime) + the TVM library for the run's target + policy."""
        out = Path(folder) if folder is not None else \
            self.run_dir / "export" / f"trial_{trial}"
        return export_trial(self.run_dir, trial, out, self.task)
