"""The ``reference`` backend: every primitive as ``fusedres.reference``'s plain PyTorch, on
any device PyTorch runs on. The other tables derive from it, so a backend under
construction is complete and correct, and override what they implement themselves."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import reference
from ._registry import PRIMITIVES, register


@register(auto={"*": 100})  # anywhere, after every other backend
class ReferenceBackend:
    """Pure PyTorch; runs on any device PyTorch runs on."""

    name = "reference"
    native: Tuple[str, ...] = PRIMITIVES

    conv_bias_act = staticmethod(reference.conv_bias_act)
    conv_stats = staticmethod(reference.conv_stats)
    batch_stats = staticmethod(reference.batch_stats)
    bn_finalize = staticmethod(reference.bn_finalize)
    bn_add_act = staticmethod(reference.bn_add_act)
    bn_backward_reduce = staticmethod(reference.bn_backward_reduce)
    bn_backward_apply = staticmethod(reference.bn_backward_apply)
    act_grad = staticmethod(reference.act_grad)
    conv_dgrad = staticmethod(reference.conv_dgrad)
    conv_wgrad = staticmethod(reference.conv_wgrad)
    bn_apply_relu = staticmethod(reference.bn_apply_relu)
    stats_tiles = staticmethod(reference.stats_tiles)

    @classmethod
    def bn_apply_conv_backward(
        cls, dh, y, scale, shift, coefs, weight, x, in_scale, in_shift, in_relu, stride, padding, dilation, groups,
        need_dx, need_dw, dx_add=None,
    ):
        """``reference.bn_apply_conv_backward`` composed of this table's own apply (dy written
        once) and convolutions."""
        dy = cls.bn_apply_relu(dh, y, scale, shift, coefs)
        dx = (
            cls.conv_dgrad(dy, weight, list(x.shape), stride, padding, dilation, groups, dx_add)
            if need_dx
            else dy.new_empty(0)
        )
        dw = (
            cls.conv_wgrad(dy, x, in_scale, in_shift, in_relu, list(weight.shape), stride, padding, dilation, groups)
            if need_dw
            else dy.new_empty(0)
        )
        return dx, dw

    @classmethod
    def availability(cls) -> Tuple[bool, str]:
        return True, "pure PyTorch"

    @classmethod
    def device_error(cls, device: torch.device) -> Optional[str]:
        return None
