"""A knob added from this file alone (the README's "Adding a knob"): once registered, the policy,
the space, the build, the byte counter, the config, the sensitivity pass, the labels and the
contract every built-in knob meets all take it, with no edit anywhere else."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from torch import nn

from search.compress.knob import BuildContext, Knob, LayerInfo, registered, weight_layers
from search.compress.policy import LayerPolicy, Policy
from search.compress.size import model_stats
from search.compress.space import derive_space
from search.core.errors import UserError
from search.study.config import SearchConfig
from search.study.sensitivity import measure_sensitivity
from search.tasks.digits import digits_resnet
from tests.test_contract import check_knob_contract


class DropBias(Knob):
    """Removes a layer's bias (a real, smaller layer: the add is gone from the graph)."""

    name = "bias"
    values = ("keep", "drop")
    doc = "drop the layer's bias"

    def offered(self, layer: LayerInfo, offered: Mapping[str, tuple]) -> tuple:
        return self.values if layer.module.bias is not None else self.values[:1]

    def restructure(self, model: nn.Module, policy: Policy, ctx: BuildContext) -> None:
        for name, lp in policy.layers.items():
            if lp.bias == "drop":
                for m in weight_layers(model.get_submodule(name)):
                    m.bias = None

    def label(self, lp: LayerPolicy) -> str:
        return "nobias" if lp.bias == "drop" else ""


@pytest.fixture
def bias_knob():
    with registered(DropBias()) as knob:
        yield knob


@pytest.fixture(scope="module")
def task():
    return digits_resnet(width=16, epochs=1)


def test_a_registered_knob_is_a_policy_knob_with_its_checks(bias_knob):
    lp = LayerPolicy(bias="drop", bits=8)
    assert lp.bias == "drop" and lp.changed() == {"bias": "drop", "bits": 8}
    assert LayerPolicy().bias == "keep" and LayerPolicy().is_identity
    with pytest.raises(ValueError, match=r"bias must be one of \('keep', 'drop'\)"):
        LayerPolicy(bias="maybe")
    policy = Policy({"fc": lp})
    assert Policy.from_yaml(policy.to_yaml()) == policy
    assert policy.label() == "fc:b8/nobias"


def test_an_unregistered_knob_is_refused():
    with pytest.raises(TypeError, match="unknown knob"):
        LayerPolicy(bias="drop")


def test_the_space_build_and_byte_counter_take_it(bias_knob, task):
    space = derive_space(task.model, task.example, knobs=["bias"])
    with_bias = [ls for ls in space if task.model.get_submodule(ls.name).bias is not None]
    assert with_bias and all(ls.choices("bias") == ("keep", "drop") for ls in with_bias)
    assert all(ls.choices("rank") == (1.0,) for ls in space)  # not searched: identity only
    name = with_bias[0].name
    policy = Policy({name: LayerPolicy(bias="drop")})
    from search.compress.build import build

    model = build(task.model, policy, task.example)
    assert model.get_submodule(name).bias is None
    out_channels = task.model.get_submodule(name).weight.shape[0]
    before = model_stats(task.model, Policy(), task.example)
    after = model_stats(model, policy, task.example)
    # one fp32 per channel
    assert before.ideal_size_bytes - after.ideal_size_bytes == 4 * out_channels
    assert before.params - after.params == out_channels


def test_the_config_takes_it_once_registered(bias_knob, tmp_path):
    config = SearchConfig(knobs=["rank", "bias"], choices={"bias": ["drop"]},
                          seeds=[{}, {"bias": "drop"}])
    config.check("config")
    with pytest.raises(UserError, match="choices for bias"):
        SearchConfig(knobs=["bias"], choices={"bias": ["sometimes"]}).check("config")


def test_the_sensitivity_pass_measures_it(bias_knob, task):
    space = derive_space(task.model, task.example, knobs=["bias"])
    sens = measure_sensitivity(task, space, ["bias"], val_examples=64, batches=1)
    measured = [e for e in sens.entries if e.knob == "bias"]
    assert measured and all(e.value == "drop" for e in measured)
    assert all(e.fisher is not None for e in measured)  # the weight keeps its shape


def test_it_meets_the_contract_every_built_in_knob_meets(bias_knob, task, tmp_path):
    from search.backend.compile import Compiler
    from search.devices.target import load_target

    compiler = Compiler(load_target("host"), tmp_path / "db", trials_per_task=0)
    check_knob_contract(task, compiler, {"bias": "drop"}, ["params", "ideal_size_bytes"], ["flops"])


def test_a_config_imports_its_plugins_so_their_knobs_are_known(tmp_path, monkeypatch):
    (tmp_path / "my_knobs.py").write_text(
        "from search.compress.knob import register\n"
        "from tests.test_knob_plugin import DropBias\n"
        "register(DropBias())\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match="unknown|knobs must be"):
        SearchConfig.from_dict({"knobs": ["rank", "bias"]})
    try:
        config = SearchConfig.from_dict({"plugins": ["my_knobs"], "knobs": ["rank", "bias"]})
        assert config.knobs == ["rank", "bias"]
    finally:
        from search.compress.knob import REGISTRY, unregister

        if "bias" in REGISTRY:
            unregister("bias")


def test_a_plugin_that_does_not_import_is_one_line():
    with pytest.raises(UserError, match=r"plugins: cannot import 'no_such_module_here'"):
        SearchConfig.from_dict({"plugins": ["no_such_module_here"]})
