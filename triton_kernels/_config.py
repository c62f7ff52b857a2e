"""Tile configurations and kernel launch for the triton backend.

On a GPU the convolution kernels are wrapped in ``triton.autotune`` over configs chosen for
Hopper (H100/H200), keyed on the problem shape and flags: the first call of each distinct
shape benchmarks the candidates (run it once before capturing a CUDA graph), later calls
launch the cached winner with no host synchronisation. Under ``TRITON_INTERPRET=1`` (CPU
tensors) one small config is used, since every program is executed in Python.

Two choices never depend on tuning, so that results and the shapes of intermediate
tensors are fixed by the problem alone: the row-tile height of the training forward (it
decides how many (count, mean, M2) partials there are) and the split count of wgrad.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List

import triton

# kind -> names of the kernel arguments that identify a problem for the tuning cache
_KEYS: Dict[str, List[str]] = {
    "fwd": ["N", "C", "H", "W", "K", "P", "Q", "R", "S", "CG", "stride_h", "dil_h",
            "HAS_BIAS", "HAS_RES", "HAS_PRO", "STATS", "TF32", "IS_1X1"],
    "dgrad": ["N", "C", "H", "W", "K", "P", "Q", "R", "S", "CG", "stride_h", "dil_h", "DY_PRO", "TF32"],
    "wgrad": ["N", "C", "H", "W", "K", "P", "Q", "R", "S", "CG", "stride_h", "dil_h", "N_SPLIT", "HAS_PRO", "DY_PRO", "TF32"],
}


# triton decides at decoration time whether a kernel is compiled or interpreted; the
# kernels of this package are decorated when this module is first imported
INTERPRET_AT_LOAD = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreting() -> bool:
    return INTERPRET_AT_LOAD


def stats_block_m(m: int) -> int:
    """Rows (output pixels) per statistics tile of the training forward."""
    if interpreting():
        # small tiles so that even the tiny test shapes produce several partials to merge
        return 16 if m <= 64 else 32
    return 128 if m >= 4096 else 64


def stats_tiles(m: int) -> int:
    return triton.cdiv(m, stats_block_m(m)) if m > 0 else 0


def wgrad_splits(m: int, kg: int, j: int, groups: int) -> int:
    """Chunks the wgrad reduction over output pixels is split into (fixed by the shape)."""
    if interpreting():
        return 1 if m <= 256 else 2
    # enough programs to fill ~132 SMs twice over, each chunk at least 1024 pixels
    tiles = triton.cdiv(kg, 64) * triton.cdiv(j, 64) * groups
    want = max(1, (264 + tiles - 1) // tiles)
    return max(1, min(want, m // 1024, 64))


def _cfg(bm, bn, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


def _hopper_configs(kind: str) -> List[triton.Config]:
    if kind == "wgrad":
        # rows = output channels, columns = (c, r, s), reduction = output pixels
        return [
            _cfg(128, 128, 64, 8, 3), _cfg(64, 128, 64, 4, 4), _cfg(128, 64, 64, 4, 4),
            _cfg(64, 64, 64, 4, 4), _cfg(64, 64, 32, 4, 3), _cfg(128, 128, 32, 8, 4),
        ]
    return [
        _cfg(128, 128, 64, 8, 3), _cfg(128, 256, 64, 8, 3), _cfg(256, 128, 64, 8, 3),
        _cfg(128, 64, 64, 4, 4), _cfg(64, 128, 64, 4, 4), _cfg(64, 64, 64, 4, 4),
        _cfg(128, 128, 32, 8, 4), _cfg(64, 64, 32, 4, 3), _cfg(64, 32, 32, 2, 3),
    ]


def _prune_fwd(configs, named_args, **kwargs):
    # the statistics tile height is fixed by the shape; drop configs with another BLOCK_M
    if not kwargs.get("STATS", named_args.get("STATS", False)):
        return configs
    m = named_args["N"] * named_args["P"] * named_args["Q"]
    bm = stats_block_m(m)
    kept = [c for c in configs if c.kwargs["BLOCK_M"] == bm]
    return kept or [_cfg(bm, 64, 32, 4, 3)]


_TUNED: Dict[str, object] = {}


def _tuned(kind: str, kernel):
    if kind not in _TUNED:
        prune = {"early_config_prune": _prune_fwd} if kind == "fwd" else None
        _TUNED[kind] = triton.autotune(configs=_hopper_configs(kind), key=_KEYS[kind], prune_configs_by=prune)(kernel)
    return _TUNED[kind]


def _interpreter_config(kind: str) -> Dict[str, int]:
    # every program runs in Python: few, large programs are fastest
    return {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}


def launch(kind: str, kernel, grid: Callable[[int, int], tuple], args, flags, stats_m: int = 0) -> None:
    """Launch ``kernel`` on ``args``; ``grid(BLOCK_M, BLOCK_N)`` gives the launch grid."""
    if interpreting():
        cfg = _interpreter_config(kind)
        if flags.get("STATS"):
            cfg["BLOCK_M"] = stats_block_m(stats_m)
        meta = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
        kernel[grid(cfg["BLOCK_M"], cfg["BLOCK_N"])](
            *args, **flags, **meta, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]
        )
        return
    _tuned(kind, kernel)[lambda meta: grid(meta["BLOCK_M"], meta["BLOCK_N"])](*args, **flags)


def chosen_configs() -> Dict[str, Dict[str, str]]:
    """The configs the autotuner picked so far: {kind: {problem key: config}}."""
    return {kind: {str(k): str(v) for k, v in tuned.cache.items()} for kind, tuned in _TUNED.items()}
