"""The per-layer latency table: each op measured once, predictions need no compile, and they
follow the whole model's measured latency (untuned compiles: structure, not speed figures)."""

from __future__ import annotations

import multiprocessing
import statistics
from pathlib import Path

import pytest
import torch
from torch import nn

from search.backend.compile import Compiler
from search.backend.int8 import int8_kind
from search.backend.latency_table import (
    LatencyTable,
    MissingLayers,
    deployed_form,
    error_report,
    layer_ops,
    verify_front,
)
from search.backend.measure import compile_and_time
from search.compress.build import build, restructure
from search.compress.int8 import ActQuant, Int8Linear
from search.compress.policy import LayerPolicy, Policy
from search.compress.precision import Half
from search.compress.space import derive_space, uniform
from search.devices.target import Measurement, load_target

FAST = Measurement(number=3, repeat=5, min_repeat_ms=20)  # the machine is shared: not 5 ms


@pytest.fixture(scope="module")
def untuned(tmp_path_factory) -> Compiler:
    return Compiler(load_target("host"), tmp_path_factory.mktemp("db"), trials_per_task=0)


@pytest.fixture(scope="module")
def models(tiny_task) -> dict[str, nn.Module]:
    space = derive_space(tiny_task.model, tiny_task.example)
    return {name: build(tiny_task.model, uniform(space, **knobs), tiny_task.example)
            for name, knobs in (("base", {}), ("rank", {"rank": 0.125}), ("fp16", {"bits": 16}))}


@pytest.fixture(scope="module")
def table(untuned, models, tiny_task) -> LatencyTable:
    """A table that has measured the uncompressed and rank-0.125 models' ops, and learned the
    residual from the uncompressed model measured whole."""
    t = LatencyTable.for_compiler(untuned)
    x = tiny_task.example
    t.measure_missing(models["base"], x, untuned, settings=FAST)
    whole = compile_and_time(models["base"], x, untuned, settings=FAST).latency
    t.record_whole(models["base"], x, whole.median_ms, family="tiny")
    t.measure_missing(models["rank"], x, untuned, settings=FAST)
    return t


def test_ops_are_the_deployed_layers_with_their_real_inputs(models, tiny_task):
    base = layer_ops(models["base"], tiny_task.example)
    assert len(base) == 5  # conv1, conv2, fc1, fc2, fc3
    assert "conv2d(out=64,k=3x3" in base[1].key and "in=1x32x16x16:float32" in base[1].key
    assert "linear(out=64" in base[2].key and "in=1x4096:float32" in base[2].key
    rank = layer_ops(models["rank"], tiny_task.example)
    assert len(rank) > len(base)  # each factorized layer is two ops
    half = layer_ops(models["fp16"], tiny_task.example)
    assert len(half) == 5 and all("half[float16]" in op.key for op in half)
    assert {op.key for op in half}.isdisjoint(op.key for op in base)


def test_each_op_is_measured_once_and_reused(table, untuned, models, tiny_task):
    x = tiny_task.example
    assert table.measured == len({op.key for m in ("base", "rank")
                                  for op in layer_ops(models[m], x)})  # shared ops once
    assert table.missing(models["base"], x) == [] and table.missing(models["rank"], x) == []
    assert table.measure_missing(models["rank"], x, untuned, settings=FAST) == []
    again = LatencyTable(table.path, "host")  # another process: same file
    assert again.missing(models["base"], x) == []
    entry = next(iter(again.layers.values()))
    assert entry["tuning"] == "untuned" and entry["source"]["method"] == "measured"
    # tuned entries wanted (a tuning compiler): the untuned ones count as missing
    assert len(again.missing(models["base"], x, tuned=True)) == 5


def test_prediction_compiles_nothing(table, untuned, models, tiny_task, monkeypatch):
    def no_compile(*a, **k):
        raise AssertionError("predict compiled something")

    monkeypatch.setattr(untuned, "compile", no_compile)
    p = table.predict(models["rank"], tiny_task.example, family="tiny")
    assert p.source.label == "predicted:host:untuned" and p.source.estimate
    assert p.residual_from == 0 and p.ms == p.layer_sum_ms  # one whole model: not used yet
    assert len(p.per_layer) == len(layer_ops(models["rank"], tiny_task.example))
    with pytest.raises(MissingLayers) as info:  # its fp16 ops were never measured
        table.predict(models["fp16"], tiny_task.example)
    assert len(info.value.keys) == 5


