"""The study end to end on a tiny task (untuned compiles, so it runs in seconds per trial)."""

from __future__ import annotations

import json
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from search.compress.space import LayerSpace, uniform
from search.core.errors import SearchFailed
from search.jobs.run import prepare, run_search
from search.study.config import SearchConfig
from search.study.runfolder import RunInfo
from tests.conftest import cli_env

TINY = {"task": "tests.tasks:tiny", "trials": 6, "finetune_steps": 5,
        "tune_trials_per_task": 0, "startup_trials": 2}


def run_tiny(out: Path, budget_ms: float = 0.5, **overrides) -> dict:
    config = SearchConfig(**{**TINY, **overrides})
    target, info = prepare("host", budget_ms, config, out, resume=False)
    return run_search(out, target, info, resume=False, show_progress=False)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("run") / "r"
    return out, run_tiny(out)


def test_a_run_writes_a_front_a_user_can_pick_from(tiny_run):
    out, data = tiny_run
    for name in ("study.db", "front.json", "front.csv", "pareto.png", "run.yaml"):
        assert (out / name).stat().st_size > 0, name
    front = json.loads((out / "front.json").read_text())
    assert set(front["baseline"]) >= {"test_accuracy", "val_accuracy", "latency_ms",
                                      "size_bytes"}
    assert front["trials"]["complete"] == 6 and front["points"]
    for p in front["points"]:
        assert set(p) >= {"trial", "test_accuracy", "val_accuracy", "latency_ms",
                          "latency_source", "size_bytes", "feasible", "policy"}
        assert 0.0 <= p["test_accuracy"] <= 1.0 and 0.0 <= p["val_accuracy"] <= 1.0
        assert p["latency_source"]["method"] == "measured"  # timed, not predicted
        assert p["latency_source"]["tuning"] == "untuned"  # tuning was off: it says so
        assert p["feasible"] == (p["latency_ms"] <= 0.5)
        assert (out / "front" / f"trial_{p['trial']:04d}.yaml").exists()
    # no front point is dominated by another complete trial
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{out / 'study.db'}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    for p in front["points"]:
        assert not any(t.values[0] > p["val_accuracy"] and t.values[1] < p["latency_ms"]
                       and t.values[2] < p["size_bytes"] for t in done)
    # early stopping is off: no validation passes at the fine-tune's checkpoints
    assert not any("accuracy_curve" in t.user_attrs for t in study.trials)


def test_the_study_is_seeded_with_the_baseline_and_uniform_policies(tiny_run):
    out, _ = tiny_run
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{out / 'study.db'}")
    first = study.trials[0]
    assert first.user_attrs["uncompressed"] is True
    assert all(v in (1.0, 0.0, 32) for v in first.params.values())
    # the rank seed: every layer at the offered rank nearest 1/8 (sensitivity narrows the space)
    space = [LayerSpace.from_dict(d) for d in json.loads((out / "space.json").read_text())]
    want = uniform(space, rank=0.125)
    assert {k: v for k, v in study.trials[1].params.items() if k.endswith(".rank")} == \
        {f"{n}.rank": lp.rank for n, lp in want.layers.items()}
    assert any(v < 1.0 for k, v in study.trials[1].params.items() if k.endswith(".rank"))
    # then the integer program's seeds (least summed sensitivity under each cost limit)
    ip = [t for t in study.trials if str(t.user_attrs.get("seed", "")).startswith("ip:")]
    solutions = study.user_attrs["ip_seeds"]
    assert solutions and len(ip) == min(len(solutions), 2)  # room: 6 trials, 4 uniform seeds
    assert [t.number for t in ip] == list(range(4, 4 + len(ip)))
    # the budget is an Optuna constraint: a trial is feasible iff within the budget
    for t in study.trials:
        if t.state == optuna.trial.TrialState.COMPLETE:
            assert (t.constraints["latency_budget_ms"] <= 0) == (t.user_attrs["latency_ms"] <= 0.5)


