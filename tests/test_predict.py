"""Predicted latency: a model's own compiled kernels costed from the kernel library (records,
or a tuned neighbour's record scaled by flops), as a ratio to the uncompressed model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from search.backend.compile import Compiler, to_relax, traced_relax
from search.backend.predict import KernelLibrary, deployed_form, error_report
from search.backend.provenance import tuning_label
from search.compress.build import build, restructure
from search.compress.policy import LayerPolicy, Policy
from search.devices.target import load_target


def test_deployed_form_has_the_ops_of_the_fine_tuned_model(tiny_task):
    """Before the fine-tune: the structure and precision the deployed model will have."""
    task = tiny_task
    policy = Policy({"conv2": LayerPolicy(bits=16), "fc1": LayerPolicy(rank=0.25, bits=8),
                     "fc2": LayerPolicy(bits=8), "fc3": LayerPolicy(bits=8, share=4)})
    before = deployed_form(restructure(task.model, policy, task.example, task.train), policy,
                           task.train)
    after = build(task.model, policy, task.example, task.train)

    def ops(model: nn.Module) -> list[tuple]:  # every module, its own tensors' shapes, dtypes
        return [(name, type(m).__name__, *((k, tuple(v.shape), v.dtype) for k, v in
                                           [*m.named_parameters(recurse=False),
                                            *m.named_buffers(recurse=False)]))
                for name, m in model.named_modules()]

    assert ops(before) == ops(after)
    kinds = [kind for _name, kind, *_ in ops(before)]
    assert "Half" in kinds and kinds.count("Int8Linear") == 3


@pytest.mark.parametrize("policy", [
    Policy({"conv1": LayerPolicy(bits=16, half="fp16"),
            "conv2": LayerPolicy(rank=0.5, split="spatial"),
            "fc1": LayerPolicy(sparsity=0.5, bits=8), "fc2": LayerPolicy(rank=0.25, prune=0.5),
            "fc3": LayerPolicy(nm="2:4", bits=16)}),
    Policy({"conv2": LayerPolicy(bits=8), "fc1": LayerPolicy(rank=0.25, bits=8),
            "fc2": LayerPolicy(bits=8, share=4), "conv1": LayerPolicy(sparsity=0.5)}),
])
def test_the_traced_import_gives_exports_kernels_and_weights(tiny_task, policy, tmp_path):
    """A prediction may import by torch.fx (25x sooner): every compressed layer must lower to
    the kernels and constants torch.export's import gives, or the library costs other kernels."""
    from search.backend.artifact import module_weight_bytes

    task, compiler = tiny_task, Compiler(load_target("host"), tmp_path, trials_per_task=0)
    model = deployed_form(restructure(task.model, policy, task.example, task.train), policy,
                          task.train)
    for m in (model, convs(16, 32)):  # and a 1x1 pooling before a Linear with a bias
        example = task.example if m is model else X
        exported, traced = to_relax(m, example), traced_relax(m, example)
        assert traced is not None
        a, b = compiler.lower(exported), compiler.lower(traced)
        ka, kb = compiler.kernels_of(a, lowered=True), compiler.kernels_of(b, lowered=True)
        assert len(ka) >= 4 and compiler.same_kernels(ka, kb)
        assert module_weight_bytes(a) == module_weight_bytes(b)
    # and the check tells different models apart
    assert not compiler.same_kernels(compiler.kernels_of(to_relax(convs(16, 32), X)),
                                     compiler.kernels_of(to_relax(convs(16, 16), X)))


def test_a_model_that_does_not_trace_symbolically_is_left_to_export():
    class Branchy(nn.Module):
        def forward(self, x):
            return x * 2 if x.shape[1] == 3 else x - 1  # a branch on a shape: export fixes it

    assert traced_relax(Branchy(), X) is None
    assert to_relax(Branchy(), X) is not None


def test_error_report():
    r = error_report([(1.1, 1.0), (0.9, 1.0), (2.0, 2.0), (1.5, 1.0)])
    assert r["n"] == 4
    assert r["median_abs_rel_error"] == pytest.approx(0.1)
    assert r["max_abs_rel_error"] == pytest.approx(0.5)
    assert 0.1 < r["p95_abs_rel_error"] <= 0.5
    assert error_report([]) == {"n": 0}


