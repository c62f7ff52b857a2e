"""fusedres: fused conv + BatchNorm + ReLU + residual-add ResNet blocks for PyTorch.

Importing fusedres never touches a GPU and never fails because the C++ extension
is missing (it warns once; the reference and triton backends keep working).
"""

from . import _ext
from ._version import __version__
from . import ops  # registers the fusedres:: custom ops
from . import functional, testing
from .functional import freeze, unfreeze
from .backends import BackendStatus, BackendUnavailableError, available_backends
from .blocks import (
    BasicBlock, Bottleneck, ConvBNAct, FusedSequential, FusedStage, PadShortcut, PreActBasicBlock, SyncBatchNorm2d,
)
from .convert import ConversionReport, convert, convert_sync_batchnorm, set_backend
from .explain import Explanation, explain
from .models import (
    CifarResNet,
    ResNet,
    cifar_resnet,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
    resnext50_32x4d,
    resnext101_32x8d,
    resnext101_64x4d,
    wide_resnet50_2,
    wide_resnet101_2,
)
from . import models

_ext.load()

__all__ = [
    "__version__",
    "available_backends",
    "BackendStatus",
    "BackendUnavailableError",
    "BasicBlock",
    "Bottleneck",
    "PreActBasicBlock",
    "ConvBNAct",
    "FusedSequential",
    "FusedStage",
    "PadShortcut",
    "SyncBatchNorm2d",
    "convert",
    "freeze",
    "unfreeze",
    "convert_sync_batchnorm",
    "set_backend",
    "ConversionReport",
    "explain",
    "Explanation",
    "functional",
    "models",
    "ResNet",
    "CifarResNet",
    "cifar_resnet",
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
]
