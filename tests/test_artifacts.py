"""A trial's files in Optuna's artifact store: a folder, or an S3 bucket (moto's in-process S3
here): written while the trial runs, fetched back by number from the study alone, dropped."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from search.study.artifacts import (
    drop_trial_files,
    fetch_trial_file,
    open_store,
    upload_late_trial_file,
    upload_trial_files,
)


def round_trip(store, tmp_path: Path) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    made = tmp_path / "made"
    made.mkdir()
    (made / "model.pt").write_bytes(b"weights of trial 0")
    (made / "policy.yaml").write_text("layers: {}\n")
    trial = study.ask()
    upload_trial_files(store, trial, [made / "model.pt", made / "policy.yaml",
                                      made / "missing.pt"])  # (a file not written: skipped)
    study.tell(trial, 1.0)
    back = tmp_path / "elsewhere" / "trials" / "0000"
    assert fetch_trial_file(study, store, 0, "model.pt", back / "model.pt").read_bytes() == \
        b"weights of trial 0"
    assert fetch_trial_file(study, store, 0, "missing.pt", back / "missing.pt") is None
    assert fetch_trial_file(study, store, 7, "model.pt", back / "x.pt") is None  # no trial 7
    # a file made after the trial finished (search finetune) goes to the study's artifacts
    (made / "finetuned.pt").write_bytes(b"longer")
    upload_late_trial_file(store, study, 0, made / "finetuned.pt")
    assert fetch_trial_file(study, store, 0, "finetuned.pt", back / "finetuned.pt") \
        .read_bytes() == b"longer"
    (made / "late").mkdir()
    (made / "late" / "model.pt").write_bytes(b"recovered")  # the front's recovery steps
    upload_late_trial_file(store, study, 0, made / "late" / "model.pt")
    assert fetch_trial_file(study, store, 0, "model.pt", back / "model.pt").read_bytes() == \
        b"recovered"  # the newest of a name wins
    other = study.ask()  # a second trial, with a late file too: not dropped with trial 0's
    (made / "one").mkdir()
    (made / "one" / "model.pt").write_bytes(b"weights of trial 1")
    upload_trial_files(store, other, [made / "one" / "model.pt"])
    study.tell(other, 0.5)
    (made / "one" / "late").mkdir()
    (made / "one" / "late" / "model.pt").write_bytes(b"trial 1 recovered")
    upload_late_trial_file(store, study, 1, made / "one" / "late" / "model.pt")
    drop_trial_files(study, store, [0], ("model.pt",))  # off the front: its weights go, all
    assert fetch_trial_file(study, store, 0, "model.pt", back / "gone.pt") is None
    assert fetch_trial_file(study, store, 1, "model.pt", back / "one.pt").read_bytes() == \
        b"trial 1 recovered"
    drop_trial_files(study, store, [], ("model.pt",))  # nothing to drop: nothing read
    drop_trial_files(study, store, [1], ("model.pt",))
    assert fetch_trial_file(study, store, 1, "model.pt", back / "one.pt") is None
    assert fetch_trial_file(study, store, 0, "policy.yaml", back / "policy.yaml") is not None
    assert not list(back.glob("*.partial"))


def test_a_folder_store_round_trips_a_trials_files(tmp_path):
    round_trip(open_store(str(tmp_path / "store")), tmp_path)


def test_an_s3_store_round_trips_a_trials_files(tmp_path, monkeypatch):
    boto3 = pytest.importorskip("boto3")
    moto = pytest.importorskip("moto")
    for key, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(key, value)
    with moto.mock_aws():
        boto3.client("s3").create_bucket(Bucket="runs")
        round_trip(open_store("s3://runs"), tmp_path)
