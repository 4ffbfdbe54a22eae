"""A run folder: the settings it was made with (run.yaml), the process setup they imply, and
its trials' models rebuilt from their policies and weights."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
import yaml
from torch import nn

from search.core.errors import UserError
from search.core.granularity import use_granularity
from search.core.settings import yaml_problem
from search.core.task import cache_dir
from search.devices.target import TargetSpec, load_target
from search.study.artifacts import DEFAULT_FOLDER, ArtifactStore, fetch_trial_file, open_store
from search.study.config import SearchConfig
from search.study.storage import STUDY_NAME, open_study, storage_url


@dataclass(frozen=True)
class RunInfo:
    """What a run folder was made with (run.yaml), so front/export/resume need no flags."""

    target: str
    budget_ms: float
    config: SearchConfig
    device: dict[str, str | None] = dataclasses.field(default_factory=dict)  # --rpc etc.
    storage: str | None = None  # an Optuna RDB URL shared by workers; None: run_dir/study.db
    study: str = STUDY_NAME
    artifacts: str | None = None  # the artifact store (a folder or s3://BUCKET); None: the
    # run folder's artifacts/ (a run on shared storage stores an absolute path: workers use it)

    def load_target(self) -> TargetSpec:
        """The run's target; its channel and rank granularity then holds in this process (every
        model the run builds or rebuilds rounds to it)."""
        target = load_target(self.target).with_device(**self.device)
        use_granularity(target.granularity)
        return target

    def url(self, run_dir: Path) -> str:
        return storage_url(run_dir, self.storage)

    def artifact_location(self, run_dir: Path) -> str:
        return self.artifacts or str(run_dir / DEFAULT_FOLDER)

    def store(self, run_dir: Path) -> ArtifactStore:
        return open_store(self.artifact_location(run_dir))

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "budget_ms": self.budget_ms,
                "config": dataclasses.asdict(self.config), "device": self.device,
                "storage": self.storage, "study": self.study, "artifacts": self.artifacts}

    @classmethod
    def from_dict(cls, data: Any, where: str = "run settings") -> RunInfo:
        """The settings a run stored (run.yaml, or the study's `run` attr), checked: a
        missing key or a wrong type is a one-line UserError naming it."""
        if not isinstance(data, dict):
            raise UserError(f"{where} must be a mapping of the run's settings; got "
                            f"{type(data).__name__}")
        missing = [k for k in ("target", "budget_ms", "config") if k not in data]
        if missing:
            raise UserError(f"{where} lacks {', '.join(missing)}: it was not written by "
                            f"`search run` (or was edited); start a new run")
        budget = data["budget_ms"]
        if isinstance(budget, bool) or not isinstance(budget, int | float) \
                or not math.isfinite(budget) or budget <= 0:
            raise UserError(f"{where}: budget_ms must be a positive number; got {budget!r}")
        for key, ok in (("target", isinstance(data["target"], str)),
                        ("config", isinstance(data["config"], dict)),
                        ("device", isinstance(data.get("device") or {}, dict)),
                        ("storage", isinstance(data.get("storage"), str | None)),
                        ("artifacts", isinstance(data.get("artifacts"), str | None)),
                        ("study", isinstance(data.get("study") or STUDY_NAME, str))):
            if not ok:
                raise UserError(f"{where}: {key} has the wrong type "
                                f"({type(data[key]).__name__})")
        config = SearchConfig.from_dict(data["config"], f"{where}: config")
        return cls(data["target"], float(budget), config, data.get("device") or {},
                   data.get("storage"), data.get("study") or STUDY_NAME, data.get("artifacts"))

    def save(self, run_dir: Path) -> None:
        (run_dir / "run.yaml").write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, run_dir: Path) -> RunInfo:
        path = run_dir / "run.yaml"
        if not path.is_file():
            raise UserError(f"{str(run_dir)!r} is not a run folder (no run.yaml); "
                            f"pass the --out folder of a `search run`")
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read {path}: {exc}") from None
        except yaml.YAMLError as exc:
            raise UserError(f"{path} is not valid YAML ({yaml_problem(exc)}): the run "
                            f"folder is damaged") from None
        return cls.from_dict(data, str(path))


def setup_threads(target: TargetSpec, share: int | None = None) -> None:
    """TVM: the target's threads (what is timed). torch (fine-tunes, sensitivity): this
    machine's cores divided among the `share` processes working on it (workers; default the
    SEARCH_WORKERS_HERE a parent set, else 1); SEARCH_TORCH_THREADS overrides. A fine-tune is
    most of a trial once the kernel library is built: 1.7x faster on 2 cores than on 1."""
    os.environ.setdefault("TVM_NUM_THREADS", str(target.threads))
    fixed = os.environ.get("SEARCH_TORCH_THREADS")
    share = share or int(os.environ.get("SEARCH_WORKERS_HERE") or 1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(int(fixed) if fixed else max(1, (cores or 1) // max(share, 1)))


def tuning_dir(target: TargetSpec) -> Path:
    return cache_dir() / "tuning" / target.db_key()


_STUDIES: dict[tuple[str, str], optuna.Study] = {}  # opened once per process


def run_study(run_dir: Path, info: RunInfo | None = None) -> optuna.Study | None:
    """The run's study, from the run folder's settings (None: a run folder without its own
    SQLite file, e.g. copied without it)."""
    info = info or RunInfo.load(run_dir)
    if info.storage is None and not (run_dir / "study.db").exists():
        return None
    key = (info.url(run_dir), info.study)
    if key not in _STUDIES:
        _STUDIES[key] = open_study(key[0], info.study, 0, 1, create=False)
    return _STUDIES[key]


def trial_file(run_dir: Path, trial: int, name: str, info: RunInfo | None = None
               ) -> Path | None:
    """A trial's file on this host: the run folder's copy, else fetched into it from the
    study's artifact store (a trial that ran on another worker, or weights kept only there).
    None: the trial has no such file."""
    local = run_dir / "trials" / f"{trial:04d}" / name
    if local.exists():
        return local
    info = info or RunInfo.load(run_dir)
    study = run_study(run_dir, info)
    if study is None:
        return None
    return fetch_trial_file(study, info.store(run_dir), trial, name, local)


def trial_policy(run_dir: Path, trial: int, info: RunInfo | None = None) -> Any:
    """A trial's policy (its policy.yaml, from wherever the trial ran); a one-line UserError
    if the run has no such trial."""
    from search.compress.policy import Policy

    path = trial_file(run_dir, trial, "policy.yaml", info)
    if path is None:
        raise UserError(f"run {str(run_dir)!r} has no trial {trial}; "
                        f"pick one from `search front {run_dir}`")
    return Policy.load(path)


def load_trial_model(run_dir: Path, trial: int, task: Any) -> tuple[nn.Module, Any]:
    """A trial's deployed model: rebuilt from its policy, with its fine-tuned weights (those of
    the long fine-tune, `finetuned.pt`, when `search finetune` ran), from this host's run
    folder or the study's artifact store."""
    from search.compress.build import build

    info = RunInfo.load(run_dir)
    policy = trial_policy(run_dir, trial, info)
    model = build(task.model, policy, task.example, task.train, task.loss)
    if all(lp.is_identity for lp in policy.layers.values()):
        return model.eval(), policy  # the uncompressed model: the task's own weights
    weights = trial_file(run_dir, trial, "finetuned.pt", info) or \
        trial_file(run_dir, trial, "model.pt", info)
    if weights is None:
        raise UserError(f"trial {trial} has no saved weights (it failed, or is off the front); "
                        f"pick a trial from `search front {run_dir}`")
    model.load_state_dict(torch.load(weights, weights_only=True))
    return model.eval(), policy
