"""Triton backend of fusedres (installed as ``fusedres.triton_kernels``).

The kernels are not part of this release yet: the backend reports itself as
unavailable with that reason, so ``backend="auto"`` skips it and an explicit
``backend="triton"`` fails with a clear error instead of running something else.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch


def _interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def availability() -> Tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "triton is not installed"
    return False, "the triton kernels are not implemented in this version"


def backend_class():
    raise NotImplementedError("the triton kernels are not implemented in this version")


def device_error(device: torch.device) -> Optional[str]:
    if device.type == "cuda":
        return None
    if device.type == "cpu" and _interpreter():
        return None
    return f"backend 'triton' runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got a tensor on {device}"
