"""Reference backend: every primitive of the fused vocabulary in plain PyTorch.

This is the ground truth the other backends are tested against, so it favours
being obviously right over being fast: each primitive is a few lines of
standard PyTorch ops computed in the "statistics dtype" (float32, or float64
for float64 inputs) and cast back to the storage dtype, the same way
``nn.BatchNorm2d`` computes in fp32 and stores in the input dtype.

Tensors use PyTorch's logical NCHW shapes whatever their memory format; every
output keeps the memory format of the tensor it is derived from. The arguments' types
are declared once, in ``fusedres.primitives``; the functions here take the same names in
the same order (``tests/test_primitives.py``).

Vocabulary (shapes: x [N, C, H, W], weight [K, C/groups, R, S], y [N, K, P, Q]):

forward
  conv_bias_act(x, w, bias, residual, in_scale, in_shift, in_relu, geometry, relu)
      -> act(conv(pro(x), w) + bias + residual)
  conv_stats(x, w, in_scale, in_shift, in_relu, geometry)
      -> y = conv(pro(x), w), partials [T, 3, K] of (count, mean, M2) per channel
  batch_stats(x) -> partials [T, 3, C] of x itself
  bn_finalize(partials, gamma, beta, running_mean, running_var, momentum, eps)
      -> mean, invstd, scale, shift; updates the running statistics in place
  bn_add_act(y, scale, shift, residual, res_scale, res_shift, sample_scale, relu)
      -> act((y*scale + shift) * sample_scale[n] + r),
         r = residual*res_scale + res_shift (dual BN) or residual or 0
backward
  bn_backward_reduce(dout, y, mean, invstd, scale, shift, out, relu, sample_scale)
      -> sum(g), sum(g * xhat)  per channel  (= dbeta, dgamma)
  bn_backward_apply(... same ..., sum_g, sum_gx, addend, grad_out) -> dy = A*g + B*y + C
         (+ addend when given, in the statistics dtype: one rounding); writes g before the
         sample scale into grad_out when given
  bn_backward_coefs(mean, invstd, scale, sum_g, sum_gx, m) -> [3, C] rows A, B, C
  bn_apply_conv_backward(dh, y, scale, shift, coefs, w, x, in_scale, in_shift, in_relu,
                         geometry, need_dx, need_dw, dx_add)
      -> dx (+ dx_add when given), dw of a conv whose output gradient is dy = A*g + B*y + C
         of the BatchNorm+ReLU after it (g = dh where y*scale + shift > 0): the apply is done
         while loading dy, so dy is never stored; an output not needed is returned empty
  act_grad(dout, out) -> dout masked where out <= 0 (ReLU backward from its output)
  conv_dgrad(dy, w, input_shape, geometry, dx_add) -> dx (+ dx_add when given: a block's
         shortcut gradient, added where dx is written)
  conv_wgrad(dy, x, in_scale, in_shift, in_relu, weight_shape, geometry) -> dw

where pro(x) = relu(x*in_scale + in_shift) when in_scale is given (the previous
BatchNorm applied on load), else x; g = dout, zeroed where the ReLU was inactive
(out <= 0 when the activated output is given, y*scale + shift <= 0 otherwise), times
sample_scale[n] when given; xhat = (y - mean) * invstd.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

NAME = "reference"


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype in which statistics and elementwise math are computed."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _c(v: Tensor) -> Tensor:
    """Per-channel vector [C] -> broadcastable [1, C, 1, 1]."""
    return v.view(1, -1, 1, 1)


def _n(v: Tensor) -> Tensor:
    """Per-sample vector [N] -> broadcastable [N, 1, 1, 1]."""
    return v.view(-1, 1, 1, 1)


def memory_format(t: Tensor) -> torch.memory_format:
    """channels_last if ``t`` is (strictly) channels_last, else contiguous: the layout rule
    every primitive follows for its outputs."""
    return torch.channels_last if _is_channels_last(t) else torch.contiguous_format


def _to(t: Tensor, dtype: torch.dtype, fmt: torch.memory_format) -> Tensor:
    """A fresh copy of ``t`` in ``dtype`` and memory format ``fmt``."""
    return torch.empty_like(t, dtype=dtype, memory_format=fmt).copy_(t)


def _like(t: Tensor, ref: Tensor) -> Tensor:
    """A fresh copy of ``t`` in ``ref``'s dtype and memory format."""
    return _to(t, ref.dtype, memory_format(ref))


