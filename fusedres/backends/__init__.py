"""The backends: each a table of primitive implementations (``fusedres.primitives``), one
module per backend, registered with the registry (``_registry``, which names none of them).

``backend="auto"`` resolves per input device in the order the tables registered: cuda ->
triton -> reference for CUDA tensors, cpu -> reference for CPU tensors. A call a backend
hands to the reference is recorded (:func:`fallbacks`), never silent.
"""

from . import _registry
from ._registry import (  # noqa: F401
    _FALLBACK_LISTENERS,
    PRIMITIVES,
    BackendStatus,
    BackendUnavailableError,
    _device_error,
    _status,
    available_backends,
    check_name,
    fallbacks,
    get,
    interpreter_enabled,
    record_fallback,
    refresh,
    register,
    reset_fallbacks,
    resolve,
)

# the built-in backends register themselves on import, in this order
from . import reference, triton, cuda, cpu  # noqa: E402,F401  isort: skip
from .cpu import CpuBackend  # noqa: E402,F401
from .cuda import CudaBackend  # noqa: E402,F401
from .reference import ReferenceBackend  # noqa: E402,F401
from .triton import TritonBackend  # noqa: E402,F401

BACKEND_NAMES = _registry.names()  # the built-in backends; _registry.names() includes any registered later
