"""Layer 7, report: what a user reads and takes away from a finished study: the front (json,
csv, plot, table), per-layer `show`, `compare`, `export`, and the longer `finetune`."""