def test_prediction_follows_the_measured_whole_model(table, untuned, models, tiny_task):
    x = tiny_task.example
    base = table.predict(models["base"], x, family="tiny")
    rank = table.predict(models["rank"], x, family="tiny")
    assert rank.ms < base.ms  # a rank-0.125 model is predicted faster
    measured = compile_and_time(models["rank"], x, untuned, settings=FAST).latency
    # untuned kernels on a shared machine: a loose factor (bench/bench_predict.py: the figures)
    assert measured.median_ms / 4 < rank.ms < measured.median_ms * 4
    # the residual: the median of (measured - op sum), used once 3 models were measured whole
    family = "tiny+rank"
    residuals = [table.record_whole(models["base"], x, base.layer_sum_ms + 0.5, family=family),
                 table.record_whole(models["rank"], x, rank.layer_sum_ms - 0.1, family=family)]
    assert table.residual(family) == (0.0, 0)
    residuals.append(table.record_whole(models["rank"], x, measured.median_ms, family=family))
    residual, n = table.residual(family)
    assert n == 3 and residual == pytest.approx(statistics.median(residuals))
    p = table.predict(models["rank"], x, family=family)
    assert p.ms == pytest.approx(rank.layer_sum_ms + max(residual, -0.5 * rank.layer_sum_ms))


def test_16_bit_and_int8_ops_are_measured_as_compiled(untuned, tmp_path):
    torch.manual_seed(0)
    table = LatencyTable(tmp_path / "layers.json", "host", int8_kind(untuned.target))
    model = nn.Sequential(Half(nn.Linear(32, 16)), nn.ReLU(),
                          Int8Linear(nn.Linear(16, 8), ActQuant(0.05, 0)))
    x = torch.randn(1, 32)
    keys = table.measure_missing(model, x, untuned, settings=FAST)
    assert len(keys) == 2 and "half[float16]" in keys[0]
    assert f"int8linear[{table.int8_kind}]" in keys[1]  # lowered to the target's int8 form
    assert table.predict(model, x).ms > 0


def test_deployed_form_has_the_ops_of_the_fine_tuned_model(tiny_task):
    """Before the fine-tune: the structure and precision the deployed model will have."""
    task = tiny_task
    policy = Policy({"conv2": LayerPolicy(bits=16), "fc1": LayerPolicy(rank=0.25, bits=8),
                     "fc2": LayerPolicy(bits=8), "fc3": LayerPolicy(bits=8, share=4)})
    before = deployed_form(restructure(task.model, policy, task.example, task.train), policy,
                           task.train)
    after = build(task.model, policy, task.example, task.train)
    keys = [op.key for op in layer_ops(before, task.example)]
    assert keys == [op.key for op in layer_ops(after, task.example)]
    assert any("half[" in k for k in keys) and sum("int8linear[" in k for k in keys) == 3


def test_front_points_are_measured_whole_and_teach_the_residual(table, untuned, models,
                                                                tiny_task):
    x = tiny_task.example
    predicted = table.predict(models["rank"], x, family="front")
    assert predicted.residual_from == 0
    rows, report = verify_front([(7, models["rank"], predicted.ms, 1e-3)], x, table, untuned,
                                family="front", settings=FAST)
    assert rows[0]["point"] == 7 and rows[0]["source"]["tuning"] == "untuned"
    assert report["n"] == 1 and report["median_abs_rel_error"] == pytest.approx(
        abs(rows[0]["rel_error"]))
    assert len(table.records("front")) == 1  # recorded after the error was taken


def _writer(path: str, worker: int) -> None:
    table = LatencyTable(Path(path))
    for i in range(15):
        table._update(lambda d, k=f"w{worker}-{i}": d["layers"].__setitem__(
            k, {"ms": 1.0, "tuning": "untuned"}))


def test_parallel_writers_lose_nothing(tmp_path):
    path = tmp_path / "layers.json"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(path), w)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert all(p.exitcode == 0 for p in procs)
    assert len(LatencyTable(path).layers) == 45


def test_error_report():
    r = error_report([(1.1, 1.0), (0.9, 1.0), (2.0, 2.0), (1.5, 1.0)])
    assert r["n"] == 4
    assert r["median_abs_rel_error"] == pytest.approx(0.1)
    assert r["max_abs_rel_error"] == pytest.approx(0.5)
    assert 0.1 < r["p95_abs_rel_error"] <= 0.5
    assert error_report([]) == {"n": 0}
