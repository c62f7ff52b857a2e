"""Loading of the C++/CUDA extension ``fusedres._C`` (the ``fusedres_ext::`` ops).

Importing this module never touches a GPU and never raises. :func:`load` imports the
extension once; if it is missing (built with ``FUSEDRES_SKIP_EXT=1``, disabled at run time
with ``FUSEDRES_DISABLE_EXT=1``, or failing to load) it warns once per process and returns
None, and the ``cpu`` / ``cuda`` backends report themselves unavailable.

Ops registered by the extension (all tensors on one device; vectors are 1-D):

``torch.ops.fusedres_ext.bn_add_act(y, scale, shift, residual, res_scale, res_shift, sample_scale, relu)``
    y: [N, C, H, W], contiguous or channels_last; CPU and CUDA: float32, float64, float16,
    bfloat16. scale/shift/res_scale/res_shift: [C], sample_scale: [N], float32 (float64 also
    accepted when y is float64). Returns y's dtype, channels_last iff y is channels_last.

``torch.ops.fusedres_ext.bn_finalize(partials, gamma, beta, running_mean, running_var, momentum, eps)``
    partials: [T, 3, C] float32 (or float64) per-tile (count, mean, M2); returns
    (mean, invstd, scale, shift) in partials' dtype and updates the running statistics in place.

``torch.ops.fusedres_ext.batch_stats(x, tiles)``
    x: [N, C, H, W], any layout, the four dtypes of bn_add_act. Returns partials [tiles, 3, C]
    in float32 (float64 for float64 x): tile t holds (count, mean, M2) of channel c over the
    pixels [t*M//T + min(t, M%T), ...) of the M = N*H*W pixels in (n, h, w) order (the first
    M % T tiles one pixel longer); tiles=1 is fusedres.reference's layout. An empty tile is
    (0, NaN, 0). Deterministic (fixed-order block merge, no atomics).

``torch.ops.fusedres_ext.bn_backward_reduce(dout, y, mean, invstd, scale, shift, out, relu, sample_scale)``
    -> (sum_g, sum_gx) [C] in the statistics dtype, with g = dout zeroed where the ReLU was
    inactive (relu: out <= 0 when out is given, else y*scale + shift <= 0), times
    sample_scale[n] when given, and xhat = (y - mean)*invstd. dout/out: y's shape and dtype;
    vectors as for bn_add_act.

``torch.ops.fusedres_ext.bn_backward_apply(dout, y, mean, invstd, scale, shift, out, relu, sample_scale, sum_g, sum_gx, addend=None, grad_out=None)``
    -> dy = A*g + B*y + C in y's dtype and layout rule, A = scale, B = -scale*invstd*sum_gx/M,
    C = -A*sum_g/M - B*mean (M = N*H*W), plus addend (y's shape and dtype) where given, added
    in the statistics dtype before the one rounding; as fusedres.reference.bn_backward_apply.
    grad_out (y's shape and dtype, dense in y's layout rule), where given, is written in
    place with g before sample_scale.

``torch.ops.fusedres_ext.bn_apply_relu(dh, y, scale, shift, coefs)``
    -> dy = A*g + B*y + C with g = dh where y*scale + shift > 0 and (A, B, C) the rows of
    coefs [3, C] (statistics dtype): the apply of the BatchNorm+ReLU backward from
    coefficients computed once per channel (fusedres.reference.bn_apply_relu); y's dtype
    and layout rule.

``torch.ops.fusedres_ext.relu_(x)`` (CPU)
    ReLU in place with torch.relu's values: NaN stays NaN (its payload kept; torch's 16-bit
    ReLU may canonicalise it), -0 stays -0, -inf becomes +0. The 16-bit types work on their
    bit patterns, at memory speed (ATen's 16-bit ReLU converts every element to float and
    back).

``torch.ops.fusedres_ext.act_grad(dout, out)``
    -> dout where out > 0, else 0 (NaN out keeps dout); any shape, out in dout's dtype; the
    result follows dout's layout rule.

``torch.ops.fusedres_ext.max_pool2d(x, kernel_size, stride, padding, relu)`` (CPU)
    -> torch.nn.functional.max_pool2d(relu(x) if relu else x, kernel_size, stride, padding)
    bit for bit (dilation 1, floor mode; a NaN in a window wins, with its payload), in one
    pass and without the int64 indices ATen's CPU max-pool always writes; x
    channels_last-contiguous, the output channels_last.

``torch.ops.fusedres_ext.fold_scale(weight, scale, dtype)`` (CPU)
    -> (weight.float() * scale.view(-1, 1, ..., 1)).to(dtype) in one pass: the BatchNorm fold
    of a convolution weight. weight float32/float16/bfloat16, contiguous or channels_last;
    scale float32 with one element per output channel; dtype float32/float16/bfloat16; the
    output has weight's strides. Values bit for bit those of the PyTorch expression (16-bit
    results rounded to nearest even; a NaN stays a NaN, its bit pattern may differ).
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Optional

import torch

_STATE = {"tried": False, "module": None, "reason": "", "cuda": False}


def _reason_from(exc: BaseException) -> str:
    msg = str(exc) or type(exc).__name__
    if isinstance(exc, ImportError) and getattr(exc, "name", None) == "fusedres._C":
        return "not built (installed with FUSEDRES_SKIP_EXT=1?); reinstall with `pip install --no-build-isolation .`"
    if isinstance(exc, ImportError) and "cannot import name '_C'" in msg:
        return "not built (installed with FUSEDRES_SKIP_EXT=1?); reinstall with `pip install --no-build-isolation .`"
    return f"{type(exc).__name__}: {msg}"


def load():
    """Import ``fusedres._C`` once; return the module, or None (after one warning) if unavailable."""
    if _STATE["tried"]:
        return _STATE["module"]
    _STATE["tried"] = True
    if os.environ.get("FUSEDRES_DISABLE_EXT", "0") == "1":
        _STATE["reason"] = "disabled by FUSEDRES_DISABLE_EXT=1"
    else:
        try:
            mod = importlib.import_module("fusedres._C")  # registers the fusedres_ext ops
            info = str(mod.build_info())
            _register_fakes()
        except Exception as e:  # noqa: BLE001  (a broken build must not break `import fusedres`)
            _STATE["reason"] = _reason_from(e)
        else:
            _STATE["module"] = mod
            _STATE["cuda"] = "cuda" in info.split("+")
    if _STATE["module"] is None:
        warnings.warn(
            f"fusedres: C++ extension not available ({_STATE['reason']}); the 'cpu' and 'cuda' backends are "
            "disabled, 'reference' and 'triton' still work",
            UserWarning,
            stacklevel=2,
        )
    return _STATE["module"]


def status() -> dict:
    """``{"loaded": bool, "reason": str, "cuda": bool}``: whether the extension is usable,
    why not ("" when it is), and whether it was compiled with the CUDA kernels."""
    load()
    return {"loaded": _STATE["module"] is not None, "reason": _STATE["reason"], "cuda": bool(_STATE["cuda"])}


def ops() -> Optional[object]:
    """``torch.ops.fusedres_ext`` if the extension loaded, else None."""
    return torch.ops.fusedres_ext if load() is not None else None


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    # the kernels' rule: channels_last only when strictly channels_last, contiguous otherwise
    cl = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


_FAKES_REGISTERED = False


def _register_fakes() -> None:
    """Fake (meta) kernels so the ops trace under torch.compile / FakeTensor."""
    global _FAKES_REGISTERED
    if _FAKES_REGISTERED:
        return

    @torch.library.register_fake("fusedres_ext::bn_add_act")
    def _bn_add_act_fake(y, scale, shift, residual, res_scale, res_shift, sample_scale, relu):
        torch._check(y.dim() == 4, lambda: f"fusedres_ext::bn_add_act: y must be 4-D (N, C, H, W), got {y.dim()}-D")
        if residual is not None:
            torch._check(
                residual.shape == y.shape,
                lambda: f"fusedres_ext::bn_add_act: residual must have the same shape as y "
                f"({list(y.shape)}), got {list(residual.shape)}",
            )
        return torch.empty(y.shape, dtype=y.dtype, device=y.device, memory_format=_memory_format(y))

    @torch.library.register_fake("fusedres_ext::bn_finalize")
    def _bn_finalize_fake(partials, gamma, beta, running_mean, running_var, momentum, eps):
        torch._check(
            partials.dim() == 3 and partials.shape[1] == 3,
            lambda: f"fusedres_ext::bn_finalize: partials must have shape [T, 3, C], got {list(partials.shape)}",
        )
        c = partials.shape[2]
        return tuple(partials.new_empty((c,)) for _ in range(4))

    def _stat_dtype(dtype):
        return torch.float64 if dtype == torch.float64 else torch.float32

    @torch.library.register_fake("fusedres_ext::batch_stats")
    def _batch_stats_fake(x, tiles):
        torch._check(x.dim() == 4, lambda: f"fusedres_ext::batch_stats: x must be 4-D (N, C, H, W), got {x.dim()}-D")
        torch._check(tiles >= 1, lambda: f"fusedres_ext::batch_stats: tiles must be at least 1, got {tiles}")
        return x.new_empty((tiles, 3, x.shape[1]), dtype=_stat_dtype(x.dtype))

    def _check_backward(op, dout, y, out, dout_name="dout"):
        torch._check(y.dim() == 4, lambda: f"fusedres_ext::{op}: y must be 4-D (N, C, H, W), got {y.dim()}-D")
        for name, t in ((dout_name, dout), ("out", out)):
            if t is not None:
                torch._check(
                    t.shape == y.shape,
                    lambda: f"fusedres_ext::{op}: {name} must have the same shape as y ({list(y.shape)}), "
                    f"got {list(t.shape)}",
                )

    @torch.library.register_fake("fusedres_ext::bn_backward_reduce")
    def _bn_backward_reduce_fake(dout, y, mean, invstd, scale, shift, out, relu, sample_scale):
        _check_backward("bn_backward_reduce", dout, y, out)
        c = y.shape[1]
        sd = _stat_dtype(y.dtype)
        return y.new_empty((c,), dtype=sd), y.new_empty((c,), dtype=sd)

    @torch.library.register_fake("fusedres_ext::bn_backward_apply")
    def _bn_backward_apply_fake(dout, y, mean, invstd, scale, shift, out, relu, sample_scale, sum_g, sum_gx,
                                addend=None, grad_out=None):
        _check_backward("bn_backward_apply", dout, y, out)
        _check_backward("bn_backward_apply", addend, y, None, "addend")
        _check_backward("bn_backward_apply", grad_out, y, None, "grad_out")
        return torch.empty(y.shape, dtype=y.dtype, device=y.device, memory_format=_memory_format(y))

    @torch.library.register_fake("fusedres_ext::bn_apply_relu")
    def _bn_apply_relu_fake(dh, y, scale, shift, coefs):
        _check_backward("bn_apply_relu", dh, y, None, "dh")
        return torch.empty(y.shape, dtype=y.dtype, device=y.device, memory_format=_memory_format(y))

    @torch.library.register_fake("fusedres_ext::act_grad")
    def _act_grad_fake(dout, out):
        torch._check(
            out.shape == dout.shape,
            lambda: f"fusedres_ext::act_grad: out must have the same shape as dout ({list(dout.shape)}), "
            f"got {list(out.shape)}",
        )
        return torch.empty(dout.shape, dtype=dout.dtype, device=dout.device, memory_format=_memory_format(dout))

    @torch.library.register_fake("fusedres_ext::relu_")
    def _relu_fake(x):
        return None

    @torch.library.register_fake("fusedres_ext::max_pool2d")
    def _max_pool2d_fake(x, kernel_size, stride, padding, relu):
        n, c, h, w = x.shape
        p = (h + 2 * padding[0] - kernel_size[0]) // stride[0] + 1
        q = (w + 2 * padding[1] - kernel_size[1]) // stride[1] + 1
        return torch.empty((n, c, p, q), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)

    @torch.library.register_fake("fusedres_ext::fold_scale")
    def _fold_scale_fake(weight, scale, dtype):
        return torch.empty_like(weight, dtype=dtype)

    from .backends import _cutlass  # the convolution ops' fakes live with their Python side

    _cutlass.register_fakes()
    _FAKES_REGISTERED = True
