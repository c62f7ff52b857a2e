"""Drop-in fused modules: same constructors, parameters and buffers as torchvision.

``BasicBlock`` and ``Bottleneck`` take torchvision's constructor arguments (plus
keyword-only ``backend``, ``drop_path`` and ``residual``) and hold ``conv1``,
``bn1``, ..., ``downsample`` exactly as torchvision does, so state_dicts move
between the two unchanged. ``forward`` is one call into
``fusedres.functional.residual_block``; the modules only own parameters.
"""

from __future__ import annotations

import copy
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from . import backends
from ._fx import is_proxy, leaf_call
from .functional import call_donating, residual_block
from .reference import stat_dtype

__all__ = [
    "BasicBlock", "Bottleneck", "PreActBasicBlock", "ConvBNAct", "PadShortcut", "FusedSequential", "FusedStage",
    "conv3x3", "conv1x1",
]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(
        in_planes, out_planes, 3, stride=stride, padding=dilation, groups=groups, bias=False, dilation=dilation
    )


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


def _not_scriptable(self):
    raise TypeError(
        f"fusedres.{type(self).__name__} cannot be compiled by TorchScript (torch.jit.script): its fused ops "
        "are torch.library custom ops called from Python. Use torch.compile, or torch.export for a graph to "
        "deploy; torch.jit.trace works for models in eval mode."
    )


class _FusedBlockMixin:
    """Shared plumbing: backend choice and the stochastic-depth per-sample scale."""

    __prepare_scriptable__ = _not_scriptable

    def _init_fused(self, backend: str, drop_path: float, residual: bool) -> None:
        self.backend = backends.check_name(backend)
        if not 0.0 <= float(drop_path) < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
        self.drop_path = float(drop_path)
        self.residual = bool(residual)
        # batch statistics across ranks (fusedres.convert_sync_batchnorm sets these)
        self.sync_bn = False
        self.process_group = None

    def _sample_scale(self, x: Tensor) -> Optional[Tensor]:
        """Stochastic depth (Huang et al. 2016): keep the residual branch of each sample with
        probability 1 - drop_path, scaled by 1/(1 - drop_path); identity in eval."""
        if not self.training or self.drop_path == 0.0:
            return None
        keep = 1.0 - self.drop_path
        mask = torch.empty(x.shape[0], device=x.device, dtype=stat_dtype(x.dtype)).bernoulli_(keep)
        return mask / keep

    def _extra(self) -> str:
        s = f"backend={self.backend!r}"
        if self.drop_path:
            s += f", drop_path={self.drop_path}"
        if self.sync_bn:
            s += ", sync_bn=True"
        if not self.residual:
            s += ", residual=False"
        return s


class BasicBlock(_FusedBlockMixin, nn.Module):
    """Fused ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` (torchvision's BasicBlock).

    x: (N, inplanes, H, W) -> (N, planes, H/stride, W/stride).
    """

    expansion: int = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
        *,
        backend: str = "auto",
        drop_path: float = 0.0,
        residual: bool = True,
    ) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride
        self._init_fused(backend, drop_path, residual)

    def forward(self, x: Tensor) -> Tensor:
        if is_proxy(x):
            return leaf_call(self, x)
        return residual_block(
            x,
            [self.conv1, self.conv2],
            [self.bn1, self.bn2],
            shortcut="identity" if self.residual else "none",
            downsample=self.downsample,
            sample_scale=self._sample_scale(x),
            backend=self.backend,
            name=type(self).__name__,
            sync_bn=self.sync_bn,
            process_group=self.process_group,
        )

    extra_repr = _FusedBlockMixin._extra


