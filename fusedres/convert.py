"""Swap ResNet blocks and Conv2d->BatchNorm2d(->ReLU) runs for fused modules, keys unchanged.

Only what can be proven equivalent is replaced:

* torchvision ``BasicBlock`` / ``Bottleneck`` instances whose class and ``forward``
  are torchvision's own. The fused block adopts the original child modules.
* timm ``resnet.BasicBlock`` / ``resnet.Bottleneck`` (ResNet, ResNeXt, Wide ResNet,
  ResNet-D, SE-ResNet) and ``resnetv2.PreActBasic`` / ``resnetv2.PreActBottleneck``
  whose configuration has fusedres semantics: ReLU activations, no anti-aliasing, no
  DropBlock, stochastic depth by timm's ``DropPath``, BatchNorm (+ReLU). The fused block
  takes over the timm block's attributes (see ``fusedres.blocks._TimmBlock``); an
  attention module (``se``) is applied between the fused branch and the residual add.
* runs ``Conv2d, BatchNorm2d[, ReLU]`` of consecutive children of an ``nn.Sequential``
  (the only container whose forward order is known): the Sequential becomes a
  ``FusedSequential`` in place, its children unmoved.
* ``nn.MaxPool2d`` instances (a ResNet's stem pool) become ``fusedres.blocks.MaxPool2d`` in
  place: the same module (arguments, hooks, no state), whose evaluation forward on a
  channels_last CPU tensor is one native pass without the int64 indices ATen writes, with
  PyTorch's values bit for bit; every other call is ``nn.MaxPool2d``'s.

No module is moved or renamed, so parameter names, state_dict keys and their order are
those of the original model, and checkpoints load both ways with ``strict=True``.
Everything else is left untouched and listed in the report with the reason;
:func:`fusedres.explain` checks on an example input what actually runs fused.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import List, Tuple, Union

import torch.nn as nn

from . import backends
from .blocks import (
    FUSED_MODULES,
    TIMM_BLOCKS,
    BasicBlock,
    Bottleneck,
    FusedSequential,
    FusedStage,
    MaxPool2d,
    _TimmBlock,
    sequential_runs,
)
from .functional import ModuleShortcut, _split_downsample

__all__ = ["convert", "ConversionReport", "set_backend"]

_TV_MODULE = "torchvision.models.resnet"


@dataclass
class ConversionReport:
    """What :func:`convert` replaced, as ``(path, from, to)``, and the candidates it left as
    they were, as ``(path, why)``. A fused run of an ``nn.Sequential`` is named by the
    path of its Conv2d."""

    replaced: List[Tuple[str, str, str]] = field(default_factory=list)  # (path, from, to)
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (path, why)

    def __str__(self) -> str:
        lines = [f"replaced {len(self.replaced)} module(s)"]
        lines += [f"  {p or '<root>'}: {a} -> {b}" for p, a, b in self.replaced]
        if self.skipped:
            lines.append(f"left {len(self.skipped)} candidate(s) unfused")
            lines += [f"  {p or '<root>'}: {why}" for p, why in self.skipped]
        return "\n".join(lines)


def _tv_block_kind(m: nn.Module):
    """'basic' / 'bottleneck' if m is an unmodified torchvision block, else None."""
    cls = type(m)
    if cls.__module__ != _TV_MODULE or cls.__name__ not in ("BasicBlock", "Bottleneck"):
        return None
    fwd = cls.forward
    if fwd.__module__ != _TV_MODULE or fwd.__qualname__ != f"{cls.__name__}.forward":
        return None
    return "basic" if cls.__name__ == "BasicBlock" else "bottleneck"


def _adopt(m: nn.Module, kind: str, backend: str) -> nn.Module:
    names = ("conv1", "bn1", "relu", "conv2", "bn2") if kind == "basic" else (
        "conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "relu"
    )
    cls = BasicBlock if kind == "basic" else Bottleneck
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for n in names:
        setattr(new, n, getattr(m, n))
    new.downsample = m.downsample
    new.stride = m.stride
    new._init_fused(backend, 0.0, True)
    new.train(m.training)
    return new


def _timm_block_class(m: nn.Module):
    """The fused class for an unmodified timm block (its class and forward timm's own), else None."""
    cls = type(m)
    fused = TIMM_BLOCKS.get((cls.__module__, cls.__name__))
    if fused is None or cls.forward.__qualname__ != f"{cls.__name__}.forward":
        return None
    return fused


def _convert(module: nn.Module, prefix: str, backend: str, fuse_runs: bool, report: ConversionReport) -> nn.Module:
    if type(module) is nn.MaxPool2d:
        module.__class__ = MaxPool2d
        report.replaced.append((prefix, "nn.MaxPool2d", "fusedres.MaxPool2d"))
        return module
    kind = _tv_block_kind(module)
    if kind is not None:
        new = _adopt(module, kind, backend)
        why = _block_unfusable(new)
        if why:
            # the fused block would run its modules one by one: say so, keep the original
            report.skipped.append((prefix, why))
            return _convert_children(module, prefix, backend, fuse_runs, report)
        report.replaced.append((prefix, f"torchvision.{type(module).__name__}", f"fusedres.{type(new).__name__}"))
        ds = new.downsample
        if ds is not None and isinstance(_split_downsample(ds, False), ModuleShortcut):
            # a shortcut the block calls as a module (not a Conv2d+BatchNorm2d projection,
            # which it fuses itself): fuse what can be fused inside it
            new.downsample = _convert_children(ds, prefix + ".downsample", backend, fuse_runs, report)
        return new
    timm_cls = _timm_block_class(module)
    if timm_cls is not None:
        return _convert_timm(module, timm_cls, prefix, backend, fuse_runs, report)
    return _convert_children(module, prefix, backend, fuse_runs, report)


def _convert_timm(module, timm_cls, prefix, backend, fuse_runs, report) -> nn.Module:
    new = timm_cls.adopt(module, backend)
    norms = new._modules_of(new._norms)
    # hooks are left out: they are the user's to add and remove, and a block with one runs
    # timm's forward for as long as it has it
    why = new.config_unfusable() or _block_unfusable(new, norms, relu_follows=new._preact)
    if why:
        report.skipped.append((prefix, why))
        return _convert_children(module, prefix, backend, fuse_runs, report)
    to = f"fusedres.{type(new).__name__}"
    if new._se() is not None:
        to += f" ({type(new._se()).__name__} applied between the fused branch and the residual add)"
    report.replaced.append((prefix, f"timm.{type(module).__name__}", to))
    ds = new.downsample_module()
    if ds is not None:
        # the block calls this shortcut as a module: fuse what can be fused inside it
        new.downsample = _convert_children(ds, prefix + ".downsample", backend, fuse_runs, report)
    return new


def _convert_children(module: nn.Module, prefix: str, backend: str, fuse_runs: bool, report) -> nn.Module:
    if isinstance(module, FUSED_MODULES):
        return module
    for name, child in list(module.named_children()):
        path = f"{prefix}.{name}" if prefix else name
        new = _convert(child, path, backend, fuse_runs, report)
        if new is not child:
            setattr(module, name, new)
    if isinstance(module, nn.Sequential):
        fused = False
        for i, n, why in sequential_runs(module):
            path = f"{prefix}.{i}" if prefix else str(i)
            if not why and type(module) is not nn.Sequential:
                why = (f"{type(module).__name__} is a subclass of nn.Sequential (fused runs need nn.Sequential "
                       "itself: its class would change)")
            if why or not fuse_runs:
                report.skipped.append((path, why or "fuse_runs=False"))
                continue
            fused = True
            run = "Conv2d+BatchNorm2d" + ("+ReLU" if n == 3 else "")
            report.replaced.append((path, run, "a fused run of fusedres.FusedSequential"))
        if fused:
            FusedSequential.fuse(module, backend)
        elif type(module) is nn.Sequential and _hands_on(module):
            # a stage of fused blocks: each block's output goes to the next as a temporary
            module.__class__ = FusedStage
            report.replaced.append((prefix, "nn.Sequential of blocks", "fusedres.FusedStage"))
    return module


def _hands_on(seq: nn.Sequential) -> bool:
    """Whether two consecutive children of ``seq`` are blocks a FusedStage hands on between."""
    from .blocks import _DONEE_TYPES

    mods = list(seq._modules.values())
    return any(type(a) in _DONEE_TYPES and type(b) in _DONEE_TYPES for a, b in zip(mods, mods[1:]))


def _block_unfusable(block: nn.Module, norms=None, relu_follows: bool = False) -> str:
    """Why a fused block made from these modules could never run fused ("" if it can).
    ``norms``: the main branch's BatchNorms (default ``bn1``..``bn3``); ``relu_follows``: a
    ReLU follows each of them (pre-activation)."""
    from .functional import _bn_fusable, _conv_fusable

    convs = [getattr(block, n) for n in ("conv1", "conv2", "conv3") if getattr(block, n, None) is not None]
    if norms is None:
        norms = [getattr(block, n) for n in ("bn1", "bn2", "bn3") if getattr(block, n, None) is not None]
    checks = [(m, relu_follows) for m in norms]
    ds = block.downsample
    if isinstance(ds, nn.Sequential):
        mods = [m for m in ds if type(m) is not nn.Identity]
        if len(mods) == 2 and isinstance(mods[0], nn.Conv2d):  # a projection the block fuses
            convs, checks = convs + mods[:1], checks + [(mods[1], False)]
    for m in convs:
        why = _conv_fusable(m)
        if why:
            return why
    for m, follows in checks:
        why = _bn_fusable(m, follows)
        if why:
            return why
    return ""


def convert(
    model: nn.Module,
    backend: str = "auto",
    inplace: bool = False,
    *,
    fuse_runs: bool = True,
    return_report: bool = False,
) -> Union[nn.Module, Tuple[nn.Module, ConversionReport]]:
    """Replace every provably equivalent block / conv-BN-ReLU run with a fused module.

    The new modules share the original tensors (with ``inplace=False`` they share
    those of a deep copy). Returns the model, or ``(model, report)`` with
    ``return_report=True``; ``print(report)`` lists what was replaced and skipped.
    """
    backends.check_name(backend)
    if not inplace:
        model = copy.deepcopy(model)
    report = ConversionReport()
    model = _convert(model, "", backend, fuse_runs, report)
    return (model, report) if return_report else model


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Point every fused module of ``model`` at ``backend`` (in place); returns the model."""
    backends.check_name(backend)
    for m in model.modules():
        if isinstance(getattr(m, "backend", None), str):
            m.backend = backend
    return model


def convert_sync_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """Synchronise BatchNorm statistics across the ranks of ``process_group`` (default: the
    world group of ``torch.distributed``), in place; returns the model.

    Fused blocks keep their modules and compute batch statistics over the whole batch of all
    ranks (per-rank (count, mean, M2) partials all-gathered and merged; backward sums
    all-reduced), equal to ``nn.SyncBatchNorm``, on CPU (gloo) and CUDA (NCCL); every other
    ``BatchNorm2d`` (a stem's, say) becomes a :class:`fusedres.SyncBatchNorm2d` sharing its
    tensors (same statistics, any device), other ``BatchNorm*d`` an ``nn.SyncBatchNorm``. The parameter
    gradients stay per rank, as with ``nn.SyncBatchNorm``: wrap the model in
    ``DistributedDataParallel`` to average them. Evaluation is unaffected.
    """
    from .blocks import PreActBasicBlock, SyncBatchNorm2d
    from .functional import ModuleShortcut, _split_downsample

    def called_modules(m: nn.Module):
        """The children a fused module calls as modules (their BatchNorms are not fused)."""
        if isinstance(m, FusedSequential):
            fused = {j for i, n, why in sequential_runs(m) if not why for j in range(i, i + n)}
            return [(str(k), c) for k, (_, c) in enumerate(m.named_children()) if k not in fused]
        if isinstance(m, _TimmBlock):
            ds = m.downsample_module()
        else:
            ds = getattr(m, "downsample", None)
            preact = isinstance(m, PreActBasicBlock)
            if ds is not None and not isinstance(_split_downsample(ds, preact), ModuleShortcut):
                ds = None
        return [] if ds is None else [("downsample", ds)]

    def visit(m: nn.Module) -> nn.Module:
        if isinstance(m, FUSED_MODULES):
            m.sync_bn, m.process_group = True, process_group
            for name, child in called_modules(m):
                new = visit(child)
                if new is not child:
                    setattr(m, name, new)
            return m
        if isinstance(m, SyncBatchNorm2d):
            m.process_group = process_group
            return m
        if type(m) is nn.BatchNorm2d:
            return SyncBatchNorm2d.from_batchnorm(m, process_group)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm):
            return nn.SyncBatchNorm.convert_sync_batchnorm(m, process_group)
        for name, child in list(m.named_children()):
            new = visit(child)
            if new is not child:
                setattr(m, name, new)
        return m

    return visit(model)
