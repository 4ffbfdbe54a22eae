"""Errors that tell a bug from bad input (issue 10): a bug inside a trial stops the run with one
line and a saved traceback (exit 1); a run with nothing to pick from says why (exit 3); bad input
(config, target file, run folder) is one line naming what is wrong (exit 2), before any work."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

import search.backend.measure
import search.study.evaluate
from search.cli import main
from search.core.errors import TrialFailed
from search.core.task import DEFAULT_TASK
from search.study.config import SearchConfig
from search.study.runfolder import RunInfo
from tests.conftest import cli_env

TINY = {"task": "tests.tasks:tiny", "trials": 3, "finetune_steps": 5,
        "tune_trials_per_task": 0, "startup_trials": 2, "sensitivity": False}


def write_config(tmp_path: Path, **settings) -> Path:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({**TINY, **settings}))
    return config


def run_cli(tmp_path: Path, capfd: pytest.CaptureFixture, *extra: str,
            **settings) -> tuple[int, str, Path]:
    """`search run` in this process on a TINY config; (exit code, stderr, run folder)."""
    out = tmp_path / "run"
    code = main(["run", "--config", str(write_config(tmp_path, **settings)), "--budget", "1ms",
                 "--out", str(out), *extra])
    return code, capfd.readouterr().err, out


def run_process(tmp_path: Path, patch: str = "", **settings) -> tuple[int, str, Path]:
    """`search run` in a fresh process, after the Python lines `patch` (a bug injected into
    the package): stderr exactly as a user sees it, Optuna's and tqdm's output included (in
    this process Optuna's log handler may hold a stream from before capfd)."""
    out = tmp_path / "run"
    args = ["run", "--config", str(write_config(tmp_path, **settings)), "--budget", "1ms",
            "--out", str(out)]
    script = f"import sys\n{patch}\nfrom search.cli import main\nsys.exit(main({args!r}))\n"
    done = subprocess.run([sys.executable, "-c", script], env=cli_env(), capture_output=True,
                          text=True, timeout=600)
    return done.returncode, done.stderr, out


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # tqdm moves the cursor between its bars
TQDM = re.compile(r"\[\d\d:\d\d")  # a progress bar's elapsed time: tqdm writes to stderr
FAILED_TRIAL = re.compile(r"^\[W [^]]*\] Trial \d+ failed with .*\.$")  # Optuna: one line


def one_error_line(err: str, trials_may_fail: bool = False) -> str:
    """The single `search: error:` line of a command's stderr. Besides it only progress bars,
    and with `trials_may_fail` Optuna's one-line warning per failed trial, may be there: no
    traceback, no other noise."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("search: error:")]
    assert len(errors) == 1, err
    others = [ln for ln in ANSI.sub("", err).replace("\r", "\n").splitlines()
              if ln.strip() and ln != errors[0] and not TQDM.search(ln)
              and not (trials_may_fail and FAILED_TRIAL.match(ln))]
    assert others == [], err
    return errors[0]


def study_of(out: Path) -> optuna.Study:
    return optuna.load_study(study_name="search", storage=f"sqlite:///{out / 'study.db'}")


# --- a bug in a trial stops the run ---------------------------------------------------------

BUG = """
import search.study.evaluate
real = search.study.evaluate.restructure
def buggy(model, policy, *args, **kwargs):
    if not all(lp.is_identity for lp in policy.layers.values()):
        return None.weight  # the kind of bug this is about: an AttributeError in our code
    return real(model, policy, *args, **kwargs)
search.study.evaluate.restructure = buggy
"""


def test_a_bug_in_the_build_stops_the_run_with_one_line_and_a_saved_traceback(tmp_path):
    code, err, out = run_process(tmp_path, BUG)
    assert code == 1, err
    line = one_error_line(err)
    log = out / "error.log"
    assert line == (f"search: error: internal error in trial 1: AttributeError: 'NoneType' "
                    f"object has no attribute 'weight'; traceback saved in {log}")
    saved = log.read_text()
    assert "Traceback (most recent call last)" in saved and "in buggy" in saved
    # the baseline finished; the first compressed candidate hit the bug, and the run stopped
    trials = study_of(out).trials
    assert [t.state for t in trials[:2]] == [optuna.trial.TrialState.COMPLETE,
                                             optuna.trial.TrialState.FAIL]
    assert all(t.state == optuna.trial.TrialState.WAITING for t in trials[2:])  # not started
    assert trials[1].user_attrs["fail_reason"] == \
        "internal error: AttributeError: 'NoneType' object has no attribute 'weight'"
    assert not (out / "front.json").exists()  # a bug's run is not a result


def test_a_run_stopped_by_a_bug_resumes_and_evaluates_that_trial_again(tmp_path, capfd,
                                                                      monkeypatch):
    """The bug's trial was not the candidate's fault: once fixed, --resume runs it again."""
    def buggy(*args, **kwargs):
        raise KeyError("layer")

    with monkeypatch.context() as patch:
        patch.setattr(search.study.evaluate, "restructure", buggy)
        code, err, out = run_cli(tmp_path, capfd, trials=2)
    assert code == 1 and "internal error in trial 0: KeyError: 'layer'" in err
    code = main(["run", "--out", str(out), "--resume"])
    assert code == 0, capfd.readouterr().err
    states = [t.state for t in study_of(out).trials]
    assert states == [optuna.trial.TrialState.FAIL] + [optuna.trial.TrialState.COMPLETE] * 2
    baseline = json.loads((out / "front.json").read_text())["baseline"]
    assert baseline is not None and baseline["trial"] > 0  # the baseline, run again


def test_an_expected_failure_fails_the_trial_only_and_the_study_goes_on(
        tmp_path, capfd, monkeypatch):
    """TrialFailed (a compile error here) is the candidate's: recorded, and the next runs."""
    real = search.backend.measure.to_relax
    calls = []

    def flaky(model, example):
        calls.append(1)
        # 1: the anchor (the uncompressed model timed beside every candidate), 2: trial 0
        if len(calls) == 3:
            raise TrialFailed("TVM compile failed: TVMError: no schedule")
        return real(model, example)

    monkeypatch.setattr(search.backend.measure, "to_relax", flaky)
    code, err, out = run_cli(tmp_path, capfd)
    assert code == 0, err
    assert "Traceback" not in err
    states = [t.state for t in study_of(out).trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 2
    failed = json.loads((out / "front.json").read_text())["trials"]["failed"]
    assert [f["reason"] for f in failed] == ["TVM compile failed: TVMError: no schedule"]


# --- a run with nothing to pick from --------------------------------------------------------

def test_a_run_whose_every_candidate_failed_exits_non_zero_and_says_why(tmp_path, capfd):
    code, err, out = run_cli(tmp_path, capfd, task="tests.tasks:nan_data")
    assert code == 3, err
    line = one_error_line(err, trials_may_fail=True)
    assert "every candidate failed (2 compressed trials); the most common reason" in line
    assert "non-finite fine-tune loss" in line
    front = json.loads((out / "front.json").read_text())  # written first: nothing is lost
    assert front["baseline"] is not None and len(front["trials"]["failed"]) == 2


def test_a_run_whose_baseline_failed_exits_non_zero_and_says_why(tmp_path, capfd,
                                                                  monkeypatch):
    def no_export(model, example):
        raise TrialFailed("model does not export to TVM: Unsupported: data-dependent control "
                          "flow")

    monkeypatch.setattr(search.backend.measure, "to_relax", no_export)
    code, err, out = run_cli(tmp_path, capfd)
    assert code == 3, err
    line = one_error_line(err, trials_may_fail=True)
    assert "the uncompressed model (trial 0) failed, so there is no baseline: model does " \
           "not export to TVM" in line
    front = json.loads((out / "front.json").read_text())
    assert front["baseline"] is None and front["points"] == [] and front["reference"] is None
    assert (out / "pareto.png").exists()  # the plot takes an empty front too


# --- bad config: one line naming the key, what was given and what would be right -------------

@pytest.mark.parametrize("setting, expected", [
    ({"task": 42}, f"task must be a string, e.g. {DEFAULT_TASK}; got 42 (an integer)"),
    ({"task": {"model": "x"}}, f"task must be a string, e.g. {DEFAULT_TASK}; got {{model: x}}"),
    ({"finetune_steps": "lots"}, "finetune_steps must be an integer, e.g. 60; got lots"),
    ({"trials": "5"}, "trials must be an integer, e.g. 16; got '5' (a string)"),
    ({"knobs": "rank"}, "knobs must be a list of strings, e.g. [rank, sparsity, bits]; got rank"),
    ({"seeds": 3}, "seeds must be a list of mappings"),
    ({"choices": []}, "choices must be a mapping to lists; got [] (a list)"),
    ({"task_args": [1]}, "task_args must be a mapping; got [1] (a list)"),
    ({"qat": "maybe"}, "qat must be true or false, e.g. true; got maybe (a string)"),
    ({"sensitivity": 1}, "sensitivity must be true or false, e.g. true; got 1 (an integer)"),
    ({"transfer": "always"}, "transfer must be true or false, e.g. true; got always (a string)"),
    ({"ip_cost": "guess"}, "ip_cost must be estimate or library; got 'guess'"),
    ({"distill_alpha": True}, "distill_alpha must be a number, e.g. 0.7; got true (a boolean)"),
    ({"trials": None}, "trials must be an integer, e.g. 16; got null"),
    ({"knobs": None}, "knobs must be a list of strings"),
    ({"finetune_steps": -1}, "finetune_steps must be at least 0; got -1"),
    ({"trials": 0}, "trials must be at least 1; got 0"),
    ({"tune_trials_per_task": -1}, "tune_trials_per_task must be at least 0; got -1"),
    ({"heartbeat_s": 0}, "heartbeat_s must be at least 1; got 0"),
    ({"heartbeat_grace_s": 10}, "heartbeat_grace_s must be longer than heartbeat_s (20)"),
    ({"timeout": -5}, "timeout must be a positive number of seconds, or null for none; got -5"),
    ({"timeout": float("inf")}, "timeout must be a positive number of seconds"),
    ({"tuning_budget_s": float("nan")}, "tuning_budget_s must be a number of seconds >= 0"),
    ({"sensitivity_max_drop": 5}, "sensitivity_max_drop must be a fraction of accuracy in"),
    ({"dropconnect": 1.5}, "dropconnect must be a number in [0, 1); got 1.5"),
    ({"knobs": ["rank", "pixie-dust"]},
     "knobs must be a non-empty list of sparsity, importance, rank"),
    ({"choices": {"bits": [3]}}, "choices for bits: bits must be one of (32, 16, 8, 4, 2, 1)"),
    ({"choices": {"bits": []}}, "choices must map a knob"),
    ({"seeds": [{}, {"rank": 2}]}, "seeds[1]: rank must be in (0, 1], got 2"),
    ({"seeds": [{"colour": 1}]}, "seeds[0] names unknown knob(s) colour"),
    ({"trails": 5}, "unknown setting(s) trails"),
    ({"recover_one_in": 3}, "recover_one_in was retired: recovery steps now go to the "
                            "in-budget points on or near the front after the search"),
    ({"recover_margin": -0.1}, "recover_margin must be at least 0; got -0.1"),
])
def test_a_bad_config_is_one_line_naming_the_key(tmp_path, capfd, setting, expected):
    code, err, out = run_cli(tmp_path, capfd, **setting)
    assert code == 2
    line = one_error_line(err)
    assert line.startswith(f"search: error: config file {tmp_path / 'config.yaml'}")
    assert expected in line
    assert not out.exists()  # before any work


def test_a_run_folder_of_an_earlier_version_loads_without_its_retired_keys():
    """Nothing already saved is lost: run.yaml of a run from before recovery moved to the end
    still loads (and resumes); its retired keys are dropped, the others kept."""
    config = SearchConfig.from_dict({"trials": 5, "recover_margin": 0.05, "recover_one_in": 3},
                                    "run settings: config")
    assert config.trials == 5 and config.recover_margin == 0.05
    assert not hasattr(config, "recover_one_in")


def test_zero_finetune_steps_is_allowed():
    """Decision: 0 steps scores candidates as compressed, without fine-tuning (an ablation)."""
    assert SearchConfig.from_dict({"finetune_steps": 0}).finetune_steps == 0


@pytest.mark.parametrize("flags, expected", [
    (["--budget", "1e999ms"], "budget '1e999ms' must be a finite positive latency"),
    (["--budget", "0ms"], "budget '0ms' must be a finite positive latency"),
    (["--budget", "infms"], "budget 'infms' is not a latency"),
    (["--timeout", "0"], "timeout '0' must be positive"),
    (["--trials", "0"], "trials must be at least 1; got 0"),
])
def test_bad_flags_are_one_line(tmp_path, capfd, flags, expected):
    out = tmp_path / "run"
    code = main(["run", "--out", str(out), *flags])
    assert code == 2
    assert expected in one_error_line(capfd.readouterr().err)


def test_a_config_that_is_a_directory_or_binary_is_one_line(tmp_path, capfd):
    binary = tmp_path / "model.pt"
    binary.write_bytes(b"\x80\x04\x95\xff\xfe\x00PK\x03\x04" * 20)
    for path, expected in ((tmp_path, "is a directory"),
                           (binary, "is not a text file (not UTF-8)")):
        assert main(["run", "--config", str(path), "--out", str(tmp_path / "r")]) == 2
        assert expected in one_error_line(capfd.readouterr().err)


# --- bad target file ------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("name: x\ntvm_target: {kind: llvm\n", "is not valid YAML: "),
    ("- host\n", "must hold a mapping of settings"),
    ("description: d\n", "missing setting(s) tvm_target"),
    ("description: d\ntvm_target: 42\n", "tvm_target must be a TVM tag"),
    ("description: d\ntvm_target: {kind: llvm}\nthreads: four\n",
     "threads must be an integer, e.g. 1; got four (a string)"),
    ("description: d\ntvm_target: {kind: llvm}\nmeasurement: 7\n",
     "measurement must be a mapping"),
    ("description: d\ntvm_target: {kind: llvm}\nmeasurement: {repeat: many}\n",
     "measurement: repeat must be an integer"),
    ("description: d\ntvm_target: {kind: llvm}\ncolour: red\n", "unknown setting(s) colour"),
])
def test_a_broken_target_file_is_one_line(tmp_path, capfd, text, expected):
    target = tmp_path / "board.yaml"
    target.write_text(text)
    code = main(["run", "--target", str(target), "--out", str(tmp_path / "r")])
    assert code == 2
    line = one_error_line(capfd.readouterr().err)
    assert f"target file {target}" in line and expected in line


