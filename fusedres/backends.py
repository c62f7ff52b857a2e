"""Backend registry: which implementations of the primitives exist here, and why not.

A backend is a table of primitive implementations (see ``fusedres.reference`` for
the vocabulary). Backends derive from the reference table and override the
primitives they implement natively, so a backend under construction is always
complete and correct; ``native`` says which primitives are its own. Nothing here
touches a GPU at import: availability is probed lazily and cached.

``backend="auto"`` resolves per input device: cuda -> triton -> reference for CUDA
tensors, cpu -> reference for CPU tensors.
"""

from __future__ import annotations

import collections
import functools
import os
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch.utils.weak import WeakIdKeyDictionary

from . import _frozen, primitives, reference

PRIMITIVES = primitives.NAMES

BACKEND_NAMES = ("reference", "triton", "cuda", "cpu")
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}


# calls a backend handed to another implementation (the reference's PyTorch ops), by
# (backend, primitive, reason): a backend never does so silently
_FALLBACKS: "collections.Counter[Tuple[str, str, str]]" = collections.Counter()
_FALLBACK_LISTENERS: List[Callable[[str, str, str], None]] = []


def record_fallback(backend: str, primitive: str, reason: str) -> None:
    """Count one call of ``backend``'s ``primitive`` that ran the reference instead of the
    backend's own kernel, and tell the listeners (``fusedres.explain`` attributes it to the
    unit that made the call)."""
    _FALLBACKS[(backend, primitive, reason)] += 1
    for listener in _FALLBACK_LISTENERS:
        listener(backend, primitive, reason)


def fallbacks() -> Dict[Tuple[str, str, str], int]:
    """How many calls each backend's primitives handed to the reference since the process
    started (or :func:`reset_fallbacks`), by ``(backend, primitive, reason)``.

    >>> fusedres.backends.fallbacks()
    {('cpu', 'conv_bias_act', 'an input prologue (oneDNN convolutions have none)'): 32}
    """
    return dict(_FALLBACKS)


def reset_fallbacks() -> None:
    _FALLBACKS.clear()


class BackendUnavailableError(RuntimeError):
    """Raised when a backend is asked for that cannot run here (or not on this device)."""


class BackendStatus(NamedTuple):
    available: bool
    reason: str  # why it is unavailable, or a short description when available
    native: Tuple[str, ...]  # primitives implemented by the backend itself


def _names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


_BACKWARD_DTYPES = ("dtypes outside the kernels (a storage dtype they lack, or a gradient/output or a per-channel "
                    "vector not in the storage / statistics dtype)")


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
    def bn_backward_apply(cls, dout, y, mean, invstd, scale, shift, out, relu, sample_scale, sum_g, sum_gx):
        args = (dout, y, mean, invstd, scale, shift, out, relu, sample_scale, sum_g, sum_gx)
        if not cls._native_backward(dout, y, out, (mean, invstd, scale, shift, sample_scale, sum_g, sum_gx)):
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
    def _prepacked(cls, weight, x, stride, padding, dilation, groups):
        """The weight in oneDNN's blocked layout for this conv where that changes nothing but
        speed: a frozen folded weight (any other tensor may be edited behind its version
        counter, or be a buffer that torch.compile reuses) and a channels_last input (for
        NCHW inputs oneDNN's blocked kernel accumulates in another order than ATen's NCHW
        convolution, so the packed path would not give eager PyTorch's numerics)."""
        if not _frozen.is_frozen_weight(weight) or reference.memory_format(x) != torch.channels_last:
            return weight
        key = (tuple(x.shape), x.dtype, tuple(stride), tuple(padding), tuple(dilation), groups)
        per_weight = cls._packed.setdefault(weight, {})
        packed = per_weight.get(key)
        if packed is None:
            if len(per_weight) >= 8:  # a new input shape: bound the copies kept per weight
                per_weight.clear()
            packed = torch.ops.mkldnn._reorder_convolution_weight(
                weight, list(padding), list(stride), list(dilation), groups, list(x.shape)
            )
            per_weight[key] = packed
        return packed

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
        fmt = reference.memory_format(x)
        x = x.contiguous(memory_format=fmt)
        b = None if bias is None else bias.to(x.dtype)
        w = cls._prepacked(weight, x, stride, padding, dilation, groups)
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
        from . import _ext

        st = _ext.status()
        if not st["loaded"]:
            return False, f"C++ extension not available ({st['reason']})"
        return True, "C++ extension"


