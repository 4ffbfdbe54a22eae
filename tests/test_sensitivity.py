"""The per-layer sensitivity pass: coverage, the Fisher proxy, narrowing, storage, the table."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import search.study.sensitivity as sensitivity_module
from search.compress.build import build
from search.compress.knob import REGISTRY, knob_names
from search.compress.lowrank import top_svd
from search.compress.policy import LayerPolicy, Policy
from search.compress.space import derive_space
from search.core.data import evaluate
from search.study.sensitivity import (
    LayerSensitivity,
    Sensitivity,
    _cost,
    cached_sensitivity,
    effective_weight,
    empirical_fisher,
    fisher_proxy,
    measure_sensitivity,
    narrow_space,
    sensitivity_key,
    sensitivity_table,
)
from search.tasks.digits import digits

DEFAULT_KNOBS = ("rank", "sparsity", "bits")


@pytest.fixture(scope="module")
def task():
    return digits(width=64, epochs=1)


@pytest.fixture(scope="module")
def space(task):
    return derive_space(task.model, task.example)


@pytest.fixture(scope="module")
def sens(task, space):
    """Every knob the policy has, so a new knob is covered without editing this test."""
    return measure_sensitivity(task, space, list(knob_names()))


def _identity(knob):
    return getattr(LayerPolicy(), knob)


def test_covers_every_layer_and_value(space, sens):
    for ls in space:
        for knob in knob_names():
            for value in ls.choices(knob):
                if value == _identity(knob):
                    assert sens.get(ls.name, knob, value) is None
                    continue
                entry = sens.get(ls.name, knob, value)
                skipped = [s for s in sens.skipped if (s["layer"], s["knob"], s["value"])
                           == (ls.name, knob, value)]
                assert entry is not None or skipped, (ls.name, knob, value)
                if knob in DEFAULT_KNOBS:  # the searched-by-default knobs always measure
                    assert entry is not None, (ls.name, knob, value, skipped)
                if entry is not None:
                    assert entry.accuracy_drop == pytest.approx(sens.baseline - entry.metric)
                    assert bool(entry.paired) == bool(REGISTRY[knob].needs)


def test_dependent_knobs_are_paired_with_the_harshest_value(space, sens):
    for e in sens.entries:
        if e.knob == "split":
            ranks = next(ls for ls in space if ls.name == e.layer).choices("rank")
            assert e.paired == {"rank": ranks[-1]}
        if e.knob == "half":
            assert e.paired == {"bits": 16}


def test_fisher_is_none_only_where_the_weight_changes_shape(sens):
    for e in sens.entries:
        if e.knob == "sparsity" or "sparsity" in e.paired:
            assert e.fisher is None, e
        else:
            assert e.fisher is not None and e.fisher >= 0, e


def test_fisher_grows_as_the_rank_shrinks(space, sens):
    checked = 0
    for ls in space:
        ranks = [r for r in ls.choices("rank") if r != 1.0]  # mild to harsh
        proxies = [sens.get(ls.name, "rank", r).fisher for r in ranks]
        assert proxies == sorted(proxies), (ls.name, ranks, proxies)
        checked += len(ranks) > 1
    assert checked


def test_truncation_matches_a_built_factorization(task, space, sens):
    """The one-SVD-per-layer shortcut gives build()'s model: same weight, same metric."""
    val = task.val.head(sens.method["metric_examples"])
    fisher = empirical_fisher(task.model, [ls.name for ls in space], task.train)
    for ls in space:
        for rank in ls.choices("rank")[1:]:
            built = build(task.model, Policy({ls.name: LayerPolicy(rank=rank)}), task.example)
            entry = sens.get(ls.name, "rank", rank)
            assert evaluate(built, val, task.metric) == pytest.approx(entry.metric,
                                                                        abs=1.5 / len(val))
            w = effective_weight(built.get_submodule(ls.name))
            proxy = fisher_proxy(fisher[ls.name], task.model.get_submodule(ls.name).weight, w)
            assert proxy == pytest.approx(entry.fisher, rel=1e-3)


def test_effective_weight_of_a_spatial_split_is_the_conv_it_applies(task, space):
    conv = next(ls for ls in space if "spatial" in ls.choices("split"))
    lp = LayerPolicy(rank=conv.choices("rank")[-1], split="spatial")
    built = build(task.model, Policy({conv.name: lp}), task.example)
    original = task.model.get_submodule(conv.name)
    w = effective_weight(built.get_submodule(conv.name))
    x = torch.randn(2, original.in_channels, 16, 16)
    with torch.no_grad():
        want = built.get_submodule(conv.name)(x)
        got = F.conv2d(x, w, original.bias, original.stride, original.padding)
    assert w.shape == original.weight.shape
    assert torch.allclose(got, want, atol=1e-4)


