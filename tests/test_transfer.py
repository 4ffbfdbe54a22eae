"""Kernels the tuning database lacks take a tuned neighbour's schedule (transfer tuning): the
build is correct, says how many kernels were transferred, and a failed transfer falls back to
tuning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from search.backend.compile import Compiler, to_relax
from search.backend.measure import run_and_time
from search.backend.provenance import Provenance
from search.backend.transfer import distance, extents, structure
from search.devices.target import Measurement, load_target

QUICK = Measurement(number=1, repeat=1, min_repeat_ms=0)


def convs(a: int, b: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, a, 3, padding=1), nn.ReLU(), nn.Conv2d(a, b, 1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(b, 4)).eval()


X = torch.randn(1, 3, 16, 16)


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """A tuning database holding one model's kernels (channels 16 and 32)."""
    db = tmp_path_factory.mktemp("library")
    tuned = Compiler(load_target("host"), db, trials_per_task=2).compile(
        to_relax(convs(16, 32), X))
    assert tuned.fully_tuned and tuned.transferred == 0  # nothing to transfer from: tuned
    return db


def test_kernels_of_other_channels_run_transferred_schedules_and_compute_the_same(library):
    model = convs(24, 40)  # the same structure, shapes the library lacks
    compiler = Compiler(load_target("host"), library, trials_per_task=0)
    compiled = compiler.compile(to_relax(model, X))
    assert compiled.transferred > 0 and compiled.new_tasks == 0
    assert compiled.tuned + compiled.transferred <= compiled.tasks
    with torch.no_grad():
        reference = model(X)
    run_and_time(compiled.executable, X, reference, QUICK)  # raises if the output differs
    label = Provenance.timed("host", compiled.tuned, compiled.tasks, None,
                             compiled.transferred).label
    assert "transferred" in label and f"({compiled.transferred}/{compiled.tasks})" in label

    off = Compiler(load_target("host"), library, trials_per_task=0, transfer=False)
    plain = off.compile(to_relax(model, X))
    assert plain.transferred == 0 and plain.tuned == compiled.tuned  # those kernels: untuned


def test_a_build_the_transferred_schedules_break_tunes_those_kernels_instead(library,
                                                                             monkeypatch):
    from tvm.s_tir import meta_schedule as ms

    def broken(sch):
        raise RuntimeError("a schedule that does not build")

    compiler = Compiler(load_target("host"), library, trials_per_task=2)
    monkeypatch.setattr(compiler.transfer, "database",
                        lambda: ms.database.ScheduleFnDatabase(broken))
    compiled = compiler.compile(to_relax(convs(8, 48), X))
    assert compiled.transferred == 0 and compiled.new_tasks > 0 and compiled.fully_tuned


def test_the_label_counts_tuned_and_transferred_kernels():
    assert Provenance.timed("pi", 3, 5, None, 2).label == "measured:pi:tuned+transferred(2/5)"
    assert Provenance.timed("pi", 2, 5, None, 1).label == \
        "measured:pi:partly-tuned(2/5)+transferred(1/5)"
    assert Provenance.timed("pi", 5, 5).label == "measured:pi:tuned"


def test_kernels_of_one_structure_differ_only_in_their_extents():
    a = 'T.Buffer((T.int64(1), T.int64(16)), "float32") for i in T.grid(T.int64(16)):'
    b = 'T.Buffer((T.int64(1), T.int64(24)), "float32") for i in T.grid(T.int64(24)):'
    c = 'T.Buffer((T.int64(1), T.int64(16)), "int8") for i in T.grid(T.int64(16)):'
    assert structure(a) == structure(b) != structure(c)  # another dtype: another structure
    assert extents(a) == (1, 16, 16) and extents(b) == (1, 24, 24)
    assert distance(extents(a), extents(a)) == 0 < distance(extents(a), extents(b))



def test_a_candidate_slower_than_the_uncompressed_model_on_transferred_schedules_gets_its_own(
        library):
    """A neighbour's schedule can be far off: a candidate it times clearly slower than the
    anchor (the uncompressed model; measure.SUSPECT_RATIO) is compiled again on its own tuned
    kernels and timed again; one it times faster keeps them (tuning every transferred kernel
    would undo transfer)."""
    from search.backend.measure import compile_anchor, compile_and_time

    host = load_target("host")
    model = convs(24, 56)  # shapes the library lacks: transferred at first
    small = compile_anchor(convs(16, 32), X, Compiler(host, library, trials_per_task=0))
    slow = compile_anchor(convs(64, 96), X, Compiler(host, library, trials_per_task=0,
                                                     transfer=False))  # untuned: naive loops
    compiler = Compiler(host, library, trials_per_task=2)
    kept = compile_and_time(model, X, compiler, host, QUICK, anchor=slow)
    assert kept.compiled.transferred > 0 and kept.latency.ratio < 1  # faster: kept as it is
    own = compile_and_time(model, X, compiler, host, QUICK, anchor=small)  # a larger model
    assert own.compiled.transferred == 0 and own.compiled.fully_tuned
    assert own.compiled.new_tasks > 0 and "transferred" not in own.source.label


def test_a_candidate_computing_fewer_ops_is_retuned_when_its_transfer_is_no_faster(library):
    """A candidate computing clearly fewer ops than the anchor that runs no faster on
    transferred schedules is a missed transfer (measure.FEWER_OPS), as is any slower than
    SUSPECT_RATIO; one computing as many ops (int8) keeps its figure up to SUSPECT_RATIO."""
    from search.backend import measure
    from search.backend.compile import Compiled
    from search.backend.measure import Anchor, Latency, transfer_missed

    host = load_target("host")
    anchor = measure.compile_anchor(convs(16, 32), X, Compiler(host, library, trials_per_task=0))
    small = Compiler(host, library, trials_per_task=0).compile(to_relax(convs(8, 16), X))
    assert 0 < small.flops < measure.FEWER_OPS * anchor.flops  # as TVM counts its kernels' ops

    def missed(ratio: float | None, flops: float, transferred: int = 3,
               to: Anchor | None = anchor) -> bool:
        compiled = Compiled(None, 10, 7, 0, 0.0, transferred=transferred, flops=flops)
        return transfer_missed(compiled, Latency(1.0, 1.0, 1.0, 1, ratio=ratio), to)

    fewer, same = measure.FEWER_OPS * anchor.flops, anchor.flops
    assert missed(1.0, fewer) and missed(1.04, fewer)  # 13.36's channel cut
    assert not missed(0.97, fewer)  # faster: the transfer holds
    assert not missed(1.04, same) and missed(measure.SUSPECT_RATIO + 0.01, same)
    assert not missed(1.04, fewer, to=None)  # no anchor's ops known: the ratio rule alone
    assert not missed(2.0, fewer, transferred=0) and not missed(None, fewer)  # own kernels