class CudaBackend(_ExtensionBackend):
    """CUDA C++ kernels from ``fusedres._C``. Convolutions run on its CUTLASS tensor-core
    kernels where the extension's support predicate takes the call (float16/bfloat16,
    channels_last, channels a multiple of 8; grouped convolutions in the forward only, with
    a multiple of 32 input and 8, 16, 32 or 64 output channels per group:
    ``fusedres._conv_cutlass``), through ATen (cuDNN)
    otherwise, and always through ATen when the extension was built without CUTLASS."""

    name = "cuda"
    device_type = "cuda"
    _DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    _CUTLASS_NATIVE = ("conv_bias_act", "conv_stats", "conv_dgrad", "conv_wgrad", "bn_apply_conv_backward")

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def _cutlass():
        """``fusedres._conv_cutlass`` when the extension has the CUTLASS kernels, else None."""
        from . import _conv_cutlass, _ext

        if _ext.load() is None:
            return None
        try:
            if not _conv_cutlass.built():
                return None
        except (AttributeError, RuntimeError):  # an extension built before the conv ops existed
            return None
        _conv_cutlass.register_fakes()
        return _conv_cutlass

    @classmethod
    def _cutlass_reason(cls, predicate: str, *args) -> str:
        """Why the CUTLASS kernel cannot run this call ("" if it can): ``predicate`` is the
        name of one of ``fusedres._conv_cutlass``'s reason functions."""
        cut = cls._cutlass()
        if cut is None:
            return "the extension was built without CUTLASS"
        return getattr(cut, predicate)(*args) or ""

    @classmethod
    def _prologue_first(cls, x, in_scale, in_shift, in_relu):
        """(x, in_scale, in_shift, in_relu) for the convolution kernels. By default a
        BatchNorm prologue runs as one native pass (bn_add_act: float32 scale and shift, one
        rounding, the reference's numerics) and the convolution takes its output: CUTLASS's
        mainloop fusion can only load scale and shift in the 16-bit storage dtype, whose
        rounding costs |shift| * 2**-9 (bfloat16) per element and breaks the numerics rule
        when the BatchNorm's |mean/sigma| is large (|shift| >> the normalised value).
        ``FUSEDRES_CUDA_PROLOGUE=fused`` keeps the prologue in the CUTLASS mainloop
        (16-bit scale and shift: one activation pass less, within the rule only for small
        |mean/sigma|)."""
        if in_scale is None or os.environ.get("FUSEDRES_CUDA_PROLOGUE", "exact") == "fused":
            return x, in_scale, in_shift, in_relu
        if cls._native_backward(x, x, None, (in_scale, in_shift)):
            h = cls._ops().bn_add_act(x, in_scale, in_shift, None, None, None, None, in_relu)
        else:
            h = reference.prologue(x, in_scale, in_shift, in_relu)
        return h, None, None, False

    @classmethod
    def conv_bias_act(cls, x, weight, bias, residual, in_scale, in_shift, in_relu, stride, padding, dilation, groups, relu):
        x, in_scale, in_shift, in_relu = cls._prologue_first(x, in_scale, in_shift, in_relu)
        why = cls._cutlass_reason("fprop_reason", x, weight, bias, residual, in_scale, in_relu, stride, padding,
                                  dilation, groups)
        if why:
            record_fallback(cls.name, "conv_bias_act", why)
            return reference.conv_bias_act(
                x, weight, bias, residual, in_scale, in_shift, in_relu, stride, padding, dilation, groups, relu
            )
        return cls._cutlass().conv_bias_act(
            x, weight, bias, residual, in_scale, in_shift, stride, padding, dilation, relu
        )

    @classmethod
    def conv_stats(cls, x, weight, in_scale, in_shift, in_relu, stride, padding, dilation, groups):
        x, in_scale, in_shift, in_relu = cls._prologue_first(x, in_scale, in_shift, in_relu)
        why = cls._cutlass_reason("fprop_reason", x, weight, None, None, in_scale, in_relu, stride, padding,
                                  dilation, groups)
        if why:
            record_fallback(cls.name, "conv_stats", why)
            return reference.conv_stats(x, weight, in_scale, in_shift, in_relu, stride, padding, dilation, groups)
        return cls._cutlass().conv_stats(x, weight, in_scale, in_shift, stride, padding, dilation)

    @classmethod
    def conv_dgrad(cls, dy, weight, input_shape, stride, padding, dilation, groups, dx_add=None):
        why = cls._cutlass_reason("dgrad_reason", dy, weight, input_shape, stride, padding, dilation, groups, dx_add)
        if why:
            record_fallback(cls.name, "conv_dgrad", why)
            return reference.conv_dgrad(dy, weight, input_shape, stride, padding, dilation, groups, dx_add)
        return cls._cutlass().conv_dgrad(dy, weight, input_shape, stride, padding, dilation, dx_add)

    @classmethod
    def conv_wgrad(cls, dy, x, in_scale, in_shift, in_relu, weight_shape, stride, padding, dilation, groups):
        x, in_scale, in_shift, in_relu = cls._prologue_first(x, in_scale, in_shift, in_relu)
        why = cls._cutlass_reason("wgrad_reason", dy, x, in_scale, in_relu, weight_shape, stride, padding, dilation,
                                  groups)
        if why:
            record_fallback(cls.name, "conv_wgrad", why)
            return reference.conv_wgrad(
                dy, x, in_scale, in_shift, in_relu, weight_shape, stride, padding, dilation, groups
            )
        return cls._cutlass().conv_wgrad(dy, x, in_scale, in_shift, weight_shape, stride, padding, dilation)

    @classmethod
    def availability(cls) -> Tuple[bool, str]:
        from . import _ext

        st = _ext.status()
        if not st["loaded"]:
            return False, f"C++ extension not available ({st['reason']})"
        if not st["cuda"]:
            return False, "extension built without CUDA"
        if not torch.cuda.is_available():
            return False, "no CUDA device visible to PyTorch"
        cutlass = cls._cutlass() is not None
        # the convolutions are this backend's own only with the CUTLASS kernels compiled in
        cls.native = _ExtensionBackend.native + (cls._CUTLASS_NATIVE if cutlass else ())
        convs = (
            "convolutions on CUTLASS where supported, else ATen"
            if cutlass
            else "convolutions through ATen (extension built without CUTLASS)"
        )
        return True, f"CUDA extension on {torch.cuda.get_device_name()}; {convs}"


