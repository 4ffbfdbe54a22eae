"""Unstructured and N:M sparsity: the `prune` and `nm` knobs, and the bytes a sparse weight needs.

`prune` zeroes the given fraction of a layer's weights by magnitude; `nm` keeps N of every M
consecutive weights of an output channel. Both are fixed masks (parametrizations) through the
fine-tune, so pruned weights stay zero, and are computed dense (Relax has no sparse kernels).

Bytes a pruned weight really needs when stored sparse, as in Deep Compression (Han et al.).

Non-zeros are stored with the gap to the previous non-zero (a relative index of `index_bits`);
a gap too long for the index gets filler entries (a stored zero). Both streams are then Huffman
coded. A layer takes the smaller of this and its dense size, as a deployment would.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.utils.parametrize as parametrize
from torch import nn

from search.compress.knob import BuildContext, Knob, weight_layers
from search.compress.quantize import Mask, nm_mask, parse_nm

PRUNES = (0.0, 0.5, 0.75, 0.9)  # fraction of weights zeroed by magnitude (unstructured)
NMS = ("off", "2:4", "1:4")  # N:M sparsity: keep N of every M consecutive weights
INDEX_BITS = {"conv": 8, "linear": 5}  # Deep Compression's relative-index widths (Han et al.)


def huffman_bits(symbols: np.ndarray) -> int:
    """Total bits of the Huffman code of a symbol stream (code lengths from the frequencies)."""
    counts = list(Counter(symbols.tolist()).values())
    if len(counts) <= 1:
        return len(symbols)  # one symbol still needs a bit each
    heap = [(c, i, 0) for i, c in enumerate(counts)]  # (weight, tiebreak, bits so far)
    heapq.heapify(heap)
    total, tiebreak = 0, len(counts)
    while len(heap) > 1:
        a, _, _ = heapq.heappop(heap)
        b, _, _ = heapq.heappop(heap)
        total += a + b  # every symbol under a merge gets one more bit
        heapq.heappush(heap, (a + b, tiebreak, 0))
        tiebreak += 1
    return total


def relative_indices(flat_nonzero: np.ndarray, index_bits: int) -> tuple[np.ndarray, int]:
    """Gaps between non-zeros, capped at 2^bits - 1 by fillers; returns (gaps, fillers).

    A gap g longer than the cap becomes g // 2^bits filler entries (each skipping 2^bits
    positions: `cap` gap plus its own stored zero) and the remainder.
    """
    cap = (1 << index_bits) - 1
    pos = np.flatnonzero(flat_nonzero)
    gaps = np.diff(np.concatenate([[-1], pos])) - 1
    fill = gaps // (cap + 1)
    rest = gaps - fill * (cap + 1)
    # per non-zero: its fillers (symbol `cap`) then its own remainder gap
    stream = np.repeat(np.stack([np.full_like(gaps, cap), rest], axis=1).reshape(-1),
                       np.stack([fill, np.ones_like(fill)], axis=1).reshape(-1))
    return stream.astype(np.int64), int(fill.sum())


def weight_bytes(weight: torch.Tensor, value_bits: int, index_bits: int) -> int:
    """min(dense, sparse + Huffman) bytes of one weight tensor at `value_bits` per value."""
    w = weight.detach().float().reshape(-1).cpu().numpy()
    dense = (w.size * value_bits + 7) // 8
    nonzero = w != 0
    if nonzero.all():
        return dense
    gaps, fillers = relative_indices(nonzero, index_bits)
    entries = len(gaps)
    index_part = huffman_bits(gaps)
    codebooks = len(np.unique(gaps)) * (index_bits + 8)  # symbol + code length per entry
    if value_bits <= 8:  # discrete codes: Huffman over the stored values (fillers store 0)
        values = np.concatenate([w[nonzero], np.zeros(fillers, dtype=w.dtype)])
        value_part = huffman_bits(values)
        codebooks += len(np.unique(values)) * (value_bits + 8)
    else:
        value_part = entries * value_bits
    sparse = (index_part + value_part + codebooks + 7) // 8
    return min(dense, sparse)


def nm_bytes(weight: torch.Tensor, n: int, m: int, value_bits: int) -> int:
    """Bytes of an N:M-sparse weight in the format sparse tensor cores read: the N kept values
    of each group of M, plus a ceil(log2 M)-bit position for each."""
    groups = -(-weight.numel() // m)
    index_bits = max(1, (m - 1).bit_length())
    return (groups * n * (value_bits + index_bits) + 7) // 8


# --- the knobs --------------------------------------------------------------------------------

def _mask_each(model: nn.Module, policy: object, knob: Knob,
               mask_of: Callable[[torch.Tensor, object], torch.Tensor | None]) -> None:
    """A fixed mask parametrization on every weight of the layers where `knob` is set."""
    for name, lp in policy.layers.items():
        if getattr(lp, knob.name) == knob.identity:
            continue
        for m in weight_layers(model.get_submodule(name)):
            mask = mask_of(m.weight.detach(), lp)
            if mask is not None:
                parametrize.register_parametrization(m, "weight", Mask(mask))


def magnitude_mask(w: torch.Tensor, fraction: float) -> torch.Tensor | None:
    """The `fraction` of smallest |w| zeroed; None when that is no weight."""
    k = int(round(fraction * w.numel()))
    if k <= 0:
        return None
    cut = w.abs().reshape(-1).kthvalue(k).values
    return w.abs() > cut


class Prune(Knob):
    name = "prune"
    values = PRUNES
    bounds = (0.0, 1.0)
    doc = "fraction of weights zeroed by magnitude: stored sparse, computed dense"

    def restructure(self, model: nn.Module, policy: object, ctx: BuildContext) -> None:
        _mask_each(model, policy, self, lambda w, lp: magnitude_mask(w, lp.prune))

    def sparse_bytes(self, w: torch.Tensor, lp: object, value_bits: int,
                     module: nn.Module) -> int | None:
        index = INDEX_BITS["conv" if isinstance(module, nn.Conv2d) else "linear"]
        return weight_bytes(w, value_bits, index)

    def label(self, lp: object) -> str:
        return f"p{lp.prune:g}" if lp.prune > 0 else ""


class NM(Knob):
    name = "nm"
    values = NMS
    doc = "N:M structured sparsity (2:4: keep 2 of every 4): stored sparse, computed dense"

    def restructure(self, model: nn.Module, policy: object, ctx: BuildContext) -> None:
        _mask_each(model, policy, self, lambda w, lp: nm_mask(w, *parse_nm(lp.nm)))

    def sparse_bytes(self, w: torch.Tensor, lp: object, value_bits: int,
                     module: nn.Module) -> int | None:
        return nm_bytes(w, *parse_nm(lp.nm), value_bits)

    def label(self, lp: object) -> str:
        return lp.nm if lp.nm != "off" else ""


PRUNE = Prune()
NM_KNOB = NM()
