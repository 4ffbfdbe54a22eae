from __future__ import annotations

import pytest
import torch

from search.compress.build import build
from search.compress.channels import round_channels
from search.compress.policy import LayerPolicy, Policy
from search.compress.space import derive_space, uniform


def test_space_is_derived_from_the_model(tiny_task):
    space = {s.name: s for s in derive_space(tiny_task.model, tiny_task.example)}
    assert list(space) == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    # the output layer keeps its 10 classes; a layer feeding one consumer may lose channels
    assert space["fc3"].choices("sparsity") == (0.0,)
    conv1 = space["conv1"].choices("sparsity")
    assert conv1[0] == 0.0 and len(conv1) > 1
    # conv2 (32->64, 3x3) factorizes into fewer parameters; fc3 (64->10) cannot
    assert len(space["conv2"].choices("rank")) > 1 and space["fc3"].choices("rank") == (1.0,)
    assert all(s.choices("bits") == (32, 16, 8) for s in space.values())  # by default


def test_channel_rounding_is_a_multiple_of_8():
    assert [round_channels(n) for n in (1, 7, 12, 13, 48.2, 100)] == [8, 8, 16, 16, 48, 104]


def test_policy_round_trips_through_yaml_and_rebuilds_the_same_model(tiny_task):
    space = derive_space(tiny_task.model, tiny_task.example)
    policy = Policy({
        "conv2": LayerPolicy(rank=0.5, sparsity=0.25, bits=16),
        "fc1": LayerPolicy(rank=0.25, sparsity=0.5, bits=8),
        "fc2": LayerPolicy(rank=1.0, sparsity=0.0, bits=32),
    })
    again = Policy.from_yaml(policy.to_yaml())
    assert again == policy and hash(again) == hash(policy)
    a = build(tiny_task.model, policy, tiny_task.example)
    b = build(tiny_task.model, again, tiny_task.example)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert uniform(space, rank=0.25) == Policy.from_yaml(uniform(space, rank=0.25).to_yaml())


@pytest.mark.parametrize("kwargs", [{"rank": 0.0}, {"rank": 1.5}, {"sparsity": 1.0},
                                    {"bits": 3}, {"nm": "4:2"},
                                    {"half": "fp8"}, {"threshold": 1.0}])
def test_invalid_layer_policies_are_rejected(kwargs):
    with pytest.raises(ValueError):
        LayerPolicy(**kwargs)
