"""Layer 1, core: what every stage shares and nothing depends on below it: the task (model,
data splits, metric, loss), how a split is read, the error kinds, reading settings files."""
