"""Deep Compression's sparse storage: relative indices with fillers, Huffman-coded streams."""

from __future__ import annotations

import numpy as np
import torch

from search.compress.sparse import huffman_bits, relative_indices, weight_bytes


def test_relative_indices_round_trip_with_fillers():
    rng = np.random.default_rng(0)
    mask = rng.random(5000) < 0.02  # long gaps: many need fillers at 3 bits
    stream, fillers = relative_indices(mask, 3)
    assert fillers > 0 and stream.max() <= 7
    assert len(stream) == mask.sum() + fillers
    # decoding: each entry sits gap+1 after the previous one; fillers hold stored zeros
    entries = np.cumsum(stream + 1) - 1
    assert set(np.flatnonzero(mask)) <= set(entries.tolist())
    assert len(set(entries.tolist()) - set(np.flatnonzero(mask))) == fillers


def test_huffman_is_never_worse_than_fixed_width_and_wins_on_skew():
    skewed = np.array([0] * 900 + [1] * 50 + [2] * 30 + [3] * 20)
    assert huffman_bits(skewed) < len(skewed) * 2
    uniform = np.arange(256).repeat(4)
    assert huffman_bits(uniform) == len(uniform) * 8


def test_a_pruned_weight_costs_less_than_dense_and_a_dense_one_costs_dense():
    torch.manual_seed(0)
    w = torch.randn(256, 256)
    dense = weight_bytes(w, 32, 5)
    assert dense == 256 * 256 * 4
    sparse = w * (torch.rand_like(w) < 0.1)  # 90% zeros
    assert weight_bytes(sparse, 32, 5) < 0.25 * dense
    few = w * (torch.rand_like(w) < 0.99)  # 1% zeros: indices (>= 1 bit each) cost more
    assert weight_bytes(few, 32, 5) == dense
