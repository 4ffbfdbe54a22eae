"""A long fine-tune of one chosen front point before deployment.

The search fine-tunes every candidate briefly: enough to rank them, not to recover all the
accuracy a compressed model can. Once a user has picked a point, more distillation steps from the
uncompressed model are cheap (one model, not a study). They continue from the point's own
fine-tuned weights (kept as `trainable.pt` for front points), with the same training transforms
(masks, QAT quantizers), then the policy's precision is applied again. Test accuracy is
reported before and after; `export` then writes the fine-tuned model (`finetuned.pt`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from search.core.errors import UserError
from search.core.task import Task
from search.study.artifacts import upload_late_trial_file
from search.study.config import SearchConfig
from search.study.evaluate import TRAINABLE, finetune_seed, more_steps
from search.study.runfolder import RunInfo, run_study, trial_file, trial_policy

FINETUNED = "finetuned.pt"  # the deployed model after the long fine-tune (export prefers it)
FINETUNED_INFO = "finetuned.json"


@dataclass(frozen=True)
class Finetuned:
    """What a long fine-tune of one trial did."""

    trial: int
    steps: int  # extra steps, on top of the search's own fine-tune
    test_before: float
    test_after: float
    val_before: float
    val_after: float
    seconds: float
    weights: str  # the deployed state_dict written

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def finetune_trial(run_dir: Path, trial: int, steps: int, task: Task,
                   config: SearchConfig) -> tuple[Finetuned, nn.Module]:
    """`steps` more distillation steps for a trial, from its fine-tuned weights."""
    if steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    trial_dir = run_dir / "trials" / f"{trial:04d}"
    policy = trial_policy(run_dir, trial)
    if all(lp.is_identity for lp in policy.layers.values()):
        raise UserError(f"trial {trial} is the uncompressed model: there is nothing to recover")
    trainable = trial_file(run_dir, trial, TRAINABLE)
    result = trial_file(run_dir, trial, "result.json")
    if trainable is None or result is None:
        raise UserError(f"trial {trial} kept no fine-tuned weights (it is off the front, or "
                        f"failed); pick a trial from `search front {run_dir}`")
    before = json.loads(result.read_text())
    more = more_steps(task, policy, torch.load(trainable, weights_only=True), steps, config,
                      finetune_seed(config.seed, policy) + 2)  # (+1: the front's recovery)
    deployed = more.model
    torch.save(deployed.state_dict(), trial_dir / FINETUNED)
    done = Finetuned(trial, steps, float(before["test_accuracy"]), more.test_accuracy,
                     float(before["val_accuracy"]), more.val_accuracy, round(more.seconds, 1),
                     str(trial_dir / FINETUNED))
    (trial_dir / FINETUNED_INFO).write_text(json.dumps(done.to_dict(), indent=1))
    study = run_study(run_dir)
    if study is not None:  # every host's `export` then writes the fine-tuned model
        store = RunInfo.load(run_dir).store(run_dir)
        for name in (FINETUNED, FINETUNED_INFO):
            upload_late_trial_file(store, study, trial, trial_dir / name)
    return done, deployed
