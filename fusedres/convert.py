"""Swap torchvision-style blocks and Conv2d->BatchNorm2d(->ReLU) runs for fused modules.

Only what can be proven equivalent is replaced:

* torchvision ``BasicBlock`` / ``Bottleneck`` instances whose class and ``forward``
  are torchvision's own. The fused block adopts the original child modules, so
  every tensor is shared and state_dict keys are unchanged.
* runs ``Conv2d, BatchNorm2d[, ReLU]`` of consecutive children of an
  ``nn.Sequential`` (the only container whose forward order is known). The run
  becomes a ``ConvBNAct`` at the conv's index and ``nn.Identity`` at the others, so
  later indices keep their names; the run's own keys move from ``i.*``/``i+1.*`` to
  ``i.conv.*``/``i.bn.*`` (pass ``fuse_runs=False`` to keep them as they are).

Everything else is left untouched and listed in the report.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import List, Tuple, Union

import torch.nn as nn

from . import backends
from .blocks import BasicBlock, Bottleneck, ConvBNAct

__all__ = ["convert", "ConversionReport", "set_backend"]

_TV_MODULE = "torchvision.models.resnet"


@dataclass
class ConversionReport:
    replaced: List[Tuple[str, str, str]] = field(default_factory=list)  # (path, from, to)
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (path, why)

    def __str__(self) -> str:
        lines = [f"replaced {len(self.replaced)} module(s)"]
        lines += [f"  {p or '<root>'}: {a} -> {b}" for p, a, b in self.replaced]
        if self.skipped:
            lines.append(f"left {len(self.skipped)} candidate(s) unfused")
            lines += [f"  {p}: {why}" for p, why in self.skipped]
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


def _run_at(seq: nn.Sequential, i: int):
    kids = list(seq)
    conv = kids[i]
    if type(conv) is not nn.Conv2d or i + 1 >= len(kids):
        return None
    bn = kids[i + 1]
    if not isinstance(bn, nn.BatchNorm2d) or type(bn).forward is not nn.BatchNorm2d.forward:
        return None
    if bn.num_features != conv.out_channels:
        return None
    act = i + 2 < len(kids) and type(kids[i + 2]) is nn.ReLU
    return conv, bn, act


def _convert(module: nn.Module, prefix: str, backend: str, fuse_runs: bool, report: ConversionReport) -> nn.Module:
    kind = _tv_block_kind(module)
    if kind is not None:
        new = _adopt(module, kind, backend)
        why = _block_unfusable(new)
        if why:
            # the fused block would run its modules one by one: say so, keep the original
            report.skipped.append((prefix, why))
            return _convert_children(module, prefix, backend, fuse_runs, report)
        report.replaced.append((prefix, f"torchvision.{type(module).__name__}", f"fusedres.{type(new).__name__}"))
        if new.downsample is not None:
            new.downsample = _convert_children(new.downsample, prefix + ".downsample", backend, False, report)
        return new
    return _convert_children(module, prefix, backend, fuse_runs, report)


def _convert_children(module: nn.Module, prefix: str, backend: str, fuse_runs: bool, report) -> nn.Module:
    if isinstance(module, (BasicBlock, Bottleneck, ConvBNAct)):
        return module
    for name, child in list(module.named_children()):
        path = f"{prefix}.{name}" if prefix else name
        new = _convert(child, path, backend, fuse_runs, report)
        if new is not child:
            setattr(module, name, new)
    if isinstance(module, nn.Sequential):
        i = 0
        while i < len(module):
            run = _run_at(module, i)
            if run is None:
                i += 1
                continue
            conv, bn, act = run
            path = f"{prefix}.{i}" if prefix else str(i)
            why = _run_unfusable(conv)
            if why or not fuse_runs:
                report.skipped.append((path, why or "fuse_runs=False"))
                i += 2
                continue
            fused = ConvBNAct.from_modules(conv, bn, act, backend)
            fused.train(conv.training)
            module[i] = fused
            module[i + 1] = nn.Identity()
            if act:
                module[i + 2] = nn.Identity()
            report.replaced.append((path, "Conv2d+BatchNorm2d" + ("+ReLU" if act else ""), "fusedres.ConvBNAct"))
            i += 3 if act else 2
    return module


def _block_unfusable(block: nn.Module) -> str:
    """Why a fused block made from these modules could never run fused ("" if it can)."""
    from .functional import _bn_fusable, _conv_fusable

    names = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")
    mods = [getattr(block, n) for n in names if getattr(block, n, None) is not None]
    ds = block.downsample
    if isinstance(ds, nn.Sequential) and len(ds) == 2:
        mods += list(ds)
    for m in mods:
        why = _bn_fusable(m) if not isinstance(m, nn.Conv2d) else _conv_fusable(m)
        if why:
            return why
    return ""


def _run_unfusable(conv: nn.Conv2d) -> str:
    if conv.bias is not None:
        return "conv has a bias"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}"
    if isinstance(conv.padding, str):
        return f"padding={conv.padding!r}"
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
    from .blocks import BasicBlock, Bottleneck, ConvBNAct, PreActBasicBlock, SyncBatchNorm2d

    fused = (BasicBlock, Bottleneck, PreActBasicBlock, ConvBNAct)

    def visit(m: nn.Module) -> nn.Module:
        if isinstance(m, fused):
            m.sync_bn, m.process_group = True, process_group
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
