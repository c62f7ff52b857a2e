"""What the ``cpu`` and ``cuda`` backends share: the C++ extension's BatchNorm kernels
(``fusedres_ext::*``, loaded by ``fusedres._ext``) and when a call is handed to the
reference instead (recorded, see ``fusedres.backends.fallbacks``)."""

from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from ._registry import record_fallback
from .reference import ReferenceBackend


def _names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


_BACKWARD_DTYPES = ("dtypes outside the kernels (a storage dtype they lack, or a gradient/output or a per-channel "
                    "vector not in the storage / statistics dtype)")


class _ExtensionBackend(ReferenceBackend):
    """Shared plumbing of the backends implemented by the ``fusedres._C`` extension."""

    device_type = ""
    native = ("bn_add_act", "bn_finalize", "batch_stats", "bn_backward_reduce", "bn_backward_apply", "act_grad")
    _DTYPES = (torch.float32, torch.float64)

    @classmethod
    def _ops(cls):
        return torch.ops.fusedres_ext

    @classmethod
    def device_error(cls, device: torch.device) -> Optional[str]:
        if device.type != cls.device_type:
            return f"backend '{cls.name}' runs on {cls.device_type} tensors, got a tensor on {device}"
        return None

    @classmethod
    def bn_add_act(cls, y, scale, shift, residual, res_scale, res_shift, sample_scale, relu):
        if y.dtype not in cls._DTYPES:
            record_fallback(cls.name, "bn_add_act", f"{y.dtype} storage (kernels: {_names(cls._DTYPES)})")
            return reference.bn_add_act(y, scale, shift, residual, res_scale, res_shift, sample_scale, relu)
        return cls._ops().bn_add_act(y, scale, shift, residual, res_scale, res_shift, sample_scale, relu)

    @classmethod
    def bn_finalize(cls, partials, gamma, beta, running_mean, running_var, momentum, eps):
        if partials.dtype != torch.float32:
            record_fallback(cls.name, "bn_finalize", f"{partials.dtype} partials (kernels: float32)")
            return reference.bn_finalize(partials, gamma, beta, running_mean, running_var, momentum, eps)
        return cls._ops().bn_finalize(partials, gamma, beta, running_mean, running_var, momentum, eps)

    @classmethod
    def batch_stats(cls, x):
        if x.dtype not in cls._DTYPES:
            record_fallback(cls.name, "batch_stats", f"{x.dtype} storage (kernels: {_names(cls._DTYPES)})")
            return reference.batch_stats(x)
        # as many tiles as this backend's conv_stats produces (ops' fake asks stats_tiles)
        return cls._ops().batch_stats(x, cls.stats_tiles(x.shape))

    @classmethod
    def _native_backward(cls, dout, y, out, vectors) -> bool:
        """The kernels cover these arguments: a storage dtype they are built for, dout/out in
        y's dtype, every per-channel/per-sample vector in the statistics dtype (otherwise the
        reference's type promotion decides the result dtype, so it runs instead)."""
        sd = reference.stat_dtype(y.dtype)
        return (
            y.dtype in cls._DTYPES
            and dout.dtype == y.dtype
            and (out is None or out.dtype == y.dtype)
            and all(v is None or v.dtype == sd for v in vectors)
        )

    @classmethod
    def bn_backward_reduce(cls, dout, y, mean, invstd, scale, shift, out, relu, sample_scale):
        if not cls._native_backward(dout, y, out, (mean, invstd, scale, shift, sample_scale)):
            record_fallback(cls.name, "bn_backward_reduce", _BACKWARD_DTYPES)
            return reference.bn_backward_reduce(dout, y, mean, invstd, scale, shift, out, relu, sample_scale)
        return cls._ops().bn_backward_reduce(dout, y, mean, invstd, scale, shift, out, relu, sample_scale)

    @classmethod
    def bn_backward_apply(cls, dout, y, mean, invstd, scale, shift, out, relu, sample_scale, sum_g, sum_gx,
                          addend=None, grad_out=None):
        args = (dout, y, mean, invstd, scale, shift, out, relu, sample_scale, sum_g, sum_gx, addend, grad_out)
        if not (cls._native_backward(dout, y, out, (mean, invstd, scale, shift, sample_scale, sum_g, sum_gx))
                and all(t is None or t.dtype == y.dtype for t in (addend, grad_out))):
            record_fallback(cls.name, "bn_backward_apply", _BACKWARD_DTYPES)
            return reference.bn_backward_apply(*args)
        return cls._ops().bn_backward_apply(*args)

    @classmethod
    def act_grad(cls, dout, out):
        if dout.dtype not in cls._DTYPES or out.dtype != dout.dtype:
            record_fallback(cls.name, "act_grad", f"dout {dout.dtype}, out {out.dtype} (kernels: one of "
                            f"{_names(cls._DTYPES)} for both)")
            return reference.act_grad(dout, out)
        return cls._ops().act_grad(dout, out)

    @classmethod
    def bn_apply_relu(cls, dh, y, scale, shift, coefs):
        """The BatchNorm+ReLU backward's apply from its coefficients: one native pass that
        writes dy (``reference.bn_apply_relu`` where the kernels do not cover the dtypes)."""
        if not cls._native_backward(dh, y, None, (scale, shift, coefs)):
            record_fallback(cls.name, "bn_apply_relu", _BACKWARD_DTYPES)
            return reference.bn_apply_relu(dh, y, scale, shift, coefs)
        return cls._ops().bn_apply_relu(dh, y, scale, shift, coefs)
