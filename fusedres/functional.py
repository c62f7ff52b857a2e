"""Block-level functional API: train vs eval, validation, BN folding, backend dispatch.

The functions take the block's own ``nn.Conv2d`` / ``nn.BatchNorm2d`` modules (the
parameters and buffers live there, exactly as in torchvision) and run them as one
fused computation:

* training (BatchNorm on batch statistics): the autograd Functions of
  ``fusedres.autograd``, updating running statistics and ``num_batches_tracked``
  exactly like ``nn.BatchNorm2d`` (momentum, or cumulative average when momentum is None);
* inference (running statistics): BatchNorm folded into the conv weights and bias
  (in fp32, then cast), cached per weight version and recomputed whenever a
  parameter or buffer changes (in-place edits, ``load_state_dict``, ``.to()``).

Configurations the fused path does not cover (a non-BatchNorm norm layer, a conv
with bias or non-zero padding mode, BatchNorms of one block in different modes, an
empty batch) run the same math through the modules themselves, so a block is
always correct; ``fusable()`` says which path a block takes. ``backend="auto"`` also
takes that path for training on CPU tensors, where it is the faster one
(``fusedres.autoselect.torch_nn_reason``).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass, replace
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import _frozen, autoselect, backends, ops
from .autograd import ChainSpec, ConvGeom, PostActBlock, PreActBlock, Shortcut
from .reference import memory_format, stat_dtype

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

__all__ = ["conv_bn_act", "residual_block", "fusable", "fold_bn", "unfused", "freeze", "unfreeze"]

_STATE = threading.local()


@contextlib.contextmanager
def _recording(recorder):
    """Within this context ``residual_block`` reports each call to ``recorder`` (used by
    :func:`fusedres.explain`): ``recorder.enter(convs)`` on entry, then
    ``recorder.result(why, backend)``: ``why`` the reason it ran through the torch.nn
    modules, or None and the backend that ran it fused."""
    prev = getattr(_STATE, "recorder", None)
    _STATE.recorder = recorder
    try:
        yield
    finally:
        _STATE.recorder = prev


def _record_fallback(convs, why: str) -> None:
    """A fused module that ran its own torch.nn modules without calling residual_block."""
    rec = getattr(_STATE, "recorder", None)
    if rec is not None:
        rec.enter(convs)
        rec.result(why, None)


def call_donating(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)``, telling the ``residual_block`` call that receives this very ``x`` that
    it is a temporary nobody else holds (the caller's promise): an evaluation forward may
    then accumulate the block's identity shortcut into x's memory instead of a copy of it
    (backends with ``accepts_owned_residual``). Used by :class:`fusedres.blocks.FusedStage`
    for the output of the block before."""
    _STATE.donated = x
    try:
        return module(x)
    finally:
        _STATE.donated = None


def _take_donation(x: Tensor) -> bool:
    """Whether x was donated by :func:`call_donating` (consumed: one call gets it)."""
    donated = getattr(_STATE, "donated", None)
    if donated is None:
        return False
    _STATE.donated = None
    return donated is x


@contextlib.contextmanager
def unfused():
    """Within this context every fusedres block runs through its own torch.nn modules
    (conv, BatchNorm, ReLU, add as separate PyTorch ops): PyTorch's semantics, the
    yardstick the fused paths are compared with."""
    prev = getattr(_STATE, "unfused", False)
    _STATE.unfused = True
    try:
        yield
    finally:
        _STATE.unfused = prev


# --------------------------------------------------------------------------- checks


def _pair(v) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _conv_fusable(conv: nn.Module) -> Optional[str]:
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is not nn.Conv2d"
    if _own(conv, "bias") is not None:
        return "conv has a bias"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}"
    if isinstance(conv.padding, str):
        return f"padding={conv.padding!r}"
    return None


_FROZEN_BN_CLASSES = (("torchvision.ops.misc", "FrozenBatchNorm2d"),)


def _own_forward_of(cls, names) -> bool:
    """``cls`` is one of the (module, class name) pairs ``names`` and runs its own forward
    (not one a subclass or a patch replaced). Asked on every block call: the answer is kept
    per (class, forward function)."""
    key = (cls, cls.forward, names)
    hit = _CLASS_TESTS.get(key)
    if hit is None:
        hit = (cls.__module__, cls.__name__) in names and cls.forward.__qualname__ == f"{cls.__name__}.forward"
        _CLASS_TESTS[key] = hit
    return hit


_CLASS_TESTS: dict = {}


def is_frozen_bn(m: nn.Module) -> bool:
    """torchvision's ``FrozenBatchNorm2d`` (also the one timm uses), with its own forward: a
    constant per-channel affine from its buffers, in training as in evaluation."""
    cls = type(m)
    return cls is not nn.BatchNorm2d and _own_forward_of(cls, _FROZEN_BN_CLASSES)


