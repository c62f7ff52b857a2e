"""Measured backend choice for ``backend="auto"``.

Where several fast backends can run a block (on CUDA tensors: ``cuda`` and ``triton``),
which one is faster depends on the layer shape, so ``auto`` does not guess: the first time
a block configuration is seen (weights' geometry, input shape, dtype, layout, train/eval),
each candidate runs the block's forward a few times, timed with device events, and the
fastest is cached for that configuration. The timing runs change nothing: they run without
autograd and every BatchNorm buffer they touch is restored.

Nothing is measured while torch.compile traces or a CUDA graph is being captured (the static
order of ``backends.resolve`` applies then; measure before capturing), or when
``FUSEDRES_AUTO_MEASURE=0``. ``choices()`` shows what was picked, ``clear()`` forgets it.

On CPU tensors in training, ``auto`` runs a block through its own ``torch.nn`` modules
(:func:`torch_nn_reason`): a whole training step of the ``cpu`` backend measured slower than
eager PyTorch's (``benchmarks/README.md``), so the unfused computation is the faster choice
there; ``backend="cpu"`` still runs the fused training kernels.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import torch

from . import backends

# backends raced against each other per device type, in the static order's preference
_CANDIDATES: Dict[str, Tuple[str, ...]] = {"cuda": ("cuda", "triton")}
_CHOICES: Dict[Hashable, str] = {}
_TIMINGS: Dict[Hashable, Dict[str, float]] = {}
_REPS = 3


def candidates(device: torch.device) -> Tuple[str, ...]:
    """The available backends ``auto`` measures on this device (fewer than 2: nothing to measure)."""
    st = backends.available_backends()
    return tuple(
        b for b in _CANDIDATES.get(device.type, ())
        if st[b].available and backends._device_error(b, device) is None
    )


TORCH_NN_CPU_TRAIN = (
    "backend='auto' trains on CPU through torch.nn: the cpu backend's training step measured slower than "
    "eager PyTorch's (benchmarks/README.md); backend='cpu' runs it fused"
)


def torch_nn_reason(device: torch.device, train: bool, sync_bn: bool) -> Optional[str]:
    """Why ``backend="auto"`` runs a block through its ``torch.nn`` modules, or None when it
    runs fused: on CPU tensors in training (batch statistics), except while torch.compile or
    ``torch.jit.trace`` traces (they keep the fused ops) and for synchronised BatchNorm (whose
    statistics only the fused path gathers across ranks)."""
    if device.type != "cpu" or not train or sync_bn:
        return None
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return None
    return TORCH_NN_CPU_TRAIN


def _enabled(device: torch.device) -> bool:
    if os.environ.get("FUSEDRES_AUTO_MEASURE", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if torch.compiler.is_compiling():
        return False
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return True


def _time(fn: Callable[[], object], device: torch.device) -> float:
    fn()  # warm-up (compilation, autotuning, packing)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(_REPS):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / _REPS
    t0 = time.perf_counter()
    for _ in range(_REPS):
        fn()
    return (time.perf_counter() - t0) * 1e3 / _REPS


def pick(key: Hashable, device: torch.device, cands: Sequence[str], run: Callable[[str], object],
         buffers: List[torch.Tensor], timer: Callable[[Callable[[], object], torch.device], float] = None) -> str:
    """The cached choice for ``key``, measuring ``run(backend)`` for each candidate on a miss.

    ``buffers`` (BatchNorm running statistics, counters) are restored after the timing runs."""
    hit = _CHOICES.get(key)
    if hit is not None:
        return hit
    if not _enabled(device):
        return cands[0]
    timer = timer or _time
    saved = [b.clone() for b in buffers]
    times: Dict[str, float] = {}
    try:
        with torch.no_grad():
            for name in cands:
                times[name] = timer(lambda: run(name), device)
    finally:
        with torch.no_grad():
            for b, s in zip(buffers, saved):
                b.copy_(s)
    best = min(cands, key=lambda n: (times[n], cands.index(n)))
    _CHOICES[key], _TIMINGS[key] = best, times
    return best


def choices() -> Dict[Hashable, Tuple[str, Dict[str, float]]]:
    """Every measured configuration: (chosen backend, {backend: ms per forward})."""
    return {k: (v, dict(_TIMINGS.get(k, {}))) for k, v in _CHOICES.items()}


def clear() -> None:
    _CHOICES.clear()
    _TIMINGS.clear()