def test_every_latency_is_its_fastest_round_timed_beside_the_uncompressed_model(tiny_run):
    """A trial's figure is its own fastest round, not scaled by the anchor (whose weights beyond
    the cache make it the noisiest model on a shared machine: bench/RESULTS.md 13.32); the ratio
    to the anchor's fastest round is kept beside it, and the study's reference (the anchor's
    fastest round in the first timed trial) is what predictions are scaled by."""
    out, data = tiny_run
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{out / 'study.db'}")
    reference = study.user_attrs["reference_latency_ms"]
    assert reference > 0
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    for t in done:
        a = t.user_attrs
        assert a["latency_ratio"] > 0 and a["latency_source"]["method"] == "measured"
        assert a["latency_source"]["reference_ms"] is None  # measured, not scaled
        assert a["latency_p25_ms"] >= a["latency_ms"] > 0  # the fastest of its rounds
        assert a["latency_raw_ms"] >= a["latency_ms"]  # ... and their median beside it
    baseline = done[0].user_attrs  # the uncompressed model timed beside itself
    assert baseline["uncompressed"] and 0.5 < baseline["latency_ratio"] < 2.0
    # ONNX Runtime's reference figure is timed the same way, so the front compares like with like
    ort = data["reference"]
    assert ort["timing"] == "interleaved" and ort["source"]["reference_ms"] is None
    assert ort["uncompressed_onnxruntime_fp32_ms"] > 0 and ort["ratio"] > 0
    # (TINY compiles untuned: no bound on how far apart they are)


