"""Recovery steps for the front, after the search: successive halving's last rung.

Every candidate is fine-tuned briefly (`finetune_steps`): enough to rank them, and one figure
that the sampler and early stopping compare across all trials. Which points deserve more steps
is known only once the search is over: each compressed point within the budget that is on the
front, or within `recover_margin` of it in validation accuracy, is fine-tuned `recover_steps`
more from its own weights, and this is repeated on the figures so far until no such point is
left. Recovered weights replace the short-run ones, here and in the artifact
store, so `export` writes the model the front reports. Trials keep the short-run figures the
sampler saw; the recovered ones are a study attr (RECOVERED) that
`search.study.points.points_of` reads in their place.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import torch

from search.compress.policy import Policy
from search.core.task import Task
from search.finetune.distill import Teacher
from search.study.artifacts import ArtifactStore, upload_late_trial_file
from search.study.config import SearchConfig
from search.study.evaluate import TRAINABLE, finetune_seed, more_steps
from search.study.points import RECOVERED, Point, points_of
from search.study.runfolder import trial_file

MODEL = "model.pt"  # a trial's deployed weights (precision applied)


def due(points: list[Point], done: dict[str, Any], margin: float) -> list[Point]:
    """The points still owed recovery steps: compressed, within the budget, not done, and on
    the front or within `margin` of it: no point as fast and as small is `margin` or more
    ahead on validation accuracy (a short fine-tune's figure is that noisy, and extra steps
    gain some policies more than others: one that close may overtake once recovered)."""
    def ahead(q: Point, p: Point) -> bool:
        return (q.trial != p.trial and q.latency_ms <= p.latency_ms
                and q.size_bytes <= p.size_bytes and q.val_accuracy >= p.val_accuracy + margin
                and (margin > 0 or (q.latency_ms, q.size_bytes, q.val_accuracy)
                     != (p.latency_ms, p.size_bytes, p.val_accuracy)))  # (0: the front alone)

    return sorted((p for p in points
                   if p.feasible and str(p.trial) not in done
                   and not all(lp.is_identity for lp in Policy.from_dict(p.policy).layers.values())
                   and not any(ahead(q, p) for q in points)), key=lambda p: p.latency_ms)


def recover_front(study: optuna.Study, run_dir: Path, task: Task, config: SearchConfig,
                  budget_ms: float, store: ArtifactStore, progress: Any | None = None,
                  say: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Give each due front point `config.recover_steps` more steps; returns the study's
    RECOVERED record (trial -> figures before and after, or the error that stopped it). A
    resumed run continues where an interrupted one stopped: done points are kept."""
    done: dict[str, Any] = dict(study.user_attrs.get(RECOVERED, {}))
    if config.recover_steps <= 0:
        return done
    teacher = None
    while todo := due(points_of(study, budget_ms, run_dir), done, config.recover_margin):
        if teacher is None:
            say(f"fine-tuning {len(todo)} point(s) on or near the front within the budget "
                f"{config.recover_steps} more steps (recover_steps, recover_margin) ...")
            teacher = Teacher(task.model, task.train)  # computed once for all of them
        if progress is not None:
            progress.reset(total=len(todo))
        for p in todo:
            done[str(p.trial)] = recover_point(study, run_dir, task, config, store, p, teacher)
            study.set_user_attr(RECOVERED, done)  # (each one kept: an interrupted run resumes)
            if progress is not None:
                progress.update(1)
    return done


def recover_point(study: optuna.Study, run_dir: Path, task: Task, config: SearchConfig,
                  store: ArtifactStore, point: Point, teacher: Teacher) -> dict[str, Any]:
    """One point's steps (seed: the policy's fine-tune seed + 1, so the steps see other batches
    than the first); its weights and result.json rewritten and uploaded."""
    trial = point.trial
    steps = config.recover_steps
    trainable = trial_file(run_dir, trial, TRAINABLE)
    if trainable is None:
        return {"steps": 0, "error": f"trial {trial} kept no fine-tuned weights ({TRAINABLE})"}
    policy = Policy.from_dict(point.policy)
    more = more_steps(task, policy, torch.load(trainable, weights_only=True), steps, config,
                      finetune_seed(config.seed, policy) + 1, teacher)
    figures = {"steps": steps, "val_accuracy": more.val_accuracy,
               "test_accuracy": more.test_accuracy, "short_val_accuracy": point.val_accuracy,
               "short_test_accuracy": point.test_accuracy, "seconds": round(more.seconds, 1)}
    trial_dir = run_dir / "trials" / f"{trial:04d}"
    torch.save(more.model.state_dict(), trial_dir / MODEL)
    torch.save(more.trainable, trial_dir / TRAINABLE)
    files = [trial_dir / MODEL, trial_dir / TRAINABLE]
    result = trial_file(run_dir, trial, "result.json")
    if result is not None:
        data = json.loads(result.read_text())
        data.update(val_accuracy=more.val_accuracy, test_accuracy=more.test_accuracy,
                    recovered_steps=steps, short_val_accuracy=point.val_accuracy,
                    short_test_accuracy=point.test_accuracy)
        result.write_text(json.dumps(data, indent=1))
        files.append(result)
    for path in files:  # every host reads them there (the newest of a name wins)
        upload_late_trial_file(store, study, trial, path)
    return figures
