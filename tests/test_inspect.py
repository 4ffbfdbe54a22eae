"""Inspecting runs: `search compare` (hypervolume, dominated points) and `search show` (a trial
layer by layer), on one tiny run (untuned compiles)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from search.cli import main
from search.core.errors import UserError
from search.report.compare import Reference, compare, hypervolume
from search.report.show import trial_layers
from tests.test_study import run_tiny


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("inspect") / "r"
    run_tiny(out, trials=3)
    return out


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def factorized_trial(run: Path) -> int:
    """A complete trial whose policy factorizes some layer (the rank seed)."""
    for folder in sorted((run / "trials").iterdir()):
        policy = yaml.safe_load((folder / "policy.yaml").read_text())["layers"]
        if (folder / "result.json").exists() and any("rank" in k for k in policy.values()):
            return int(folder.name)
    raise AssertionError("no factorized trial in the tiny run")


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_hypervolume_of_a_small_front_is_the_hand_computed_volume():
    ref = Reference(accuracy=0.0, latency_ms=10.0, size_bytes=1000.0)
    # scaled losses (1 - acc, lat / 10, size / 1000): (.5, .5, .5) and (.2, .8, .2)
    a, b = (0.5, 5.0, 500.0), (0.8, 8.0, 200.0)
    assert hypervolume([a], ref) == pytest.approx(0.5 * 0.5 * 0.5)
    both = 0.125 + 0.8 * 0.2 * 0.8 - 0.5 * 0.2 * 0.5  # inclusion-exclusion of the two boxes
    assert hypervolume([a, b], ref) == pytest.approx(both)
    # a dominated point and a point beyond the reference's latency add nothing
    assert hypervolume([a, b, (0.4, 6.0, 600.0), (0.99, 12.0, 1.0)], ref) == pytest.approx(both)
    assert hypervolume([], ref) == 0.0


def test_a_front_compared_with_itself_is_equal(run, capsys):
    c = compare(run, run)
    assert c.hypervolume_a == c.hypervolume_b > 0
    assert c.a_dominated_by_b == [] and c.b_dominated_by_a == []
    assert len(c.common) == c.points_a == c.points_b
    base = json.loads((run / "front.json").read_text())["baseline"]
    assert c.reference == Reference(0.0, base["latency_ms"], base["size_bytes"])
    code, out, _ = cli(capsys, "compare", str(run), str(run))
    assert code == 0 and "hypervolume" in out and "0 of" in out


def test_a_doctored_front_dominates_the_original(run, tmp_path):
    better = copy_run(run, tmp_path / "better")
    front = json.loads((better / "front.json").read_text())
    point = front["points"][0]  # the fastest (the baseline, slowest, sits on the reference)
    point["latency_ms"] *= 0.5  # the same policy, measured twice as fast
    (better / "front.json").write_text(json.dumps(front))
    c = compare(run, better)
    assert c.a_dominated_by_b == [point["trial"]]
    assert c.b_dominated_by_a == []
    assert c.hypervolume_b > c.hypervolume_a
    assert (point["trial"], point["trial"]) in c.common  # same policy, better measurement


def test_runs_of_different_targets_are_refused_unless_forced(run, tmp_path, capsys):
    other = copy_run(run, tmp_path / "pi")
    info = yaml.safe_load((other / "run.yaml").read_text())
    info["target"] = "raspberry-pi"
    (other / "run.yaml").write_text(yaml.safe_dump(info))
    with pytest.raises(UserError, match="different targets"):
        compare(run, other)
    code, out, err = cli(capsys, "compare", str(run), str(other))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "--force" in err
    code, out, _ = cli(capsys, "compare", str(run), str(other), "--force")
    assert code == 0 and out.startswith("warning: different targets")


def test_show_lists_every_layer_with_its_size_before_and_after(run, capsys):
    trial = factorized_trial(run)
    t = trial_layers(run, trial)
    policy = yaml.safe_load((run / "trials" / f"{trial:04d}" / "policy.yaml").read_text())
    compressed = {name for name, knobs in policy["layers"].items() if knobs}
    assert compressed <= {r.name for r in t.rows}
    factorized = [r for r in t.rows if "rank" in r.knobs]
    assert factorized and all(r.params_after < r.params_before for r in factorized)
    assert all(r.bytes_after < r.bytes_before for r in factorized)
    assert all(r.latency_after is None for r in t.rows)  # not measured unless asked
    code, out, _ = cli(capsys, "show", str(run), str(trial))
    assert code == 0
    for name in compressed:
        assert any(line.startswith(name + " ") for line in out.splitlines()), out
    assert "add --latency" in out


def test_show_latency_times_each_layer_and_says_how(run, tmp_path, capsys):
    trial = factorized_trial(run)
    out_dir = copy_run(run, tmp_path / "s")
    sens = {"version": 1, "baseline": 0.9, "method": {}, "skipped": [], "entries": [
        {"layer": name, "knob": "rank", "value": knobs["rank"], "accuracy_drop": 0.031,
         "fisher": None, "metric": 0.869}
        for name, knobs in yaml.safe_load((out_dir / "trials" / f"{trial:04d}" /
                                           "policy.yaml").read_text())["layers"].items()
        if "rank" in knobs]}
    (out_dir / "sensitivity.json").write_text(json.dumps(sens))
    code, out, _ = cli(capsys, "show", str(out_dir), str(trial), "--latency")
    assert code == 0, out
    t = trial_layers(out_dir, trial)  # from the cache now: no compile
    assert (out_dir / "trials" / f"{trial:04d}" / "layers.json").exists()
    for r in t.rows:
        for timing in (r.latency_before, r.latency_after):
            assert timing is not None and timing.error is None and timing.median_ms > 0
            assert timing.source.label.startswith("measured:host:")  # tuned / partly / untuned
            assert timing.input_shape[0] == 1
    factorized = next(r for r in t.rows if "rank" in r.knobs)
    assert factorized.sensitivity == {f"rank={factorized.knobs['rank']}": 0.031}
    assert "untuned" in out and "sum of layers" in out and "-3.1" in out
    assert "compiled alone" in out
    # the uncompressed layers went to the baseline trial's cache, for every other trial
    assert (out_dir / "trials" / "0000" / "layers.json").exists()


def test_show_errors_are_one_line(run, tmp_path, capsys):
    failed = copy_run(run, tmp_path / "f")
    (failed / "trials" / "0009").mkdir()
    shutil.copy(failed / "trials" / "0000" / "policy.yaml", failed / "trials" / "0009")
    front = json.loads((failed / "front.json").read_text())
    front["trials"]["failed"].append({"trial": 9, "reason": "TVM compile failed: boom"})
    (failed / "front.json").write_text(json.dumps(front))
    for args, expected in (
            (["show", str(tmp_path / "nope"), "1"], "is not a run folder"),
            (["show", str(run), "99"], "has no trial 99"),
            (["show", str(failed), "9"], "trial 9 failed, so it has nothing to show: TVM"),
            (["compare", str(run), str(tmp_path / "nope")], "is not a run folder")):
        code, out, err = cli(capsys, *args)
        assert code == 2 and out == "", args
        lines = err.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], err


def test_show_counts_an_int8_layer_with_the_front_s_byte_counter(tiny_task):
    """`search show` per layer and the front's size are one counter: an int8 Linear (its
    weights are buffers) is not 0 bytes and 0 parameters."""
    from search.compress.build import build
    from search.compress.int8 import Int8Linear
    from search.compress.policy import LayerPolicy, Policy
    from search.compress.size import layer_bytes, layer_params, model_stats
    from search.report.show import _layer_bytes, _params

    lp = LayerPolicy(bits=8)
    policy = Policy({"fc1": lp})
    model = build(tiny_task.model, policy, tiny_task.example, tiny_task.train)
    fc1 = model.fc1
    assert isinstance(fc1, Int8Linear)
    assert _layer_bytes(fc1, lp) == layer_bytes(fc1, lp) == \
        fc1.weight_q.numel() + 4 * (2 * fc1.out_features + 2)
    assert _params(fc1) == layer_params(fc1) == fc1.in_features * fc1.out_features + \
        fc1.out_features
    rest = model_stats(model, policy, tiny_task.example).ideal_size_bytes - layer_bytes(fc1, lp)
    plain = sum(p.numel() * 4 for n, p in model.named_parameters() if not n.startswith("fc1"))
    assert rest == plain  # the other layers are fp32: the sum is the front's size