def test_fisher_leaves_the_model_alone(task, space):
    names = [ls.name for ls in space]
    grads = {n: p.grad if p.grad is None else p.grad.clone()
             for n, p in task.model.named_parameters()}
    fisher = empirical_fisher(task.model, names, task.train, examples=64)
    for n, p in task.model.named_parameters():  # (training may have left a .grad behind)
        assert (p.grad is None and grads[n] is None) or torch.equal(p.grad, grads[n])
    for n in names:
        layer = task.model.get_submodule(n)
        assert fisher[n].shape == layer.weight.shape
        assert (fisher[n] >= 0).all() and fisher[n].sum() > 0
        assert not layer._forward_hooks
    assert not task.model.training


def test_fisher_of_a_linear_layer_is_the_mean_squared_per_example_gradient(task):
    (x,), y = task.train.head(6).tensors
    fisher = empirical_fisher(task.model, ["fc2"], (x, y), examples=6, batch=4)
    w = task.model.fc2.weight
    want = torch.zeros_like(w)
    for i in range(6):
        loss = F.cross_entropy(task.model(x[i:i + 1]), y[i:i + 1])
        want += torch.autograd.grad(loss, w)[0] ** 2
    assert torch.allclose(fisher["fc2"], want / 6, rtol=1e-4, atol=1e-10)


