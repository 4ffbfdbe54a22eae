"""Every knob on every built-in model: the compressed model runs, exports to TVM, compiles, gives
PyTorch's outputs, and its parameters / stored size move the way the knob says."""

from __future__ import annotations

import pytest
import torch

from search.compile import Compiler, to_relax
from search.compress import build, model_stats, output_tolerance
from search.measure import run_and_time
from search.policy import Policy, derive_space, uniform
from search.target import Measurement, load_target
from search.task import digits, digits_mobilenet, digits_resnet, digits_transformer

MODELS = {
    "digits": lambda: digits(width=64, epochs=1),
    "resnet": lambda: digits_resnet(width=16, epochs=1),
    "mobilenet": lambda: digits_mobilenet(width=8, epochs=1),
    "transformer": lambda: digits_transformer(dim=32, epochs=1),
}
# knob -> (uniform policy arguments, what must shrink, what must stay)
KNOBS = {
    "rank": ({"rank": 0.0625}, ["params", "flops", "size_bytes"], []),
    "sparsity": ({"sparsity": 0.75}, ["params", "flops", "size_bytes"], []),
    "sparsity-taylor": ({"sparsity": 0.5, "importance": "taylor"},
                        ["params", "flops", "size_bytes"], []),
    "sparsity-fisher": ({"sparsity": 0.5, "importance": "fisher"},
                        ["params", "flops", "size_bytes"], []),
    "bits16": ({"bits": 16}, ["size_bytes"], ["params", "flops"]),
    "bits8": ({"bits": 8}, ["size_bytes"], ["params", "flops"]),
    "prune": ({"prune": 0.9}, ["size_bytes"], ["params", "flops"]),
    "share": ({"share": 2}, ["size_bytes"], ["params", "flops"]),
    "split": ({"rank": 0.25, "split": "spatial"}, ["params", "flops", "size_bytes"], []),
    "threshold": ({"threshold": 0.8}, ["params", "flops", "size_bytes"], []),
    "rank+int4": ({"rank": 0.25, "bits": 4}, ["params", "flops", "size_bytes"], []),
    "bits4": ({"bits": 4}, ["size_bytes"], ["params", "flops"]),
    "ternary": ({"bits": 2}, ["size_bytes"], ["params", "flops"]),
    "binary": ({"bits": 1}, ["size_bytes"], ["params", "flops"]),
    "bf16": ({"bits": 16, "half": "bf16"}, ["size_bytes"], ["params", "flops"]),
    "nm2:4": ({"nm": "2:4"}, ["size_bytes"], ["params", "flops"]),
}


@pytest.fixture(scope="module")
def tasks():
    return {name: make() for name, make in MODELS.items()}


@pytest.fixture(scope="module")
def compiler(tmp_path_factory):
    return Compiler(load_target("host"), tmp_path_factory.mktemp("db"), trials_per_task=0)


@pytest.mark.parametrize("knob", list(KNOBS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_knob_on_model(tasks, compiler, model_name, knob):
    task = tasks[model_name]
    space = derive_space(task.model, task.example, choices={})  # every value of every knob
    args, shrink, same = KNOBS[knob]
    policy = uniform(space, **args)
    if policy == uniform(space):
        pytest.skip(f"{knob} does not apply to any layer of {model_name}")
    base = model_stats(task.model, Policy(), task.example)
    model = build(task.model, policy, task.example, task.train)
    stats = model_stats(model, policy, task.example)
    for field in shrink:
        assert getattr(stats, field) < getattr(base, field), field
    for field in same:
        assert getattr(stats, field) == getattr(base, field), field
    with torch.no_grad():
        ref = model(*task.example)
    compiled = compiler.compile(to_relax(model, task.example))
    lat = run_and_time(compiled.executable, task.example, ref, Measurement(1, 1, 1),
                       atol=output_tolerance(policy))
    assert lat.median_ms > 0


def test_every_knob_applies_somewhere_on_each_model(tasks):
    """Each model has layers to factorize and channel groups that can go (the residual and
    depthwise models: inside the blocks and across the skip adds; the transformer: its
    feed-forward)."""
    for name, task in tasks.items():
        space = derive_space(task.model, task.example)
        assert any(len(s.choices("sparsity")) > 1 for s in space), name
        assert any(len(s.choices("rank")) > 1 for s in space), name
