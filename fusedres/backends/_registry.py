"""The backend registry: which primitive tables exist, whether they can run here, and which
one a call gets. It names no backend: each backend module registers its table with
:func:`register`, saying for which device types ``backend="auto"`` may pick it and in which
order. Nothing here touches a GPU: availability is asked lazily and cached.

A table is a class whose attributes are the primitives (``fusedres.primitives``: the same
arguments, in the same order) plus ``name``, ``native`` (the primitives it implements
itself; the others are inherited from the reference table), ``availability() -> (bool,
reason)`` and ``device_error(device) -> Optional[str]``.
"""

from __future__ import annotations

import collections
import functools
import os
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple

import torch

from .. import primitives

PRIMITIVES = primitives.NAMES

# every registered table by name, in registration order
_TABLES: Dict[str, type] = {}
# (rank, device type or "*" for any, name): "auto" tries the lowest rank first
_AUTO: List[Tuple[int, str, str]] = []


def register(*, auto: Mapping[str, int]) -> Callable[[type], type]:
    """Class decorator: register a table under its ``name``; ``auto`` maps the device types
    for which ``backend="auto"`` may pick it (``"*"``: any) to its rank there (lower first)."""

    def add(table: type) -> type:
        name = table.name
        if name in _TABLES or name == "auto":
            raise ValueError(f"backend name {name!r} is taken")
        missing = [p for p in PRIMITIVES if not callable(getattr(table, p, None))]
        if missing:
            raise TypeError(f"backend {name!r} lacks the primitives {missing}")
        _TABLES[name] = table
        _AUTO.extend((rank, device, name) for device, rank in auto.items())
        _AUTO.sort()
        return table

    return add


def names() -> Tuple[str, ...]:
    return tuple(_TABLES)


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


def _expected() -> str:
    return f"'auto' or one of {names()}"


@functools.lru_cache(maxsize=None)
def _status(name: str) -> BackendStatus:
    table = _TABLES[name]
    ok, why = table.availability()
    return BackendStatus(ok, why, tuple(table.native) if ok else ())


def available_backends() -> Dict[str, BackendStatus]:
    """Every backend with whether it can run here and, if not, why.

    >>> fusedres.available_backends()["cuda"]
    BackendStatus(available=False, reason='extension built without CUDA', native=())
    """
    return {name: _status(name) for name in _TABLES}


def refresh() -> None:
    """Forget cached availability (e.g. after changing TRITON_INTERPRET)."""
    _status.cache_clear()


def get(name: str):
    """The primitive table of a concrete backend name (no availability check)."""
    try:
        return _TABLES[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; expected {_expected()}") from None


def _device_error(name: str, device: torch.device) -> Optional[str]:
    return _TABLES[name].device_error(device)


@torch.compiler.assume_constant_result
def resolve(backend: str, device: torch.device) -> str:
    """Turn ``backend`` ("auto" or a name) into a concrete backend usable on ``device``.

    Raises ``BackendUnavailableError`` naming the reason when an explicitly requested
    backend cannot run here, and ``ValueError`` for an unknown name.
    """
    if backend == "auto":
        for _, dev, name in _AUTO:
            if dev in (device.type, "*") and _status(name).available and _device_error(name, device) is None:
                return name
        raise BackendUnavailableError(f"no backend runs on {device} here: {available_backends()}")
    check_name(backend)
    st = _status(backend)
    if not st.available:
        raise BackendUnavailableError(f"backend '{backend}' is not available: {st.reason}")
    err = _device_error(backend, device)
    if err is not None:
        raise BackendUnavailableError(err)
    return backend


def check_name(backend: str) -> str:
    """Validate a backend name at construction time (availability is checked at call time)."""
    if backend != "auto" and backend not in _TABLES:
        raise ValueError(f"backend must be {_expected()}, got {backend!r}")
    return backend


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