def test_truncated_svd_is_eckart_young():
    """With a uniform Fisher the proxy is half the squared Frobenius error, which for the
    truncated SVD is half the tail energy: it grows as the rank shrinks (exact path), and the
    randomized path stays close to it."""
    torch.manual_seed(0)
    mat = torch.randn(700, 20) @ torch.randn(20, 600) + 0.1 * torch.randn(700, 600)
    s = torch.linalg.svdvals(mat)
    ones = torch.ones_like(mat)
    for q, tol in ((300, 1e-4), (40, 0.05)):  # 300: exact (2p >= k), 40: randomized
        u, sv, v = top_svd(mat, q)
        proxies = []
        for r in (q, q // 2, q // 4):
            approx = (u[:, :r] * sv[:r]) @ v[:, :r].T
            tail = 0.5 * float((s[r:] ** 2).sum())
            proxies.append(fisher_proxy(ones, mat, approx))
            assert proxies[-1] == pytest.approx(tail, rel=tol)
            assert proxies[-1] >= tail * (1 - 1e-4)
        assert proxies == sorted(proxies)


def _fake(space, drops):
    """A Sensitivity with the given drops: {(layer, knob, value): (drop, paired)}."""
    entries = [LayerSensitivity(layer, knob, value, drop, None, 0.9 - drop, paired)
               for (layer, knob, value), (drop, paired) in drops.items()]
    return Sensitivity(0.9, entries, {"knobs": ["rank", "split"]})


def test_narrow_space_removes_costly_values_and_keeps_the_identity(space):
    ls = next(s for s in space if len(s.choices("rank")) >= 3)
    ranks = ls.choices("rank")
    mild, harsh = ranks[1], ranks[-1]
    sens = _fake(space, {(ls.name, "rank", mild): (0.01, {}),
                         (ls.name, "rank", harsh): (0.2, {})})
    narrowed = {s.name: s for s in narrow_space(space, sens, max_drop=0.05)}
    kept = narrowed[ls.name].choices("rank")
    assert kept[0] == 1.0 and mild in kept and harsh not in kept
    assert set(kept) == set(ranks) - {harsh}  # unmeasured values stay
    assert [r for r in ranks if r in kept] == list(kept)  # order kept
    others = [s for s in space if s.name != ls.name]
    assert all(narrowed[s.name] == s for s in others)
    assert narrowed[ls.name].choices("bits") == ls.choices("bits")


def test_narrow_space_keeps_the_mildest_unless_hopeless(space):
    ls = next(s for s in space if len(s.choices("rank")) >= 3)
    values = ls.choices("rank")[1:]
    drops = {(ls.name, "rank", v): (0.1 + 0.1 * i, {}) for i, v in enumerate(values)}
    narrowed = {s.name: s for s in narrow_space(space, _fake(space, drops), max_drop=0.05)}
    assert narrowed[ls.name].choices("rank") == (1.0, values[0])
    hopeless = {k: (0.6 + d, p) for k, (d, p) in drops.items()}
    narrowed = {s.name: s for s in narrow_space(space, _fake(space, hopeless), 0.05)}
    assert narrowed[ls.name].choices("rank") == (1.0,)


def test_narrow_space_judges_a_paired_value_by_its_extra_drop(space):
    ls = next(s for s in space if "spatial" in s.choices("split"))
    harsh = ls.choices("rank")[-1]
    drops = {(ls.name, "rank", harsh): (0.3, {}),
             (ls.name, "split", "spatial"): (0.32, {"rank": harsh})}
    narrowed = {s.name: s for s in narrow_space(space, _fake(space, drops), 0.05)}
    assert "spatial" in narrowed[ls.name].choices("split")  # 2 points beyond the rank's own


def test_narrow_space_on_a_measured_pass(space, sens):
    """At max_drop 0 only harmless values stay, plus at most the mildest one per knob."""
    narrowed = narrow_space(space, sens, max_drop=0.0)
    assert [s.name for s in narrowed] == [s.name for s in space]
    for before, after in zip(space, narrowed, strict=True):
        for knob in knob_names():
            kept = after.choices(knob)
            assert kept[0] == before.choices(knob)[0] == _identity(knob)
            assert set(kept) <= set(before.choices(knob))
            costs = {v: _cost(sens, after.name, knob, v) for v in before.choices(knob)[1:]}
            over = [v for v in kept[1:] if costs[v] is not None and costs[v] > 0.0]
            assert len(over) <= 1, (after.name, knob, kept)
            if over:
                measured = [c for c in costs.values() if c is not None]
                assert costs[over[0]] == min(measured) and min(measured) > 0.0


def test_json_round_trip(sens, tmp_path):
    path = tmp_path / "sensitivity.json"
    sens.save(path)
    again = Sensitivity.load(path)
    assert again == sens
    assert [type(e.value) for e in again.entries] == [type(e.value) for e in sens.entries]
    assert dataclasses.asdict(again.entries[0]) == dataclasses.asdict(sens.entries[0])


def test_table_names_every_layer_and_fits(space, sens):
    table = sensitivity_table(sens)
    for ls in space:
        assert ls.name in table
    assert all(len(line) <= 100 for line in table.splitlines()), table
    assert table.splitlines()[-1].startswith("worst")
    worst = max(sens.entries, key=lambda e: e.accuracy_drop)
    assert f"{worst.layer} {worst.knob}=" in table.splitlines()[-1]


def test_a_second_run_reuses_the_table_and_a_change_measures_again(task, space, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setenv("SEARCH_CACHE_DIR", str(tmp_path))
    knobs = ["rank", "bits"]
    measured = []
    real = sensitivity_module.measure_sensitivity

    def counting(*args, **kwargs):
        measured.append(kwargs.get("seed"))
        return real(*args, **kwargs)

    monkeypatch.setattr(sensitivity_module, "measure_sensitivity", counting)
    said = []
    first = cached_sensitivity(task, space, knobs, seed=0, say=said.append)
    again = cached_sensitivity(task, space, knobs, seed=0, say=said.append)
    assert measured == [0]
    assert again.entries == first.entries and again.baseline == first.baseline
    assert again.method["reused_from"].startswith(str(tmp_path)) and "reused" in said[-1]

    cached_sensitivity(task, space, knobs, seed=1)  # another Fisher sample: measured
    cached_sensitivity(task, space, ["rank"], seed=0)  # other knobs: measured
    assert measured == [0, 1, 0]
    # the key sees the weights: one weight nudged gives another key, and back gives the same
    key = sensitivity_key(task, space, knobs)
    weight = task.model.get_submodule(space[0].name).weight
    with torch.no_grad():
        weight[0, 0] += 1e-3
        assert sensitivity_key(task, space, knobs) != key
        weight[0, 0] -= 1e-3
    assert sensitivity_key(task, space, knobs) == key
    assert sensitivity_key(task, space[1:], knobs) != key

    # a damaged file is measured again, not a crash
    path = Path(again.method["reused_from"])
    path.write_text("{ not json")
    fresh = cached_sensitivity(task, space, knobs, seed=0, say=said.append)
    assert measured == [0, 1, 0, 0] and "unreadable" in said[-1]
    def figures(sens):  # what was measured, not how long it took
        return [dataclasses.replace(e, seconds=0.0) for e in sens.entries]

    assert figures(fresh) == figures(first)
    assert Sensitivity.load(path).entries == fresh.entries
