"""The real ``torchvision.models.resnet`` for tests (see ``fusedres._torchvision`` for how it
is imported where ``import torchvision`` itself fails against a CPU-only torch)."""

import pytest

from fusedres import _torchvision


def load_torchvision_resnet():
    """Return ``torchvision.models.resnet``; skip the caller if torchvision is not installed."""
    mod = _torchvision.load_resnet_module()
    if mod is None:
        pytest.skip(
            "torchvision is not installed (pip install --no-deps torchvision==0.28.0)",
            allow_module_level=True,
        )
    return mod
