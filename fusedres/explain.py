"""explain(): run a model once and say, for every fused unit, whether it ran fused.

:func:`fusedres.convert`'s report says what was replaced; whether a replaced module runs
its fused kernels is decided at each call (a hook on one of its modules, BatchNorms in
different modes, an empty batch, :func:`fusedres.functional.unfused`, ... make it run its
``torch.nn`` modules instead, with the same result). ``explain`` runs the model once on an
example input and reports what happened, from two independent records: the reason or the
backend each fused call reports (``fusedres.functional`` keeps no record otherwise), and a
count of the ``fusedres::`` operators actually dispatched while each unit ran. The run
leaves the model as it was: buffers (running statistics, ``num_batches_tracked``) and the
random number generators are restored, no gradients are recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from . import backends, functional
from .blocks import FUSED_MODULES, FusedSequential, _TimmBlock, sequential_runs

__all__ = ["explain", "Explanation", "FusedUnit"]


@dataclass
class FusedUnit:
    """One fused unit: a fused block, a fused run of a ``FusedSequential`` (named by its
    Conv2d's path), a fused ResNet stem (named by its conv's path), or any other call of
    the fused functional API (named by its first conv's path)."""

    path: str
    kind: str
    calls: int = 0  # fused calls attempted (one per forward of the unit)
    fused_calls: int = 0  # calls that ran the fused ops
    backends: List[str] = field(default_factory=list)  # backends that ran them
    reasons: List[str] = field(default_factory=list)  # why the other calls ran through torch.nn
    ops: int = 0  # fusedres:: operators dispatched while the unit ran
    # calls of a backend primitive that ran the reference instead ("backend primitive: reason")
    fallbacks: Dict[str, int] = field(default_factory=dict)

    @property
    def ran_fused(self) -> bool:
        """Every call of the unit ran fused, and fused operators were dispatched."""
        return self.calls > 0 and self.fused_calls == self.calls and self.ops > 0

    @property
    def status(self) -> str:
        if self.calls == 0:
            return "not called"
        if self.ran_fused:
            s = f"fused ({', '.join(self.backends)}), {self.ops} fusedres ops"
            if self.fallbacks:
                s += "; through the reference: " + "; ".join(f"{k} (x{n})" for k, n in self.fallbacks.items())
            return s
        if self.fused_calls == 0:
            return "torch.nn: " + "; ".join(self.reasons)
        return f"{self.fused_calls} of {self.calls} calls fused; torch.nn: " + "; ".join(self.reasons)


@dataclass
class Explanation:
    """What :func:`explain` saw: ``units`` by path, in model order, and the BatchNorm
    layers that ran their own ``torch.nn`` forward (outside fused units, or in a unit that
    fell back)."""

    units: Dict[str, FusedUnit]
    torch_nn_norms: List[str]

    def fell_back(self) -> List[FusedUnit]:
        """The units called at least once that did not run fused on every call."""
        return [u for u in self.units.values() if u.calls and not u.ran_fused]

    def __str__(self) -> str:
        called = [u for u in self.units.values() if u.calls]
        fused = sum(u.ran_fused for u in called)
        lines = [
            f"{len(self.units)} fused unit(s): {fused} ran fused, {len(called) - fused} ran through torch.nn, "
            f"{len(self.units) - len(called)} not called"
        ]
        width = max((len(u.path) for u in self.units.values()), default=0)
        kw = max((len(u.kind) for u in self.units.values()), default=0)
        lines += [f"  {u.path:<{width}}  {u.kind:<{kw}}  {u.status}" for u in self.units.values()]
        if self.torch_nn_norms:
            lines.append(f"{len(self.torch_nn_norms)} BatchNorm layer(s) ran through torch.nn: "
                         + ", ".join(self.torch_nn_norms))
        return "\n".join(lines)


def _kind(m: nn.Module) -> str:
    if isinstance(m, _TimmBlock):
        return f"fusedres.{type(m).__name__} (from timm {m._timm_cls.__name__})"
    return f"fusedres.{type(m).__name__}"


def _units(model: nn.Module) -> Dict[str, FusedUnit]:
    from .models import CifarResNet, ResNet

    units: Dict[str, FusedUnit] = {}
    for name, m in model.named_modules():
        dot = f"{name}." if name else ""
        if isinstance(m, FusedSequential):
            for i, n, why in sequential_runs(m):
                if not why:
                    kind = "Conv2d+BatchNorm2d" + ("+ReLU" if n == 3 else "") + " run of FusedSequential"
                    units[f"{dot}{i}"] = FusedUnit(f"{dot}{i}", kind)
        elif isinstance(m, FUSED_MODULES):
            units[name] = FusedUnit(name, _kind(m))
        elif isinstance(m, (ResNet, CifarResNet)) and not getattr(m, "preact", False):
            units[f"{dot}conv1"] = FusedUnit(f"{dot}conv1", f"{type(m).__name__} stem (conv1+bn1+relu)")
    return units


class _Recorder(TorchDispatchMode):
    """Attributes fused calls and fusedres:: operators to units. A frame per fused module
    being run (entered by global forward hooks) holds the unit its operators count for:
    the module itself, or for a FusedSequential and outside fused modules, the unit named
    by the conv of the fused call in progress."""

    def __init__(self, model: nn.Module, units: Dict[str, FusedUnit]):
        super().__init__()
        self.paths = {m: n for n, m in model.named_modules()}
        self.units = units
        self.frames: List[list] = [[None, None]]  # [module path or None, current unit]
        self.norms: List[str] = []

    def unit(self, key: str) -> FusedUnit:
        if key not in self.units:
            self.units[key] = FusedUnit(key, "fusedres.functional call")
        return self.units[key]

    # functional.residual_block's record
    def enter(self, convs) -> None:
        frame = self.frames[-1]
        owner = frame[0]
        if owner is None or isinstance(owner[1], FusedSequential):
            frame[1] = self.paths.get(convs[0], "<conv outside the model>")
        else:
            frame[1] = owner[0]

    def result(self, why: Optional[str], backend: Optional[str]) -> None:
        u = self.unit(self.frames[-1][1])
        u.calls += 1
        if why is None:
            u.fused_calls += 1
            if backend not in u.backends:
                u.backends.append(backend)
        elif why not in u.reasons:
            u.reasons.append(why)

    # fusedres.backends' record of calls a backend handed to the reference
    def fallback(self, backend: str, primitive: str, reason: str) -> None:
        key = self.frames[-1][1]
        if key is not None:
            fb = self.unit(key).fallbacks
            name = f"{backend} {primitive}: {reason}"
            fb[name] = fb.get(name, 0) + 1

    # global module hooks
    def pre(self, module, args) -> None:
        if isinstance(module, FUSED_MODULES):
            path = self.paths.get(module)
            self.frames.append([(path, module), path])
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) or functional.is_frozen_bn(module):
            path = self.paths.get(module, type(module).__name__)
            if path not in self.norms:
                self.norms.append(path)

    def post(self, module, args, out) -> None:
        if isinstance(module, FUSED_MODULES) and len(self.frames) > 1:
            self.frames.pop()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.name().startswith("fusedres::") and self.frames[-1][1] is not None:
            self.unit(self.frames[-1][1]).ops += 1
        return func(*args, **(kwargs or {}))


def explain(model: nn.Module, *args, **kwargs) -> Explanation:
    """Run ``model(*args, **kwargs)`` once, in the model's current mode (train or eval),
    and return what ran fused: ``print(fusedres.explain(model, x))`` lists every fused
    unit with the backend that ran it and the number of ``fusedres::`` operators it
    dispatched (and the primitives a backend handed to the reference, with the reason), or
    the reason it ran through its ``torch.nn`` modules, then the BatchNorm
    layers that ran through ``torch.nn``. The model's buffers and the random number
    generators are restored afterwards; no autograd graph is recorded."""
    units = _units(model)
    rec = _Recorder(model, units)
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({t.device.index or 0 for t in list(args) + list(kwargs.values())
                      if isinstance(t, torch.Tensor) and t.is_cuda})
    hooks = [
        nn.modules.module.register_module_forward_pre_hook(rec.pre),
        nn.modules.module.register_module_forward_hook(rec.post),
    ]
    backends._FALLBACK_LISTENERS.append(rec.fallback)
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), functional._recording(rec), rec:
            model(*args, **kwargs)
    finally:
        backends._FALLBACK_LISTENERS.remove(rec.fallback)
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)
    return Explanation(units, rec.norms)