# --- a damaged run folder -------------------------------------------------------------------

FRONT = {"target": "host", "budget_ms": 1.0, "baseline": None, "points": [],
         "trials": {"complete": 0, "failed": []}}


def run_folder(root: Path, run_yaml: str | None = None, front: str | None = None) -> Path:
    """A run folder with a good run.yaml and front.json, or the broken text given."""
    folder = root / "run"
    folder.mkdir()
    RunInfo("host", 1.0, SearchConfig(**TINY)).save(folder)
    if run_yaml is not None:
        (folder / "run.yaml").write_text(run_yaml)
    (folder / "front.json").write_text(front if front is not None else json.dumps(FRONT))
    return folder


BROKEN_RUN_YAML = [
    ("target: host\nbudget_ms: [1\n", "is not valid YAML"),
    ("just some words\n", "must be a mapping of the run's settings"),
    ("target: host\n", "lacks budget_ms, config"),
    ("target: host\nbudget_ms: fast\nconfig: {}\n", "budget_ms must be a positive number"),
    ("target: host\nbudget_ms: 1.0\nconfig: 3\n", "config has the wrong type"),
    ("target: 7\nbudget_ms: 1.0\nconfig: {}\n", "target has the wrong type"),
    ("target: host\nbudget_ms: 1.0\nconfig: {trials: '5'}\n",
     "config: trials must be an integer, e.g. 16; got '5'"),
    ("target: host\nbudget_ms: 1.0\nconfig: {colour: red}\n", "unknown setting(s) colour"),
]


