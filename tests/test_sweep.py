"""Nightly sweeps: jobs run as normal runs, a dated report, regressions as an exit code."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from search.cli import main
from search.core.errors import UserError
from search.jobs.sweep import SweepConfig, compare_fronts
from search.report.compare import hypervolume, objectives, reference_for
from search.study.config import SearchConfig
from tests.conftest import cli_env

TINY = {"task": "tests.tasks:tiny", "trials": 2, "finetune_steps": 5,
        "tune_trials_per_task": 0, "startup_trials": 2, "seeds": [{}, {"rank": 0.125}]}
if "sensitivity" in {f.name for f in fields(SearchConfig)}:
    TINY["sensitivity"] = False  # NOTE: the per-layer pre-pass is not what these tests are about


def write_sweep(folder: Path, jobs: list[dict], name: str, **settings) -> Path:
    config = folder / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    path = folder / name
    path.write_text(yaml.safe_dump({"out": str(folder / "sweeps"), "config": str(config),
                                    **settings, "jobs": jobs}))
    return path


def cli(*args: str) -> tuple[int, str, str]:
    """`search ...` in this process (the tiny task and TVM stay loaded between sweeps)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


JOBS = [{"name": "broken", "target": "host", "budget": "5ms", "task": "tests.tasks:not_a_task"},
        {"name": "fast", "target": "host", "budget": "50ms"},
        {"target": "host", "budget": "1ms"}]  # named host-1ms


@pytest.fixture(scope="module")
def day1(tmp_path_factory) -> tuple[Path, tuple[int, str, str]]:
    folder = tmp_path_factory.mktemp("sweep")
    return folder, cli("sweep", str(write_sweep(folder, JOBS, "day1.yaml")), "--date",
                       "2025-01-01")


def test_a_sweep_runs_every_job_reports_both_fronts_and_survives_a_failing_job(day1):
    folder, (code, out, err) = day1
    sweep = folder / "sweeps" / "2025-01-01"
    assert code == 4, err  # the broken job failed; the jobs after it still ran
    assert [line for line in err.splitlines() if line.startswith("search:")] == [
        "search: job broken failed: task entry point 'tests.tasks:not_a_task' returned int, "
        "not a Task"]
    report = json.loads((sweep / "report.json").read_text())
    jobs = {j["name"]: j for j in report["jobs"]}
    assert [j["name"] for j in report["jobs"]] == ["broken", "fast", "host-1ms"]
    assert jobs["broken"]["status"] == "failed" and "not a Task" in jobs["broken"]["error"]
    assert report["failed"] == 1 and report["exit_code"] == 4
    md = (sweep / "report.md").read_text()
    for name in ("fast", "host-1ms"):
        assert jobs[name]["status"] == "ok" and jobs[name]["front"]
        assert jobs[name]["moved"] is None  # the first sweep: nothing to compare with
        assert (sweep / name / "front.json").exists() and (sweep / name / "pareto.png").exists()
        assert f"## {name}" in md and f"![Pareto front of {name}]({name}/pareto.png)" in md
        for p in jobs[name]["front"]:
            ok = "y" if p["latency_ms"] <= jobs[name]["budget_ms"] else "n"
            assert f"| {p['trial']} | {ok} | {100 * p['test_accuracy']:.2f} |" in md
    assert "**failed**: task entry point" in md
    assert "report.md" in out


def test_a_later_sweep_compares_with_the_latest_earlier_one_and_flags_a_regression(day1):
    folder, _ = day1
    sweeps = folder / "sweeps"
    # doctor day 1: a point faster and more accurate than anything the tiny task can reach
    front_path = sweeps / "2025-01-01" / "fast" / "front.json"
    front = json.loads(front_path.read_text())
    ghost = {**front["points"][0], "trial": 99, "test_accuracy": 1.0, "latency_ms": 1e-4,
             "latency_p25_ms": 1e-4, "latency_p75_ms": 1e-4, "size_bytes": 1}
    front["points"].insert(0, ghost)
    front_path.write_text(json.dumps(front))
    for decoy in ("2024-12-31", "2025-01-09"):  # older, and later than today: both ignored
        (sweeps / decoy / "fast").mkdir(parents=True)
        (sweeps / decoy / "fast" / "front.json").write_text("not json")

    day2 = write_sweep(folder, JOBS[1:], "day2.yaml")
    code, out, err = cli("sweep", str(day2), "--date", "2025-01-02")
    assert code == 3, err
    assert "REGRESSION fast (since 2025-01-01): trial 99 (100.00%, 0.000 ms) is gone" in out
    sweep = sweeps / "2025-01-02"
    report = json.loads((sweep / "report.json").read_text())
    jobs = {j["name"]: j for j in report["jobs"]}
    assert all(j["moved"]["since"] == "2025-01-01" for j in jobs.values())
    lost = [r["previous"]["trial"] for r in jobs["fast"]["moved"]["regressions"]]
    assert 99 in lost and report["exit_code"] == 3
    hv = jobs["fast"]["moved"]["hypervolume"]
    assert hv["previous"] > 0.99 > hv["current"]  # the ghost owns almost the whole box
    # the current front's own share, against the same reference (0 when the tiny task's
    # compressed point timed slower than the slower baseline: timing decides, not the code)
    current = json.loads((sweep / "fast" / "front.json").read_text())
    ref = reference_for(front, current)
    assert ref.latency_ms == max(front["baseline"]["latency_ms"], current["baseline"]["latency_ms"])
    assert hv["current"] == pytest.approx(hypervolume(map(objectives, current["points"]), ref))
    md = (sweep / "report.md").read_text()
    assert "### Moved since 2025-01-01" in md and "**regression: trial 99" in md
    assert "![fast: 2025-01-01 vs 2025-01-02](front-moved-fast.png)" in md
    assert (sweep / "front-moved-fast.png").stat().st_size > 0
    assert (sweep / "front-moved-host-1ms.png").stat().st_size > 0

    again = cli("sweep", str(day2), "--date", "2025-01-02")  # same day twice: refused
    assert again[0] == 2 and "already holds a run" in again[2]