def _is_channels_last(t: Tensor) -> bool:
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def prologue(x: Tensor, in_scale: Optional[Tensor], in_shift: Optional[Tensor], in_relu: bool) -> Tensor:
    """relu(x*in_scale + in_shift) in the statistics dtype, stored in x's dtype; x if no scale."""
    if in_scale is None:
        return x.relu() if in_relu else x
    h = x.to(stat_dtype(x.dtype)) * _c(in_scale) + _c(in_shift)
    if in_relu:
        h = h.relu()
    return h.to(x.dtype)


def _partials(t: Tensor) -> Tensor:
    """One tile covering the whole batch: [1, 3, C] = (count, mean, M2) per channel."""
    tf = t.to(stat_dtype(t.dtype))
    count = t.numel() // t.shape[1]
    mean = tf.mean(dim=(0, 2, 3))
    m2 = (tf - _c(mean)).square().sum(dim=(0, 2, 3))
    return torch.stack([torch.full_like(mean, count), mean, m2]).unsqueeze(0)


def stats_tiles(y_shape: Sequence[int]) -> int:
    """Number of partial-statistics tiles this backend produces for an output of this shape."""
    return 1


# --------------------------------------------------------------------------- forward


def conv_bias_act(
    x, weight, bias, residual, in_scale, in_shift, in_relu, stride, padding, dilation, groups, relu
) -> Tensor:
    h = prologue(x, in_scale, in_shift, in_relu)
    y = F.conv2d(h, weight, None, stride, padding, dilation, groups)
    z = y.to(stat_dtype(y.dtype))
    if bias is not None:
        z = z + _c(bias)
    if residual is not None:
        z = z + residual
    if relu:
        z = z.relu()
    return _to(z, x.dtype, memory_format(x))


def conv_stats(x, weight, in_scale, in_shift, in_relu, stride, padding, dilation, groups) -> Tuple[Tensor, Tensor]:
    h = prologue(x, in_scale, in_shift, in_relu)
    y = F.conv2d(h, weight, None, stride, padding, dilation, groups)
    y = y.contiguous(memory_format=memory_format(x))
    return y, _partials(y)


def batch_stats(x) -> Tensor:
    return _partials(x)


