"""The primitives as ``torch.library`` custom ops in the ``fusedres`` namespace.

Every op takes the concrete backend name as its last argument and forwards to
that backend's table, so one op (one schema, one fake implementation) serves all
backends and ``torch.compile`` traces through any of them without graph breaks.
Fake implementations run the reference math on fake tensors, which gives the
exact output shapes and strides; only the number of partial-statistics tiles is
backend-specific and asked of the backend.

``conv_bias_act`` also has an autograd formula, used by inference-mode blocks
when gradients are required (e.g. fine-tuning with frozen BatchNorm); training
mode differentiates whole blocks in ``fusedres.autograd`` instead.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import backends, reference

_LIB = "fusedres"


def _table(backend: str):
    return backends.get(backend)


# --------------------------------------------------------------------------- forward


@torch.library.custom_op(f"{_LIB}::conv_bias_act", mutates_args=())
def conv_bias_act(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    in_scale: Optional[Tensor],
    in_shift: Optional[Tensor],
    in_relu: bool,
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
    relu: bool,
    backend: str,
) -> Tensor:
    """act(conv(pro(x), weight) + bias + residual); x [N,C,H,W] -> [N,K,P,Q]."""
    return _table(backend).conv_bias_act(
        x, weight, bias, residual, in_scale, in_shift, in_relu, stride, padding, dilation, groups, relu
    )


@conv_bias_act.register_fake
def _(x, weight, bias, residual, in_scale, in_shift, in_relu, stride, padding, dilation, groups, relu, backend):
    return reference.conv_bias_act(
        x, weight, bias, residual, in_scale, in_shift, in_relu, stride, padding, dilation, groups, relu
    )


@torch.library.custom_op(f"{_LIB}::conv_stats", mutates_args=())
def conv_stats(
    x: Tensor,
    weight: Tensor,
    in_scale: Optional[Tensor],
    in_shift: Optional[Tensor],
    in_relu: bool,
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
    backend: str,
) -> Tuple[Tensor, Tensor]:
    """y = conv(pro(x), weight) and its per-tile (count, mean, M2) partials [T, 3, K]."""
    return _table(backend).conv_stats(x, weight, in_scale, in_shift, in_relu, stride, padding, dilation, groups)


@conv_stats.register_fake
def _(x, weight, in_scale, in_shift, in_relu, stride, padding, dilation, groups, backend):
    y, _p = reference.conv_stats(x, weight, in_scale, in_shift, in_relu, stride, padding, dilation, groups)
    return y, _fake_partials(y, backend)


def _fake_partials(t: Tensor, backend: str) -> Tensor:
    tiles = _table(backend).stats_tiles(t.shape)
    return t.new_empty((tiles, 3, t.shape[1]), dtype=reference.stat_dtype(t.dtype))


@torch.library.custom_op(f"{_LIB}::batch_stats", mutates_args=())
def batch_stats(x: Tensor, backend: str) -> Tensor:
    """Per-tile (count, mean, M2) partials [T, 3, C] of x itself."""
    return _table(backend).batch_stats(x)


@batch_stats.register_fake
def _(x, backend):
    return _fake_partials(x, backend)


@torch.library.custom_op(f"{_LIB}::bn_finalize", mutates_args=("running_mean", "running_var"))
def bn_finalize(
    partials: Tensor,
    gamma: Tensor,
    beta: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    momentum: float,
    eps: float,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Merge partials -> (mean, invstd, scale, shift) [C]; update running stats in place."""
    return _table(backend).bn_finalize(partials, gamma, beta, running_mean, running_var, momentum, eps)


@bn_finalize.register_fake
def _(partials, gamma, beta, running_mean, running_var, momentum, eps, backend):
    c = partials.shape[2]
    return tuple(partials.new_empty((c,)) for _ in range(4))


@torch.library.custom_op(f"{_LIB}::bn_add_act", mutates_args=())
def bn_add_act(
    y: Tensor,
    scale: Tensor,
    shift: Tensor,
    residual: Optional[Tensor],
    res_scale: Optional[Tensor],
    res_shift: Optional[Tensor],
    sample_scale: Optional[Tensor],
    relu: bool,
    backend: str,
) -> Tensor:
    """act((y*scale + shift) * sample_scale[n] + r), r = residual [*res_scale + res_shift]."""
    return _table(backend).bn_add_act(y, scale, shift, residual, res_scale, res_shift, sample_scale, relu)


@bn_add_act.register_fake
def _(y, scale, shift, residual, res_scale, res_shift, sample_scale, relu, backend):
    return reference.bn_add_act(y, scale, shift, residual, res_scale, res_shift, sample_scale, relu)


