"""Early stopping against the study's own data: a dominated candidate stops, others run."""

from __future__ import annotations

import inspect

import optuna
import pytest
import torch
from torch import nn

from search.core.data import accuracy
from search.finetune.distill import FinetuneOptions, Teacher, distill
from search.study.early_stop import CURVE_ATTR, Hopeless, StoppedEarly, checkpoints, stopped_attrs

DIRECTIONS = ["maximize", "minimize", "minimize"]
DIST = optuna.distributions.FloatDistribution(0, 1)


def done(acc: float, latency_ms: float, size: int, curve: dict[str, float] | None = None
         ) -> optuna.trial.FrozenTrial:
    return optuna.trial.create_trial(
        values=[acc, latency_ms, size], params={"x": 0.5}, distributions={"x": DIST},
        user_attrs={CURVE_ATTR: curve} if curve else {})


def make_study(with_history: bool = True) -> optuna.Study:
    """Trial #0: the fast, small, accurate rival; #1-#3: fine-tuned trials that recovered at
    most 0.05 after a third of their steps and 0.02 after two thirds."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=DIRECTIONS)
    study.add_trial(done(0.95, 1.0, 1000))
    if with_history:
        for final, third, two_thirds in ((0.90, 0.85, 0.88), (0.80, 0.78, 0.79),
                                         (0.70, 0.69, 0.70)):
            study.add_trial(done(final, 5.0, 5000, {"0.33": third, "0.67": two_thirds}))
    return study


def test_margin_is_the_largest_recovery_seen():
    hopeless = Hopeless(make_study(), floor=0.01)
    assert hopeless.margin(1 / 3) == pytest.approx(0.06)
    assert hopeless.margin(2 / 3) == pytest.approx(0.03)
    assert Hopeless(make_study(with_history=False)).margin(1 / 3) is None
    assert Hopeless(make_study(with_history=False), margin=0.2).margin(1 / 3) == 0.2


def test_a_dominated_candidate_is_stopped():
    hopeless = Hopeless(make_study())
    with pytest.raises(StoppedEarly) as info:
        hopeless.check(1 / 3, accuracy=0.5, latency_ms=2.0, size_bytes=2000, step=20, steps=60)
    exc = info.value
    assert isinstance(exc, optuna.TrialPruned) and exc.rival == 0
    assert str(exc).startswith("stopped early: dominated by trial #0 at step 20/60")


@pytest.mark.parametrize("candidate", [
    dict(accuracy=0.5, latency_ms=0.5, size_bytes=2000),  # faster than every trial
    dict(accuracy=0.5, latency_ms=2.0, size_bytes=500),  # smaller than every trial
    dict(accuracy=0.90, latency_ms=2.0, size_bytes=2000),  # may still reach 0.95 (+0.06)
])
def test_a_candidate_that_can_still_reach_the_front_runs_on(candidate):
    Hopeless(make_study()).check(1 / 3, **candidate)


def test_no_history_no_decision():
    Hopeless(make_study(with_history=False)).check(1 / 3, accuracy=0.0, latency_ms=9.0,
                                                   size_bytes=9000)


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(256, 10))


def fake_distill(model: nn.Module, data, steps: int, on_step) -> None:
    """The fine-tune's loop shape: a step, then the callback with the steps done."""
    x, y = data
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for step in range(steps):
        loss = nn.functional.cross_entropy(model(x[:64]), y[:64])
        opt.zero_grad()
        loss.backward()
        opt.step()
        on_step(step + 1)


def digits_like(n: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 16, 16, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def test_checkpoints_record_the_curve_and_restore_training_mode():
    model, data, curve = small_model(), digits_like(), {}
    seen = []

    def then(fraction, acc, step):
        assert model.training and 0.0 <= acc <= 1.0  # evaluated, then back to training
        seen.append((round(fraction, 2), step))

    fake_distill(model, data, 9, checkpoints(model, data, accuracy, 9, curve, then=then))
    assert seen == [(0.33, 3), (0.67, 6)] and set(curve) == {"0.33", "0.67"}
    assert model.training


def test_the_fine_tune_stops_at_the_first_checkpoint():
    model, data, curve = small_model(), digits_like(), {}
    hopeless = Hopeless(make_study())
    on_step = hopeless.on_step(model, data, accuracy, 30, latency_ms=2.0, size_bytes=2000,
                               curve=curve)
    with pytest.raises(StoppedEarly) as info:
        fake_distill(model, data, 30, on_step)
    assert info.value.step == 10 and list(curve) == ["0.33"]
    attrs = stopped_attrs(info.value)
    assert attrs["stopped_by"] == 0 and attrs[CURVE_ATTR] == curve


@pytest.mark.skipif("on_step" not in inspect.signature(distill).parameters,
                    reason="search.finetune.distill.distill has no on_step callback yet")
def test_distill_calls_back_and_stops():
    model, data, curve = small_model(), digits_like(), {}
    teacher = Teacher(small_model(), data)
    # checkpoints only evaluate: a fine-tune that is not stopped ends with the same weights
    plain, watched = small_model(), small_model()
    distill(plain, teacher, data, FinetuneOptions(steps=12))
    distill(watched, teacher, data, FinetuneOptions(steps=12),
            on_step=checkpoints(watched, data, accuracy, 12, {}))
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), watched.parameters(),
                                                 strict=True))
    on_step = Hopeless(make_study()).on_step(model, data, accuracy, 12, 2.0, 2000, curve)
    with pytest.raises(StoppedEarly):
        distill(model, teacher, data, FinetuneOptions(steps=12), on_step=on_step)
    assert list(curve) == ["0.33"]


def test_optuna_records_a_stopped_trial_as_pruned_and_goes_on():
    """Optuna 5 accepts TrialPruned from a multi-objective objective (only report and
    should_prune are refused): the trial is PRUNED with its reason, and sampling goes on."""
    study = make_study()
    hopeless = Hopeless(study)

    def objective(trial: optuna.Trial) -> tuple[float, float, float]:
        x = trial.suggest_float("x", 0, 1)
        latency, size = 2.0 + x, 2000
        trial.set_constraint("latency_budget_ms", latency - 10.0)
        try:
            hopeless.check(1 / 3, 0.1 if trial.number == 4 else 0.99, latency, size)
        except StoppedEarly as exc:
            for k, v in stopped_attrs(exc).items():
                trial.set_user_attr(k, v)
            raise
        return 0.99, latency, size

    study.optimize(objective, n_trials=3, catch=(Exception,))
    stopped = study.trials[4]
    assert stopped.state == optuna.trial.TrialState.PRUNED and stopped.values is None
    assert stopped.user_attrs["fail_reason"].startswith("stopped early: dominated by trial #0")
    assert [t.state for t in study.trials[5:]] == [optuna.trial.TrialState.COMPLETE] * 2
