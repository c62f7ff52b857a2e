"""Locate the CUTLASS headers for the CUDA convolution kernels (shared by setup.py,
CMakeLists.txt and .ci/compile_cuda.sh).

Order: the CUTLASS_DIR environment variable (a CUTLASS checkout, its include/ directory, or
any directory holding cutlass/cutlass.h), then the ``nvidia-cutlass`` wheel's bundled
sources (``cutlass_library/source/include``, found without importing the package).

    python csrc/find_cutlass.py        # prints the include directory; exit status 1 if none
    python csrc/find_cutlass.py --util # the CUTLASS 3.x utility headers (tools/util/include)

The Hopper-native kernels (CUTLASS 3.x) also need ``tools/util/include`` of the same tree
(``cutlass/util/packed_stride.hpp``); the wheel and a checkout both have it.

Install the headers with ``pip install --no-deps nvidia-cutlass==4.2.0.0``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Optional

HEADER = os.path.join("cutlass", "cutlass.h")


def _include_dir_under(root: str) -> Optional[str]:
    for cand in (root, os.path.join(root, "include"), os.path.join(root, "source", "include")):
        if os.path.isfile(os.path.join(cand, HEADER)):
            return os.path.abspath(cand)
    return None


def find_cutlass() -> Optional[str]:
    """The directory to pass as ``-I`` (it holds ``cutlass/cutlass.h``), or None."""
    env = os.environ.get("CUTLASS_DIR", "").strip()
    if env:
        return _include_dir_under(env)  # an explicit choice is never silently replaced
    spec = importlib.util.find_spec("cutlass_library")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            found = _include_dir_under(os.path.join(loc, "source"))
            if found:
                return found
    return None


def find_cutlass_util(include_dir: Optional[str] = None) -> Optional[str]:
    """``tools/util/include`` beside the CUTLASS include directory, or None."""
    include_dir = include_dir or find_cutlass()
    if include_dir is None:
        return None
    cand = os.path.join(os.path.dirname(include_dir), "tools", "util", "include")
    return os.path.abspath(cand) if os.path.isfile(os.path.join(cand, "cutlass", "util", "packed_stride.hpp")) else None


if __name__ == "__main__":
    path = find_cutlass_util() if sys.argv[1:] == ["--util"] else find_cutlass()
    if path is None:
        sys.stderr.write(
            "CUTLASS headers not found: set CUTLASS_DIR or `pip install --no-deps nvidia-cutlass==4.2.0.0`\n"
        )
        sys.exit(1)
    print(path)
