"""Shared fixtures. Nothing here touches CUDA at import or collection.

Without a CUDA device the triton backend's kernels run on CPU tensors through Triton's
interpreter, so every test that runs over the available backends covers them too.
TRITON_INTERPRET must be set before any kernel is defined, hence here, before the tests
import fusedres. Set TRITON_INTERPRET=0 to leave the triton backend out.
"""

import collections
import os
import random

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from torch.utils._python_dispatch import TorchDispatchMode

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    torch.manual_seed(0)
    yield


class OpCounter(TorchDispatchMode):
    """Counts the fusedres:: ops dispatched inside the context (proves the fused path ran)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if name.startswith("fusedres::"):
            self.counts[name.split("::")[1].split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def op_counter():
    return OpCounter
