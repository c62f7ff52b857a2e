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


def _check_install():
    """Fail the run, loudly, when the fusedres under test is a bare source tree: there
    ``fusedres.triton_kernels`` (mapped from ``triton_kernels/`` by the build) and the C++
    extension are missing, and every test of those backends would quietly skip."""
    import importlib.util

    import fusedres
    from fusedres import _ext

    missing = []
    if importlib.util.find_spec("fusedres.triton_kernels") is None:
        missing.append("fusedres.triton_kernels")
    skip_ext = os.environ.get("FUSEDRES_DISABLE_EXT", "0") == "1" or os.environ.get("FUSEDRES_SKIP_EXT", "0") == "1"
    if not skip_ext and not _ext.status()["loaded"]:
        missing.append(f"the C++ extension ({_ext.status()['reason']})")
    if missing:
        pytest.exit(
            f"fusedres imported from {os.path.dirname(fusedres.__file__)} lacks {' and '.join(missing)}: "
            "install it (`pip install --no-build-isolation .`) and run `pytest tests` "
            "(not `python -m pytest`, which puts the source tree first on sys.path); "
            "FUSEDRES_DISABLE_EXT=1 tests without the extension on purpose",
            returncode=4,
        )


def pytest_sessionstart(session):
    _check_install()

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
