"""The ``reference`` backend: every primitive as ``fusedres.reference``'s plain PyTorch, on
any device PyTorch runs on. The other tables derive from it, so a backend under
construction is complete and correct, and override what they implement themselves."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import reference
from ._registry import PRIMITIVES, register


class ReferenceBackend:
    """Pure PyTorch; runs on any device PyTorch runs on. Every primitive is
    ``fusedres.reference``'s function of that name (set below the class), except
    ``bn_apply_conv_backward``, composed of the table's own methods."""

    name = "reference"
    native: Tuple[str, ...] = PRIMITIVES

    # helpers the derived tables call through ``cls``
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


for _name in PRIMITIVES:
    if _name not in vars(ReferenceBackend):
        setattr(ReferenceBackend, _name, staticmethod(getattr(reference, _name)))
register(auto={"*": 100})(ReferenceBackend)  # anywhere, after every other backend
