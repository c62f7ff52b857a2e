"""The primitives as ``torch.library`` custom ops in the ``fusedres`` namespace.

The ops are defined from the contract in ``fusedres.primitives`` (schema, outputs, what is
written in place). Every op takes the concrete backend name as its last argument and forwards to
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

import torch
from torch import Tensor

from . import backends, primitives, reference

_LIB = "fusedres"


def _table(backend: str):
    return backends.get(backend)


def _define(p: primitives.Primitive):
    """The custom op ``fusedres::<p.name>`` with the contract's schema plus the backend name:
    it calls that backend's implementation; its fake runs the reference on fake tensors
    (exact shapes and strides) unless ``_FAKES`` has one."""
    name = p.name

    def implementation(*args):
        return getattr(_table(args[-1]), name)(*args[:-1])

    def reference_fake(*args):
        return getattr(reference, name)(*args[:-1])

    implementation.__name__ = implementation.__qualname__ = name
    implementation.__doc__ = p.doc
    op = torch.library.custom_op(f"{_LIB}::{name}", implementation, mutates_args=p.mutates, schema=p.schema())
    op.register_fake(_FAKES.get(name, reference_fake))
    return op


def _fake_partials(t: Tensor, backend: str) -> Tensor:
    # the number of partial-statistics tiles is the one backend-specific size
    tiles = _table(backend).stats_tiles(t.shape)
    return t.new_empty((tiles, 3, t.shape[1]), dtype=reference.stat_dtype(t.dtype))


def _conv_stats_fake(x, weight, in_scale, in_shift, in_relu, stride, padding, dilation, groups, backend):
    y, _ = reference.conv_stats(x, weight, in_scale, in_shift, in_relu, stride, padding, dilation, groups)
    return y, _fake_partials(y, backend)


def _bn_finalize_fake(partials, gamma, beta, running_mean, running_var, momentum, eps, backend):
    # the reference would update the running statistics: a fake only says what it returns
    return tuple(partials.new_empty((partials.shape[2],)) for _ in range(4))


def _bn_backward_reduce_fake(dout, y, mean, invstd, scale, shift, out, relu, sample_scale, backend):
    return mean.new_empty(mean.shape), mean.new_empty(mean.shape)


_FAKES = {
    "conv_stats": _conv_stats_fake,
    "batch_stats": lambda x, backend: _fake_partials(x, backend),
    "bn_finalize": _bn_finalize_fake,
    "bn_backward_reduce": _bn_backward_reduce_fake,
}

_OPS = {p.name: _define(p) for p in primitives.PRIMITIVES}

# forward
conv_bias_act = _OPS["conv_bias_act"]
conv_stats = _OPS["conv_stats"]
batch_stats = _OPS["batch_stats"]
bn_finalize = _OPS["bn_finalize"]
bn_add_act = _OPS["bn_add_act"]
# backward
bn_backward_reduce = _OPS["bn_backward_reduce"]
bn_backward_apply = _OPS["bn_backward_apply"]
act_grad = _OPS["act_grad"]
conv_dgrad = _OPS["conv_dgrad"]
conv_wgrad = _OPS["conv_wgrad"]
bn_apply_conv_backward = _OPS["bn_apply_conv_backward"]


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
    """A call on ``x`` that nothing observes: grad mode off, not compiling or tracing, no
    torch function/dispatch mode or functorch transform active, a plain tensor."""
    return not (
        torch.is_grad_enabled()
        or torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or type(x) is not Tensor
        or torch._C._len_torch_function_stack() > 0
        or torch._C._len_torch_dispatch_stack() > 0
        or torch._C._are_functorch_transforms_active()
    )


def _direct(name: str):
    op = _OPS[name]

    def call(*args):
        if unobserved(args[0]):
            return getattr(_table(args[-1]), name)(*args[:-1])
        return op(*args)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"``{name}`` through one dispatcher crossing where nothing observes the call."
    return call


class _Direct:
    """The primitives as the block's autograd Functions call them (``ops.direct.<name>``,
    the custom op's arguments): the backend's implementation itself where going through
    the ``fusedres::`` op changes nothing (:func:`unobserved`: inside a Function's forward
    and a backward without ``create_graph``), so a call crosses the dispatcher once, in the
    backend's own kernel op; the custom op otherwise (torch.compile, tracing, a dispatch
    mode, a functorch transform, grad mode)."""

    def __init__(self):
        for p in primitives.PRIMITIVES:
            setattr(self, p.name, _direct(p.name))


direct = _Direct()


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


ALL_OPS = tuple(_OPS.values())
