"""The real ``torchvision.models.resnet``, also where ``import torchvision`` fails.

The torchvision wheels on PyPI are CUDA builds: ``torchvision/_C.so`` links against
``libc10_cuda.so`` and ``libtorch_cuda.so``, which a CPU-only torch does not ship. torchvision
swallows that load failure, but its ``_meta_registrations`` then calls
``torch.library.register_fake("torchvision::nms")`` without checking that the op exists, so
``import torchvision`` raises ``RuntimeError: operator torchvision::nms does not exist``.
The ResNet definitions themselves are pure Python.

``load_resnet_module()`` first tries the normal import. If that fails, it drops the
half-imported ``torchvision*`` modules and registers two package modules, ``torchvision`` and
``torchvision.models``, built from the installed package's specs but never executed, so
``torchvision.models.resnet`` and the pure-Python modules it needs (``models._api``,
``transforms``, ``utils``, ...) import from the wheel without running the package
``__init__`` files that load the compiled ops. torch itself is not patched; the returned
module is torchvision's own code, not a copy. Used by the tests and by ``fusedres bench``
(eager / torch.compile baselines).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType
from typing import Optional

_NAME = "torchvision.models.resnet"


def _purge() -> None:
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]


def _bare_package(name: str, path: str) -> None:
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(path, "__init__.py"), submodule_search_locations=[path]
    )
    sys.modules[name] = importlib.util.module_from_spec(spec)  # not executed


def installed() -> bool:
    spec = importlib.util.find_spec("torchvision")
    return spec is not None and bool(spec.submodule_search_locations)


def load_resnet_module() -> Optional[ModuleType]:
    """``torchvision.models.resnet``, or None when torchvision is not installed."""
    if _NAME in sys.modules:
        return sys.modules[_NAME]
    if not installed():
        return None
    spec = importlib.util.find_spec("torchvision")
    try:
        return importlib.import_module(_NAME)
    except Exception:  # the compiled-op registration failure described above
        _purge()
    root = list(spec.submodule_search_locations)[0]
    _bare_package("torchvision", root)
    _bare_package("torchvision.models", os.path.join(root, "models"))
    try:
        return importlib.import_module(_NAME)
    except Exception as e:
        _purge()
        raise ImportError(f"cannot import {_NAME} from {root}: {type(e).__name__}: {e}") from e
