"""Integer-program seeds: the per-layer choice losing the least (sensitivity) under a cost limit."""

from __future__ import annotations

import pytest

from search.compress.space import derive_space
from search.study.allocate import (
    PRECISION_COST,
    _option_cost,
    _shapes,
    allocate,
    block_of,
    by_threshold,
)
from search.study.sensitivity import LayerSensitivity, Sensitivity

KNOBS = ["rank", "sparsity", "bits"]


def _table(space, harsh: dict[tuple[str, str, object], float]) -> Sensitivity:
    """Every (layer, knob, value) harmless except those in `harsh` (drop)."""
    entries = [LayerSensitivity(ls.name, k, v, harsh.get((ls.name, k, v), 0.001 * i), None, 0.9)
               for ls in space for k in KNOBS for i, v in enumerate(ls.choices(k)) if i > 0]
    return Sensitivity(0.9, entries)


@pytest.fixture(scope="module")
def tiny_space(tiny_task):
    return derive_space(tiny_task.model, tiny_task.example, None, KNOBS)


def _estimate(task, space, policy) -> float:
    modules = dict(task.model.named_modules())
    positions = _shapes(task.model, task.example, [ls.name for ls in space])
    return sum(_option_cost(modules[n], positions[n], lp)[0] for n, lp in policy.layers.items())


def test_each_solution_keeps_its_limit_and_spends_accuracy_where_it_is_cheapest(
        tiny_task, tiny_space):
    first = tiny_space[0].name
    harsh = {(first, "bits", 8): 0.5, (first, "bits", 16): 0.5}  # the first layer hates bits
    sens = _table(tiny_space, harsh)
    sols = allocate(tiny_task.model, tiny_task.example, tiny_space, KNOBS, sens,
                    [0.3, 0.6, 1.0])
    assert sols, "no solution"
    full = _estimate(tiny_task, tiny_space, sols[-1].policy.__class__(
        {ls.name: sols[-1].policy.layers[ls.name].replace(rank=1.0, sparsity=0.0, bits=32)
         for ls in tiny_space}))
    drops = []
    for a in sols:
        cost = _estimate(tiny_task, tiny_space, a.policy)
        assert cost <= a.latency_fraction * full * (1 + 1e-9)  # the limit holds
        assert a.cost_fraction == pytest.approx(cost / full)
        drops.append(a.predicted_drop)
        assert a.policy.layers[first].bits == 32  # never the harsh choice: others are cheaper
    assert drops == sorted(drops, reverse=True)  # a looser limit never loses more
    assert min(drops) == pytest.approx(0.0, abs=1e-12)  # no limit: nothing compressed


def test_a_limit_no_choice_meets_gives_no_seed(tiny_task, tiny_space):
    sens = _table(tiny_space, {})
    assert allocate(tiny_task.model, tiny_task.example, tiny_space, KNOBS, sens, [1e-6]) == []


def test_per_block_gives_every_layer_of_a_block_one_choice(tiny_task, tiny_space):
    assert block_of("features.3.conv.0.0") == "features.3" and block_of("fc1") == "fc1"
    sens = _table(tiny_space, {})
    for a in allocate(tiny_task.model, tiny_task.example, tiny_space, KNOBS, sens, [0.5],
                      per="block"):
        by_block = {}
        for name, lp in a.policy.layers.items():
            by_block.setdefault(block_of(name), set()).add((lp.rank, lp.sparsity, lp.bits))
        assert all(len(v) == 1 for v in by_block.values())


def test_int8_is_estimated_cheaper_and_16_bit_not_cheaper():
    assert PRECISION_COST[8] < PRECISION_COST[32] <= PRECISION_COST[16]


def test_the_threshold_baseline_compresses_each_layer_as_far_as_its_own_drop_allows(
        tiny_task, tiny_space):
    first = tiny_space[0].name
    sens = _table(tiny_space, {(first, "rank", v): 0.3 for v in tiny_space[0].choices("rank")
                               if v != 1.0})
    (_, tight), (_, loose) = by_threshold(tiny_task.model, tiny_task.example, tiny_space,
                                          KNOBS, sens, [0.0, 0.2])
    # 0: only what loses nothing (the identity); 0.2: everything but the first layer's rank
    assert all(lp.is_identity for lp in tight.layers.values())
    assert loose.layers[first].rank == 1.0
    assert _estimate(tiny_task, tiny_space, loose) < 0.5 * _estimate(tiny_task, tiny_space, tight)
    assert any(lp.rank < 1.0 for n, lp in loose.layers.items() if n != first)


def test_drops_below_the_tables_resolution_do_not_make_compression_free(tiny_task, tiny_space):
    """Every drop 0 on 256 examples: the program compresses only as far as the limit asks."""
    entries = [LayerSensitivity(ls.name, k, v, 0.0, None, 0.9)
               for ls in tiny_space for k in KNOBS for v in ls.choices(k)[1:]]
    blind = Sensitivity(0.9, entries)
    counted = Sensitivity(0.9, entries, {"metric_examples": 256})
    (free,) = allocate(tiny_task.model, tiny_task.example, tiny_space, KNOBS, blind, [0.6])
    (kept,) = allocate(tiny_task.model, tiny_task.example, tiny_space, KNOBS, counted, [0.6])
    assert free.cost_fraction < 0.3  # everything looked free: the cheapest of all
    assert 0.3 < kept.cost_fraction <= 0.6 and kept.predicted_drop > 0
