"""Loading of the C++/CUDA extension ``fusedres._C`` (the ``fusedres_ext::`` ops).

Importing this module never touches a GPU and never raises. :func:`load` imports the
extension once; if it is missing (built with ``FUSEDRES_SKIP_EXT=1``, disabled at run time
with ``FUSEDRES_DISABLE_EXT=1``, or failing to load) it warns once per process and returns
None, and the ``cpu`` / ``cuda`` backends report themselves unavailable.

Ops registered by the extension (all tensors on one device; vectors are 1-D):

``torch.ops.fusedres_ext.bn_add_act(y, scale, shift, residual, res_scale, res_shift, sample_scale, relu)``
    y: [N, C, H, W], contiguous or channels_last; CPU and CUDA: float32, float64, float16,
    bfloat16. scale/shift/res_scale/res_shift: [C], sample_scale: [N], float32 (float64 also
    accepted when y is float64). Returns y's dtype, channels_last iff y is channels_last.

``torch.ops.fusedres_ext.bn_finalize(partials, gamma, beta, running_mean, running_var, momentum, eps)``
    partials: [T, 3, C] float32 (or float64) per-tile (count, mean, M2); returns
    (mean, invstd, scale, shift) in partials' dtype and updates the running statistics in place.
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Optional

import torch

_STATE = {"tried": False, "module": None, "reason": "", "cuda": False}


def _reason_from(exc: BaseException) -> str:
    msg = str(exc) or type(exc).__name__
    if isinstance(exc, ImportError) and getattr(exc, "name", None) == "fusedres._C":
        return "not built (installed with FUSEDRES_SKIP_EXT=1?); reinstall with `pip install --no-build-isolation .`"
    if isinstance(exc, ImportError) and "cannot import name '_C'" in msg:
        return "not built (installed with FUSEDRES_SKIP_EXT=1?); reinstall with `pip install --no-build-isolation .`"
    return f"{type(exc).__name__}: {msg}"


def load():
    """Import ``fusedres._C`` once; return the module, or None (after one warning) if unavailable."""
    if _STATE["tried"]:
        return _STATE["module"]
    _STATE["tried"] = True
    if os.environ.get("FUSEDRES_DISABLE_EXT", "0") == "1":
        _STATE["reason"] = "disabled by FUSEDRES_DISABLE_EXT=1"
    else:
        try:
            mod = importlib.import_module("fusedres._C")  # registers the fusedres_ext ops
            info = str(mod.build_info())
            _register_fakes()
        except Exception as e:  # noqa: BLE001  (a broken build must not break `import fusedres`)
            _STATE["reason"] = _reason_from(e)
        else:
            _STATE["module"] = mod
            _STATE["cuda"] = "cuda" in info.split("+")
    if _STATE["module"] is None:
        warnings.warn(
            f"fusedres: C++ extension not available ({_STATE['reason']}); the 'cpu' and 'cuda' backends are "
            "disabled, 'reference' and 'triton' still work",
            UserWarning,
            stacklevel=2,
        )
    return _STATE["module"]


def status() -> dict:
    """``{"loaded": bool, "reason": str, "cuda": bool}``: whether the extension is usable,
    why not ("" when it is), and whether it was compiled with the CUDA kernels."""
    load()
    return {"loaded": _STATE["module"] is not None, "reason": _STATE["reason"], "cuda": bool(_STATE["cuda"])}


def ops() -> Optional[object]:
    """``torch.ops.fusedres_ext`` if the extension loaded, else None."""
    return torch.ops.fusedres_ext if load() is not None else None


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    # the kernels' rule: channels_last only when strictly channels_last, contiguous otherwise
    cl = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


_FAKES_REGISTERED = False


def _register_fakes() -> None:
    """Fake (meta) kernels so the ops trace under torch.compile / FakeTensor."""
    global _FAKES_REGISTERED
    if _FAKES_REGISTERED:
        return

    @torch.library.register_fake("fusedres_ext::bn_add_act")
    def _bn_add_act_fake(y, scale, shift, residual, res_scale, res_shift, sample_scale, relu):
        torch._check(y.dim() == 4, lambda: f"fusedres_ext::bn_add_act: y must be 4-D (N, C, H, W), got {y.dim()}-D")
        if residual is not None:
            torch._check(
                residual.shape == y.shape,
                lambda: f"fusedres_ext::bn_add_act: residual must have the same shape as y "
                f"({list(y.shape)}), got {list(residual.shape)}",
            )
        return torch.empty(y.shape, dtype=y.dtype, device=y.device, memory_format=_memory_format(y))

    @torch.library.register_fake("fusedres_ext::bn_finalize")
    def _bn_finalize_fake(partials, gamma, beta, running_mean, running_var, momentum, eps):
        torch._check(
            partials.dim() == 3 and partials.shape[1] == 3,
            lambda: f"fusedres_ext::bn_finalize: partials must have shape [T, 3, C], got {list(partials.shape)}",
        )
        c = partials.shape[2]
        return tuple(partials.new_empty((c,)) for _ in range(4))

    _FAKES_REGISTERED = True