# --------------------------------------------------------------------------- backward


@torch.library.custom_op(f"{_LIB}::bn_backward_reduce", mutates_args=())
def bn_backward_reduce(
    dout: Tensor,
    y: Tensor,
    mean: Tensor,
    invstd: Tensor,
    scale: Tensor,
    shift: Tensor,
    out: Optional[Tensor],
    relu: bool,
    sample_scale: Optional[Tensor],
    backend: str,
) -> Tuple[Tensor, Tensor]:
    """(sum g, sum g*xhat) per channel: dbeta and dgamma of a BatchNorm(+ReLU)."""
    return _table(backend).bn_backward_reduce(dout, y, mean, invstd, scale, shift, out, relu, sample_scale)


@bn_backward_reduce.register_fake
def _(dout, y, mean, invstd, scale, shift, out, relu, sample_scale, backend):
    return mean.new_empty(mean.shape), mean.new_empty(mean.shape)


@torch.library.custom_op(f"{_LIB}::bn_backward_apply", mutates_args=())
def bn_backward_apply(
    dout: Tensor,
    y: Tensor,
    mean: Tensor,
    invstd: Tensor,
    scale: Tensor,
    shift: Tensor,
    out: Optional[Tensor],
    relu: bool,
    sample_scale: Optional[Tensor],
    sum_g: Tensor,
    sum_gx: Tensor,
    backend: str,
) -> Tensor:
    """dy = A*g + B*y + C: gradient w.r.t. the BatchNorm input y."""
    return _table(backend).bn_backward_apply(
        dout, y, mean, invstd, scale, shift, out, relu, sample_scale, sum_g, sum_gx
    )


@bn_backward_apply.register_fake
def _(dout, y, mean, invstd, scale, shift, out, relu, sample_scale, sum_g, sum_gx, backend):
    return reference.bn_backward_apply(dout, y, mean, invstd, scale, shift, out, relu, sample_scale, sum_g, sum_gx)


@torch.library.custom_op(f"{_LIB}::act_grad", mutates_args=())
def act_grad(dout: Tensor, out: Tensor, backend: str) -> Tensor:
    """ReLU backward from the activated output: dout where out > 0, else 0."""
    return _table(backend).act_grad(dout, out)


@act_grad.register_fake
def _(dout, out, backend):
    return reference.act_grad(dout, out)


@torch.library.custom_op(f"{_LIB}::conv_dgrad", mutates_args=())
def conv_dgrad(
    dy: Tensor,
    weight: Tensor,
    input_shape: List[int],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
    dx_add: Optional[Tensor],
    backend: str,
) -> Tensor:
    """Gradient of conv2d w.r.t. its input, plus ``dx_add`` when given."""
    return _table(backend).conv_dgrad(dy, weight, input_shape, stride, padding, dilation, groups, dx_add)


@conv_dgrad.register_fake
def _(dy, weight, input_shape, stride, padding, dilation, groups, dx_add, backend):
    return reference.conv_dgrad(dy, weight, input_shape, stride, padding, dilation, groups, dx_add)


@torch.library.custom_op(f"{_LIB}::conv_wgrad", mutates_args=())
def conv_wgrad(
    dy: Tensor,
    x: Tensor,
    in_scale: Optional[Tensor],
    in_shift: Optional[Tensor],
    in_relu: bool,
    weight_shape: List[int],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
    backend: str,
) -> Tensor:
    """Gradient of conv2d w.r.t. its weight, the input recomputed as pro(x) on load."""
    return _table(backend).conv_wgrad(
        dy, x, in_scale, in_shift, in_relu, weight_shape, stride, padding, dilation, groups
    )


@conv_wgrad.register_fake
def _(dy, x, in_scale, in_shift, in_relu, weight_shape, stride, padding, dilation, groups, backend):
    return reference.conv_wgrad(dy, x, in_scale, in_shift, in_relu, weight_shape, stride, padding, dilation, groups)


@torch.library.custom_op(f"{_LIB}::bn_apply_conv_backward", mutates_args=())
def bn_apply_conv_backward(
    dh: Tensor,
    y: Tensor,
    scale: Tensor,
    shift: Tensor,
    coefs: Tensor,
    weight: Tensor,
    x: Tensor,
    in_scale: Optional[Tensor],
    in_shift: Optional[Tensor],
    in_relu: bool,
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
    need_dx: bool,
    need_dw: bool,
    dx_add: Optional[Tensor],
    backend: str,
) -> Tuple[Tensor, Tensor]:
    """dgrad (plus ``dx_add`` when given) and wgrad of a conv whose output gradient is the
    BatchNorm(+ReLU) backward apply of ``dh``, computed while loading (never stored).
    Unneeded outputs are empty tensors."""
    return _table(backend).bn_apply_conv_backward(
        dh, y, scale, shift, coefs, weight, x, in_scale, in_shift, in_relu, stride, padding, dilation, groups,
        need_dx, need_dw, dx_add,
    )


