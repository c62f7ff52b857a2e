"""The ``cpu`` backend: the C++ extension's CPU kernels and oneDNN convolutions."""

from __future__ import annotations

import functools
from typing import Tuple

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .. import _frozen, reference
from ._extension import _ExtensionBackend, _names
from ._registry import record_fallback, register


def _nhwc_strides(x) -> bool:
    """Whether ATen and oneDNN take ``x`` for a channels_last tensor: channels_last-contiguous
    and, where that is ambiguous (x contiguous too: 1x1 spatial or one channel), with strides
    of the channels_last pattern (``Tensor.suggest_memory_format``'s rule: walking C, W, H, N,
    each stride at least the extent of the one before)."""
    if not x.is_contiguous(memory_format=torch.channels_last):
        return False
    if not x.is_contiguous():
        return True
    size, stride = x.shape, x.stride()
    if stride[1] == 0:
        return False
    least = 0
    for d in (1, 3, 2, 0):
        if size[d] == 0 or stride[d] < least or (d == 0 and least == stride[1]):
            return False
        least = stride[d] * (size[d] if size[d] > 1 else 1)
    return True


@register(auto={"cpu": 0})
class CpuBackend(_ExtensionBackend):
    """C++ CPU kernels from ``fusedres._C``; inference convolutions as one oneDNN call with
    pre-packed weights and the bias and residual add as fused post-ops (ReLU after it, so
    NaN stays NaN); other convolutions through ATen, the
    training forward's statistics by the native batch_stats."""

    name = "cpu"
    device_type = "cpu"
    # the C++ CPU kernels store 16-bit types and compute in float32, like the reference
    _DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    native = _ExtensionBackend.native + ("conv_bias_act", "conv_stats")

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def _onednn_dtypes() -> Tuple[torch.dtype, ...]:
        if not torch.backends.mkldnn.is_available():
            return ()
        ok = [torch.float32]
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            ok.append(torch.bfloat16)
        if torch.ops.mkldnn._is_mkldnn_fp16_supported():
            ok.append(torch.float16)
        return tuple(ok)

    # oneDNN-blocked copies of frozen inference weights (fusedres.freeze), per input shape
    # and geometry; keyed weakly by the frozen folded weight, a private tensor nothing ever
    # writes, so identity is a sound key and an unfrozen or re-folded weight takes its
    # packed copies with it
    _packed = WeakIdKeyDictionary()

    @classmethod
    def _prepacked(cls, weight, bias, x, stride, padding, dilation, groups):
        """(weight, bias in x's dtype), the weight in oneDNN's blocked layout for this conv
        where that changes nothing but speed: a frozen folded weight (any other tensor may be
        edited behind its version counter, or be a buffer that torch.compile reuses) and a
        channels_last input (for NCHW inputs oneDNN's blocked kernel accumulates in another
        order than ATen's NCHW convolution, so the packed path would not give eager PyTorch's
        numerics). A tensor that is both (1x1 spatial, as in layer4 of a small image) counts
        as channels_last when its strides say so, as oneDNN reads it: packing it changes no
        bit either."""
        if not _frozen.is_frozen_weight(weight) or not _nhwc_strides(x):
            return weight, None if bias is None else bias.to(x.dtype)
        key = (tuple(x.shape), x.dtype, tuple(stride), tuple(padding), tuple(dilation), groups)
        per_weight = cls._packed.setdefault(weight, {})
        packed = per_weight.get(key)
        # the bias in x's dtype is kept beside it: the frozen fold made it with the weight and
        # never writes it either (checked by identity, version and storage all the same)
        stamp = None if bias is None else (-1 if bias.is_inference() else bias._version, bias.data_ptr())
        if packed is None or packed[1] is not bias or packed[2] != stamp:
            if len(per_weight) >= 8:  # a new input shape: bound the copies kept per weight
                per_weight.clear()
            w = packed[0] if packed is not None else torch.ops.mkldnn._reorder_convolution_weight(
                weight, list(padding), list(stride), list(dilation), groups, list(x.shape)
            )
            packed = (w, bias, stamp, None if bias is None else bias.to(x.dtype))
            per_weight[key] = packed
        return packed[0], packed[3]

    # conv_bias_act(..., residual_owned=True): the residual may be overwritten (see below)
    accepts_owned_residual = True

    @classmethod
    def conv_bias_act(
        cls, x, weight, bias, residual, in_scale, in_shift, in_relu, stride, padding, dilation, groups, relu,
        residual_owned=False,
    ):
        # oneDNN fuses the bias and a residual add after the conv; it has no input prologue
        # and no fp64. Its ReLU post-op turns NaN into 0, so ReLU runs as torch.relu_ after
        # it, which keeps NaN as the reference does.
        why = cls._onednn_reason(x, weight, in_scale, in_relu)
        if why:
            record_fallback(cls.name, "conv_bias_act", why)
            return reference.conv_bias_act(
                x, weight, bias, residual, in_scale, in_shift, in_relu, stride, padding, dilation, groups, relu
            )
        # (an x both NCHW- and NHWC-contiguous keeps the NHWC strides it came with, so that
        # the next convolution is packed too)
        fmt = torch.channels_last if _nhwc_strides(x) else reference.memory_format(x)
        x = x.contiguous(memory_format=fmt)
        w, b = cls._prepacked(weight, bias, x, stride, padding, dilation, groups)
        pw = torch.ops.mkldnn._convolution_pointwise
        if residual is None:
            y = pw(x, w, b, padding, stride, dilation, groups, "none", [], "")
        else:
            # The residual is accumulated by oneDNN's in-place "sum" post-op into a copy of
            # it (the caller's tensor is never written, unless the caller hands it over with
            # residual_owned=True): measured about 3x faster per call than the out-of-place
            # binary-add post-op on NHWC ResNet shapes, which more than pays for the copy.
            y = residual.to(dtype=x.dtype, memory_format=fmt, copy=not residual_owned)
            torch.ops.mkldnn._convolution_pointwise_.binary(
                y, x, w, b, padding, stride, dilation, groups, "add", 1.0, None, [], ""
            )
        if relu:
            # NaN-keeping ReLU; the native one for 16-bit types (ATen's converts every
            # element to float and back, about 3x slower on bfloat16)
            if y.element_size() == 2:
                torch.ops.fusedres_ext.relu_(y)
            else:
                y.relu_()
        return y.contiguous(memory_format=fmt)

    @classmethod
    def _onednn_reason(cls, x, weight, in_scale, in_relu) -> str:
        """Why the fused oneDNN convolution cannot run this call ("" if it can)."""
        if in_scale is not None or in_relu:
            return "an input prologue (oneDNN convolutions have none)"
        if x.dtype not in cls._onednn_dtypes():
            return f"{x.dtype} input (oneDNN convolutions here: {_names(cls._onednn_dtypes())})"
        if weight.dtype != x.dtype:
            return f"weight {weight.dtype} for a {x.dtype} input"
        return ""

    @classmethod
    def conv_stats(cls, x, weight, in_scale, in_shift, in_relu, stride, padding, dilation, groups):
        # the conv through ATen (oneDNN), its statistics from the native batch_stats: one
        # pass over y instead of the reference's mean, subtract, square and sum
        h = reference.prologue(x, in_scale, in_shift, in_relu)
        y = torch.nn.functional.conv2d(h, weight, None, stride, padding, dilation, groups)
        y = y.contiguous(memory_format=reference.memory_format(x))
        return y, cls.batch_stats(y)

    @classmethod
    def availability(cls) -> Tuple[bool, str]:
        from .. import _ext

        st = _ext.status()
        if not st["loaded"]:
            return False, f"C++ extension not available ({st['reason']})"
        return True, "C++ extension"
