"""`search tune`: the target's kernel library is tuned once, then found by the next call."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from search.cli import main

SUMMARY = re.compile(r"^(\d+) candidates use (\d+) distinct kernels: (\d+) were tuned before, "
                     r"(\d+) tuned now \(\d+ s\); ([\d.]+)% of their estimated FLOPs now run "
                     r"on tuned kernels \((done|budget)\)$", re.M)


def test_tune_builds_the_library_and_a_second_call_finds_it(tmp_path: Path,
                                                            capfd: pytest.CaptureFixture):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "task": "tests.tasks:tiny", "knobs": ["bits"], "choices": {"bits": [32, 8]},
        "tune_trials_per_task": 2}))
    args = ["tune", "--target", "host", "--config", str(config), "--samples", "1"]
    assert main(args) == 0
    first = SUMMARY.search(capfd.readouterr().out)
    assert first, "no summary line"
    candidates, kernels, before, tuned = map(int, first.groups()[:4])
    assert candidates == 3  # uniform bits=32, uniform bits=8, one random policy
    assert kernels > 0 and 0 < tuned <= kernels - before and first[6] == "done"
    # NOTE: a kernel whose builds all time out (a loaded machine) gets no record; the share
    # covered says so, and the next call retries it
    everything = tuned == kernels - before
    if everything:
        assert float(first[5]) == pytest.approx(100.0)
    assert main(args) == 0  # the same space again: every record of the first call is found
    second = SUMMARY.search(capfd.readouterr().out)
    assert second and int(second[2]) == kernels and int(second[3]) == before + tuned
    assert int(second[3]) + int(second[4]) <= kernels
    if everything:
        assert int(second[4]) == 0


def test_tune_rejects_a_negative_sample_count(capfd: pytest.CaptureFixture):
    assert main(["tune", "--target", "host", "--samples", "-1"]) == 2
    err = capfd.readouterr().err
    assert "--samples must be >= 0, got -1" in err and "Traceback" not in err
