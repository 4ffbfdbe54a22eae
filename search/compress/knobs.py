"""The built-in knobs, registered here in the order their steps apply: channels are removed
first, the surviving layers factorized, sparsity masks attached; after the fine-tune, the
precision, then shared values. A knob of your own: subclass search.compress.knob.Knob and
`register` it (README: "Adding a knob")."""

from search.compress import channels, lowrank, precision, share, sparse
from search.compress.knob import REGISTRY, Knob, knob_names, register, registered

BUILT_IN: tuple[Knob, ...] = (
    channels.SPARSITY, channels.IMPORTANCE,  # structure: channel groups removed first,
    lowrank.RANK, lowrank.THRESHOLD, lowrank.SPLIT,  # then the layers left factorized,
    sparse.PRUNE, sparse.NM_KNOB,  # then masks on the weights they end with
    precision.BITS_KNOB, precision.HALF,  # after the fine-tune: the precision,
    share.SHARE,  # or shared values in its place
)
for _knob in BUILT_IN:
    if _knob.name not in REGISTRY:
        register(_knob)

__all__ = ["BUILT_IN", "REGISTRY", "Knob", "knob_names", "register", "registered"]
