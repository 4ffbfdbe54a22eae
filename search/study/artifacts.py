"""A trial's files (fine-tuned weights, policy, result, fine-tune log) in Optuna's artifact
store, so any machine that reaches the study's storage and the store rebuilds a point, and
optuna-dashboard lists them (`optuna-dashboard URL --artifact-dir DIR`).

The store is named by a location: a folder (`FileSystemArtifactStore`; a shared path such as
an NFS mount when workers run on several hosts) or `s3://BUCKET` (`Boto3ArtifactStore`, with
boto3's usual credentials; `AWS_ENDPOINT_URL` for an S3-compatible server such as MinIO).
A run folder's `trials/NNNN/` is this host's cache of them.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterable
from pathlib import Path

import optuna
from optuna.artifacts import (
    Boto3ArtifactStore,
    FileSystemArtifactStore,
    download_artifact,
    get_all_artifact_meta,
    upload_artifact,
)
from optuna.artifacts.exceptions import ArtifactNotFound

from search.core.errors import UserError
from search.core.files import writable_folder

ArtifactStore = FileSystemArtifactStore | Boto3ArtifactStore
DEFAULT_FOLDER = "artifacts"  # inside the run folder, unless `--artifacts` names another place
WEIGHTS = ("model.pt", "trainable.pt")  # kept for front points only (see report.front)


def open_store(location: str) -> ArtifactStore:
    """The artifact store at `location` (a folder, created if missing, or s3://BUCKET)."""
    if location.startswith("s3://"):
        bucket, _, prefix = location[len("s3://"):].partition("/")
        if not bucket or prefix.strip("/"):
            raise UserError(f"artifact store {location!r}: an S3 store is a whole bucket, "
                            f"s3://BUCKET (Optuna keys artifacts by id)")
        try:
            return Boto3ArtifactStore(bucket)
        except ImportError:
            raise UserError(f"artifact store {location!r} needs boto3: pip install boto3") \
                from None
    path = Path(location).expanduser()
    writable_folder(path, "the artifact store", "; pass --artifacts with a folder every "
                    "worker can write (an NFS mount) or s3://BUCKET")
    return FileSystemArtifactStore(path)


def upload_trial_files(store: ArtifactStore, trial: optuna.Trial, paths: list[Path]) -> None:
    """Attach files to a running trial (a finished trial's attrs are frozen)."""
    for path in paths:
        if path.exists():
            upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial)


def study_file_name(trial: int, name: str) -> str:
    """What a trial's file written after the trial finished (`search finetune`) is called
    among the study's own artifacts."""
    return f"trial_{trial:04d}_{name}"


def upload_late_trial_file(store: ArtifactStore, study: optuna.Study, trial: int,
                           path: Path) -> None:
    """A file made for trial `trial` after it finished goes to the study's artifacts, named
    `study_file_name`; the newest one of a name wins."""
    with tempfile.TemporaryDirectory() as tmp:
        named = Path(tmp) / study_file_name(trial, path.name)
        named.symlink_to(path.resolve())
        upload_artifact(artifact_store=store, file_path=str(named), study_or_trial=study)


def _trial_files(study: optuna.Study, trial: int) -> list:
    """The artifact metas of trial number `trial` (KeyError: no such trial)."""
    storage = study._storage  # NOTE: Optuna has no public lookup of a trial by number here
    frozen = storage.get_trial(storage.get_trial_id_from_study_id_trial_number(
        study._study_id, trial))
    return get_all_artifact_meta(frozen, storage=storage)


def _artifact_id(study: optuna.Study, trial: int, name: str) -> str | None:
    late = [m for m in get_all_artifact_meta(study)
            if m.filename == study_file_name(trial, name)]
    if late:
        return late[-1].artifact_id
    own = [m for m in _trial_files(study, trial) if m.filename == name]
    return own[-1].artifact_id if own else None


def fetch_trial_file(study: optuna.Study, store: ArtifactStore, trial: int, name: str,
                     dest: Path) -> Path | None:
    """Download trial `trial`'s file `name` to `dest` (None: the trial has no such file, or
    it was dropped from the store)."""
    try:
        artifact = _artifact_id(study, trial, name)
    except KeyError:  # no such trial number in the study
        return None
    if artifact is None:
        return None
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    try:
        download_artifact(artifact_store=store, file_path=str(partial), artifact_id=artifact)
    except ArtifactNotFound:
        return None
    partial.replace(dest)
    return dest


def drop_trial_files(study: optuna.Study, store: ArtifactStore, trials: Iterable[int],
                     names: tuple[str, ...]) -> None:
    """Remove the trials' files `names` from the store (dominated points' weights), those
    written after they finished (the front's recovery steps) too. The study's own list of
    files is read once, whatever the number of trials."""
    trials = list(trials)
    if not trials:
        return
    late = {study_file_name(t, n) for t in trials for n in names}
    metas = [m for m in get_all_artifact_meta(study) if m.filename in late]
    for trial in trials:
        metas += [m for m in _trial_files(study, trial) if m.filename in names]
    for meta in metas:
        with contextlib.suppress(ArtifactNotFound):
            store.remove(meta.artifact_id)