def test_front_and_export_commands(tiny_run):
    out, data = tiny_run
    shown = subprocess.run([sys.executable, "-m", "search", "front", str(out)], env=cli_env(),
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "Pareto front on host" in shown.stdout
    trial = data["points"][0]["trial"]
    exported = subprocess.run([sys.executable, "-m", "search", "export", str(out), str(trial)],
                              env=cli_env(), capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0, exported.stderr
    folder = out / "export" / f"trial_{trial}"
    assert (folder / "model.onnx").stat().st_size > 0
    assert (folder / "model_host.so").stat().st_size > 0
    # what the front says the point weighs is what the written library carries
    from search.backend.artifact import library_weight_bytes

    point = data["points"][0]
    assert library_weight_bytes(folder / "model_host.so").total == point["size_bytes"]
    assert f"weights {point['size_bytes']:,} bytes, read from the file" in exported.stdout
    assert not (out / "export" / f"trial_{trial}.partial").exists()
    assert yaml.safe_load((folder / "policy.yaml").read_text())["layers"]
    # the exported library loads and runs in TVM
    import numpy as np
    import tvm
    from tvm import relax

    lib = tvm.runtime.load_module(str(folder / "model_host.so"))
    vm = relax.VirtualMachine(lib, tvm.cpu())
    out_arr = vm["main"](tvm.runtime.tensor(np.zeros((1, 1, 16, 16), "float32"))).numpy()
    assert out_arr.shape == (1, 10)


def test_a_failing_trial_is_recorded_with_its_reason_and_the_study_goes_on(tmp_path):
    out = tmp_path / "r"
    with pytest.raises(SearchFailed, match="every candidate failed .3 compressed trials.; the "
                                           "most common reason"):
        run_tiny(out, task="tests.tasks:nan_data", trials=4)
    data = json.loads((out / "front.json").read_text())  # written before the run failed
    failed = data["trials"]["failed"]
    assert len(failed) == 3  # every compressed candidate hit the NaN; the baseline did not
    assert all("non-finite fine-tune loss" in f["reason"] for f in failed)
    assert data["trials"]["complete"] == 1 and data["baseline"] is not None


def _complete(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db) as conn:
            return conn.execute("select count(*) from trials where state='COMPLETE'").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_a_killed_run_resumes_and_keeps_its_finished_trials(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "trials": 5}))
    out = tmp_path / "r"
    cmd = [sys.executable, "-m", "search", "run", "--config", str(config), "--budget", "1ms",
           "--out", str(out)]
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while _complete(out / "study.db") < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    storage = f"sqlite:///{out / 'study.db'}"
    before = {t.number: t.values for t in optuna.load_study(study_name="search", storage=storage)
              .trials if t.state == optuna.trial.TrialState.COMPLETE}
    assert 2 <= len(before) < 5
    # a second run into the same folder without --resume refuses, and loses nothing
    again = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "--resume" in again.stderr
    resumed = subprocess.run(cmd + ["--resume"], env=cli_env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    study = optuna.load_study(study_name="search", storage=storage)
    after = {t.number: t.values for t in study.trials
             if t.state == optuna.trial.TrialState.COMPLETE}
    assert all(after[n] == v for n, v in before.items())  # finished trials kept as they were
    assert len(after) == 5
    assert RunInfo.load(out).config.trials == 5


def test_unstructured_pruning_is_opt_in_and_shrinks_only_the_estimate(tmp_path):
    """Pruned weights are stored dense in the library (no sparse format is written), so the
    artifact's size stays; the ideal size, an estimate of the sparse format, goes down."""
    data = run_tiny(tmp_path / "r", trials=2, knobs=["rank", "sparsity", "bits", "prune"],
                    seeds=[{}, {"prune": 0.9}], sensitivity_max_drop=None)  # keep every value
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{tmp_path / 'r/study.db'}")
    base, pruned = study.trials[0], study.trials[1]
    assert all(v == 0.9 for k, v in pruned.params.items() if k.endswith(".prune"))
    assert pruned.user_attrs["size_bytes"] == base.user_attrs["size_bytes"]  # written dense
    assert pruned.user_attrs["ideal_size_bytes"] < 0.5 * base.user_attrs["ideal_size_bytes"]
    assert pruned.user_attrs["params"] == base.user_attrs["params"]  # still dense in the graph
    assert data["trials"]["complete"] == 2
    # the default space has no prune parameter at all
    run_tiny(tmp_path / "d", trials=1)
    d = optuna.load_study(study_name="search", storage=f"sqlite:///{tmp_path / 'd/study.db'}")
    assert not any(k.endswith(".prune") for k in d.trials[0].params)


def test_optuna_dashboard_opens_the_study(tiny_run):
    """The standard Optuna UI reads the run: its API lists the study, named objectives, trials,
    and serves each trial's files from the artifact store (`--artifact-dir RUN/artifacts`)."""
    from wsgiref.util import setup_testing_defaults

    import optuna_dashboard
    from optuna.artifacts import FileSystemArtifactStore

    out, data = tiny_run
    app = optuna_dashboard.wsgi(f"sqlite:///{out / 'study.db'}",
                                FileSystemArtifactStore(out / "artifacts"))

    def get(path: str) -> bytes:
        env: dict = {}
        setup_testing_defaults(env)
        env["PATH_INFO"] = path
        status = []
        body = b"".join(app(env, lambda s, h, e=None: status.append(s)))
        assert status[0].startswith("200"), status
        return body

    studies = json.loads(get("/api/studies"))["study_summaries"]
    assert [s["study_name"] for s in studies] == ["search"]
    study = json.loads(get(f"/api/studies/{studies[0]['study_id']}"))
    assert len(study["trials"]) == 6
    assert study["directions"] == ["maximize", "minimize", "minimize"]
    on_front = {p["trial"] for p in data["points"]} - {data["baseline"]["trial"]}
    for trial in study["trials"]:
        files = {a["filename"]: a for a in trial["artifacts"]}
        assert {"policy.yaml", "result.json"} <= set(files), trial["number"]
        policy = get(f"/artifacts/{trial['study_id']}/{trial['trial_id']}/"
                     f"{files['policy.yaml']['artifact_id']}")
        assert yaml.safe_load(policy)["layers"] == \
            yaml.safe_load((out / "trials" / f"{trial['number']:04d}" / "policy.yaml")
                           .read_text())["layers"]
        if trial["number"] in on_front:  # weights: kept for front points, in the store only
            assert "model.pt" in files and "trainable.pt" in files


def test_predicted_latency_search_measures_its_front_whole_and_reports_the_error(
        tmp_path, monkeypatch):
    """latency: predicted ranks trials by their kernels costed from the kernel library (the
    baseline's, tuned; the rest from records or tuned neighbours); every front point is then
    compiled and timed whole, says so, and the prediction's error on them is in front.json."""
    monkeypatch.setenv("SEARCH_CACHE_DIR", str(tmp_path / "cache"))  # its own tuned library
    data = run_tiny(tmp_path / "r", trials=5, latency="predicted", early_stop=True,
                    tune_trials_per_task=1, knobs=["rank"], sensitivity=False)
    assert data["points"]
    for p in data["points"]:
        assert p["latency_source"]["method"] == "measured"  # not "predicted"
    table = data["latency_prediction"]
    rows = {r["point"]: r for r in table["points"] if "error" not in r}
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{tmp_path / 'r/study.db'}")
    for p in data["points"]:  # each front point's latency is its whole-model measurement:
        own = study.trials[p["trial"]].user_attrs["latency_source"]["method"]
        retuned = {r["point"]: r for r in (data.get("transfer") or {}).get("points", [])
                   if "error" not in r}
        if own == "predicted":  # measured whole after the search, for the front (and where
            # that ran transferred schedules, on its own tuned kernels after that)
            final = retuned.get(p["trial"], rows[p["trial"]])
            assert p["latency_ms"] == final["measured_ms"]
        else:  # the uncompressed model is measured whole during the search
            assert own == "measured" and p["trial"] not in rows
    # the reported error is that of the predictions against those measurements
    rel = [abs(r["predicted_ms"] - r["measured_ms"]) / r["measured_ms"] for r in rows.values()]
    assert table["error"]["n"] == len(rows) >= 1
    assert table["error"]["median_abs_rel_error"] == pytest.approx(statistics.median(rel))
    # and as ratios (to the uncompressed model timed beside each point), without that model's
    # drift since the reference was taken
    reference = study.user_attrs["reference_latency_ms"]
    for r in rows.values():
        assert r["measured_ratio"] == pytest.approx(r["measured_ms"] / r["anchor_ms"])
    rel = [abs(r["predicted_ms"] / reference - r["measured_ratio"]) / r["measured_ratio"]
           for r in rows.values()]
    assert table["error"]["ratio"]["n"] == len(rows)
    assert table["error"]["ratio"]["median_abs_rel_error"] == pytest.approx(statistics.median(rel))
    sources = {t.user_attrs["latency_source"]["method"] for t in study.trials
               if t.state == optuna.trial.TrialState.COMPLETE}
    assert "predicted" in sources  # the search itself ran on predictions
    for t in study.trials:  # a prediction: its kernel sum's ratio x the measured reference
        a = t.user_attrs
        if a.get("latency_source", {}).get("method") == "predicted":
            reference = study.user_attrs["reference_latency_ms"]
            assert a["latency_source"]["reference_ms"] == pytest.approx(reference)
            assert a["latency_ms"] == pytest.approx(a["latency_ratio"] * reference)
    # the study finished its 5 trials; early stopping only prunes, with its reason
    assert len(study.trials) == 5
    for t in study.trials:
        assert t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED), \
            (t.number, t.state, t.user_attrs.get("fail_reason"))
        if t.state == optuna.trial.TrialState.PRUNED:
            assert t.user_attrs["fail_reason"].startswith("stopped early")
        elif not t.user_attrs["uncompressed"]:  # its history: accuracy at both checkpoints
            assert set(t.user_attrs["accuracy_curve"]) == {"0.33", "0.67"}, t.number