@pytest.mark.parametrize("command", ["front", "export", "show", "compare"])
@pytest.mark.parametrize("text, expected", BROKEN_RUN_YAML)
def test_a_broken_run_yaml_is_one_line_for_every_command(tmp_path, capfd, command, text,
                                                         expected):
    folder = run_folder(tmp_path, run_yaml=text)
    args = {"front": [str(folder)], "export": [str(folder), "0"], "show": [str(folder), "0"],
            "compare": [str(folder), str(folder)]}[command]
    assert main([command, *args]) == 2
    line = one_error_line(capfd.readouterr().err)
    assert str(folder / "run.yaml") in line and expected in line


@pytest.mark.parametrize("command", ["front", "show", "compare"])
@pytest.mark.parametrize("text, expected", [
    ('{"points": [', "cannot be read (Expecting value"),
    ("[1, 2]", "must hold a JSON object"),
    (json.dumps({**FRONT, "points": None}), "points is missing or has the wrong type"),
    (json.dumps({**FRONT, "points": [{"trial": 1}]}), "a point lacks some of"),
    (json.dumps({**FRONT, "trials": {}}), "trials must hold complete and failed"),
])
def test_a_corrupt_front_json_is_one_line(tmp_path, capfd, command, text, expected):
    folder = run_folder(tmp_path, front=text)
    args = {"front": [str(folder)], "show": [str(folder), "0"],
            "compare": [str(folder), str(folder)]}[command]
    assert main([command, *args]) == 2
    line = one_error_line(capfd.readouterr().err)
    assert str(folder / "front.json") in line and expected in line
