"""ResNet builders with fused blocks and torchvision-identical state_dicts.

``resnet18`` ... ``wide_resnet101_2`` build the architectures of torchvision's
``models.resnet`` (same module tree, names, shapes and initialisation scheme), so
``model.load_state_dict(torchvision_model.state_dict())`` works both ways. The stem
conv-BN-ReLU runs fused too, through the same ``conv1``/``bn1``/``relu`` attributes.

``cifar_resnet`` builds the CIFAR networks of He et al. 2015 (depth 6n+2, 16/32/64
channels) with shortcut options A/B/C, their pre-activation variant (He et al.
2016), the plain (shortcut-free) networks of the degradation experiment, and
stochastic depth with linearly decaying survival probability (Huang et al. 2016).
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Type, Union

import torch
import torch.nn as nn
from torch import Tensor

from . import backends
from ._fx import is_proxy
from .blocks import (
    BasicBlock, Bottleneck, FusedStage, MaxPool2d, PadShortcut, PreActBasicBlock, _donation_allowed, _not_scriptable,
    conv1x1, conv3x3,
)
from .functional import is_bn_relu, residual_block

__all__ = [
    "ResNet",
    "CifarResNet",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
    "cifar_resnet",
]

Block = Union[Type[BasicBlock], Type[Bottleneck]]


def _he_init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            if m.weight is not None:
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)


def _drop_rates(drop_path: float, total: int) -> List[float]:
    """Linear decay (Huang et al. 2016): block l of L drops with probability drop_path * l / L."""
    if not 0.0 <= drop_path < 1.0:
        raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
    return [drop_path * (i + 1) / total for i in range(total)]


class ResNet(nn.Module):
    """torchvision's ResNet (v1.5) with fused blocks and stem.

    x: (N, 3, H, W) -> logits (N, num_classes).
    """

    __prepare_scriptable__ = _not_scriptable

    def __init__(
        self,
        block: Block,
        layers: Sequence[int],
        num_classes: int = 1000,
        zero_init_residual: bool = False,
        groups: int = 1,
        width_per_group: int = 64,
        replace_stride_with_dilation: Optional[Sequence[bool]] = None,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
        *,
        backend: str = "auto",
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        self._norm_layer = norm_layer
        self.backend = backends.check_name(backend)
        self.inplanes = 64
        self.dilation = 1
        if replace_stride_with_dilation is None:
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError(
                "replace_stride_with_dilation should be None or a 3-element tuple, "
                f"got {replace_stride_with_dilation}"
            )
        self.groups = groups
        self.base_width = width_per_group
        self._drops = iter(_drop_rates(drop_path, sum(layers)))
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2, dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2, dilate=replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2, dilate=replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        del self._drops
        _he_init(self)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck) and m.bn3.weight is not None:
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock) and m.bn2.weight is not None:
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int = 1, dilate: bool = False) -> nn.Sequential:
        norm_layer = self._norm_layer
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride), norm_layer(planes * block.expansion)
            )
        layers = [
            block(
                self.inplanes, planes, stride, downsample, self.groups, self.base_width, previous_dilation, norm_layer,
                backend=self.backend, drop_path=next(self._drops),
            )
        ]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(
                block(
                    self.inplanes, planes, groups=self.groups, base_width=self.base_width, dilation=self.dilation,
                    norm_layer=norm_layer, backend=self.backend, drop_path=next(self._drops),
                )
            )
        return FusedStage(*layers)

    def _pool_takes_relu(self, x: Tensor) -> bool:
        """An evaluation forward nothing observes on a channels_last CPU tensor, with the
        stem's max-pool this package's (no hooks on it, none global) and its BatchNorm a plain
        one: the ReLU can run in the max-pool's pass (on other devices it stays in the
        convolution's epilogue)."""
        pool = self.maxpool
        return (
            x.device.type == "cpu"
            and x.dim() == 4
            and x.is_contiguous(memory_format=torch.channels_last)
            and not x.is_contiguous()
            and isinstance(pool, MaxPool2d)
            and not (pool._forward_hooks or pool._forward_pre_hooks)
            and not is_bn_relu(self.bn1)
            and _donation_allowed(x)
        )

    def forward(self, x: Tensor) -> Tensor:
        if is_proxy(x):
            # torch.fx symbolic tracing: the stem as torchvision's three nodes (conv1, bn1,
            # relu; graph node names as in torchvision) and the max-pool, the blocks as one node each
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        elif self._pool_takes_relu(x):
            # the stem's ReLU in the max-pool's pass (bit for bit relu then max-pool)
            x = residual_block(
                x, [self.conv1], [self.bn1], shortcut="none", relu=False, backend=self.backend, name="ResNet stem"
            )
            x = self.maxpool.relu_then_pool(x)
        else:
            x = residual_block(
                x, [self.conv1], [self.bn1], shortcut="none", backend=self.backend, name="ResNet stem"
            )
            x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def _resnet(block: Block, layers: Sequence[int], **kwargs) -> ResNet:
    weights = kwargs.pop("weights", None)
    kwargs.pop("progress", None)
    if weights is not None:
        raise ValueError(
            "fusedres builders do not download weights; build the model and load a torchvision "
            "state_dict instead: model.load_state_dict(tv_model.state_dict())"
        )
    return ResNet(block, layers, **kwargs)


def resnet18(**kwargs) -> ResNet:
    """ResNet-18 (He et al. 2015)."""
    return _resnet(BasicBlock, [2, 2, 2, 2], **kwargs)


def resnet34(**kwargs) -> ResNet:
    """ResNet-34 (He et al. 2015)."""
    return _resnet(BasicBlock, [3, 4, 6, 3], **kwargs)