# --------------------------------------------------------------------------------------------
# the kernel library's prediction

X = torch.randn(1, 3, 16, 16)


def convs(a: int, b: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, a, 3, padding=1), nn.ReLU(), nn.Conv2d(a, b, 1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(b, 4)).eval()


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Compiler:
    """A compiler (tuning off) on a database holding one model's tuned kernels."""
    db = tmp_path_factory.mktemp("library")
    Compiler(load_target("host"), db, trials_per_task=2).compile(to_relax(convs(16, 32), X))
    return Compiler(load_target("host"), db, trials_per_task=0)


def _record_ms(compiler: Compiler, task) -> float:
    rec = compiler.database.query_tuning_record(task.dispatched[0], compiler.target,
                                                task.task_name)
    return min(float(s) for s in rec.run_secs) * 1e3


def test_a_models_kernels_are_costed_by_their_own_records_compiling_nothing(library,
                                                                             monkeypatch):
    def no_compile(*a, **k):
        raise AssertionError("a prediction compiled something")

    monkeypatch.setattr(library, "compile", no_compile)
    kernels = library.kernels_of(to_relax(convs(16, 32), X))
    got = KernelLibrary(library).kernel_sum(kernels)
    assert got.complete and got.own == got.kernels == len(kernels) and got.donors == 0
    assert got.calls == sum(int(t.weight) for t in kernels)
    assert got.ms == pytest.approx(sum(int(t.weight) * _record_ms(library, t) for t in kernels))


def test_kernels_the_library_lacks_are_costed_from_their_nearest_tuned_neighbour(library):
    lib = KernelLibrary(library)
    base = lib.model_sum(to_relax(convs(16, 32), X))
    small, large = (lib.model_sum(to_relax(convs(a, b), X)) for a, b in ((8, 16), (48, 96)))
    for got in (small, large):  # shapes the library lacks: donors, scaled by their flops
        assert got.complete and got.donors > 0 and got.own + got.donors == got.kernels
    assert small.ms < base.ms < large.ms  # fewer channels: fewer flops, less time


def test_a_prediction_is_the_kernel_sum_over_the_uncompressed_models_times_the_reference(
        library):
    lib, target = KernelLibrary(library), load_target("host")
    base = lib.model_sum(to_relax(convs(16, 32), X))
    small = lib.model_sum(to_relax(convs(8, 16), X))
    p = lib.predict(to_relax(convs(8, 16), X), base, 2.0, target)
    assert p.ratio == pytest.approx(small.ms / base.ms) and p.ratio < 1
    assert p.ms == pytest.approx(2.0 * p.ratio)
    assert p.source.estimate and p.source.reference_ms == 2.0
    assert p.source.tuning == tuning_label(small.own, small.kernels, small.donors)
    assert p.source.label.startswith("predicted:host:")


def test_a_kernel_no_record_or_neighbour_costs_is_tuned_or_the_model_measured_whole(tmp_path):
    target = load_target("host")
    model = to_relax(convs(8, 16), X)
    off = Compiler(target, tmp_path / "db", trials_per_task=0)  # an empty library, no tuning
    got = KernelLibrary(off).model_sum(model)
    assert got.ms == 0 and len(got.unknown) == got.kernels > 0 and not got.complete
    assert KernelLibrary(off).predict(model, got, 2.0, target) is None  # measure it whole
    tuning = Compiler(target, tmp_path / "db", trials_per_task=1)
    lib = KernelLibrary(tuning)
    p = lib.predict(model, got, 2.0, target)  # the base was not complete: still no figure
    assert p is None and len(tuning.database) > 0  # but its kernels were tuned
    base = lib.model_sum(model)
    assert base.complete and base.own == base.kernels
    p = lib.predict(model, base, 2.0, target)
    assert p.ratio == pytest.approx(1.0) and p.ms == pytest.approx(2.0)


