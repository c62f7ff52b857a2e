"""The real ``torchvision.models.resnet`` for tests, also where ``import torchvision`` fails.

The torchvision wheels on PyPI are CUDA builds. With a CPU-only torch, ``import torchvision``
raises while registering fake kernels for its compiled ops (``operator torchvision::nms does
not exist``): its ``_C`` library links against CUDA libraries the CPU torch does not ship, so
the ops it would define never appear. The ResNet definitions themselves are pure Python.

``load_torchvision_resnet()`` first tries the normal import. If that fails, it drops the
half-imported modules and registers two bare package objects, ``torchvision`` and
``torchvision.models``, whose ``__path__`` points at the installed package, so that
``torchvision.models.resnet`` and the few pure-Python modules it needs import from the wheel
without running the package ``__init__`` files that load and register the compiled ops.
The returned module is torchvision's own code, not a copy.
"""

import importlib
import importlib.util
import os
import sys
import types

import pytest


def _purge():
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]


def load_torchvision_resnet():
    """Return ``torchvision.models.resnet``; skip the calling test if torchvision is absent."""
    mod = sys.modules.get("torchvision.models.resnet")
    if mod is not None:
        return mod
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("torchvision is not installed (pip install --no-deps torchvision)")
    try:
        return importlib.import_module("torchvision.models.resnet")
    except Exception:  # the compiled-op registration failure described above
        _purge()
    root = list(spec.submodule_search_locations)[0]
    for name, path in (("torchvision", root), ("torchvision.models", os.path.join(root, "models"))):
        pkg = types.ModuleType(name)
        pkg.__path__ = [path]
        pkg.__file__ = os.path.join(path, "__init__.py")
        pkg.__package__ = name
        sys.modules[name] = pkg
    try:
        return importlib.import_module("torchvision.models.resnet")
    except Exception as e:
        _purge()
        raise ImportError(f"could not import torchvision.models.resnet from {root}: {e}") from e