_BN_RELU_CLASSES = (("timm.layers.norm_act", "BatchNormAct2d"),)


def is_bn_relu(m: nn.Module) -> bool:
    """timm's ``BatchNormAct2d`` with its own forward, a ReLU activation and no drop layer:
    ``relu(bn(x))``, where ``bn`` is ``nn.BatchNorm2d``'s forward verbatim (same batch
    statistics, running-statistic update and ``num_batches_tracked`` count)."""
    cls = type(m)
    return (
        cls is not nn.BatchNorm2d
        and _own_forward_of(cls, _BN_RELU_CLASSES)
        and type(getattr(m, "act", None)) is nn.ReLU
        and type(getattr(m, "drop", None)) is nn.Identity
    )


def _bn_fusable(bn: nn.Module, relu_follows: bool = False) -> Optional[str]:
    """None when ``bn`` can be fused as a BatchNorm; ``relu_follows``: the block applies a
    ReLU right after it, so a BatchNorm+ReLU module is that BatchNorm (ReLU is idempotent)."""
    if is_frozen_bn(bn):
        return None
    if relu_follows and is_bn_relu(bn):
        return None
    if not isinstance(bn, nn.BatchNorm2d) or type(bn).forward is not nn.BatchNorm2d.forward:
        return f"{type(bn).__name__} is not nn.BatchNorm2d"
    return None


def fusable(
    convs: Sequence[nn.Module],
    bns: Sequence[nn.Module],
    ds_bn: Optional[nn.Module] = None,
    relu_follows: Sequence[bool] = (),
) -> Optional[str]:
    """None when the fused path applies to these modules, else the reason it does not.

    ``ds_bn`` is the projection shortcut's BatchNorm, which must be in the same mode;
    ``relu_follows[i]``: the block applies a ReLU right after ``bns[i]``."""
    for m in convs:
        why = _conv_fusable(m)
        if why:
            return why
    for i, m in enumerate(bns):
        why = _bn_fusable(m, i < len(relu_follows) and relu_follows[i])
        if why:
            return why
    modes = {_batch_stats(bn) for bn in bns}
    if ds_bn is not None:
        modes.add(_batch_stats(ds_bn))
    if len(modes) > 1:
        return "BatchNorms of the block are in different modes (train/eval)"
    return None


_HOOK_DICTS = (
    "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
)


def _hooked(mods: Sequence[nn.Module]) -> Optional[str]:
    """A reason to run unfused when a module of the block (or of its downsample) carries a
    hook: the fused path never calls the submodules, so their hooks (and what relies on
    them: pruning, forward-pre-hook parametrisations, activation capture) would not run."""
    for m in mods:
        for sub in (m.modules() if m._modules else (m,)):
            for d in _HOOK_DICTS:
                if getattr(sub, d, None):
                    return f"{type(sub).__name__} carries a {d[1:-1].replace('_', ' ')}"
    return None


def _batch_stats(bn: nn.BatchNorm2d) -> bool:
    """Whether ``bn`` normalises with batch statistics (training) rather than its buffers."""
    if is_frozen_bn(bn):
        return False
    return bn.training or _own(bn, "running_mean") is None


def _geom(conv: nn.Conv2d) -> ConvGeom:
    raw = (conv.stride, conv.padding, conv.dilation, conv.groups)
    try:
        return _GEOMS[raw]
    except (KeyError, TypeError):  # a new geometry, or unhashable attributes (lists)
        g = ConvGeom(_pair(conv.stride), _pair(conv.padding), _pair(conv.dilation), conv.groups)
        try:
            _GEOMS[raw] = g
        except TypeError:
            pass
        return g


_GEOMS: dict = {}


def _out_hw(h: int, w: int, g: ConvGeom, k: Tuple[int, int]) -> Tuple[int, int]:
    return tuple(
        (size + 2 * g.padding[d] - g.dilation[d] * (k[d] - 1) - 1) // g.stride[d] + 1 for d, size in enumerate((h, w))
    )


