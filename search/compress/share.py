"""Weight sharing (Deep Compression): the `share` knob. Each layer's weights snap to 2^share
values found by k-means; a layer stores a `share`-bit code per weight plus the codebook."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from search.compress.knob import BuildContext, Knob, weight_layers

SHARES = (0, 4, 2)  # bits of a k-means code per weight (2^b shared values); 0 = off


def share_weights(w: torch.Tensor, bits: int, sample: int = 100_000, seed: int = 0
                  ) -> torch.Tensor:
    """K-means to 2^bits values; zeros stay zero.

    Centroids are fitted on a sample (scikit-learn's k-means++; linear init as in Han et al. is
    not needed at these sizes), then every weight snaps to its nearest centroid.
    """
    from sklearn.cluster import KMeans

    flat = w.detach().float().reshape(-1).cpu().numpy()
    nonzero = flat != 0
    values = flat[nonzero]
    k = 1 << bits
    if values.size <= k:
        return w
    rng = np.random.default_rng(seed)
    fit = values if values.size <= sample else rng.choice(values, sample, replace=False)
    km = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(fit.reshape(-1, 1))
    centers = np.sort(km.cluster_centers_.reshape(-1))
    edges = (centers[1:] + centers[:-1]) / 2
    out = flat.copy()
    out[nonzero] = centers[np.searchsorted(edges, values)]
    return torch.from_numpy(out).reshape(w.shape).to(w.dtype)


class Share(Knob):
    name = "share"
    values = SHARES
    overrides = ("bits",)  # the shared values are the layer's precision: it computes in fp32
    changes_ops = False  # only the values change: the compiled layer is the fp32 one
    doc = "bits of a k-means code per weight (2^share shared values per layer); 0 = off"

    def apply_precision(self, model: nn.Module, policy: Any, ctx: BuildContext) -> None:
        for name, lp in policy.layers.items():
            if lp.share:
                for m in weight_layers(model.get_submodule(name)):
                    m.weight.data = share_weights(m.weight.data, lp.share)

    def value_bits(self, lp: Any, bits: int) -> int:
        return lp.share

    def extra_bytes(self, w: torch.Tensor, lp: Any) -> int:
        return (1 << lp.share) * 4  # the codebook, fp32

    def label(self, lp: Any) -> str:
        return f"k{lp.share}" if lp.share else ""


SHARE = Share()
