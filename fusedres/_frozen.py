"""Bookkeeping of the opt-in frozen (deployment) mode, shared by the block layer and the
backends without either importing the other.

By default nothing derived from a parameter or buffer is cached: evaluation folds
BatchNorm into the convolution weights on every call, because edits made through
``.data``, pruning and parametrizations do not bump version counters, so a cache keyed on
versions could serve stale values. :func:`fusedres.freeze` is the user's promise that the
weights of a model will not change; only then are folded weights (and, on the cpu backend,
their oneDNN-packed copies) kept. Frozen folded weights are private tensors that nothing
ever writes, so a backend may key further caches on their identity.
"""

from __future__ import annotations

import weakref

from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

# convolutions whose folded weights may be cached (set by fusedres.freeze)
CONVS: "weakref.WeakSet" = weakref.WeakSet()
# folded weights made by the frozen cache: never written after creation
_WEIGHTS = WeakIdKeyDictionary()


def mark(t: Tensor) -> Tensor:
    _WEIGHTS[t] = True
    return t


def is_frozen_weight(t: Tensor) -> bool:
    return t in _WEIGHTS