def test_a_bf16_point_exports_a_library_and_an_onnx_model_onnx_runtime_runs(tmp_path):
    """ONNX Runtime's CPU provider has no bf16 MatMul: the ONNX model holds those layers as fp32
    with the same bf16-rounded weights (and says so); the TVM library keeps them bf16."""
    out = tmp_path / "r"
    run_tiny(out, trials=2, sensitivity=False, knobs=["bits", "half"],
             seeds=[{}, {"bits": 16, "half": "bf16"}])
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{out / 'study.db'}")
    bf16 = next(t.number for t in study.trials if "bf16" in t.user_attrs.get("precisions", []))
    from search.backend.artifact import library_weight_bytes
    from search.report.export import export_trial
    from search.study.runfolder import trial_file

    assert trial_file(out, bf16, "model.pt") is not None  # smaller: on the front, kept
    exported = export_trial(out, bf16, tmp_path / "export")
    assert "bfloat16" in library_weight_bytes(exported.tvm_library).by_dtype
    assert exported.notes and "bf16" in exported.notes[0]
    assert exported.onnx_max_abs_error <= 0.1
    assert not (tmp_path / "export.partial").exists()


def test_a_policy_proposed_again_reuses_its_figures_and_is_listed_once(tmp_path):
    out = tmp_path / "r"
    run_tiny(out, trials=3, seeds=[{}, {"bits": 8}], sensitivity=False)
    storage = f"sqlite:///{out / 'study.db'}"
    study = optuna.load_study(study_name="search", storage=storage)
    first = study.trials[1]  # the int8 seed, complete
    assert first.state == optuna.trial.TrialState.COMPLETE
    study.enqueue_trial(first.params)  # the sampler proposes it again
    config = SearchConfig(**{**TINY, "trials": 4, "seeds": [{}, {"bits": 8}],
                             "sensitivity": False})
    target, info = prepare("host", 0.5, config, out, resume=True)
    data = run_search(out, target, info, resume=True, show_progress=False)
    again = optuna.load_study(study_name="search", storage=storage).trials[3]
    assert again.params == first.params and again.user_attrs["duplicate_of"] == 1
    assert again.values == first.values  # the sampler learns the same figures
    assert again.user_attrs["compile_s"] == first.user_attrs["compile_s"]  # nothing rebuilt
    assert not (out / "trials" / "0003" / "model.pt").exists()
    assert [p["trial"] for p in data["points"]].count(3) == 0  # the front lists it once


