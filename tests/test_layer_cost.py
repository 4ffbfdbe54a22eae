"""The integer program's cost from the kernel library: per layer and option, the change of the
kernel sum of the layer's window, costed by the library's records."""

from __future__ import annotations

import pytest
from torch import nn

from search.backend.compile import Compiler, to_relax
from search.backend.predict import KernelLibrary
from search.compress.build import build
from search.compress.policy import LayerPolicy, Policy
from search.compress.space import derive_space
from search.core.errors import UserError
from search.core.hooks import layer_inputs
from search.devices.target import load_target
from search.study.allocate import allocate, options_of
from search.study.layer_cost import _digest, library_options, window_of
from search.study.sensitivity import LayerSensitivity, Sensitivity

KNOBS = ["rank", "sparsity", "bits"]
IDENTITY = (1.0, 0.0, 32)


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
    flat = {name: {v: (d, opts[IDENTITY][1], b) for v, (d, _c, b) in opts.items()}
            for name, opts in estimate.items()}
    assert allocate(tiny_task.model, tiny_task.example, space, KNOBS, sens, [0.7],
                    options=flat) == []


class Custom(nn.Sequential):
    def forward(self, x):  # not a chain: a window must not assume one
        return super().forward(x) + x


def test_a_layers_window_is_its_sequential_child_and_the_next():
    model = nn.Module()
    model.stem = nn.Conv2d(3, 8, 3)
    model.features = nn.Sequential(
        nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 8, 1), Custom(nn.Conv2d(8, 8, 1))),
        nn.Sequential(nn.Conv2d(8, 8, 1)))
    assert window_of(model, "stem") == ("stem",)
    assert window_of(model, "features.0.0") == ("features.0", "features.1")
    assert window_of(model, "features.1.1.0") == ("features.1", "features.2")
    assert window_of(model, "features.2.0") == ("features.2",)  # the last child
    chain = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    assert window_of(chain, "2") == ("2",) and window_of(chain, "0") == ("0", "1")
    assert window_of(Custom(nn.Linear(4, 4)), "0") == ("0",)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> Compiler:
    """A compiler that tunes (one MetaSchedule trial per kernel: the test is about the sums)."""
    return Compiler(load_target("host"), tmp_path_factory.mktemp("db"), trials_per_task=1)


def test_each_option_costs_the_change_of_its_windows_kernel_sum(tiny_task, space, sens, tuned):
    task = tiny_task
    space = [ls for ls in space if len(ls.choices("rank")) > 1][:2]
    estimate = options_of(task.model, task.example, space, KNOBS, sens)
    estimate = {name: {v: c for v, c in opts.items() if v[2] == 32 and v[1] == 0.0}
                for name, opts in estimate.items()}
    costed, how = library_options(task, KNOBS, estimate, tuned)
    assert how["source"].startswith("library:host:") and how["left_out"] == 0
    assert how["tuned_now"] > 0  # the library lacked them: tuned in one session
    library = KernelLibrary(tuned)
    whole = library.model_sum(to_relax(task.model.eval(), task.example))
    assert whole.complete and how["uncompressed_kernel_ms"] == pytest.approx(whole.ms)
    # the uncompressed options share out the model's kernel sum by the estimate's proportions
    shares = {n: opts[IDENTITY][1] for n, opts in costed.items()}
    total_estimate = sum(opts[IDENTITY][1] for opts in estimate.values())
    for name, share in shares.items():
        assert share == pytest.approx(whole.ms * estimate[name][IDENTITY][1] / total_estimate)
    # an option adds to its share what the layer's window gains or loses in kernels (these
    # layers are no Sequential's: each is its own window), drops and sizes kept
    inputs = layer_inputs(task.model, task.example, list(costed))
    for name, options in costed.items():
        assert window_of(task.model, name) == (name,)
        was = library.model_sum(to_relax(task.model.get_submodule(name).eval(), inputs[name]))
        assert len(options) == len(estimate[name]) > 1
        for values, (drop, ms, size) in options.items():
            assert (drop, size) == (estimate[name][values][0], estimate[name][values][2])
            lp = LayerPolicy(**dict(zip(KNOBS, values, strict=True)))
            built = build(task.model, Policy({name: lp}), task.example, task.train)
            now = library.model_sum(to_relax(built.get_submodule(name).eval(), inputs[name]))
            # (the window's input and output layout changes: no record, the same either way)
            assert {_digest(k) for k in now.unknown} == {_digest(k) for k in was.unknown}
            assert ms == pytest.approx(shares[name] + now.ms - was.ms, rel=1e-6, abs=1e-9)
    # a second program finds every kernel in the library: nothing tuned again
    again, how2 = library_options(task, KNOBS, estimate, tuned)
    assert how2["tuned_now"] == 0 and again == costed
    # and the program's limit holds in the library's milliseconds
    total = sum(opts[IDENTITY][1] for opts in costed.values())
    cheapest = sum(min(ms for _d, ms, _b in opts.values()) for opts in costed.values())
    limit = (1 + cheapest / total) / 2  # between the cheapest policy and none: one exists
    (a,) = allocate(task.model, task.example, space, KNOBS, sens, [limit], options=costed)
    chosen = sum(costed[n][(lp.rank, lp.sparsity, lp.bits)][1]
                 for n, lp in a.policy.layers.items())
    assert chosen <= limit * total * (1 + 1e-9) and a.cost_fraction == pytest.approx(chosen / total)


def test_without_a_library_or_tuning_it_says_how_to_build_one(tiny_task, space, sens, tmp_path):
    untuned = Compiler(load_target("host"), tmp_path / "db", trials_per_task=0)
    estimate = options_of(tiny_task.model, tiny_task.example, space[:1], KNOBS, sens)
    with pytest.raises(UserError, match=r"search tune --target host.*ip_cost: estimate"):
        library_options(tiny_task, KNOBS, estimate, untuned)