def merge_partials(partials: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Chan-merge [T, 3, C] partials in tile order, in float64 -> (count, mean, M2)."""
    p = partials.to(torch.float64)
    n, mean, m2 = p[0, 0].clone(), p[0, 1].clone(), p[0, 2].clone()
    for t in range(1, p.shape[0]):
        nb, mb, m2b = p[t, 0], p[t, 1], p[t, 2]
        tot = n + nb
        safe = torch.where(tot > 0, tot, torch.ones_like(tot))
        delta = mb - mean
        # the mean as a weighted sum rather than mean + delta*nb/n: the same in finite
        # arithmetic, and +Inf stays +Inf when two tiles both average to +Inf (as a sum does)
        m2 = torch.where(nb > 0, m2 + m2b + delta * delta * n * nb / safe, m2)
        mean = torch.where(nb > 0, (n * mean + nb * mb) / safe, mean)
        n = tot
    return n, mean, m2


def bn_finalize(
    partials, gamma, beta, running_mean, running_var, momentum, eps
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    sd = partials.dtype
    n, mean64, m2 = merge_partials(partials)
    var = m2 / n
    invstd64 = torch.rsqrt(var + eps)
    mean, invstd = mean64.to(sd), invstd64.to(sd)
    scale = gamma.to(sd) * invstd
    shift = beta.to(sd) - mean * scale
    if running_mean is not None:
        with torch.no_grad():
            unbiased = m2 / (n - 1)
            running_mean.mul_(1.0 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1.0 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
    return mean, invstd, scale, shift


def bn_add_act(y, scale, shift, residual, res_scale, res_shift, sample_scale, relu) -> Tensor:
    z = y.to(stat_dtype(y.dtype)) * _c(scale) + _c(shift)
    if sample_scale is not None:
        z = z * _n(sample_scale)
    if residual is not None:
        r = residual.to(z.dtype)
        if res_scale is not None:
            r = r * _c(res_scale) + _c(res_shift)
        z = z + r
    if relu:
        z = z.relu()
    return _like(z, y)


# --------------------------------------------------------------------------- backward


def _masked_grad(
    dout: Tensor,
    y: Tensor,
    scale: Tensor,
    shift: Tensor,
    out: Optional[Tensor],
    relu: bool,
    sample_scale: Optional[Tensor],
) -> Tensor:
    """g = dout where the ReLU was active (threshold_backward semantics: dropped where <= 0)."""
    g = dout.to(stat_dtype(y.dtype))
    if relu:
        z = out if out is not None else y.to(g.dtype) * _c(scale) + _c(shift)
        g = torch.where(z <= 0, torch.zeros_like(g), g)
    if sample_scale is not None:
        g = g * _n(sample_scale)
    return g


def bn_backward_reduce(dout, y, mean, invstd, scale, shift, out, relu, sample_scale) -> Tuple[Tensor, Tensor]:
    g = _masked_grad(dout, y, scale, shift, out, relu, sample_scale)
    xhat = (y.to(g.dtype) - _c(mean)) * _c(invstd)
    return g.sum(dim=(0, 2, 3)), (g * xhat).sum(dim=(0, 2, 3))


def bn_backward_apply(dout, y, mean, invstd, scale, shift, out, relu, sample_scale, sum_g, sum_gx,
                      addend=None, grad_out=None) -> Tensor:
    g = _masked_grad(dout, y, scale, shift, out, relu, None)
    if grad_out is not None:
        grad_out.copy_(g)  # dout's values or zeros: exact in any storage dtype
    if sample_scale is not None:
        g = g * _n(sample_scale)
    m = y.numel() // y.shape[1]
    a = scale
    b = -scale * invstd * sum_gx / m
    c = -a * sum_g / m - b * mean
    dy = g * _c(a) + y.to(g.dtype) * _c(b) + _c(c)
    if addend is not None:
        dy = dy + addend.to(g.dtype)
    return _like(dy, y)


def bn_backward_coefs(mean: Tensor, invstd: Tensor, scale: Tensor, sum_g: Tensor, sum_gx: Tensor, m: int) -> Tensor:
    """Per-channel [3, C] (A, B, C) of the BatchNorm backward dy = A*g + B*y + C (C-sized math)."""
    a = scale.to(mean.dtype)
    b = -a * invstd * sum_gx / m
    c = -a * sum_g / m - b * mean
    return torch.stack([a, b, c])


def bn_apply_relu(dh: Tensor, y: Tensor, scale: Tensor, shift: Tensor, coefs: Tensor) -> Tensor:
    """dy = A*g + B*y + C with g = dh where y*scale + shift > 0; y's dtype and layout."""
    g = _masked_grad(dh, y, scale, shift, None, True, None)
    dy = g * _c(coefs[0]) + y.to(g.dtype) * _c(coefs[1]) + _c(coefs[2])
    return _like(dy, y)


def bn_apply_conv_backward(
    dh, y, scale, shift, coefs, weight, x, in_scale, in_shift, in_relu, stride, padding, dilation, groups, need_dx,
    need_dw, dx_add=None
) -> Tuple[Tensor, Tensor]:
    dy = bn_apply_relu(dh, y, scale, shift, coefs)
    dx = (
        conv_dgrad(dy, weight, list(x.shape), stride, padding, dilation, groups, dx_add)
        if need_dx
        else dy.new_empty(0)
    )
    dw = (
        conv_wgrad(dy, x, in_scale, in_shift, in_relu, list(weight.shape), stride, padding, dilation, groups)
        if need_dw
        else dy.new_empty(0)
    )
    return dx, dw


def act_grad(dout, out) -> Tensor:
    return torch.where(out <= 0, torch.zeros_like(dout), dout)


def conv_dgrad(dy, weight, input_shape, stride, padding, dilation, groups, dx_add=None) -> Tensor:
    dummy = dy.new_empty(1).expand(input_shape)
    dx = torch.ops.aten.convolution_backward(
        dy, dummy, weight, None, stride, padding, dilation, False, [0, 0], groups, (True, False, False)
    )[0]
    dx = dx.contiguous(memory_format=memory_format(dy))
    return dx if dx_add is None else dx + dx_add


def conv_wgrad(dy, x, in_scale, in_shift, in_relu, weight_shape, stride, padding, dilation, groups) -> Tensor:
    h = prologue(x, in_scale, in_shift, in_relu)
    dummy = dy.new_empty(1).expand(weight_shape)
    dw = torch.ops.aten.convolution_backward(
        dy, h, dummy, None, stride, padding, dilation, False, [0, 0], groups, (False, True, False)
    )[1]
    return dw.contiguous()