def test_front_points_within_the_budget_get_recovery_steps_after_the_search(tmp_path):
    """Every candidate is ranked on its short fine-tune (what the sampler learns); once the
    search is over, each compressed front point within the budget is fine-tuned
    `recover_steps` more, the front reports those figures, and the weights a user loads and
    exports are the recovered ones."""
    from search.core.data import evaluate
    from search.core.task import load_task
    from search.study.recovery import recover_front
    from search.study.runfolder import load_trial_model

    out = tmp_path / "r"
    data = run_tiny(out, budget_ms=1e6, trials=3, seeds=[{}, {"bits": 8}, {"rank": 0.25}],
                    sensitivity=False, recover_steps=7)
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{out / 'study.db'}")
    recovered = study.user_attrs["front_recovered"]
    front = {p["trial"]: p for p in data["points"]}
    base = next(t.number for t in study.trials if t.user_attrs["uncompressed"])
    assert str(base) not in recovered  # the uncompressed model keeps the task's weights
    compressed = [n for n in front if n != base]
    assert compressed and all(front[n]["recovered_steps"] == 7 for n in compressed)
    assert set(recovered) <= {str(t.number) for t in study.trials}
    task = load_task("tests.tasks:tiny")
    for n in compressed:
        r, trial = recovered[str(n)], study.trials[n]
        assert r["short_val_accuracy"] == trial.values[0]  # the sampler saw the short figure
        assert front[n]["val_accuracy"] == r["val_accuracy"]
        model, _ = load_trial_model(out, n, task)  # what `export` writes
        assert evaluate(model, task.test, task.metric) == pytest.approx(r["test_accuracy"])
        assert front[n]["test_accuracy"] == r["test_accuracy"]
    info = RunInfo.load(out)  # resumed: what is done is kept, nothing is fine-tuned again
    again = recover_front(study, out, task, info.config, info.budget_ms, info.store(out))
    assert again == recovered

    strict = tmp_path / "s"
    data = run_tiny(strict, budget_ms=1e-6, trials=2, seeds=[{}, {"bits": 8}],
                    sensitivity=False, recover_steps=7)  # nothing within the budget
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{strict / 'study.db'}")
    assert not study.user_attrs.get("front_recovered")
    assert all(p["recovered_steps"] == 0 for p in data["points"])