def test_a_prediction_imports_by_fx_only_where_fx_gave_exports_kernels(tiny_task, tmp_path,
                                                                       monkeypatch):
    """The evaluator checks the traced import on the uncompressed model once; where its
    kernels differ from export's, every candidate is exported instead."""
    from search.study import evaluate as ev
    from search.study.config import SearchConfig

    target = load_target("host")
    policy = Policy({"fc1": LayerPolicy(rank=0.25)})
    model = restructure(tiny_task.model, policy, tiny_task.example, tiny_task.train)
    exported = []
    monkeypatch.setattr(ev, "to_relax", lambda m, x: exported.append(m) or to_relax(m, x))

    def evaluator(traced) -> ev.Evaluator:
        monkeypatch.setattr(ev, "traced_relax", traced)
        e = ev.Evaluator(tiny_task, target, Compiler(target, tmp_path, trials_per_task=0),
                         SearchConfig(latency="predicted"))
        e.reference_ms = 1.0
        e.base_sum()
        exported.clear()
        return e

    e = evaluator(traced_relax)  # the same kernels: candidates are traced, not exported
    e._predict(model, None)
    assert not any(m is model for m in exported)
    # a trace that imports the uncompressed model into other kernels is not relied on
    e = evaluator(lambda m, x: traced_relax(convs(16, 32), X) if m is tiny_task.model
                  else traced_relax(m, x))
    e._predict(model, None)
    assert [m for m in exported if m is model] == [model]


def test_without_early_stopping_a_trial_predicts_from_the_model_it_deploys(tiny_task, tmp_path,
                                                                           monkeypatch):
    """The prediction comes after the fine-tune, from the deployed model itself (no copy put
    in its deployed form first): the same figure as a prediction of that model."""
    from search.study import evaluate as ev
    from search.study.config import SearchConfig

    target = load_target("host")
    e = ev.Evaluator(tiny_task, target, Compiler(target, tmp_path, trials_per_task=1),
                     SearchConfig(latency="predicted", finetune_steps=2))
    e.reference_ms = 2.0
    policy = Policy({"fc1": LayerPolicy(rank=0.25, bits=8), "conv2": LayerPolicy(sparsity=0.5)})
    deployed = build(tiny_task.model, policy, tiny_task.example, tiny_task.train)
    base = to_relax(tiny_task.model.eval(), tiny_task.example)
    for _ in range(6):  # its kernels and the uncompressed model's tuned first, as a study's
        # first trials do; one trial a kernel, and some VNNI int8 dense schedules fail to build
        # (TVM's "Cannot broadcast lanes=64 to 256"): tried until each has a record
        e.library.predict(base, e.base_sum(), 2.0, target)
        if e.base_sum().complete and e._predict(deployed, None) is not None:
            break
    assert e._predict(deployed, None) is not None, "tuning gave some kernel no valid schedule"
    monkeypatch.setattr(ev, "deployed_form", lambda *a: pytest.fail("a copy was deployed"))
    result, model = e(policy)
    assert result.latency_source.method == "predicted"
    again = e.library.predict(to_relax(model, tiny_task.example), e.base_sum(), 2.0, target)
    assert result.latency.ratio == pytest.approx(again.ratio) and 0 < again.ratio < 1
    assert result.latency.median_ms == pytest.approx(2.0 * again.ratio)
    assert result.size_bytes == again.weights.total


def test_tuning_for_a_prediction_tries_a_kernel_with_no_valid_candidate_once_more(tmp_path,
                                                                                  monkeypatch):
    """`tune` (a prediction's, `search tune`'s) retries as a compile's tuning does: a kernel
    whose every candidate failed to build gets a second session, with another seed."""
    compiler = Compiler(load_target("host"), tmp_path, trials_per_task=1)
    real, seeds = compiler._tune, []

    def failing_first(tasks, progress, retry=0):
        seeds.append(retry)
        if retry:  # the first session's candidates all failed: nothing recorded
            real(tasks, progress, retry)

    monkeypatch.setattr(compiler, "_tune", failing_first)
    kernels = compiler.kernels_of(to_relax(convs(8, 16), X))
    assert compiler.tune(kernels) == len({k.task_name for k in kernels}) > 0
    assert seeds == [0, 1]
    assert KernelLibrary(compiler).kernel_sum(kernels).complete
