"""Layer 6, study: the run's settings, the sensitivity pass, evaluating one candidate, and the
Optuna study that proposes candidates (storage, sampler, seeds, early stop)."""
