"""Every knob on every built-in model: the compressed model runs, exports to TVM, compiles, gives
PyTorch's outputs, and its parameters / stored size move the way the knob says."""

from __future__ import annotations

import pytest
import torch

from search.backend.compile import Compiler, to_relax
from search.backend.measure import run_and_time
from search.compress.build import build, output_tolerance
from search.compress.policy import Policy
from search.compress.size import model_stats
from search.compress.space import derive_space, uniform
from search.devices.target import Measurement, load_target
from search.tasks.digits import digits, digits_mobilenet, digits_resnet, digits_transformer

MODELS = {
    "digits": lambda: digits(width=64, epochs=1),
    "resnet": lambda: digits_resnet(width=16, epochs=1),
    "mobilenet": lambda: digits_mobilenet(width=8, epochs=1),
    "transformer": lambda: digits_transformer(dim=32, epochs=1),
}
# knob -> (uniform policy arguments, what must shrink, what must stay)
KNOBS = {
    "rank": ({"rank": 0.0625}, ["params", "flops", "ideal_size_bytes"], []),
    "sparsity": ({"sparsity": 0.75}, ["params", "flops", "ideal_size_bytes"], []),
    "sparsity-taylor": ({"sparsity": 0.5, "importance": "taylor"},
                        ["params", "flops", "ideal_size_bytes"], []),
    "sparsity-fisher": ({"sparsity": 0.5, "importance": "fisher"},
                        ["params", "flops", "ideal_size_bytes"], []),
    "bits16": ({"bits": 16}, ["ideal_size_bytes"], ["flops"]),  # (a BatchNorm folds too)
    "bits8": ({"bits": 8}, ["ideal_size_bytes"], ["flops"]),  # (a BatchNorm folds: fewer params)
    "prune": ({"prune": 0.9}, ["ideal_size_bytes"], ["params", "flops"]),
    "share": ({"share": 2}, ["ideal_size_bytes"], ["params", "flops"]),
    "split": ({"rank": 0.25, "split": "spatial"}, ["params", "flops", "ideal_size_bytes"], []),
    "threshold": ({"threshold": 0.8}, ["params", "flops", "ideal_size_bytes"], []),
    "rank+int4": ({"rank": 0.25, "bits": 4}, ["params", "flops", "ideal_size_bytes"], []),
    "bits4": ({"bits": 4}, ["ideal_size_bytes"], ["params", "flops"]),
    "ternary": ({"bits": 2}, ["ideal_size_bytes"], ["params", "flops"]),
    "binary": ({"bits": 1}, ["ideal_size_bytes"], ["params", "flops"]),
    "bf16": ({"bits": 16, "half": "bf16"}, ["ideal_size_bytes"], ["flops"]),
    "nm2:4": ({"nm": "2:4"}, ["ideal_size_bytes"], ["params", "flops"]),
}


@pytest.fixture(scope="module")
def tasks():
    return {name: make() for name, make in MODELS.items()}


@pytest.fixture(scope="module")
def compiler(tmp_path_factory):
    return Compiler(load_target("host"), tmp_path_factory.mktemp("db"), trials_per_task=0)


def check_knob_contract(task, compiler, args: dict, shrink: list[str], same: list[str]) -> None:
    """The contract every knob meets on a model: a uniform policy of `args` builds a model whose
    `shrink` stats are smaller and `same` stats equal, and that TVM compiles and runs with
    PyTorch's outputs. Skips when the knob applies to no layer of the model."""
    space = derive_space(task.model, task.example, choices={})  # every value of every knob
    policy = uniform(space, **args)
    if policy == uniform(space):
        pytest.skip(f"{args} does not apply to any layer of {task.name}")
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


@pytest.mark.parametrize("knob", list(KNOBS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_knob_on_model(tasks, compiler, model_name, knob):
    check_knob_contract(tasks[model_name], compiler, *KNOBS[knob])


def test_every_knob_applies_somewhere_on_each_model(tasks):
    """Each model has layers to factorize and channel groups that can go (the residual and
    depthwise models: inside the blocks and across the skip adds; the transformer: its
    feed-forward)."""
    for name, task in tasks.items():
        space = derive_space(task.model, task.example)
        assert any(len(s.choices("sparsity")) > 1 for s in space), name
        assert any(len(s.choices("rank")) > 1 for s in space), name


ARTIFACT_KNOBS = {  # knob -> uniform policy; the artifact's weights by dtype must show it
    "none": ({}, {"float32"}),
    "rank": ({"rank": 0.25}, {"float32"}),
    "sparsity": ({"sparsity": 0.5}, {"float32"}),
    "bits8": ({"bits": 8}, {"float32", "int8"}),  # on the transformer: int8 Linears
    "bits8-conv": ({"bits": 8}, {"float32", "int8"}),  # on the CNN: int8 convs
    "fp16": ({"bits": 16}, {"float16", "float32"}),
    "bf16": ({"bits": 16, "half": "bf16"}, {"bfloat16", "float32"}),
    "bits4": ({"bits": 4}, {"float32"}),  # stored fp32: 4-bit values are not written packed
    "prune": ({"prune": 0.9}, {"float32"}),  # stored dense: no sparse format is written
    "nm": ({"nm": "2:4"}, {"float32"}),
    "share": ({"share": 2}, {"float32"}),  # stored fp32: the codebook form is not written
}


@pytest.mark.parametrize("knob", list(ARTIFACT_KNOBS))
def test_the_size_a_trial_reports_is_what_the_written_library_carries(tasks, compiler, knob,
                                                                      tmp_path):
    """The Compiler's weight bytes (a trial's size_bytes) equal the bytes of the tensors read
    back from the exported library file, for every knob; the ideal size is the estimate."""
    from search.backend.artifact import library_weight_bytes
    from search.compress.size import model_stats

    task = tasks["transformer" if knob == "bits8" else "mobilenet"]
    args, dtypes = ARTIFACT_KNOBS[knob]
    space = derive_space(task.model, task.example, choices={})
    policy = uniform(space, **args)
    model = build(task.model, policy, task.example, task.train)
    compiled = compiler.compile(to_relax(model, task.example))
    compiled.executable.export_library(str(tmp_path / "m.so"))
    written = library_weight_bytes(tmp_path / "m.so")
    assert compiled.weights.total == written.total > 0
    assert compiled.weights.by_dtype == written.by_dtype
    floats = {d for d in written.by_dtype if "float" in d or d.startswith("int8")}
    assert floats == dtypes, written.by_dtype  # (small int64 index constants aside)
    if knob == "bits8-conv":  # every int8 conv's weights are written as int8 (VNNI pads N to 16)
        int8_weights = sum(m.weight_q.numel() for m in model.modules() if hasattr(m, "weight_q"))
        assert int8_weights > 0 and written.by_dtype["int8"] >= int8_weights
    ideal = model_stats(model, policy, task.example).ideal_size_bytes
    if knob in ("prune", "share", "bits4"):  # counted in formats that are not written
        assert ideal < 0.5 * written.total
