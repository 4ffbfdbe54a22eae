"""Bad input: a non-zero exit and one line naming what was wrong, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from search.core.errors import UserError
from search.study.config import parse_duration_ms
from tests.conftest import cli_env


def search_cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "search", *args], env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, expected", [
    (["run", "--target", "toaster"], "unknown target 'toaster'"),
    (["run", "--budget", "5 parsecs"], "budget '5 parsecs' is not a latency"),
    (["run", "--config", "no/such/config.yaml"], "does not exist"),
    (["run", "--trials", "0"], "trials must be at least 1"),
    (["front", "no/such/run"], "no front.json"),
    (["export", "no/such/run", "3"], "not a run folder"),
])
def test_bad_input_is_one_line(tmp_path, args, expected):
    result = search_cli(*args, "--out", str(tmp_path / "r")) if args[0] == "run" \
        else search_cli(*args)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("entry, expected", [
    ("no_such_module:task", "cannot import 'no_such_module'"),
    ("tests.tasks:missing", "has no function 'missing'"),
    ("justtext", "must look like 'package.module:function'"),
])
def test_a_config_entry_point_that_does_not_import(tmp_path, entry, expected):
    config = tmp_path / "c.yaml"
    config.write_text(f"task: {entry}\n")
    result = search_cli("run", "--config", str(config), "--out", str(tmp_path / "r"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and expected in result.stderr


def test_unknown_knobs_fail_loudly(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("knobs: [rank, pixie-dust]\n")
    result = search_cli("run", "--config", str(config), "--out", str(tmp_path / "r"))
    assert result.returncode != 0 and "knobs must be a non-empty list of" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_unknown_config_keys_fail_loudly(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("trails: 5\n")
    result = search_cli("run", "--config", str(config), "--out", str(tmp_path / "r"))
    assert result.returncode != 0 and "unknown setting(s) trails" in result.stderr


@pytest.mark.parametrize("text, ms", [("5ms", 5.0), ("800us", 0.8), ("0.005s", 5.0),
                                      (" 2.5 ms ", 2.5)])
def test_budget_units(text, ms):
    assert parse_duration_ms(text) == pytest.approx(ms)


@pytest.mark.parametrize("text", ["5", "5 parsecs", "-1ms", "ms", "0ms"])
def test_bad_budgets(text):
    with pytest.raises(UserError):
        parse_duration_ms(text)


def test_help_teaches():
    result = search_cli("run", "--help")
    assert result.returncode == 0
    for word in ("--target", "--budget", "800us", "--resume", "optuna-dashboard"):
        assert word in result.stdout


def test_targets_lists_each_device_with_its_hardware_arithmetic():
    result = search_cli("targets")
    assert result.returncode == 0
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:-1]}
    assert {"host", "raspberry-pi", "raspberry-pi-5"} <= set(rows)
    assert "fp16" not in rows["raspberry-pi"] and "int8-dot" in rows["raspberry-pi-5"]
