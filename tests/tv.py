"""The real torchvision for tests (see ``fusedres._torchvision`` for how it is imported where
``import torchvision`` itself fails against a CPU-only torch): its ResNet definitions, its
detection backbones and FX feature extraction, and timm (which imports torchvision)."""

import importlib

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


def import_torchvision(name):
    """``torchvision.<name>`` (a pure-Python module), importable once the ResNet module is."""
    load_torchvision_resnet()
    return importlib.import_module(f"torchvision.{name}")


def import_feature_extraction():
    """``torchvision.models.feature_extraction``. Its tracers autowrap ``torchvision.ops`` (an
    attribute of the package once ``import torchvision`` has run, not of the bare package of
    ``fusedres._torchvision``), so that is imported first."""
    import_torchvision("ops")
    return import_torchvision("models.feature_extraction")


def load_timm():
    """timm, imported after torchvision is importable; skip the caller if it is not installed."""
    load_torchvision_resnet()
    return pytest.importorskip("timm")