def sweep_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "search", "sweep", *args], env=cli_env(),
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("job, expected", [
    ({"target": "toaster", "budget": "5ms"}, "job 2: unknown target 'toaster'"),
    ({"target": "host", "budget": "5 parsecs"}, "job 2: budget '5 parsecs' is not a latency"),
])
def test_a_bad_job_fails_at_load_in_one_line(tmp_path, job, expected):
    path = write_sweep(tmp_path, [{"target": "host", "budget": "5ms"}, job], "bad.yaml")
    result = sweep_cli(str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert not (tmp_path / "sweeps").exists()  # nothing ran


@pytest.mark.parametrize("data, expected", [
    ({"jobs": [{"target": "host", "budget": "5ms"}], "nightly": 1}, "unknown setting(s) nightly"),
    ({"jobs": []}, "`jobs` must be a non-empty list"),
    ({"jobs": [{"target": "host", "budget": "5ms", "gpu": 1}]}, "job 1: unknown key(s) gpu"),
    ({"jobs": [{"target": "host"}]}, "job 1: needs budget"),
    ({"jobs": [{"target": "host", "budget": "5ms"}, {"target": "host", "budget": "5ms"}]},
     "more than one job named host-5ms"),
    ({"jobs": [{"target": "host", "budget": "5ms", "name": "a b"}]}, "name 'a b' must be"),
    ({"jobs": [{"target": "host", "budget": "5ms", "config": "no/such.yaml"}]},
     "config file 'no/such.yaml' does not exist"),
    ({"jobs": [{"target": "host", "budget": "5ms"}], "trials": 0}, "trials must be at least 1"),
])
def test_bad_sweep_files(tmp_path, data, expected):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError) as exc:
        SweepConfig.load(path)
    assert expected in str(exc.value) and "\n" not in str(exc.value)


def test_missing_sweep_file_and_bad_date(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        SweepConfig.load(tmp_path / "nope.yaml")
    path = write_sweep(tmp_path, [{"target": "host", "budget": "5ms"}], "s.yaml")
    code, _, err = cli("sweep", str(path), "--date", "last tuesday")
    assert code == 2 and "is not a date: use YYYY-MM-DD" in err


def test_the_example_nightly_file_loads():
    cfg = SweepConfig.load(Path(__file__).resolve().parent.parent / "configs" / "nightly.yaml")
    assert [(j.name, j.target, j.budget_ms) for j in cfg.jobs] == [
        ("host-1.5ms", "host", 1.5), ("host-1ms", "host", 1.0)]


def pt(trial: int, acc: float, ms: float, iqr: float = 0.0) -> dict:
    return {"trial": trial, "test_accuracy": acc, "latency_ms": ms,
            "latency_p25_ms": ms - iqr / 2, "latency_p75_ms": ms + iqr / 2}


@pytest.mark.parametrize("current, lost", [
    ([pt(1, 0.90, 1.05)], False),  # 5% slower: within the 10% floor
    ([pt(1, 0.90, 1.30)], True),  # 30% slower, tight timings: a regression
    ([pt(1, 0.90, 1.30, iqr=0.4)], False),  # 30% slower, but its spread is that wide
    ([pt(1, 0.896, 1.0)], False),  # 0.4 points less accurate: within 0.005
    ([pt(1, 0.88, 1.0)], True),  # 2 points less accurate
    ([pt(1, 0.88, 1.0), pt(2, 0.95, 3.0)], True),  # each matches on one axis only
    ([pt(1, 0.95, 0.5)], False),  # better on both
])
def test_the_regression_rule(current, lost):
    regressions, _ = compare_fronts([pt(0, 0.90, 1.0)], current, budget_ms=5.0)
    assert bool(regressions) == lost


def test_points_beyond_the_budget_are_not_checked_and_improvements_are_listed():
    previous = [pt(0, 0.80, 1.0), pt(1, 0.99, 9.0)]  # trial 1 is over the 5 ms budget
    current = [pt(5, 0.86, 0.7)]
    regressions, improvements = compare_fronts(previous, current, budget_ms=5.0)
    assert not regressions
    assert [(i.current["trial"], [p["trial"] for p in i.beaten]) for i in improvements] == \
        [(5, [0])]
    # the same point within noise is no improvement
    assert compare_fronts(previous, [pt(5, 0.802, 0.97)], 5.0)[1] == []