def _check_input(x: Tensor, c_in: Optional[int], name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a Tensor input, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D input (N, C, H, W), got a {x.dim()}-D tensor of shape {list(x.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{name}: input dtype must be one of float16, bfloat16, float32, float64; got {x.dtype}")
    if c_in is not None and x.shape[1] != c_in:
        raise ValueError(f"{name}: expected an input with {c_in} channels, got {x.shape[1]} (input shape {list(x.shape)})")


def _check_devices(x: Tensor, mods: Sequence[nn.Module], name: str) -> None:
    dev = x.device
    for m in mods:
        # the module's own tensors (named_parameters(recurse=False) and named_buffers(recurse=False))
        for tensors in (m._parameters, m._buffers):
            for pname, t in tensors.items():
                if t is not None and t.device != dev:
                    raise RuntimeError(
                        f"{name}: input is on {x.device} but {type(m).__name__}.{pname} is on {t.device}"
                    )


def _check_dtypes(chain: "_Chain", dtype: torch.dtype, name: str) -> None:
    proj = chain.projection
    for m in list(chain.convs) + ([] if proj is None else [proj.conv]):
        if _own(m, "weight").dtype != dtype:
            raise TypeError(
                f"{name}: input dtype {dtype} does not match conv weight dtype {m.weight.dtype}; "
                "convert the module with .to(dtype) or run under torch.autocast"
            )


def _autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The autocast dtype for x's device when autocast is on there, else None."""
    try:
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
    except RuntimeError:  # device types autocast does not know (e.g. meta)
        pass
    return None


def _check_batch(x: Tensor, convs: Sequence[nn.Conv2d], preact: bool) -> None:
    n, _, h, w = x.shape
    sizes = []
    if preact:
        sizes.append((h, w))
    for conv in convs:
        h, w = _out_hw(h, w, _geom(conv), _pair(conv.kernel_size))
        sizes.append((h, w))
    for i, (hh, ww) in enumerate(sizes):
        if n * hh * ww <= 1:
            c = convs[i].out_channels if not preact else (x.shape[1] if i == 0 else convs[i - 1].out_channels)
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {torch.Size([n, c, hh, ww])}"
            )


# --------------------------------------------------------------------------- BatchNorm helpers


def _running_update_factor(bn: nn.BatchNorm2d) -> float:
    """Bump num_batches_tracked and return the running-stat factor, exactly as nn.BatchNorm2d."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    return factor


def _affine(bn: nn.BatchNorm2d, like: Tensor) -> Tuple[Tensor, Tensor]:
    sd = stat_dtype(like.dtype)
    gamma = bn.weight if bn.weight is not None else torch.ones(bn.num_features, device=like.device, dtype=sd)
    beta = bn.bias if bn.bias is not None else torch.zeros(bn.num_features, device=like.device, dtype=sd)
    return gamma, beta


def _bn_train_params(bn: nn.BatchNorm2d, like: Tensor) -> List[Optional[Tensor]]:
    gamma, beta = _affine(bn, like)
    tracked = bn.training and bn.track_running_stats and bn.running_mean is not None
    return [gamma, beta, bn.running_mean if tracked else None, bn.running_var if tracked else None]


def bn_scale_shift(bn: nn.BatchNorm2d, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """Inference-mode BatchNorm as per-channel (scale, shift) in the statistics dtype."""
    sd = stat_dtype(dtype)
    gamma, beta = _affine(bn, bn.running_mean)
    scale = gamma.to(sd) * torch.rsqrt(bn.running_var.to(sd) + bn.eps)
    return scale, beta.to(sd) - bn.running_mean.to(sd) * scale


def fold_bn(conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d], dtype: torch.dtype) -> Tuple[Tensor, Optional[Tensor]]:
    """(w', b') with conv(x, w') + b' == bn(conv(x, w)) in inference mode.

    Folded in fp32 (fp64 for fp64), weight cast to ``dtype``, bias kept in fp32.
    """
    if bn is None:
        return conv.weight.to(dtype), None
    scale, shift = bn_scale_shift(bn, dtype)
    weight = conv.weight
    if _native_fold(weight, scale, dtype):
        # one pass over the weight instead of a multiply and a cast (the same values)
        return torch.ops.fusedres_ext.fold_scale(weight, scale, dtype), shift
    w = (weight.to(scale.dtype) * scale.view(-1, 1, 1, 1)).to(dtype)
    return w, shift


_FOLD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _native_fold(weight: Tensor, scale: Tensor, dtype: torch.dtype) -> bool:
    """Whether the extension's one-pass fold can run: a CPU weight nothing observes (no
    autograd, tracing or compiling: the fold must then stay PyTorch ops), float32 scale,
    16/32-bit types, a dense weight (contiguous or channels_last)."""
    from . import _ext

    return (
        type(weight) in (Tensor, nn.Parameter)  # no subclass whose __torch_function__ would be skipped
        and weight.device.type == "cpu"
        and scale.dtype == torch.float32
        and dtype in _FOLD_DTYPES
        and weight.dtype in _FOLD_DTYPES
        and ops.unobserved(scale)
        and (weight.is_contiguous() or weight.is_contiguous(memory_format=torch.channels_last))
        and _ext.load() is not None
    )


_FOLD_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _own(m: nn.Module, name: str):
    """``getattr(m, name)`` for a parameter or buffer, without nn.Module.__getattr__."""
    t = m._parameters.get(name, _MISSING)
    if t is _MISSING:
        t = m._buffers.get(name, _MISSING)
    return getattr(m, name) if t is _MISSING else t


_MISSING = object()
_BN_TENSORS = ("weight", "bias", "running_mean", "running_var")


def _fold_key(conv, bn, dtype):
    """(the tensors folded, a stamp of their state): each tensor's version, data pointer and
    dtype, the target dtype and eps. A data pointer identifies the storage because the cache
    entry keeps the storages it folded alive (see ``folded``): no other storage can reuse
    their addresses, so a tensor moved by ``.to()`` and back is seen too."""
    w = _own(conv, "weight")
    ts = (w,) if bn is None else (w,) + tuple(_own(bn, n) for n in _BN_TENSORS)
    stamp = [dtype, None if bn is None else bn.eps]
    for t in ts:
        if t is None:
            stamp.append(None)
            continue
        try:
            version = t._version
        except RuntimeError:  # inference tensors (made under torch.inference_mode) have none
            version = -1
        stamp += (version, t.data_ptr(), t.dtype)
    return ts, tuple(stamp)


def _same_key(a, b) -> bool:
    """The same tensors (by identity) in the same state."""
    (ta, sa), (tb, sb) = a, b
    return sa == sb and len(ta) == len(tb) and all(x is y for x, y in zip(ta, tb))


def _needs_param_grad(*mods) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(p.requires_grad for m in mods if m is not None for p in m.parameters(recurse=False))


def folded(conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d], dtype: torch.dtype) -> Tuple[Tensor, Optional[Tensor]]:
    """fold_bn of the current parameters and buffers.

    Folded anew on every call (edits through ``.data``, pruning and parametrizations do not
    bump version counters, so no cache could be trusted), except for the convolutions of a
    model passed to :func:`freeze`: their folded weights are cached (still refreshed when a
    version, storage, device or dtype changes), which is the user's promise that nothing
    edits the weights behind the version counters. Never cached while gradients are needed
    or torch.compile / torch.jit trace the call (the fold must be part of the graph)."""
    if (
        conv not in _frozen.CONVS
        or _needs_param_grad(conv, bn)
        or torch.compiler.is_compiling()
        or torch.jit.is_tracing()
    ):
        return fold_bn(conv, bn, dtype)
    key = _fold_key(conv, bn, dtype)
    hit = _FOLD_CACHE.get(conv)
    if hit is not None and _same_key(hit[0], key):
        return hit[1]
    with torch.no_grad():
        w, b = fold_bn(conv, bn, dtype)
    # a private copy, never written: a backend may cache a re-layout of it by identity
    w = _frozen.mark(w.clone() if w is conv.weight else w)
    storages = tuple(t.untyped_storage() for t in key[0] if t is not None)  # kept alive: see _fold_key
    _FOLD_CACHE[conv] = (key, (w, b), storages)
    return w, b


def _model_convs(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def freeze(model: nn.Module) -> nn.Module:
    """Deployment mode for evaluation: cache the BatchNorm-folded weights of every fused
    block of ``model`` (and the cpu backend's oneDNN-packed copies of them) instead of
    folding on every call. This is a promise that the weights do not change while frozen:
    edits that bump version counters (in-place ops, ``copy_``, ``load_state_dict``) or
    move tensors (``.to()``) are still seen, edits through ``.data`` are not. The cache holds
    the storages it folded from until the next forward after they change (so that a moved
    tensor can never be mistaken for them). A training-mode forward of a block unfreezes it;
    :func:`unfreeze` unfreezes the whole model. Returns ``model`` (in place)."""
    for conv in _model_convs(model):
        _frozen.CONVS.add(conv)
    return model


def unfreeze(model: nn.Module) -> nn.Module:
    """Undo :func:`freeze`: fold on every call again and drop the cached folded weights."""
    for conv in _model_convs(model):
        _frozen.CONVS.discard(conv)
        _FOLD_CACHE.pop(conv, None)
    return model


def _thaw(convs) -> None:
    for conv in convs:
        if conv in _frozen.CONVS:
            _frozen.CONVS.discard(conv)
            _FOLD_CACHE.pop(conv, None)


# --------------------------------------------------------------------------- blocks


@dataclass(frozen=True, eq=False)
class Projection:
    """A downsample (``module``) the block fuses as its projection shortcut: ``conv`` then
    ``bn`` (post-activation), or ``conv`` alone fed the pre-activated input (pre-activation)."""

    module: nn.Module
    conv: nn.Conv2d
    bn: Optional[nn.BatchNorm2d]


@dataclass(frozen=True, eq=False)
class ModuleShortcut:
    """A downsample the block applies as it is, to the block's input."""

    module: nn.Module


def _split_downsample(downsample, preact: bool) -> Union[Projection, ModuleShortcut, None]:
    """Classify a torchvision-style downsample: a projection the block fuses, or a module
    it applies as is."""
    if downsample is None:
        return None
    mods = list(downsample) if isinstance(downsample, nn.Sequential) else [downsample]
    # an nn.Identity in the Sequential changes nothing (timm's stride-1 avg-pool shortcut)
    mods = [m for m in mods if type(m) is not nn.Identity]
    if preact:
        if len(mods) == 1 and _conv_fusable(mods[0]) is None:
            return Projection(downsample, mods[0], None)
    elif len(mods) == 2 and _conv_fusable(mods[0]) is None and _bn_fusable(mods[1]) is None:
        return Projection(downsample, mods[0], mods[1])
    return ModuleShortcut(downsample)


@dataclass(eq=False, slots=True)
class _Chain:
    """One block call, described once and read by every path (fused training, fused
    evaluation, the torch.nn modules): the modules in order and what is added before the
    output activation."""

    convs: Sequence[nn.Conv2d]
    bns: Sequence[nn.BatchNorm2d]
    preact: bool
    shortcut: Shortcut
    downsample: Union[Projection, ModuleShortcut, None]  # PROJECT: a Projection; TENSOR: maybe a module
    residual: Optional[Tensor]  # TENSOR: the tensor given (None while a ModuleShortcut is still to run)
    relu: bool  # ReLU at the output
    sample_scale: Optional[Tensor]  # per-sample factor of the main branch (stochastic depth)

    @property
    def projection(self) -> Optional[Projection]:
        return self.downsample if isinstance(self.downsample, Projection) else None

    def modules(self) -> List[nn.Module]:
        """Every module whose parameters the fused path reads."""
        p = self.projection
        return list(self.convs) + list(self.bns) + ([] if p is None else [m for m in (p.conv, p.bn) if m is not None])

    def main_branch(self) -> "_Chain":
        """The chain without its shortcut and output ReLU."""
        return replace(self, shortcut=Shortcut.NONE, downsample=None, residual=None, relu=False)


def _describe(convs, bns, preact, shortcut, downsample, residual, relu, sample_scale, name) -> _Chain:
    if len(convs) != len(bns) or not convs:
        raise ValueError(f"{name}: need as many BatchNorms as convs (got {len(convs)} and {len(bns)})")
    if shortcut not in ("identity", "none"):
        raise ValueError(f"{name}: shortcut must be 'identity' or 'none', got {shortcut!r}")
    ds = _split_downsample(downsample, preact) if shortcut == "identity" else None
    if residual is not None and ds is not None:
        raise ValueError(f"{name}: pass either downsample or residual, not both")
    if shortcut == "none":
        kind = Shortcut.NONE
    elif isinstance(ds, Projection):
        kind = Shortcut.PROJECT
    elif residual is not None or ds is not None:
        kind = Shortcut.TENSOR
    else:
        kind = Shortcut.IDENTITY
    return _Chain(tuple(convs), tuple(bns), preact, kind, ds, residual, relu, sample_scale)


def _unfusable(x: Tensor, chain: _Chain, backend: str, sync_bn: bool) -> Optional[str]:
    """Why this call runs through the torch.nn modules (None: it runs fused)."""
    proj = chain.projection
    # which BatchNorms a ReLU follows directly: pre-activation, all; post-activation, all
    # but the last, and the last too when nothing is added before the output ReLU
    n = len(chain.bns)
    follows = [True] * n if chain.preact else [True] * (n - 1) + [chain.relu and chain.shortcut is Shortcut.NONE]
    why = fusable(chain.convs, chain.bns, None if proj is None else proj.bn, follows)
    if why is None and x.shape[0] == 0:
        why = "empty batch"
    if why is None and getattr(_STATE, "unfused", False):
        why = "fusedres.functional.unfused() is active"
    if why is None:
        ds = [] if chain.downsample is None else [chain.downsample.module]
        why = _hooked(list(chain.convs) + list(chain.bns) + ds)
    if why is None and backend == "auto":
        why = autoselect.torch_nn_reason(x.device, _batch_stats(chain.bns[0]), sync_bn)
    return why


def residual_block(
    x: Tensor,
    convs: Sequence[nn.Conv2d],
    bns: Sequence[nn.BatchNorm2d],
    *,
    preact: bool = False,
    shortcut: str = "identity",
    downsample: Optional[nn.Module] = None,
    residual: Optional[Tensor] = None,
    relu: bool = True,
    sample_scale: Optional[Tensor] = None,
    backend: str = "auto",
    name: str = "fusedres block",
    sync_bn: bool = False,
    process_group=None,
) -> Tensor:
    """One fused residual block.

    post-activation (``preact=False``), equivalent to::

        h = x
        for conv, bn in zip(convs[:-1], bns[:-1]): h = relu(bn(conv(h)))
        out = act(bns[-1](convs[-1](h)) * sample_scale[n] + r)

    pre-activation (``preact=True``; ``bns[i]`` precedes ``convs[i]``)::

        a = relu(bns[0](x)); h = convs[0](a)
        for bn, conv in zip(bns[1:], convs[1:]): h = conv(relu(bn(h)))
        out = act(h * sample_scale[n] + r)

    r: ``shortcut="identity"`` -> x (or ``downsample(.)`` if given); ``"none"`` -> 0;
    ``residual`` tensor -> that tensor. A ``downsample`` of ``Sequential(Conv2d,
    BatchNorm2d)`` (post-act) or ``Conv2d`` (pre-act, fed the pre-activated input)
    is fused as a projection; any other module is applied to x as is.
    x: (N, C, H, W); returns (N, K, P, Q) in x's dtype and memory format.

    ``sync_bn``: in training, batch statistics are computed over the whole batch across the
    ranks of ``process_group`` (default: the world group of ``torch.distributed``), like
    ``nn.SyncBatchNorm``: each rank's (count, mean, M2) partials are all-gathered and
    merged in rank order, and the BatchNorm backward sums are all-reduced.
    """
    x_owned = _take_donation(x)
    chain = _describe(convs, bns, preact, shortcut, downsample, residual, relu, sample_scale, name)
    backends.check_name(backend)
    first = bns[0] if preact else convs[0]
    _check_input(x, getattr(first, "num_features" if preact else "in_channels", None), name)
    if residual is not None and residual.shape[0] != x.shape[0]:
        raise ValueError(f"{name}: residual batch {residual.shape[0]} != input batch {x.shape[0]}")

    rec = getattr(_STATE, "recorder", None)
    if rec is not None:
        rec.enter(convs)
    why = _unfusable(x, chain, backend, sync_bn)
    if why is not None:
        if sync_bn and _batch_stats(bns[0]):
            raise NotImplementedError(
                f"{name}: sync_bn=True but the block cannot be fused ({why}); convert its BatchNorms with "
                "torch.nn.SyncBatchNorm.convert_sync_batchnorm instead"
            )
        if rec is not None:
            rec.result(why, None)
        return _unfused(x, chain)

    _check_devices(x, chain.modules(), name)
    dtype = x.dtype  # of the convolutions
    autocast = _autocast_dtype(x)
    added = residual if residual is not None else (x if chain.shortcut is Shortcut.IDENTITY else None)
    if autocast is not None and added is not None and torch.promote_types(autocast, added.dtype) != autocast:
        # As torch.nn under autocast: the main branch ends in the autocast dtype and the
        # residual add promotes to the residual's wider dtype (a float32 block input), so
        # the add and ReLU run outside the fused kernels, in that dtype.
        main = _fused(x.to(autocast), chain.main_branch(), autocast, backend, name, sync_bn, process_group, False,
                      rec)
        out = main + added
        return out.relu() if relu else out
    if autocast is not None:
        dtype = autocast
        x = x.to(dtype)
        if residual is not None:
            chain = replace(chain, residual=residual.to(dtype))
    else:
        _check_dtypes(chain, dtype, name)
    return _fused(x, chain, dtype, backend, name, sync_bn, process_group, x_owned, rec)


def _fused(x, chain: _Chain, dtype, backend, name, sync_bn, process_group, x_owned, rec) -> Tensor:
    """The fused block on x (in the convolutions' ``dtype``): the backend resolved once,
    then the training or the evaluation chain."""
    backend_name = backends.resolve(backend, x.device)
    if isinstance(chain.downsample, ModuleShortcut):
        chain = replace(chain, residual=chain.downsample.module(x))
    if chain.shortcut is Shortcut.IDENTITY and (x.shape[1] != chain.convs[-1].out_channels
                                                or _spatial_changes(x, chain.convs)):
        raise ValueError(
            f"{name}: identity shortcut needs the output shape to equal the input's "
            f"(input {list(x.shape)}, {chain.convs[-1].out_channels} output channels); pass a downsample"
        )

    train = _batch_stats(chain.bns[0])
    if train and torch.jit.is_tracing():
        raise RuntimeError(
            f"{name}: torch.jit.trace of a fused block in training mode is not supported (running statistics "
            "and the fused backward cannot be traced); trace the model in eval mode, or use torch.compile / "
            "torch.export"
        )
    proj = chain.projection
    if train and _frozen.CONVS:
        _thaw(list(chain.convs) + ([] if proj is None else [proj.conv]))
    group = _sync_group(sync_bn, process_group, name) if train else None
    if train and group is None:
        _check_batch(x, chain.convs, chain.preact)
    if backend == "auto" and group is None:
        cands = autoselect.candidates(x.device)
        if len(cands) > 1 and backend_name in cands:
            backend_name = _measured_backend(x, chain, dtype, train, cands)
    if rec is not None:
        rec.result(None, backend_name)
    if train:
        return _train(x, chain, dtype, backend_name, group)
    return _eval(x, chain, dtype, backend_name, x_owned)


def _measured_backend(x, chain: _Chain, dtype, train, cands):
    """backend="auto" with several fast candidates: the one measured fastest on this block
    configuration (fusedres.autoselect)."""
    proj = chain.projection
    all_convs = list(chain.convs) + ([] if proj is None else [proj.conv])
    all_bns = list(chain.bns) + ([] if proj is None or proj.bn is None else [proj.bn])
    key = (
        tuple((tuple(c.weight.shape), _geom(c)) for c in all_convs),
        tuple(x.shape), x.dtype, dtype, memory_format(x), x.device,
        train, chain.preact, chain.shortcut, chain.relu, chain.residual is not None, chain.sample_scale is not None,
    )
    buffers = [b for bn in all_bns for b in bn.buffers(recurse=False) if b is not None]

    def run(backend_name):
        if train:
            return _train(x, chain, dtype, backend_name)
        return _eval(x, chain, dtype, backend_name)

    return autoselect.pick(key, x.device, cands, run, buffers)


def _spatial_changes(x: Tensor, convs) -> bool:
    h, w = x.shape[2], x.shape[3]
    for conv in convs:
        h, w = _out_hw(h, w, _geom(conv), _pair(conv.kernel_size))
    return (h, w) != (x.shape[2], x.shape[3])


def _wcast(conv: nn.Conv2d, dtype: torch.dtype) -> Tensor:
    return conv.weight if conv.weight.dtype == dtype else conv.weight.to(dtype)


def _sync_group(sync_bn: bool, process_group, name: str):
    """The process group to synchronise batch statistics over, or None for local statistics."""
    if not sync_bn:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{name}: sync_bn=True needs torch.distributed to be initialised (dist.init_process_group) "
            "before a training forward"
        )
    group = process_group if process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def _train(x, chain: _Chain, dtype, backend_name, group=None):
    params: List[Optional[Tensor]] = []
    for conv, bn in zip(chain.convs, chain.bns):
        params += [_wcast(conv, dtype)] + _bn_train_params(bn, x)
    ds_geom, ds_eps, ds_factor = None, 0.0, 0.0
    proj = chain.projection
    if proj is not None:
        ds_geom = _geom(proj.conv)
        if proj.bn is not None:
            ds_eps, ds_factor = proj.bn.eps, _running_update_factor(proj.bn)
            params += [_wcast(proj.conv, dtype)] + _bn_train_params(proj.bn, x)
        else:
            params += [_wcast(proj.conv, dtype), None, None, None, None]
    spec = ChainSpec(
        preact=chain.preact,
        convs=tuple(_geom(c) for c in chain.convs),
        eps=tuple(float(bn.eps) for bn in chain.bns),
        factors=tuple(_running_update_factor(bn) for bn in chain.bns),
        shortcut=chain.shortcut,
        ds_conv=ds_geom,
        ds_eps=float(ds_eps),
        ds_factor=float(ds_factor),
        relu_out=chain.relu,
        backend=backend_name,
        group=group,
    )
    fn = PreActBlock if chain.preact else PostActBlock
    sample_scale = chain.sample_scale
    if sample_scale is not None:
        sample_scale = sample_scale.to(stat_dtype(x.dtype))
    return fn.apply(spec, x, chain.residual, sample_scale, *params)


def _eval(x, chain: _Chain, dtype, backend_name, x_owned=False):
    """Each BatchNorm folded into its convolution, one ``conv_bias_act`` per convolution.
    ``x_owned``: x is a temporary of the caller (:func:`call_donating`), read last by the
    final convolution as the identity shortcut, so the backend may accumulate into it."""
    no_prologue = (None, None, False)
    conv_bias_act = ops.conv_bias_act_eager(x, backend_name)
    convs, bns, proj = chain.convs, chain.bns, chain.projection
    added = {Shortcut.IDENTITY: x, Shortcut.TENSOR: chain.residual}.get(chain.shortcut)
    if not chain.preact:
        h = x
        for conv, bn in zip(convs[:-1], bns[:-1]):
            weight, bias = folded(conv, bn, dtype)
            h = conv_bias_act(h, weight, bias, None, *no_prologue, *_geom(conv).args(), True, backend_name)
        if proj is not None:
            weight, bias = folded(proj.conv, proj.bn, dtype)
            added = conv_bias_act(x, weight, bias, None, *no_prologue, *_geom(proj.conv).args(), False, backend_name)
        weight, bias = folded(convs[-1], bns[-1], dtype)
        geom = _geom(convs[-1])
        if chain.sample_scale is None:
            # a projection's output is this function's own temporary: the backend may
            # accumulate into it instead of a copy
            owned = proj is not None or (chain.shortcut is Shortcut.IDENTITY and x_owned)
            return conv_bias_act(h, weight, bias, added, *no_prologue, *geom.args(), chain.relu, backend_name,
                                 residual_owned=owned)
        y = conv_bias_act(h, weight, bias, None, *no_prologue, *geom.args(), False, backend_name)
        return _scale_add(y, added, chain.sample_scale, chain.relu, backend_name)
    # pre-activation: bns[0] stays a prologue (a ReLU sits between it and conv 0);
    # bns[i+1] folds into convs[i].
    scale0, shift0 = bn_scale_shift(bns[0], dtype)
    prologue = (scale0, shift0, True)
    h = x
    for i in range(len(convs) - 1):
        weight, bias = folded(convs[i], bns[i + 1], dtype)
        h = conv_bias_act(h, weight, bias, None, *prologue, *_geom(convs[i]).args(), True, backend_name)
        prologue = no_prologue
    if proj is not None:
        added = conv_bias_act(x, _wcast(proj.conv, dtype), None, None, scale0, shift0, True,
                              *_geom(proj.conv).args(), False, backend_name)
    geom = _geom(convs[-1])
    weight = _wcast(convs[-1], dtype)
    if chain.sample_scale is None:
        owned = chain.shortcut is Shortcut.IDENTITY and x_owned
        return conv_bias_act(h, weight, None, added, *prologue, *geom.args(), chain.relu, backend_name,
                             residual_owned=owned)
    y = conv_bias_act(h, weight, None, None, *prologue, *geom.args(), False, backend_name)
    return _scale_add(y, added, chain.sample_scale, chain.relu, backend_name)


def _scale_add(y, added, sample_scale, relu, backend_name):
    one = torch.ones(y.shape[1], device=y.device, dtype=stat_dtype(y.dtype))
    s = sample_scale.to(one.dtype)
    return ops.direct.bn_add_act(y, one, torch.zeros_like(one), added, None, None, s, relu, backend_name)


def _fresh_output(m: nn.Module) -> bool:
    """Whether ``m(h)`` is a new tensor that nothing else holds and autograd does not save
    (``nn.BatchNorm2d``, ``FrozenBatchNorm2d``, ``nn.Conv2d``; no hook that could keep or
    replace it), so a ReLU or the residual add may write it in place, as torchvision's blocks
    do: the same values, one activation less to allocate and fill."""
    from .blocks import _no_global_hooks

    cls = type(m)
    return (
        (cls is nn.BatchNorm2d or cls is nn.Conv2d or is_frozen_bn(m))
        and not m._forward_hooks
        and _no_global_hooks()
    )


def _unfused(x, chain: _Chain):
    """The block's math through its own modules (fallback; also defines the semantics)."""
    sample_scale = chain.sample_scale

    def relu_of(bn, h):
        return F.relu(h, inplace=_fresh_output(bn))

    convs, bns, ds = chain.convs, chain.bns, chain.downsample
    if not chain.preact:
        h = x
        for i, (conv, bn) in enumerate(zip(convs, bns)):
            h = bn(conv(h))
            if i < len(convs) - 1:
                h = relu_of(bn, h)
        projected = x  # what a projection is applied to
        owned = _fresh_output(bns[-1])  # h: the last BatchNorm's own output
    else:
        a = relu_of(bns[0], bns[0](x))
        h = convs[0](a)
        for conv, bn in zip(convs[1:], bns[1:]):
            h = conv(relu_of(bn, bn(h)))
        projected = a
        owned = _fresh_output(convs[-1])  # h: the last convolution's own output
    if sample_scale is not None:
        h, owned = h * sample_scale.view(-1, 1, 1, 1).to(h.dtype), True
    added = None
    if chain.shortcut is Shortcut.IDENTITY:
        added = x
    elif chain.shortcut is Shortcut.PROJECT:
        added = ds.conv(projected) if ds.bn is None else ds.bn(ds.conv(projected))
    elif chain.shortcut is Shortcut.TENSOR:
        added = chain.residual if chain.residual is not None else ds.module(x)
    if added is not None:
        in_place = owned and added.shape == h.shape and torch.promote_types(h.dtype, added.dtype) == h.dtype
        h = h.add_(added) if in_place else h + added
    return F.relu(h, inplace=owned or added is not None) if chain.relu else h


def conv_bn_act(
    x: Tensor,
    conv: nn.Conv2d,
    bn: nn.BatchNorm2d,
    *,
    relu: bool = True,
    residual: Optional[Tensor] = None,
    backend: str = "auto",
    name: str = "fusedres.conv_bn_act",
    sync_bn: bool = False,
    process_group=None,
) -> Tensor:
    """Equivalent to ``act(bn(conv(x)) + residual)``; x: (N, C, H, W). ``sync_bn`` /
    ``process_group`` as in :func:`residual_block`."""
    return residual_block(
        x,
        [conv],
        [bn],
        shortcut="none" if residual is None else "identity",
        residual=residual,
        relu=relu,
        backend=backend,
        name=name,
        sync_bn=sync_bn,
        process_group=process_group,
    )