class _MissingTriton:
    """Stands in for ``fusedres.triton_kernels`` when it is not installed (source tree)."""

    native = ()

    @staticmethod
    def availability():
        return False, "fusedres.triton_kernels is not installed (install fusedres with pip)"

    @staticmethod
    def backend_class():
        raise BackendUnavailableError(_MissingTriton.availability()[1])

    @staticmethod
    def device_error(device):
        return None


def _triton_backend():
    try:
        from . import triton_kernels
    except ImportError:
        return _MissingTriton
    return triton_kernels


_REGISTRY: Dict[str, type] = {"reference": ReferenceBackend, "cpu": CpuBackend, "cuda": CudaBackend}


@functools.lru_cache(maxsize=None)
def _status(name: str) -> BackendStatus:
    if name == "triton":
        tk = _triton_backend()
        ok, why = tk.availability()
        table = tk.backend_class() if ok else None
        return BackendStatus(ok, why, tuple(table.native) if table else ())
    cls = _REGISTRY[name]
    ok, why = cls.availability()
    return BackendStatus(ok, why, tuple(cls.native) if ok else ())


def available_backends() -> Dict[str, BackendStatus]:
    """Every backend with whether it can run here and, if not, why.

    >>> fusedres.available_backends()["cuda"]
    BackendStatus(available=False, reason='extension built without CUDA', native=())
    """
    return {name: _status(name) for name in BACKEND_NAMES}


def refresh() -> None:
    """Forget cached availability (e.g. after changing TRITON_INTERPRET)."""
    _status.cache_clear()


def get(name: str):
    """The primitive table of a concrete backend name (no availability check)."""
    if name == "triton":
        return _triton_backend().backend_class()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; expected one of {('auto',) + BACKEND_NAMES}") from None


def _device_error(name: str, device: torch.device) -> Optional[str]:
    if name == "triton":
        return _triton_backend().device_error(device)
    return _REGISTRY[name].device_error(device)


@torch.compiler.assume_constant_result
def resolve(backend: str, device: torch.device) -> str:
    """Turn ``backend`` ("auto" or a name) into a concrete backend usable on ``device``.

    Raises ``BackendUnavailableError`` naming the reason when an explicitly requested
    backend cannot run here, and ``ValueError`` for an unknown name.
    """
    if backend == "auto":
        for name in _AUTO_ORDER.get(device.type, ("reference",)):
            if _status(name).available and _device_error(name, device) is None:
                return name
        return "reference"
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be 'auto' or one of {BACKEND_NAMES}, got {backend!r}")
    st = _status(backend)
    if not st.available:
        raise BackendUnavailableError(f"backend '{backend}' is not available: {st.reason}")
    err = _device_error(backend, device)
    if err is not None:
        raise BackendUnavailableError(err)
    return backend


def check_name(backend: str) -> str:
    """Validate a backend name at construction time (availability is checked at call time)."""
    if backend != "auto" and backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be 'auto' or one of {BACKEND_NAMES}, got {backend!r}")
    return backend


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
