"""Drop-in fused modules: same constructors, parameters and buffers as torchvision.

``BasicBlock`` and ``Bottleneck`` take torchvision's constructor arguments (plus
keyword-only ``backend``, ``drop_path`` and ``residual``) and hold ``conv1``,
``bn1``, ..., ``downsample`` exactly as torchvision does, so state_dicts move
between the two unchanged. ``forward`` is one call into
``fusedres.functional.residual_block``; the modules only own parameters.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
from torch import Tensor

from . import backends
from .functional import residual_block
from .reference import stat_dtype

__all__ = ["BasicBlock", "Bottleneck", "PreActBasicBlock", "ConvBNAct", "PadShortcut", "conv3x3", "conv1x1"]


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
