"""Layer 8, jobs: one search run in a folder, end to end (with workers), and nightly sweeps."""
