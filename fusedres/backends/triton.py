"""The ``triton`` backend: every primitive as a Triton kernel of ``fusedres.triton_kernels``
(installed from the top-level ``triton_kernels/``, which imports nothing from fusedres).
Registering the table imports neither triton nor the kernels: they load on first use."""

from __future__ import annotations

import functools
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from .. import primitives, reference
from ._registry import register
from .reference import ReferenceBackend

def _package():
    """``fusedres.triton_kernels`` (its ``__init__`` imports neither triton nor the
    kernels), or None where it is not installed (a source tree)."""
    try:
        from .. import triton_kernels
    except ImportError:
        return None
    return triton_kernels


@functools.lru_cache(maxsize=None)
def _tk():
    """The kernels' package with its kernel modules loaded (imports triton)."""
    from .. import triton_kernels
    from ..triton_kernels import _config, bn, conv  # noqa: F401  (loads them)

    return triton_kernels


class _Kernels:
    """A kernel module of the package, loaded on first use."""

    def __init__(self, module: str):
        self._module = module

    def __getattr__(self, name):
        return getattr(getattr(_tk(), self._module), name)


conv, bn = _Kernels("conv"), _Kernels("bn")


def _vec(v: Optional[Tensor]) -> Optional[Tensor]:
    return None if v is None else v.contiguous()


def _same_dtype(w: Tensor, like: Tensor) -> Tensor:
    return w if w.dtype == like.dtype else w.to(like.dtype)


def _fused_addend(dx_add: Optional[Tensor], like: Tensor, shape: List[int]) -> bool:
    """Whether the dgrad kernel adds ``dx_add`` in its epilogue: of dx's shape, dtype and
    device (otherwise the sum is a separate op, with PyTorch's type promotion)."""
    return (dx_add is not None and list(dx_add.shape) == list(shape) and dx_add.dtype == like.dtype
            and dx_add.device == like.device)


@register(auto={"cuda": 1})  # after the cuda backend
class TritonBackend(ReferenceBackend):
    """Every primitive as a Triton kernel."""

    name = "triton"
    native = primitives.NAMES

    @classmethod
    def availability(cls):
        tk = _package()
        if tk is None:
            return False, "fusedres.triton_kernels is not installed (install fusedres with pip)"
        return tk.availability()

    @classmethod
    def device_error(cls, device: torch.device) -> Optional[str]:
        tk = _package()
        return None if tk is None else tk.device_error(device)

    @staticmethod
    def stats_tiles(y_shape: Sequence[int]) -> int:
        n, _, p, q = y_shape
        return _tk()._config.stats_tiles(n * p * q)

    @staticmethod
    def conv_bias_act(x, weight, bias, residual, in_scale, in_shift, in_relu, stride, padding, dilation, groups,
                      relu) -> Tensor:
        return conv.conv_forward(
            x, _same_dtype(weight, x), _vec(bias), residual, _vec(in_scale), _vec(in_shift), in_relu,
            list(stride), list(padding), list(dilation), groups, relu, reference.memory_format(x), stats=False,
        )

    @staticmethod
    def conv_stats(x, weight, in_scale, in_shift, in_relu, stride, padding, dilation, groups):
        return conv.conv_forward(
            x, _same_dtype(weight, x), None, None, _vec(in_scale), _vec(in_shift), in_relu,
            list(stride), list(padding), list(dilation), groups, False, reference.memory_format(x), stats=True,
        )

    @staticmethod
    def batch_stats(x: Tensor) -> Tensor:
        return bn.batch_stats(x)

    @staticmethod
    def bn_finalize(partials, gamma, beta, running_mean, running_var, momentum, eps):
        return bn.bn_finalize(partials, _vec(gamma), _vec(beta), running_mean, running_var, momentum, eps)

    @staticmethod
    def bn_add_act(y, scale, shift, residual, res_scale, res_shift, sample_scale, relu):
        return bn.bn_add_act(y, _vec(scale), _vec(shift), residual, _vec(res_scale), _vec(res_shift),
                             _vec(sample_scale), relu)

    @staticmethod
    def bn_backward_reduce(dout, y, mean, invstd, scale, shift, out, relu, sample_scale):
        return bn.bn_backward_reduce(dout, y, _vec(mean), _vec(invstd), _vec(scale), _vec(shift), out, relu,
                                     _vec(sample_scale))

    @staticmethod
    def bn_backward_apply(dout, y, mean, invstd, scale, shift, out, relu, sample_scale, sum_g, sum_gx, addend=None,
                          grad_out=None):
        return bn.bn_backward_apply(dout, y, _vec(mean), _vec(invstd), _vec(scale), _vec(shift), out, relu,
                                    _vec(sample_scale), sum_g, sum_gx, addend, grad_out)

    @staticmethod
    def act_grad(dout: Tensor, out: Tensor) -> Tensor:
        return bn.act_grad(dout, out)

    @staticmethod
    def conv_dgrad(dy, weight, input_shape: List[int], stride, padding, dilation, groups, dx_add=None) -> Tensor:
        fuse = _fused_addend(dx_add, dy, input_shape)
        dx = conv.conv_dgrad(dy, _same_dtype(weight, dy), list(input_shape), list(stride), list(padding),
                             list(dilation), groups, reference.memory_format(dy), add=dx_add if fuse else None)
        return dx if dx_add is None or fuse else dx + dx_add

    @staticmethod
    def conv_wgrad(dy, x, in_scale, in_shift, in_relu, weight_shape, stride, padding, dilation, groups) -> Tensor:
        return conv.conv_wgrad(dy, _same_dtype(x, dy), _vec(in_scale), _vec(in_shift), in_relu, list(weight_shape),
                               list(stride), list(padding), list(dilation), groups)

    @staticmethod
    def bn_apply_conv_backward(dh, y, scale, shift, coefs, weight, x, in_scale, in_shift, in_relu, stride, padding,
                               dilation, groups, need_dx, need_dw, dx_add=None):
        # the apply runs in the prologue of both kernels: dy = A*g + B*y + C is never stored
        bn_args = (y, _vec(scale), _vec(shift), coefs.contiguous())
        geom = (list(stride), list(padding), list(dilation), groups)
        dx = dw = dh.new_empty(0)
        if need_dx:
            fuse = _fused_addend(dx_add, dh, list(x.shape))
            dx = conv.conv_dgrad(dh, _same_dtype(weight, dh), list(x.shape), *geom, reference.memory_format(y),
                                 bn=bn_args, add=dx_add if fuse else None)
            if dx_add is not None and not fuse:
                dx = dx + dx_add
        if need_dw:
            dw = conv.conv_wgrad(dh, _same_dtype(x, dh), _vec(in_scale), _vec(in_shift), in_relu, list(weight.shape),
                                 *geom, bn=bn_args)
        return dx, dw
