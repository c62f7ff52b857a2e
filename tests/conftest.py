"""Shared fixtures. Nothing here touches CUDA at import or collection."""

import collections
import random

import pytest
import torch
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