def test_recovery_steps_go_to_in_budget_points_on_or_within_the_margin_of_the_front():
    from search.backend.provenance import Provenance
    from search.study.points import Point
    from search.study.recovery import due

    def point(trial: int, val: float, ms: float, size: int = 100, feasible: bool = True,
              policy: dict | None = None) -> Point:
        return Point(trial, val, val, ms, ms, ms, Provenance.timed("host", 1, 1), size, 10, 10,
                     feasible, {"fc": {"rank": 0.5}} if policy is None else policy)

    points = [point(0, 0.99, 9.0, 900, feasible=False, policy={"fc": {}}),  # uncompressed
              point(1, 0.80, 1.0),  # the front
              point(2, 0.79, 2.0),  # dominated by #1, but only by 0.01: may overtake
              point(3, 0.70, 2.0),  # dominated by 0.10: no
              point(4, 0.85, 3.0, feasible=False),  # over the budget: no
              point(5, 0.78, 0.5)]  # the front
    assert [p.trial for p in due(points, {}, margin=0.02)] == [5, 1, 2]  # fastest first
    assert [p.trial for p in due(points, {}, margin=0.0)] == [5, 1]  # the front alone
    assert [p.trial for p in due(points, {"1": {}, "5": {}}, margin=0.02)] == [2]  # done: kept


def test_front_points_on_transferred_schedules_are_tuned_and_timed_again(tmp_path,
                                                                         monkeypatch):
    """A trial's kernels the library lacks run a neighbour's schedule (transfer); before the
    front is written, the feasible front points that did are tuned and timed again, so the
    figures a user picks from (and exports) are on their own tuned kernels; front.json says
    how far the transferred figures were."""
    # a library of this run's own (what other tests tuned would cover the seeds' kernels)
    monkeypatch.setenv("SEARCH_CACHE_DIR", str(tmp_path / "cache"))
    data = run_tiny(tmp_path / "r", budget_ms=1000.0, trials=4, tune_trials_per_task=2,
                    sensitivity=False, ip_seeds=[])
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{tmp_path / 'r/study.db'}")
    during = {t.number: t.user_attrs["latency_source"]["tuning"] for t in study.trials
              if t.state == optuna.trial.TrialState.COMPLETE}
    moved = {n for n, tuning in during.items() if "transferred(" in tuning}
    assert moved  # the seeds met kernels the baseline's tuning did not cover
    rows = {r["point"]: r for r in data["transfer"]["points"] if "error" not in r}
    for p in data["points"]:
        assert "transferred(" not in p["latency_source"]["tuning"], p
        if p["trial"] in moved:  # timed again on tuned kernels: that figure is the point's
            assert p["latency_ms"] == rows[p["trial"]]["measured_ms"]
            assert rows[p["trial"]]["transferred_ms"] == study.trials[p["trial"]].values[1]
    assert data["transfer"]["error"]["n"] == len(rows) >= 1