class Bottleneck(_FusedBlockMixin, nn.Module):
    """Fused ``relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + shortcut(x))``.

    torchvision's Bottleneck (ResNet v1.5: stride on the 3x3 conv), including groups
    (ResNeXt) and base_width (Wide ResNet). x: (N, inplanes, H, W) ->
    (N, planes * 4, H/stride, W/stride).
    """

    expansion: int = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
        *,
        backend: str = "auto",
        drop_path: float = 0.0,
        residual: bool = True,
    ) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self._init_fused(backend, drop_path, residual)

    def forward(self, x: Tensor) -> Tensor:
        if is_proxy(x):
            return leaf_call(self, x)
        return residual_block(
            x,
            [self.conv1, self.conv2, self.conv3],
            [self.bn1, self.bn2, self.bn3],
            shortcut="identity" if self.residual else "none",
            downsample=self.downsample,
            sample_scale=self._sample_scale(x),
            backend=self.backend,
            name=type(self).__name__,
            sync_bn=self.sync_bn,
            process_group=self.process_group,
        )

    extra_repr = _FusedBlockMixin._extra


class PreActBasicBlock(_FusedBlockMixin, nn.Module):
    """Pre-activation basic block (He et al. 2016, "Identity Mappings in Deep Residual Networks").

    Equivalent to ``conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut``; a ``Conv2d``
    downsample (optionally inside a one-element ``Sequential``) sees the
    pre-activated input ``relu(bn1(x))``, any other downsample module (such as the
    parameter-free ``PadShortcut``) sees ``x``. No ReLU after the addition.
    """

    expansion: int = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
        *,
        backend: str = "auto",
        drop_path: float = 0.0,
        residual: bool = True,
    ) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("PreActBasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in PreActBasicBlock")
        self.bn1 = norm_layer(inplanes)
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn2 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self._init_fused(backend, drop_path, residual)

    def forward(self, x: Tensor) -> Tensor:
        if is_proxy(x):
            return leaf_call(self, x)
        return residual_block(
            x,
            [self.conv1, self.conv2],
            [self.bn1, self.bn2],
            preact=True,
            shortcut="identity" if self.residual else "none",
            downsample=self.downsample,
            relu=False,
            sample_scale=self._sample_scale(x),
            backend=self.backend,
            name=type(self).__name__,
            sync_bn=self.sync_bn,
            process_group=self.process_group,
        )

    extra_repr = _FusedBlockMixin._extra


class ConvBNAct(nn.Module):
    """Fused ``act(bn(conv(x)) [+ residual])`` with children ``conv`` and ``bn``.

    x: (N, in_channels, H, W) -> (N, out_channels, P, Q). ``padding`` defaults to
    ``dilation * (kernel_size - 1) // 2`` ("same" for odd kernels at stride 1).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: Optional[int] = None,
        dilation: int = 1,
        groups: int = 1,
        act: bool = True,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        if padding is None:
            padding = dilation * (kernel_size - 1) // 2
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=False
        )
        self.bn = norm_layer(out_channels)
        self.act = bool(act)
        self.backend = backends.check_name(backend)
        self.sync_bn, self.process_group = False, None

    __prepare_scriptable__ = _not_scriptable

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, act: bool, backend: str = "auto") -> "ConvBNAct":
        """Wrap existing modules (sharing their tensors) without re-initialising anything."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.conv, self.bn, self.act = conv, bn, bool(act)
        self.backend = backends.check_name(backend)
        self.sync_bn, self.process_group = False, None
        return self

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if is_proxy(x):
            return leaf_call(self, x, residual)
        return residual_block(
            x,
            [self.conv],
            [self.bn],
            shortcut="none" if residual is None else "identity",
            residual=residual,
            relu=self.act,
            backend=self.backend,
            name=type(self).__name__,
            sync_bn=self.sync_bn,
            process_group=self.process_group,
        )

    def extra_repr(self) -> str:
        return f"act={self.act}, backend={self.backend!r}"


