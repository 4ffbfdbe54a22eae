"""General tasks through the whole path (sensitivity, channel groups, fine-tune, compile, measure,
export): integer two-input encoders with an attention mask, DataLoader-fed data, dict outputs, a
custom loss, and the Python API (the README's example)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from search import Task, open_front, search
from search.compress.build import output_tolerance
from search.compress.channels import channel_groups
from search.compress.policy import Policy
from search.core.data import Split, evaluate
from search.core.errors import UserError
from tests import tasks

ROOT = Path(__file__).resolve().parent.parent
QUICK = {"trials": 5, "finetune_steps": 4, "tune_trials_per_task": 0, "startup_trials": 2}


def compressed_front_point(front) -> int:
    """A front point that is not the uncompressed model (the seeds make sure one exists)."""
    base = front.baseline.trial
    points = [p.trial for p in front.points if p.trial != base]
    assert points, "the front holds only the uncompressed model"
    return points[0]


def check_export(front, trial: int, tmp_path: Path) -> None:
    exported = front.export(trial, tmp_path / "export")
    assert exported.tvm_library.stat().st_size > 0
    sess = ort.InferenceSession(str(exported.onnx), providers=["CPUExecutionProvider"])
    task = front.task
    assert len(sess.get_inputs()) == len(task.example)  # every input, by name
    feed = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), task.example, strict=True)}
    model = front.model(trial)
    with torch.no_grad():
        ref = model(*task.example).numpy()
    policy = Policy.load(front.run_dir / "trials" / f"{trial:04d}" / "policy.yaml")
    assert np.allclose(sess.run(None, feed)[0], ref, atol=output_tolerance(policy))


def test_an_integer_two_input_encoder_goes_through_the_whole_path(tmp_path):
    task = tasks.encoder()
    assert all(not t.is_floating_point() for t in task.example)
    groups = channel_groups(task.model, task.example)
    # q/k/v keep their width (no head mixing); the feed-forward is prunable
    assert "intermediate" in groups
    assert not {"attention.query", "attention.key", "attention.value"} & set(groups)
    front = search("tests.tasks:encoder", "host", "50ms", out=tmp_path / "run", progress=False,
                   **QUICK)
    sens = json.loads((tmp_path / "run" / "sensitivity.json").read_text())
    assert sens["entries"] and sens["method"]["metric_split"] == "val"
    assert front.data["trials"]["complete"] == 5
    assert all(p.latency_source.label.startswith("measured:host") for p in front.points)
    trial = compressed_front_point(front)
    check_export(front, trial, tmp_path)
    from search.report.show import show

    text = show(tmp_path / "run", trial)  # `search show`: layer by layer, two integer inputs
    assert "intermediate" in text and "attention.query" in text
    with pytest.raises(UserError, match="no test split"):
        Task("x", task.model, task.train.tensors, task.val.tensors, task.example)


def test_a_dict_output_model_is_scored_and_compiled_on_the_selected_output(tmp_path):
    task = tasks.dict_encoder()
    out = task.model(*task.example)
    assert isinstance(out, torch.Tensor) and out.shape == (1, 2)  # the selected "logits"
    assert [n for n, _ in task.model.named_modules()][1] == "embed"  # layer names kept
    front = search(task, "host", "50ms", out=tmp_path / "run", progress=False, **QUICK)
    check_export(front, compressed_front_point(front), tmp_path)
    with pytest.raises(UserError, match="not one of the model's outputs"):
        Task("x", tasks.TinyEncoder(as_dict=True).eval(), task.train.tensors,
             task.val.tensors, task.example, test=task.test.tensors, output="nope")


def test_a_dataloader_fed_task_is_never_materialized(tmp_path):
    task = tasks.loader_task()
    assert not task.train.in_memory and not task.test.in_memory
    # a DataLoader's split gives the same metric as the same data in memory
    (x,), y = tasks.tiny().test.tensors
    assert evaluate(task.model, task.test, task.metric) == pytest.approx(
        evaluate(task.model, Split((x, y)), task.metric))
    front = search("tests.tasks:loader_task", "host", "0.5ms", out=tmp_path / "run",
                   progress=False, **QUICK)
    assert front.data["trials"]["complete"] == 5
    check_export(front, compressed_front_point(front), tmp_path)


def test_a_custom_loss_is_what_the_fine_tune_and_importance_use(tmp_path):
    tasks.LOSS_CALLS["n"] = 0
    task = tasks.custom_loss_task()
    search(task, "host", "0.5ms", out=tmp_path / "run", progress=False,
           knobs=["rank", "sparsity", "importance", "bits"], **QUICK)
    # at least the Fisher pass and every fine-tune step of the 4 compressed trials
    assert tasks.LOSS_CALLS["n"] >= 4 * QUICK["finetune_steps"]


def test_validation_chooses_and_test_reports(tmp_path):
    front = search("tests.tasks:tiny", "host", "0.5ms", out=tmp_path / "run", progress=False,
                   **QUICK)
    data = json.loads((tmp_path / "run" / "front.json").read_text())
    task = front.task
    for p in data["points"]:
        assert {"test_accuracy", "val_accuracy"} <= set(p)
        model = front.model(p["trial"])
        assert p["test_accuracy"] == pytest.approx(evaluate(model, task.test, task.metric))
        assert p["val_accuracy"] == pytest.approx(evaluate(model, task.val, task.metric))
    assert "test %" in front.table()
    # the sampler's objective is the validation accuracy
    import optuna

    study = optuna.load_study(study_name="search",
                              storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    for t in study.trials:
        if t.state == optuna.trial.TrialState.COMPLETE:
            assert t.values[0] == t.user_attrs["val_accuracy"]


def test_a_long_fine_tune_of_a_point_is_what_export_writes(tmp_path):
    front = search("tests.tasks:tiny", "host", "0.5ms", out=tmp_path / "run", progress=False,
                   **QUICK)
    trial = compressed_front_point(front)
    before = front.model(trial).state_dict()
    done = front.finetune(trial, steps=30)
    assert done.test_before == pytest.approx(
        next(p.test_accuracy for p in front.points if p.trial == trial))
    after = front.model(trial)  # reloaded: the fine-tuned weights
    changed = [k for k, v in after.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, before[k])]
    assert changed
    assert done.test_after == pytest.approx(evaluate(after, front.task.test, front.task.metric))
    check_export(front, trial, tmp_path)
    with pytest.raises(UserError, match="uncompressed"):
        front.finetune(front.baseline.trial, steps=5)


def test_the_readme_python_example_runs(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    example = next(b for b in blocks if "from search import" in b)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    front = namespace["front"]
    assert front.points and (tmp_path / "runs").exists()


def test_a_run_from_a_task_object_says_how_to_reopen_it(tmp_path):
    task = tasks.tiny()
    search(task, "host", "0.5ms", out=tmp_path / "run", progress=False, **QUICK)
    with pytest.raises(UserError, match="open_front"):
        open_front(tmp_path / "run").model(0)
    assert open_front(tmp_path / "run", task).model(0) is not None
