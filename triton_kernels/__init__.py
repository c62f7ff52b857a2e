"""Triton backend of fusedres (installed as ``fusedres.triton_kernels``).

Every primitive of the fused vocabulary (see ``fusedres.reference``) as Triton kernels:
implicit-GEMM NHWC convolutions with the previous BatchNorm + ReLU applied while loading
the input (prologue) and bias / residual / ReLU or per-tile BatchNorm statistics in the
epilogue, dgrad, wgrad with the same prologue (normalised activations are recomputed,
never stored), and the BatchNorm finalize / normalise-add-ReLU / backward kernels.

Runs on CUDA tensors; with ``TRITON_INTERPRET=1`` set before the kernels are first used,
the very same kernels run on CPU tensors through Triton's interpreter (slow: small shapes).
Importing this module does not import triton or touch a GPU, and nothing here imports
fusedres: the backend table that calls these kernels is ``fusedres.backends.triton``.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

_SUPPORTED = ((3, 6), (3, 10))  # triton versions this backend is written for: [3.6, 3.10)


def _interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_version() -> Optional[Tuple[int, int]]:
    try:
        import triton
    except ImportError:
        return None
    parts = triton.__version__.split(".")
    return int(parts[0]), int(parts[1])


def _loaded_mode() -> Optional[bool]:
    """Whether the kernels were compiled for the interpreter (None: not loaded yet)."""
    import sys

    mod = sys.modules.get(__name__ + "._config")
    return None if mod is None else mod.INTERPRET_AT_LOAD


def availability() -> Tuple[bool, str]:
    v = _triton_version()
    if v is None:
        return False, "triton is not installed (pip install 'triton>=3.6,<3.10')"
    if not (_SUPPORTED[0] <= v < _SUPPORTED[1]):
        return False, f"triton {v[0]}.{v[1]} is not supported (need >=3.6,<3.10)"
    if _interpreter():
        return True, f"triton {v[0]}.{v[1]} kernels; TRITON_INTERPRET=1: CPU tensors run through the interpreter"
    if torch.cuda.is_available():
        return True, f"triton {v[0]}.{v[1]} kernels on CUDA"
    return False, "no CUDA device (set TRITON_INTERPRET=1 to run the triton kernels on CPU tensors)"


def device_error(device: torch.device) -> Optional[str]:
    interp = _interpreter()
    loaded = _loaded_mode()
    if loaded is not None and loaded != interp:
        return (
            f"the triton kernels were loaded with TRITON_INTERPRET={'1' if loaded else 'unset'} and it is now "
            f"{'1' if interp else 'unset'}; set it before fusedres's triton kernels are first used"
        )
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interp:
        return None
    return (
        f"backend 'triton' runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), "
        f"got a tensor on {device}"
    )


def chosen_configs():
    """The tile configs the autotuner chose so far (GPU): {kernel: {problem key: config}}."""
    from . import _config

    return _config.chosen_configs()