class PadShortcut(nn.Module):
    """Parameter-free shortcut of He et al. 2015, option A: subsample by ``stride`` and
    zero-pad the channels from ``in_planes`` to ``out_planes`` (new channels at the end)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int = 2) -> None:
        super().__init__()
        if out_planes < in_planes:
            raise ValueError(f"PadShortcut needs out_planes >= in_planes, got {out_planes} < {in_planes}")
        self.in_planes, self.out_planes, self.stride = in_planes, out_planes, stride

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return nn.functional.pad(x, (0, 0, 0, 0, 0, self.out_planes - self.in_planes))

    def extra_repr(self) -> str:
        return f"{self.in_planes}->{self.out_planes}, stride={self.stride}"


class SyncBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training statistics span the ranks of ``process_group``
    (default: the world group), on CPU (gloo) and CUDA (NCCL); same parameters, buffers and
    state_dict keys as ``nn.BatchNorm2d``. With one rank, or in evaluation, it is exactly
    ``nn.BatchNorm2d``. Made by :func:`fusedres.convert_sync_batchnorm` for BatchNorms that
    are not part of a fused block."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, backend: str = "auto", device=None,
                 dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group
        self.backend = backends.check_name(backend)

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d, process_group=None, backend: str = "auto") -> "SyncBatchNorm2d":
        """Wrap ``bn``'s tensors (shared, not copied)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.__dict__.update(bn.__dict__)  # parameters, buffers, hooks, training flag: shared
        new.process_group = process_group
        new.backend = backends.check_name(backend)
        return new

    def forward(self, x: Tensor) -> Tensor:
        from .autograd import SyncBatchNormFn
        from .functional import _batch_stats, _bn_train_params, _running_update_factor, _sync_group

        if x.dim() != 4:
            raise ValueError(f"SyncBatchNorm2d: expected a 4-D input (N, C, H, W), got {x.dim()}-D")
        if not _batch_stats(self):
            return super().forward(x)
        group = _sync_group(True, self.process_group, type(self).__name__)
        if group is None:
            return super().forward(x)
        gamma, beta, rm, rv = _bn_train_params(self, x)
        factor = _running_update_factor(self)
        be = backends.resolve(self.backend, x.device)
        return SyncBatchNormFn.apply(x, gamma, beta, rm, rv, factor, self.eps, group, be)


# --------------------------------------------------------------------------- stages


# blocks whose forward is one residual_block call on its input and nothing else
_DONEE_TYPES = (BasicBlock, Bottleneck, PreActBasicBlock)


def _no_global_hooks() -> bool:
    from torch.nn.modules import module as _m

    return not (_m._global_forward_hooks or _m._global_forward_pre_hooks)


def _donation_allowed(x: Tensor) -> bool:
    """An evaluation forward that nothing observes (``ops.unobserved``), no global module hooks."""
    from .ops import unobserved

    return unobserved(x) and _no_global_hooks()


