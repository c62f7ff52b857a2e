"""The CUTLASS convolution ops of the extension (``fusedres_ext::conv_*_cutlass``) as the
``cuda`` backend uses them: which calls they take, and fake (meta) kernels so that
torch.compile / FakeTensor can trace them.

The decision of which calls run on CUTLASS is made in one place, the C++ predicate
``csrc/kernels/conv_support.h``, exposed as ``torch.ops.fusedres_ext.conv_cutlass_support``
(callable on any machine, GPU or not); :func:`unsupported` asks it, with a cache.

Ops (CUDA tensors; float16/bfloat16; x, dy NHWC in memory for speed, other layouts are
converted; in_scale/in_shift/bias: [C]/[K] vectors in any float dtype; groups are inferred from
the weight's shape as in ``torch.nn.functional.conv2d``, and only ``conv_bias_act_cutlass`` /
``conv_stats_cutlass`` without in_scale and residual take groups > 1, see conv_support.h):

``conv_bias_act_cutlass(x, weight, bias, residual, in_scale, in_shift, stride, padding, dilation, relu, hopper=False)``
    act(conv(pro(x), weight) + bias + residual), pro(x) = relu(x*in_scale + in_shift) when
    in_scale is given (then no bias); x's layout rule for the output.
``conv_stats_cutlass(x, weight, in_scale, in_shift, stride, padding, dilation, hopper=False)``
    (y, partials [1, 3, K] float32 (count, mean, M2) per output channel).

``hopper``: run the convolution on the Hopper-native kernel (CUTLASS 3.x: TMA, wgmma) where
it takes the call (an sm_90 device, bfloat16, groups 1, no in_scale) and fall back to the Sm80
kernel elsewhere. The backend passes :func:`hopper_requested` (``FUSEDRES_CUDA_HOPPER=1``);
off by default until a GPU run has checked it.
``conv_dgrad_cutlass(dy, weight, input_shape, stride, padding, dilation, addend)``
    dx (+ addend when given: input_shape, dy's dtype; added to the float32 sum, one
    rounding) in dy's layout rule.
``conv_wgrad_cutlass(dy, x, in_scale, in_shift, weight_shape, stride, padding, dilation)``
    dw contiguous [K, C, R, S] in dy's dtype; the input is pro(x) as above.
"""

from __future__ import annotations

import functools
import os
from typing import List, Sequence

import torch
from torch import Tensor

KINDS = ("fprop", "fprop_prologue", "dgrad", "wgrad", "wgrad_prologue")


def _channels_last(t: Tensor) -> bool:
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)


def _layout_rule(t: Tensor) -> torch.memory_format:
    cl = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


@functools.lru_cache(maxsize=4096)
def _ask(kind, dtype, x_shape, w_shape, stride, padding, dilation, groups, bias, residual, input_relu, nhwc, same):
    return torch.ops.fusedres_ext.conv_cutlass_support(
        kind, dtype, list(x_shape), list(w_shape), list(stride), list(padding), list(dilation), groups,
        bias, residual, input_relu, nhwc, same,
    )


def unsupported(
    kind: str,
    dtype: torch.dtype,
    x_shape: Sequence[int],
    w_shape: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    *,
    bias: bool = False,
    residual: bool = False,
    input_relu: bool = False,
    nhwc: bool = True,
    same_dtype: bool = True,
) -> str:
    """'' when the CUTLASS kernel of ``kind`` takes this call, else why not (from the C++
    predicate; needs the extension loaded, not a GPU)."""
    return _ask(
        kind, dtype, tuple(int(v) for v in x_shape), tuple(int(v) for v in w_shape), tuple(stride), tuple(padding),
        tuple(dilation), int(groups), bool(bias), bool(residual), bool(input_relu), bool(nhwc), bool(same_dtype),
    )


def built() -> str:
    """Description of the compiled CUTLASS kernels; '' when the extension has none."""
    return torch.ops.fusedres_ext.conv_cutlass_info()


def _out_hw(size: int, pad: int, dil: int, ker: int, stride: int) -> int:
    return (size + 2 * pad - dil * (ker - 1) - 1) // stride + 1


_FAKES_REGISTERED = False


