"""The integer program's cost, measured: each layer's ops per option, timed alone on the target."""

from __future__ import annotations

import pytest

from search.backend.compile import Compiler
from search.backend.latency_table import LatencyTable
from search.compress.space import derive_space
from search.devices.target import load_target
from search.study.allocate import allocate, options_of
from search.study.layer_cost import measured_options, option_ops
from search.study.sensitivity import LayerSensitivity, Sensitivity

KNOBS = ["rank", "sparsity", "bits"]


@pytest.fixture(scope="module")
def space(tiny_task):
    return derive_space(tiny_task.model, tiny_task.example, None, KNOBS)


@pytest.fixture(scope="module")
def sens(space):
    return Sensitivity(0.9, [LayerSensitivity(ls.name, k, v, 0.001 * i, None, 0.9)
                             for ls in space for k in KNOBS
                             for i, v in enumerate(ls.choices(k)) if i > 0])


def test_the_program_reads_the_costs_it_is_given(tiny_task, space, sens):
    estimate = options_of(tiny_task.model, tiny_task.example, space, KNOBS, sens)
    assert allocate(tiny_task.model, tiny_task.example, space, KNOBS, sens, [0.7])
    # every option as costly as the uncompressed layer: no limit under 1 can be met
    flat = {name: {v: (d, opts[(1.0, 0.0, 32)][1], b) for v, (d, _c, b) in opts.items()}
            for name, opts in estimate.items()}
    assert allocate(tiny_task.model, tiny_task.example, space, KNOBS, sens, [0.7],
                    options=flat) == []


def test_each_option_costs_its_layers_ops_timed_alone_once_per_target(tiny_task, space, sens,
                                                                      tmp_path):
    compiler = Compiler(load_target("host"), tmp_path / "db", trials_per_task=0)
    space = [ls for ls in space if len(ls.choices("rank")) > 1][:2]  # (each op compiles: ~1 s)
    estimate = options_of(tiny_task.model, tiny_task.example, space, KNOBS, sens)
    estimate = {name: {v: c for v, c in opts.items() if v[2] == 32}
                for name, opts in estimate.items()}
    measured, how = measured_options(tiny_task, KNOBS, estimate, compiler)
    table = LatencyTable.for_compiler(compiler)
    assert how["measured_now"] == how["ops"] == len(table.layers) > 0
    assert how["source"] == "measured:host:layer ops alone" and how["tuning"] == ["untuned"]
    for name, options in measured.items():
        full = options[(1.0, 0.0, 32)][1]
        assert full > 0
        for values, (drop, ms, size) in options.items():
            assert (drop, size) == (estimate[name][values][0], estimate[name][values][2])
            assert ms > 0 and ms != estimate[name][values][1]  # milliseconds, not MACs
    # a factorized layer is two ops: its cost is both their timings summed
    ls = next(ls for ls in space if len(ls.choices("rank")) > 1)
    low = (min(ls.choices("rank")), 0.0, 32)
    ops = option_ops(tiny_task, KNOBS, {ls.name: estimate[ls.name]}, table.int8_kind)
    assert len(ops[(ls.name, low)]) == 2 and len(ops[(ls.name, (1.0, 0.0, 32))]) == 1
    assert measured[ls.name][low][1] == pytest.approx(
        sum(table.layers[op.key]["ms"] for op in ops[(ls.name, low)]))
    # the table is kept: a second program on the target times nothing again
    again, how2 = measured_options(tiny_task, KNOBS, estimate, compiler)
    assert how2["measured_now"] == 0 and again == measured
    # and the program's limit holds in measured milliseconds
    total = sum(opts[(1.0, 0.0, 32)][1] for opts in measured.values())
    cheapest = sum(min(ms for _d, ms, _b in opts.values()) for opts in measured.values())
    limit = (1 + cheapest / total) / 2  # between the cheapest policy and none: one exists
    (a,) = allocate(tiny_task.model, tiny_task.example, space, KNOBS, sens, [limit],
                    options=measured)
    chosen = sum(measured[n][(lp.rank, lp.sparsity, lp.bits)][1]
                 for n, lp in a.policy.layers.items())
    assert chosen <= limit * total * (1 + 1e-9) and a.cost_fraction == pytest.approx(chosen / total)