class FusedStage(nn.Sequential):
    """``nn.Sequential`` of residual blocks (one ResNet stage) that runs as ``nn.Sequential``
    does, except that in an evaluation forward nothing observes (grad off, no tracing,
    compiling or hooks that could keep a block's output) each block's output is handed to
    the next block as a temporary: a fused block whose shortcut is that input then
    accumulates its last convolution into the input's memory (the cpu backend's oneDNN
    in-place sum) instead of into a copy of it. Results are those of ``nn.Sequential``
    bit for bit; children, state_dict keys and indexing are unchanged. The builders of
    :mod:`fusedres.models` make their stages this class."""

    def forward(self, x: Tensor) -> Tensor:
        if is_proxy(x) or not _donation_allowed(x):
            return super().forward(x)
        prev = None
        for m in self._modules.values():
            if (
                prev is not None
                and type(prev) in _DONEE_TYPES and type(m) in _DONEE_TYPES
                and not prev._forward_hooks and not m._forward_pre_hooks
            ):
                # x is prev's output, made by its backend in this call: nothing else holds it
                x = call_donating(m, x)
            else:
                x = m(x)
            prev = m
        return x


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` (same arguments, repr and behaviour) whose evaluation forward on a
    channels_last CPU tensor runs the extension's one-pass kernel (``fusedres_ext::max_pool2d``:
    PyTorch's values bit for bit, NaN included, without the int64 indices ATen's CPU max-pool
    always writes); every other call is ``nn.MaxPool2d``'s. :meth:`relu_then_pool` is
    ``max_pool2d(relu(x))`` in that same pass (the ResNet stem's ReLU)."""

    def _native(self, x: Tensor) -> bool:
        from . import _ext
        from .ops import unobserved

        return (
            unobserved(x)
            and x.device.type == "cpu"
            and x.dim() == 4
            and x.dtype in _POOL_DTYPES
            and x.is_contiguous(memory_format=torch.channels_last)
            and not x.is_contiguous()  # strictly channels_last: the output layout PyTorch gives
            and self.dilation in (1, (1, 1))
            and not self.ceil_mode
            and not self.return_indices
            and _ext.load() is not None
        )

    def _args(self):
        return [_pair(self.kernel_size), _pair(self.stride or self.kernel_size), _pair(self.padding)]

    def forward(self, x: Tensor) -> Tensor:
        proxy = leaf_call(self, x)
        if proxy is not None:
            return proxy
        if self._native(x):
            return torch.ops.fusedres_ext.max_pool2d(x, *self._args(), False)
        return super().forward(x)

    def relu_then_pool(self, x: Tensor) -> Tensor:
        """``self(torch.relu(x))`` computed in one pass where the kernel takes x (this
        module's hooks are not run: the caller checks it has none)."""
        if self._native(x):
            return torch.ops.fusedres_ext.max_pool2d(x, *self._args(), True)
        return super().forward(torch.relu(x))


_POOL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _pair(v) -> List[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(e) for e in v]


# --------------------------------------------------------------------------- runs in nn.Sequential


def _channels(bn: nn.Module) -> Optional[int]:
    n = getattr(bn, "num_features", None)
    if n is None and getattr(bn, "running_mean", None) is not None:  # FrozenBatchNorm2d
        n = bn.running_mean.shape[0]
    return n


def sequential_runs(seq: nn.Sequential) -> List[Tuple[int, int, str]]:
    """The runs ``Conv2d, BatchNorm2d[, ReLU]`` of consecutive children of ``seq``, left to
    right, as ``(index, length, why)``: length 3 when an ``nn.ReLU`` without hooks follows
    the BatchNorm (a hooked ReLU stays a module of its own, called on the fused output),
    else 2; ``why`` is "" when the run can be fused, else why not (a conv with a bias, ...)."""
    from .functional import _bn_fusable, _conv_fusable, _hooked

    mods = list(seq._modules.values())
    runs = []
    i = 0
    while i + 1 < len(mods):
        conv, bn = mods[i], mods[i + 1]
        if type(conv) is not nn.Conv2d or _bn_fusable(bn) is not None or _channels(bn) != conv.out_channels:
            i += 1
            continue
        act = i + 2 < len(mods) and type(mods[i + 2]) is nn.ReLU and _hooked([mods[i + 2]]) is None
        n = 3 if act else 2
        runs.append((i, n, _conv_fusable(conv) or ""))
        i += n
    return runs


class FusedSequential(nn.Sequential):
    """``nn.Sequential`` in which every run ``Conv2d -> BatchNorm2d [-> ReLU]`` of
    consecutive children runs as one fused ``act(bn(conv(x)))``; other children run as
    in ``nn.Sequential``.

    The children stay where they are, so parameter names, state_dict keys, ``named_modules``
    and indexing are exactly those of the ``nn.Sequential``; a hook on a run's module
    makes that run call its modules one by one, so the hook sees what it sees in
    ``nn.Sequential``. Runs are found at each call (:func:`sequential_runs`), so edits of the
    children after conversion are followed. :func:`fusedres.convert` turns an
    ``nn.Sequential`` with fusable runs into this class in place.
    """

    __prepare_scriptable__ = _not_scriptable

    def __init__(self, *args, backend: str = "auto") -> None:
        super().__init__(*args)
        self.backend = backends.check_name(backend)
        self.sync_bn, self.process_group = False, None

    @classmethod
    def fuse(cls, seq: nn.Sequential, backend: str = "auto") -> "FusedSequential":
        """Make ``seq`` (an ``nn.Sequential`` itself, not a subclass) a FusedSequential in place:
        same object, children, parameters and hooks; returns it."""
        if type(seq) is not nn.Sequential and type(seq) is not cls:
            raise TypeError(f"FusedSequential.fuse needs an nn.Sequential, got {type(seq).__name__}")
        seq.__class__ = cls
        seq.backend = backends.check_name(backend)
        seq.sync_bn, seq.process_group = getattr(seq, "sync_bn", False), getattr(seq, "process_group", None)
        return seq

    def forward(self, x: Tensor) -> Tensor:
        if is_proxy(x):
            if not x.tracer.path_of_module(self):
                # the root of the trace cannot be a node of its own graph: the children
                # become the nodes (nn.Sequential's graph), as torch.nn modules unfused
                return super().forward(x)
            return leaf_call(self, x)
        mods = list(self._modules.values())
        runs = {i: n for i, n, why in sequential_runs(self) if not why}
        i = 0
        while i < len(mods):
            n = runs.get(i)
            if n is None:
                x = mods[i](x)
                i += 1
                continue
            x = residual_block(
                x, [mods[i]], [mods[i + 1]], shortcut="none", relu=n == 3, backend=self.backend,
                name=f"{type(self).__name__}[{i}:{i + n}]", sync_bn=self.sync_bn, process_group=self.process_group,
            )
            i += n
        return x

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}" + (", sync_bn=True" if self.sync_bn else "")


# --------------------------------------------------------------------------- timm blocks


def _is_class(m, module: str, name: str) -> bool:
    """``m`` is an instance of exactly ``module.name`` (not a subclass), with that class's own forward."""
    cls = type(m)
    return (cls.__module__, cls.__name__) == (module, name) and cls.forward.__qualname__ == f"{name}.forward"


def _identity(m) -> bool:
    return m is None or type(m) is nn.Identity


def _drop_path_unfusable(dp) -> str:
    """"" when ``dp`` is stochastic depth the fused block computes (timm's DropPath, scaled by
    1/keep) or nothing (None, nn.Identity); else why not."""
    if _identity(dp):
        return ""
    if not _is_class(dp, "timm.layers.drop", "DropPath"):
        return f"drop_path is {type(dp).__name__}, not timm's DropPath"
    if not dp.scale_by_keep:
        return "DropPath(scale_by_keep=False) does not rescale the kept samples"
    if not 0.0 <= float(dp.drop_prob) < 1.0:
        return f"DropPath(drop_prob={dp.drop_prob}) outside [0, 1)"
    return ""


class _TimmBlock(_FusedBlockMixin):
    """A timm ResNet-family block computed with the fused ops.

    Made by :func:`fusedres.convert` from a timm block: it takes over the block's attributes
    and children as they are (``conv1``, ``bn1``, ``act1``, ``aa``, ``drop_block``, ``se``,
    ``drop_path``, ``downsample``, ...), so the module tree, parameter names and state_dict
    keys are timm's, and ``zero_init_last`` is timm's own. ``forward`` equals timm's
    forward; whenever the fused ops cannot express the block as it is at call time (a hook
    on one of its modules, an activation that is no longer ``nn.ReLU``, ...) it runs timm's
    own forward (``self._timm_cls.forward``) on the same modules.
    """

    _convs: Tuple[str, ...] = ()
    _norms: Tuple[str, ...] = ()
    _acts: Tuple[str, ...] = ()
    _preact = False

    def __init__(self, *args, **kwargs) -> None:
        raise TypeError(
            f"fusedres.blocks.{type(self).__name__} is made from a timm block by fusedres.convert(model) "
            f"(or {type(self).__name__}.adopt(block)), not constructed"
        )

    @classmethod
    def adopt(cls, block: nn.Module, backend: str = "auto"):
        """The fused form of the timm ``block``, sharing its modules and tensors."""
        new = cls.__new__(cls)
        # every attribute in its order (module tree and state_dict order, hooks included); the
        # containers are copied so that the original stays a working timm block
        new.__dict__.update({k: copy.copy(v) if isinstance(v, (dict, set, list)) else v
                             for k, v in block.__dict__.items()})
        new._timm_cls = type(block)
        new.backend = backends.check_name(backend)
        new.residual = True
        new.sync_bn, new.process_group = False, None
        return new

    def _modules_of(self, names) -> List[nn.Module]:
        return [getattr(self, n) for n in names]

    def unfusable(self) -> str:
        """"" when this block runs fused as it is now, else why it runs timm's forward."""
        from .functional import _hooked

        return _hooked(list(self.children())) or self.config_unfusable()

    def config_unfusable(self) -> str:
        """"" when the block's modules have fusedres semantics, else why not (hooks aside)."""
        from .functional import _conv_fusable, is_bn_relu

        for n in self._convs:
            if type(getattr(self, n)) is not nn.Conv2d:
                return f"{n} is {type(getattr(self, n)).__name__}, not nn.Conv2d"
        for n in self._acts:
            if type(getattr(self, n)) is not nn.ReLU:
                return f"{n} is {type(getattr(self, n)).__name__}, not nn.ReLU"
        for n in ("aa", "drop_block"):
            if not _identity(getattr(self, n, None)):
                return f"{n} is {type(getattr(self, n)).__name__}"
        why = _drop_path_unfusable(self.drop_path)
        if why:
            return why
        if self._preact:
            for n in self._norms:
                if not is_bn_relu(getattr(self, n)):
                    return f"{n} is not BatchNorm2d + ReLU"
            ds = self.downsample
            if ds is not None:
                if not _is_class(ds, "timm.models.resnetv2", "DownsampleConv") or not _identity(ds.norm):
                    return f"{type(ds).__name__} shortcut of the pre-activated input is not a single convolution"
                why = _conv_fusable(ds.conv)
                if why:
                    return f"downsample: {why}"
        return ""

    def _drop_scale(self, x: Tensor) -> Optional[Tensor]:
        """timm's stochastic depth as a per-sample scale: one Bernoulli(keep) draw per
        sample in x's dtype, divided by keep (the same draws as timm's ``drop_path``)."""
        dp = self.drop_path
        if _identity(dp) or not dp.training or float(dp.drop_prob) == 0.0:
            return None
        keep = 1.0 - float(dp.drop_prob)
        return x.new_empty(x.shape[0]).bernoulli_(keep).div_(keep)

    def _se(self) -> Optional[nn.Module]:
        se = getattr(self, "se", None)
        return None if _identity(se) else se

    def downsample_module(self) -> Optional[nn.Module]:
        """The shortcut module this block calls as a module (not fused into the block's
        kernels), or None."""
        from .functional import ModuleShortcut, _split_downsample

        ds = self.downsample
        if ds is None or self._preact:
            return None
        if self._se() is not None or isinstance(_split_downsample(ds, False), ModuleShortcut):
            return ds
        return None

    def forward(self, x: Tensor) -> Tensor:
        if is_proxy(x):
            return leaf_call(self, x)
        from .functional import _batch_stats, _record_fallback

        convs, norms = self._modules_of(self._convs), self._modules_of(self._norms)
        why = self.unfusable()
        if why:
            if self.sync_bn and any(_batch_stats(n) for n in norms if isinstance(n, nn.BatchNorm2d)):
                raise NotImplementedError(
                    f"{type(self).__name__}: sync_bn=True but the block cannot be fused ({why}); convert its "
                    "BatchNorms with torch.nn.SyncBatchNorm.convert_sync_batchnorm instead"
                )
            _record_fallback(convs, why)
            return self._timm_cls.forward(self, x)
        common = dict(backend=self.backend, name=type(self).__name__, sync_bn=self.sync_bn,
                      process_group=self.process_group)
        if self._preact:
            ds = None if self.downsample is None else self.downsample.conv
            return residual_block(x, convs, norms, preact=True, downsample=ds, relu=False,
                                  sample_scale=self._drop_scale(x), **common)
        se = self._se()
        if se is None:
            return residual_block(x, convs, norms, downsample=self.downsample, sample_scale=self._drop_scale(x),
                                  **common)
        # attention sits between the last BatchNorm and the residual add: the branch is fused
        # up to its last BatchNorm, the rest is timm's forward verbatim
        y = residual_block(x, convs, norms, shortcut="none", relu=False, **common)
        y = se(y)
        if self.drop_path is not None:
            y = self.drop_path(y)
        y += x if self.downsample is None else self.downsample(x)
        return getattr(self, self._acts[-1])(y)

    def zero_init_last(self) -> None:
        """timm's own ``zero_init_last`` (zero the last BatchNorm's weight, or for
        pre-activation blocks the last convolution's)."""
        self._timm_cls.zero_init_last(self)

    def extra_repr(self) -> str:
        s = f"backend={self.backend!r}, from {self._timm_cls.__module__}.{self._timm_cls.__name__}"
        return s + (", sync_bn=True" if self.sync_bn else "")


class TimmBasicBlock(_TimmBlock, BasicBlock):
    """timm's ``resnet.BasicBlock`` run fused:
    ``act2(drop_path(se(bn2(conv2(act1(bn1(conv1(x))))))) + shortcut(x))``."""

    _convs, _norms, _acts = ("conv1", "conv2"), ("bn1", "bn2"), ("act1", "act2")


class TimmBottleneck(_TimmBlock, Bottleneck):
    """timm's ``resnet.Bottleneck`` run fused (ResNet, ResNeXt, Wide ResNet, ResNet-D, SE-ResNet):
    ``act3(drop_path(se(bn3(conv3(act2(bn2(conv2(act1(bn1(conv1(x)))))))))) + shortcut(x))``."""

    _convs, _norms, _acts = ("conv1", "conv2", "conv3"), ("bn1", "bn2", "bn3"), ("act1", "act2", "act3")


class TimmPreActBasic(_TimmBlock, PreActBasicBlock):
    """timm's ``resnetv2.PreActBasic`` run fused: with ``a = relu(bn(x))`` for each
    BatchNorm+ReLU ``norm_i``, ``drop_path(conv2(norm2(conv1(norm1(x))))) + shortcut``, the
    shortcut ``x`` or ``downsample.conv(norm1(x))``."""

    _convs, _norms, _preact = ("conv1", "conv2"), ("norm1", "norm2"), True


class TimmPreActBottleneck(_TimmBlock, nn.Module):
    """timm's ``resnetv2.PreActBottleneck`` run fused:
    ``drop_path(conv3(norm3(conv2(norm2(conv1(norm1(x))))))) + shortcut``, each ``norm_i``
    a BatchNorm+ReLU, the shortcut ``x`` or ``downsample.conv(norm1(x))``."""

    _convs, _norms, _preact = ("conv1", "conv2", "conv3"), ("norm1", "norm2", "norm3"), True


TIMM_BLOCKS = {
    ("timm.models.resnet", "BasicBlock"): TimmBasicBlock,
    ("timm.models.resnet", "Bottleneck"): TimmBottleneck,
    ("timm.models.resnetv2", "PreActBasic"): TimmPreActBasic,
    ("timm.models.resnetv2", "PreActBottleneck"): TimmPreActBottleneck,
}

# every module whose forward runs fused ops (fusedres.explain, convert_sync_batchnorm)
FUSED_MODULES = (BasicBlock, Bottleneck, PreActBasicBlock, ConvBNAct, FusedSequential, TimmPreActBottleneck)