def register_fakes() -> None:
    """Fake kernels of the four tensor ops (idempotent; the extension must be loaded)."""
    global _FAKES_REGISTERED
    if _FAKES_REGISTERED:
        return

    def out_shape(x_shape, w_shape, stride, padding, dilation) -> List[int]:
        return [
            x_shape[0],
            w_shape[0],
            _out_hw(x_shape[2], padding[0], dilation[0], w_shape[2], stride[0]),
            _out_hw(x_shape[3], padding[1], dilation[1], w_shape[3], stride[1]),
        ]

    @torch.library.register_fake("fusedres_ext::conv_bias_act_cutlass")
    def _conv_bias_act_fake(x, weight, bias, residual, in_scale, in_shift, stride, padding, dilation, relu,
                            hopper=False):
        shape = out_shape(x.shape, weight.shape, stride, padding, dilation)
        if residual is not None:
            torch._check(
                list(residual.shape) == shape,
                lambda: f"fusedres_ext::conv_bias_act_cutlass: residual must have shape {shape}, got {list(residual.shape)}",
            )
        return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_layout_rule(x))

    @torch.library.register_fake("fusedres_ext::conv_stats_cutlass")
    def _conv_stats_fake(x, weight, in_scale, in_shift, stride, padding, dilation, hopper=False):
        shape = out_shape(x.shape, weight.shape, stride, padding, dilation)
        y = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_layout_rule(x))
        return y, x.new_empty((1, 3, shape[1]), dtype=torch.float32)

    @torch.library.register_fake("fusedres_ext::conv_dgrad_cutlass")
    def _conv_dgrad_fake(dy, weight, input_shape, stride, padding, dilation, addend):
        return torch.empty(list(input_shape), dtype=dy.dtype, device=dy.device, memory_format=_layout_rule(dy))

    @torch.library.register_fake("fusedres_ext::conv_wgrad_cutlass")
    def _conv_wgrad_fake(dy, x, in_scale, in_shift, weight_shape, stride, padding, dilation):
        return dy.new_empty(list(weight_shape))

    _FAKES_REGISTERED = True


# ------------------------------------------------------------------ the cuda backend's use


def fprop_reason(x: Tensor, weight: Tensor, bias, residual, in_scale, in_relu, stride, padding, dilation, groups) -> str:
    """Why conv_bias_act / conv_stats with these arguments cannot run on CUTLASS ('' if it can)."""
    kind = "fprop_prologue" if in_scale is not None else "fprop"
    same = weight.dtype == x.dtype and (residual is None or residual.dtype == x.dtype)
    return unsupported(
        kind, x.dtype, x.shape, weight.shape, stride, padding, dilation, groups,
        bias=bias is not None, residual=residual is not None, input_relu=in_relu,
        nhwc=_channels_last(x), same_dtype=same,
    )


def dgrad_reason(dy: Tensor, weight: Tensor, input_shape, stride, padding, dilation, groups, dx_add=None) -> str:
    """Why conv_dgrad (with ``dx_add`` added to dx when given) cannot run on CUTLASS ('' if it
    can); the addend must have the input's shape and dy's dtype."""
    if dx_add is not None and list(dx_add.shape) != list(input_shape):
        return f"dx_add has shape {list(dx_add.shape)}, not the input's {list(input_shape)}"
    return unsupported(
        "dgrad", dy.dtype, input_shape, weight.shape, stride, padding, dilation, groups,
        residual=dx_add is not None,
        nhwc=_channels_last(dy) and (dx_add is None or _channels_last(dx_add)),
        same_dtype=weight.dtype == dy.dtype and (dx_add is None or dx_add.dtype == dy.dtype),
    )


def wgrad_reason(dy: Tensor, x: Tensor, in_scale, in_relu, weight_shape, stride, padding, dilation, groups) -> str:
    kind = "wgrad_prologue" if in_scale is not None else "wgrad"
    return unsupported(
        kind, dy.dtype, x.shape, weight_shape, stride, padding, dilation, groups,
        input_relu=in_relu, nhwc=_channels_last(dy) and _channels_last(x), same_dtype=x.dtype == dy.dtype,
    )


def hopper_requested() -> bool:
    """``FUSEDRES_CUDA_HOPPER=1``: forward convolutions on the Hopper-native kernel where it
    takes them (read at each call, like ``FUSEDRES_CUDA_PROLOGUE``)."""
    return os.environ.get("FUSEDRES_CUDA_HOPPER", "0").strip().lower() in ("1", "true", "yes", "on")


def conv_bias_act(x, weight, bias, residual, in_scale, in_shift, stride, padding, dilation, relu) -> Tensor:
    return torch.ops.fusedres_ext.conv_bias_act_cutlass(
        x, weight, bias, residual, in_scale, in_shift, list(stride), list(padding), list(dilation), relu,
        hopper_requested(),
    )


def conv_stats(x, weight, in_scale, in_shift, stride, padding, dilation):
    return torch.ops.fusedres_ext.conv_stats_cutlass(
        x, weight, in_scale, in_shift, list(stride), list(padding), list(dilation), hopper_requested()
    )


def conv_dgrad(dy, weight, input_shape, stride, padding, dilation, addend=None) -> Tensor:
    return torch.ops.fusedres_ext.conv_dgrad_cutlass(
        dy, weight, list(input_shape), list(stride), list(padding), list(dilation), addend
    )


def conv_wgrad(dy, x, in_scale, in_shift, weight_shape, stride, padding, dilation) -> Tensor:
    return torch.ops.fusedres_ext.conv_wgrad_cutlass(
        dy, x, in_scale, in_shift, list(weight_shape), list(stride), list(padding), list(dilation)
    )
