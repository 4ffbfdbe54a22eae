"""Early stopping of hopeless trials during the fine-tune, decided from the study's own data.

A candidate's latency and size are known before it is fine-tuned (they depend on its structure
and precision, not on its weights: latency predicted from search.backend.predict, or measured
first), so only its accuracy is still open while it fine-tunes. At a few checkpoints (by
default 1/3 and 2/3 of the steps) its validation accuracy is taken; if some completed trial is
at least as fast, at least as small and more accurate than this candidate could still reach
(its accuracy now + a margin), the candidate can never be on the front: the fine-tune stops.

The margin is learned from the study: each fine-tuned trial records its accuracy at the
checkpoints (user attr `accuracy_curve`), and the margin at a checkpoint is the largest
recovery (final accuracy - accuracy at that checkpoint) seen in completed trials, plus a small
floor. With fewer than `min_history` such trials nothing is stopped (no data, no decision),
unless a fixed margin is given.

NOTE (Optuna 5.0.0, read from its source): `Trial.report` and `Trial.should_prune` raise
NotImplementedError in multi-objective studies (optuna/trial/_trial.py), so no pruner can be
used. But `study.optimize` (optuna/study/_optimize.py, `_run_trial`) catches `TrialPruned` for
every study ("TODO(mamu): Handle multi-objective cases") and `_tell` records the trial PRUNED
with no values (it has no intermediate values). So `StoppedEarly` subclasses `TrialPruned`: the
trial is PRUNED, not FAIL. That is better for the sampler: TPE samples from COMPLETE and PRUNED
trials (a FAIL one is ignored) and ranks a pruned trial without intermediate values below the
complete ones, so it learns to avoid the region; set the trial's latency constraint before
raising (the latency is known) so that an infeasible one is ranked as infeasible.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import optuna
import torch
from torch import nn

CURVE_ATTR = "accuracy_curve"  # user attr: {"0.33": accuracy, ...} at fine-tune checkpoints
FRACTIONS = (1 / 3, 2 / 3)  # checkpoints, as fractions of the fine-tune's steps
ACCURACY, LATENCY, SIZE = 0, 1, 2  # the study's objectives (search.study.loop.DIRECTIONS)


def fraction_key(fraction: float) -> str:
    return f"{fraction:.2f}"


class StoppedEarly(optuna.TrialPruned):
    """A candidate dominated by a completed trial, whatever its remaining steps recover.
    Optuna records the trial PRUNED; the message is its `fail_reason`."""

    def __init__(self, message: str, rival: int, step: int, curve: dict[str, float],
                 latency_ms: float, size_bytes: float) -> None:
        super().__init__(message)
        self.rival = rival
        self.step = step
        self.curve = dict(curve)
        self.latency_ms = latency_ms  # the candidate's (known before the fine-tune): the
        self.size_bytes = size_bytes  # caller still sets the trial's latency constraint


class Hopeless:
    """Decides at a fine-tune checkpoint whether a candidate can still reach the front."""

    def __init__(self, study: optuna.Study, margin: float | None = None, floor: float = 0.01,
                 min_history: int = 3) -> None:
        """
        Args:
            margin: a fixed accuracy margin; None learns it from the study's curves.
            floor: added to the learned margin (evaluation noise).
            min_history: completed trials with a curve needed before a learned margin exists.
        """
        self.study = study
        self.fixed_margin = margin
        self.floor = floor
        self.min_history = min_history

    def _complete(self) -> list[optuna.trial.FrozenTrial]:
        return [t for t in self.study.get_trials(deepcopy=False,
                                                 states=(optuna.trial.TrialState.COMPLETE,))
                if t.values is not None]

    def margin(self, fraction: float) -> float | None:
        """How much accuracy a fine-tune may still recover after `fraction` of its steps: the
        largest recovery seen in the study (never below the floor); None while the study has
        too few curves."""
        if self.fixed_margin is not None:
            return self.fixed_margin
        key = fraction_key(fraction)
        recoveries = [t.values[ACCURACY] - float(t.user_attrs[CURVE_ATTR][key])
                      for t in self._complete()
                      if key in (t.user_attrs.get(CURVE_ATTR) or {})]
        if len(recoveries) < self.min_history:
            return None
        return max(0.0, max(recoveries)) + self.floor

    def rival(self, accuracy: float, latency_ms: float, size_bytes: float, margin: float
              ) -> optuna.trial.FrozenTrial | None:
        """The most accurate completed trial at least as fast and small as the candidate and
        more accurate than `accuracy + margin`; None if there is none."""
        best = None
        for t in self._complete():
            v = t.values
            if v[LATENCY] <= latency_ms and v[SIZE] <= size_bytes and \
                    v[ACCURACY] > accuracy + margin and \
                    (best is None or v[ACCURACY] > best.values[ACCURACY]):
                best = t
        return best

    def check(self, fraction: float, accuracy: float, latency_ms: float, size_bytes: float,
              step: int | None = None, steps: int | None = None,
              curve: dict[str, float] | None = None) -> None:
        """Raise StoppedEarly if the candidate (accuracy now, latency, size) is hopeless."""
        margin = self.margin(fraction)
        if margin is None:
            return
        rival = self.rival(accuracy, latency_ms, size_bytes, margin)
        if rival is None:
            return
        v = rival.values
        at = f" at step {step}/{steps}" if step is not None and steps is not None else ""
        raise StoppedEarly(
            f"stopped early: dominated by trial #{rival.number}{at} (its accuracy "
            f"{v[ACCURACY]:.4f} > {accuracy:.4f} now + margin {margin:.4f}; latency "
            f"{v[LATENCY]:.4g} <= {latency_ms:.4g} ms; size {int(v[SIZE]):,} <= "
            f"{int(size_bytes):,} bytes)",
            rival.number, step if step is not None else -1, curve or {}, latency_ms,
            size_bytes)

    def on_step(self, model: nn.Module, data: tuple[torch.Tensor, torch.Tensor],
                metric: Callable[[torch.Tensor, torch.Tensor], float], steps: int,
                latency_ms: float, size_bytes: float, curve: dict[str, float],
                fractions: Sequence[float] = FRACTIONS) -> Callable[[int], None]:
        """A callback for `distill(..., on_step=...)`, called with the number of steps done:
        at each checkpoint it evaluates `model` on `data` (eval mode, then back to training),
        writes the accuracy into `curve` (the caller stores it as the trial's CURVE_ATTR, also
        when StoppedEarly is raised) and checks."""
        return checkpoints(model, data, metric, steps, curve, fractions,
                           lambda f, acc, step: self.check(f, acc, latency_ms, size_bytes,
                                                           step, steps, curve))


def checkpoints(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor],
                metric: Callable[[torch.Tensor, torch.Tensor], float], steps: int,
                curve: dict[str, float], fractions: Sequence[float] = FRACTIONS,
                then: Callable[[float, float, int], None] | None = None
                ) -> Callable[[int], None]:
    """An `on_step(step)` callback recording validation accuracy at the checkpoints only (for
    trials that are not checked, e.g. before the study has a history: their curves are that
    history), calling `then(fraction, accuracy, step)` after each."""
    from search.core.data import evaluate

    at = {max(1, round(f * steps)): f for f in fractions if round(f * steps) < steps}

    def on_step(step: int) -> None:
        fraction = at.get(step)
        if fraction is None:
            return
        was_training = model.training
        accuracy = evaluate(model, data, metric)
        model.train(was_training)
        curve[fraction_key(fraction)] = accuracy
        if then is not None:
            then(fraction, accuracy, step)

    return on_step


def stopped_attrs(exc: StoppedEarly) -> dict[str, Any]:
    """User attrs for a stopped trial: why (fail_reason, as for failed trials), and its curve."""
    return {"fail_reason": str(exc), "stopped_by": exc.rival, "stopped_at_step": exc.step,
            CURVE_ATTR: exc.curve, "latency_ms": exc.latency_ms, "size_bytes": exc.size_bytes}
