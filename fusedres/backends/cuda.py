"""The ``cuda`` backend: the C++ extension's CUDA kernels, its CUTLASS convolutions where
they take the call (``fusedres.backends._cutlass``: the ops and the support predicate), ATen
(cuDNN) otherwise."""

from __future__ import annotations

import functools
import os
from typing import Tuple

import torch

from .. import reference
from ._extension import _ExtensionBackend
from ._registry import record_fallback, register


@register(auto={"cuda": 0})
class CudaBackend(_ExtensionBackend):
    """CUDA C++ kernels from ``fusedres._C``. Convolutions run on its CUTLASS tensor-core
    kernels where the extension's support predicate takes the call (float16/bfloat16,
    channels_last, channels a multiple of 8; grouped convolutions in the forward only, with
    a multiple of 32 input and 8, 16, 32 or 64 output channels per group:
    ``fusedres.backends._cutlass``), through ATen (cuDNN)
    otherwise, and always through ATen when the extension was built without CUTLASS."""

    name = "cuda"
    device_type = "cuda"
    _DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    _CUTLASS_NATIVE = ("conv_bias_act", "conv_stats", "conv_dgrad", "conv_wgrad", "bn_apply_conv_backward")

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def _cutlass():
        """``fusedres.backends._cutlass`` when the extension has the CUTLASS kernels, else None."""
        from .. import _ext
        from . import _cutlass

        if _ext.load() is None:
            return None
        try:
            if not _cutlass.built():
                return None
        except (AttributeError, RuntimeError):  # an extension built before the conv ops existed
            return None
        _cutlass.register_fakes()
        return _cutlass

    @classmethod
    def _cutlass_reason(cls, predicate: str, *args) -> str:
        """Why the CUTLASS kernel cannot run this call ("" if it can): ``predicate`` is the
        name of one of ``fusedres.backends._cutlass``'s reason functions."""
        cut = cls._cutlass()
        if cut is None:
            return "the extension was built without CUTLASS"
        return getattr(cut, predicate)(*args) or ""

    @classmethod
    def _prologue_first(cls, x, in_scale, in_shift, in_relu):
        """(x, in_scale, in_shift, in_relu) for the convolution kernels. By default a
        BatchNorm prologue runs as one native pass (bn_add_act: float32 scale and shift, one
        rounding, the reference's numerics) and the convolution takes its output: CUTLASS's
        mainloop fusion can only load scale and shift in the 16-bit storage dtype, whose
        rounding costs |shift| * 2**-9 (bfloat16) per element and breaks the numerics rule
        when the BatchNorm's |mean/sigma| is large (|shift| >> the normalised value).
        ``FUSEDRES_CUDA_PROLOGUE=fused`` keeps the prologue in the CUTLASS mainloop
        (16-bit scale and shift: one activation pass less, within the rule only for small
        |mean/sigma|)."""
        if in_scale is None or os.environ.get("FUSEDRES_CUDA_PROLOGUE", "exact") == "fused":
            return x, in_scale, in_shift, in_relu
        if cls._native_backward(x, x, None, (in_scale, in_shift)):
            h = cls._ops().bn_add_act(x, in_scale, in_shift, None, None, None, None, in_relu)
        else:
            h = reference.prologue(x, in_scale, in_shift, in_relu)
        return h, None, None, False

    @classmethod
    def conv_bias_act(cls, x, weight, bias, residual, in_scale, in_shift, in_relu, stride, padding, dilation, groups, relu):
        x, in_scale, in_shift, in_relu = cls._prologue_first(x, in_scale, in_shift, in_relu)
        why = cls._cutlass_reason("fprop_reason", x, weight, bias, residual, in_scale, in_relu, stride, padding,
                                  dilation, groups)
        if why:
            record_fallback(cls.name, "conv_bias_act", why)
            return reference.conv_bias_act(
                x, weight, bias, residual, in_scale, in_shift, in_relu, stride, padding, dilation, groups, relu
            )
        return cls._cutlass().conv_bias_act(
            x, weight, bias, residual, in_scale, in_shift, stride, padding, dilation, relu
        )

    @classmethod
    def conv_stats(cls, x, weight, in_scale, in_shift, in_relu, stride, padding, dilation, groups):
        x, in_scale, in_shift, in_relu = cls._prologue_first(x, in_scale, in_shift, in_relu)
        why = cls._cutlass_reason("fprop_reason", x, weight, None, None, in_scale, in_relu, stride, padding,
                                  dilation, groups)
        if why:
            record_fallback(cls.name, "conv_stats", why)
            return reference.conv_stats(x, weight, in_scale, in_shift, in_relu, stride, padding, dilation, groups)
        return cls._cutlass().conv_stats(x, weight, in_scale, in_shift, stride, padding, dilation)

    @classmethod
    def conv_dgrad(cls, dy, weight, input_shape, stride, padding, dilation, groups, dx_add=None):
        why = cls._cutlass_reason("dgrad_reason", dy, weight, input_shape, stride, padding, dilation, groups, dx_add)
        if why:
            record_fallback(cls.name, "conv_dgrad", why)
            return reference.conv_dgrad(dy, weight, input_shape, stride, padding, dilation, groups, dx_add)
        return cls._cutlass().conv_dgrad(dy, weight, input_shape, stride, padding, dilation, dx_add)

    @classmethod
    def conv_wgrad(cls, dy, x, in_scale, in_shift, in_relu, weight_shape, stride, padding, dilation, groups):
        x, in_scale, in_shift, in_relu = cls._prologue_first(x, in_scale, in_shift, in_relu)
        why = cls._cutlass_reason("wgrad_reason", dy, x, in_scale, in_relu, weight_shape, stride, padding, dilation,
                                  groups)
        if why:
            record_fallback(cls.name, "conv_wgrad", why)
            return reference.conv_wgrad(
                dy, x, in_scale, in_shift, in_relu, weight_shape, stride, padding, dilation, groups
            )
        return cls._cutlass().conv_wgrad(dy, x, in_scale, in_shift, weight_shape, stride, padding, dilation)

    @classmethod
    def availability(cls) -> Tuple[bool, str]:
        from .. import _ext

        st = _ext.status()
        if not st["loaded"]:
            return False, f"C++ extension not available ({st['reason']})"
        if not st["cuda"]:
            return False, "extension built without CUDA"
        if not torch.cuda.is_available():
            return False, "no CUDA device visible to PyTorch"
        cutlass = cls._cutlass() is not None
        # the convolutions are this backend's own only with the CUTLASS kernels compiled in
        cls.native = _ExtensionBackend.native + (cls._CUTLASS_NATIVE if cutlass else ())
        convs = (
            "convolutions on CUTLASS where supported, else ATen"
            if cutlass
            else "convolutions through ATen (extension built without CUTLASS)"
        )
        return True, f"CUDA extension on {torch.cuda.get_device_name()}; {convs}"