def resnet50(**kwargs) -> ResNet:
    """ResNet-50 (He et al. 2015; v1.5, stride on the 3x3 conv)."""
    return _resnet(Bottleneck, [3, 4, 6, 3], **kwargs)


def resnet101(**kwargs) -> ResNet:
    """ResNet-101 (He et al. 2015)."""
    return _resnet(Bottleneck, [3, 4, 23, 3], **kwargs)


def resnet152(**kwargs) -> ResNet:
    """ResNet-152 (He et al. 2015)."""
    return _resnet(Bottleneck, [3, 8, 36, 3], **kwargs)


def resnext50_32x4d(**kwargs) -> ResNet:
    """ResNeXt-50 32x4d (Xie et al. 2017)."""
    kwargs.setdefault("groups", 32)
    kwargs.setdefault("width_per_group", 4)
    return _resnet(Bottleneck, [3, 4, 6, 3], **kwargs)


def resnext101_32x8d(**kwargs) -> ResNet:
    """ResNeXt-101 32x8d (Xie et al. 2017)."""
    kwargs.setdefault("groups", 32)
    kwargs.setdefault("width_per_group", 8)
    return _resnet(Bottleneck, [3, 4, 23, 3], **kwargs)


def resnext101_64x4d(**kwargs) -> ResNet:
    """ResNeXt-101 64x4d (Xie et al. 2017)."""
    kwargs.setdefault("groups", 64)
    kwargs.setdefault("width_per_group", 4)
    return _resnet(Bottleneck, [3, 4, 23, 3], **kwargs)


def wide_resnet50_2(**kwargs) -> ResNet:
    """Wide ResNet-50-2 (Zagoruyko & Komodakis 2016): bottleneck width doubled."""
    kwargs.setdefault("width_per_group", 64 * 2)
    return _resnet(Bottleneck, [3, 4, 6, 3], **kwargs)


def wide_resnet101_2(**kwargs) -> ResNet:
    """Wide ResNet-101-2 (Zagoruyko & Komodakis 2016): bottleneck width doubled."""
    kwargs.setdefault("width_per_group", 64 * 2)
    return _resnet(Bottleneck, [3, 4, 23, 3], **kwargs)


class CifarResNet(nn.Module):
    """CIFAR ResNet of He et al. 2015 §4.2: 3x3 stem with 16 channels, three stages of n
    basic blocks (16, 32, 64 channels; stride 1, 2, 2), global average pool, linear.

    x: (N, 3, 32, 32) -> logits (N, num_classes). Pre-activation nets end with a
    BatchNorm + ReLU (``final_bn``) before the pool.
    """

    __prepare_scriptable__ = _not_scriptable

    def __init__(
        self,
        depth: int,
        shortcut: str = "A",
        preact: bool = False,
        plain: bool = False,
        drop_path: float = 0.0,
        num_classes: int = 10,
        in_channels: int = 3,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, 1202, ...), got {depth}")
        if shortcut not in ("A", "B", "C"):
            raise ValueError(f"shortcut must be 'A', 'B' or 'C', got {shortcut!r}")
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        n = (depth - 2) // 6
        self.depth, self.shortcut, self.preact, self.plain = depth, shortcut, preact, plain
        self.backend = backends.check_name(backend)
        block = PreActBasicBlock if preact else BasicBlock
        drops = iter(_drop_rates(drop_path, 3 * n))
        self.conv1 = conv3x3(in_channels, 16)
        if not preact:
            self.bn1 = norm_layer(16)
            self.relu = nn.ReLU(inplace=True)
        inplanes = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                s = stride if i == 0 else 1
                ds = None
                changes = s != 1 or inplanes != planes
                if not plain and (shortcut == "C" or (changes and shortcut == "B")):
                    ds = nn.Sequential(conv1x1(inplanes, planes, s)) if preact else nn.Sequential(
                        conv1x1(inplanes, planes, s), norm_layer(planes)
                    )
                elif not plain and changes:
                    ds = PadShortcut(inplanes, planes, s)
                blocks.append(
                    block(inplanes, planes, s, ds, norm_layer=norm_layer, backend=self.backend,
                          drop_path=next(drops), residual=not plain)
                )
                inplanes = planes
            stages.append(FusedStage(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        if preact:
            self.final_bn = norm_layer(64)
            self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)
        _he_init(self)

    def forward(self, x: Tensor) -> Tensor:
        if self.preact:
            x = self.conv1(x)
        elif is_proxy(x):  # torch.fx symbolic tracing (see ResNet.forward)
            x = self.relu(self.bn1(self.conv1(x)))
        else:
            x = residual_block(x, [self.conv1], [self.bn1], shortcut="none", backend=self.backend, name="CifarResNet stem")
        x = self.layer3(self.layer2(self.layer1(x)))
        if self.preact:
            x = self.relu(self.final_bn(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)

    def extra_repr(self) -> str:
        kind = "plain" if self.plain else f"shortcut={self.shortcut!r}"
        return f"depth={self.depth}, {kind}, preact={self.preact}, backend={self.backend!r}"


def cifar_resnet(
    depth: int,
    shortcut: str = "A",
    preact: bool = False,
    plain: bool = False,
    drop_path: float = 0.0,
    num_classes: int = 10,
    **kwargs,
) -> CifarResNet:
    """CIFAR ResNet-``depth`` (6n+2): shortcut "A" (zero-padding, parameter-free), "B"
    (projection where the shape changes) or "C" (projection everywhere); ``preact`` for
    pre-activation blocks, ``plain`` for no shortcuts, ``drop_path`` for stochastic depth
    (the last block drops with probability drop_path, earlier ones linearly less)."""
    return CifarResNet(depth, shortcut, preact, plain, drop_path, num_classes, **kwargs)
