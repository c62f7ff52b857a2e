"""Loading of the C++/CUDA extension ``fusedres._C`` (the ``fusedres_ext::`` ops).

Importing this module never touches a GPU and never raises: if the extension is missing
(built with ``FUSEDRES_SKIP_EXT=1``, disabled with ``FUSEDRES_DISABLE_EXT=1``, or failing to
load) it warns once and the ``cpu`` / ``cuda`` backends report themselves unavailable.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import torch

_STATE = {"tried": False, "module": None, "reason": "", "cuda": False}


def load():
    """Import ``fusedres._C`` once; return it, or None (after one warning) if unavailable."""
    if _STATE["tried"]:
        return _STATE["module"]
    _STATE["tried"] = True
    if os.environ.get("FUSEDRES_DISABLE_EXT", "0") == "1":
        _STATE["reason"] = "disabled by FUSEDRES_DISABLE_EXT=1"
    else:
        try:
            from . import _C  # noqa: F401  (registers the fusedres_ext ops)

            _STATE["module"] = _C
            _STATE["cuda"] = "cuda" in _C.build_info()
            _register_fakes()
        except ImportError as e:
            msg = str(e)
            _STATE["reason"] = (
                "not built; reinstall without FUSEDRES_SKIP_EXT=1" if "_C" in msg and "cannot import" in msg else msg
            )
    if _STATE["module"] is None:
        warnings.warn(
            f"fusedres: C++ extension not available ({_STATE['reason']}); the 'cpu' and 'cuda' backends are "
            "disabled, 'reference' and 'triton' still work",
            UserWarning,
            stacklevel=2,
        )
    return _STATE["module"]


def status() -> dict:
    load()
    return {"loaded": _STATE["module"] is not None, "reason": _STATE["reason"], "cuda": _STATE["cuda"]}


def _layout(t: torch.Tensor) -> torch.memory_format:
    cl = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


def _register_fakes() -> None:
    @torch.library.register_fake("fusedres_ext::bn_add_act")
    def _(y, scale, shift, residual, res_scale, res_shift, sample_scale, relu):
        return torch.empty(y.shape, dtype=y.dtype, device=y.device, memory_format=_layout(y))

    @torch.library.register_fake("fusedres_ext::bn_finalize")
    def _(partials, gamma, beta, running_mean, running_var, momentum, eps):
        c = partials.shape[2]
        return tuple(partials.new_empty((c,)) for _ in range(4))


def ops() -> Optional[object]:
    return torch.ops.fusedres_ext if load() is not None else None