@bn_apply_conv_backward.register_fake
def _(dh, y, scale, shift, coefs, weight, x, in_scale, in_shift, in_relu, stride, padding, dilation, groups,
      need_dx, need_dw, dx_add, backend):
    return reference.bn_apply_conv_backward(
        dh, y, scale, shift, coefs, weight, x, in_scale, in_shift, in_relu, stride, padding, dilation, groups,
        need_dx, need_dw, dx_add,
    )


# ----------------------------------------------------------- autograd of conv_bias_act


def _cba_setup(ctx, inputs, output):
    (x, weight, bias, residual, in_scale, in_shift, in_relu, stride, padding, dilation, groups, relu, backend) = inputs
    ctx.geom = (list(stride), list(padding), list(dilation), groups)
    ctx.flags = (in_relu, relu, backend, bias is not None, residual is not None)
    ctx.save_for_backward(x, weight, in_scale, in_shift, output if relu else None)


def _cba_backward(ctx, dout):
    x, weight, in_scale, in_shift, out = ctx.saved_tensors
    in_relu, relu, backend, has_bias, has_res = ctx.flags
    stride, padding, dilation, groups = ctx.geom
    need = ctx.needs_input_grad
    g = act_grad(dout, out, backend) if relu else dout
    dx = dw = dbias = dres = dscale = dshift = None
    if need[1]:
        dw = conv_wgrad(g, x, in_scale, in_shift, in_relu, list(weight.shape), stride, padding, dilation, groups, backend)
    if has_bias and need[2]:
        dbias = g.sum(dim=(0, 2, 3))
    if has_res and need[3]:
        dres = g
    if need[0] or need[4] or need[5]:
        dh = conv_dgrad(g, weight, list(x.shape), stride, padding, dilation, groups, None, backend)
        if in_scale is None:
            dx = torch.where(x <= 0, torch.zeros_like(dh), dh) if in_relu else dh
        else:
            sd = reference.stat_dtype(x.dtype)
            xf = x.to(sd)
            dz = dh.to(sd)
            if in_relu:
                z = xf * in_scale.view(1, -1, 1, 1) + in_shift.view(1, -1, 1, 1)
                dz = torch.where(z <= 0, torch.zeros_like(dz), dz)
            dx = (dz * in_scale.view(1, -1, 1, 1)).to(x.dtype)
            dscale = (dz * xf).sum(dim=(0, 2, 3)).to(in_scale.dtype)
            dshift = dz.sum(dim=(0, 2, 3)).to(in_shift.dtype)
    return dx, dw, dbias, dres, dscale, dshift, None, None, None, None, None, None, None


conv_bias_act.register_autograd(_cba_backward, setup_context=_cba_setup)



def unobserved(x: Tensor) -> bool:
    """An inference call on ``x`` that nothing observes: grad mode off, not compiling or
    tracing, no torch function/dispatch mode active, a plain tensor."""
    return not (
        torch.is_grad_enabled()
        or torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or type(x) is not Tensor
        or torch._C._len_torch_function_stack() > 0
        or torch._C._len_torch_dispatch_stack() > 0
    )


def conv_bias_act_eager(x: Tensor, backend: str):
    """``conv_bias_act`` for an inference forward on ``x``: the backend's function itself
    where going through the dispatcher changes nothing (grad mode off, not tracing, no
    torch function/dispatch mode active, a plain tensor input), which saves the custom-op
    dispatch per call; the custom op otherwise. Same arguments as ``conv_bias_act``, plus
    ``residual_owned=True`` to say the residual is a temporary of the caller that the
    backend may overwrite with the result (used only by backends that declare
    ``accepts_owned_residual``; ignored otherwise)."""
    if not unobserved(x):
        return lambda *args, residual_owned=False: conv_bias_act(*args)
    table = _table(backend)
    fn = table.conv_bias_act
    if getattr(table, "accepts_owned_residual", False):
        return lambda *args, residual_owned=False: fn(*args[:-1], residual_owned=residual_owned)
    return lambda *args, residual_owned=False: fn(*args[:-1])

ALL_OPS = (
    conv_bias_act,
    conv_stats,
    batch_stats,
    bn_finalize,
    bn_add_act,
    bn_backward_reduce,
    bn_backward_apply,
    act_grad,
    conv_dgrad,
    conv_wgrad,
    bn_apply_conv_backward,
)
