"""Tile configurations, tuning and kernel launch for the triton backend.

Every launch goes through this module: it picks the tile config of a convolution, and it
launches under the device of the kernel's tensors (``torch.cuda.device``), so that a process
whose tensors live on ``cuda:1`` does not launch on the current device.

Tuning (``FUSEDRES_TRITON_TUNE``, read at each launch):

- ``off``: one heuristic config per problem, no benchmarking (tests, first GPU checks);
- ``fast`` (default): the heuristic's short list (at most 3 configs) is benchmarked briefly;
- ``full``: every config the pruner keeps is benchmarked (``triton.testing.do_bench``).

The cache is keyed on the problem (kind, dtype, flags and geometry) with the batch size
bucketed to the next power of two, so a last partial batch or an evaluation batch reuses the
choice made for the training batch. No benchmarking happens while a CUDA graph is being
captured or torch.compile traces: the cached config is used, or the heuristic one (recorded
as such in ``chosen_configs()`` and kept for the key, so later calls use the same tiles).

The pruner (``candidates``) only offers configs that the compile-level audit
(``benchmarks/static_audit.py``) shows to compile for sm_90 without register spills and,
with 4 or more warps, to warpgroup MMA (wgmma).

Two choices never depend on tuning, so that results and the shapes of intermediate tensors
are fixed by the problem alone: the row-tile height of the training forward (it decides how
many (count, mean, M2) partials there are) and the split count of wgrad. Under
``TRITON_INTERPRET=1`` (CPU tensors) one small config is used, since every program is
executed in Python.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch
import triton

# triton decides at decoration time whether a kernel is compiled or interpreted; the
# kernels of this package are decorated when this module is first imported
INTERPRET_AT_LOAD = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

TUNE_ENV = "FUSEDRES_TRITON_TUNE"
TUNE_MODES = ("off", "fast", "full")


def interpreting() -> bool:
    return INTERPRET_AT_LOAD


def tune_mode() -> str:
    mode = os.environ.get(TUNE_ENV, "fast").strip().lower() or "fast"
    if mode not in TUNE_MODES:
        raise ValueError(f"{TUNE_ENV}={mode!r}: expected one of {', '.join(TUNE_MODES)}")
    return mode


# ------------------------------------------------------------------ shape-fixed choices


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


def wgrad_tap_cols(cg: int) -> bool:
    """Whether wgrad's column blocks hold the channels of one filter tap (vector loads of
    NHWC patches) rather than running over the flattened (r, s, c) columns: where a group
    has enough channels to fill a block (under the interpreter lower, so that the small test
    shapes exercise both forms)."""
    return cg >= (4 if interpreting() else 16)


def merge_tiles_per_program() -> int:
    """Partials merged by one program of bn_finalize's tree merge (fixed: determinism)."""
    return 4 if interpreting() else 64


# ------------------------------------------------------------------ configs and pruning


class Cfg:
    """One tile config: BLOCK_M x BLOCK_N output tile, BLOCK_K reduction step."""

    __slots__ = ("bm", "bn", "bk", "warps", "stages")

    def __init__(self, bm: int, bn: int, bk: int, warps: int, stages: int):
        self.bm, self.bn, self.bk, self.warps, self.stages = bm, bn, bk, warps, stages

    def meta(self) -> Dict[str, int]:
        return {"BLOCK_M": self.bm, "BLOCK_N": self.bn, "BLOCK_K": self.bk}

    def options(self) -> Dict[str, int]:
        return {"num_warps": self.warps, "num_stages": self.stages}

    def astuple(self) -> Tuple[int, int, int, int, int]:
        return (self.bm, self.bn, self.bk, self.warps, self.stages)

    def __eq__(self, other) -> bool:
        return isinstance(other, Cfg) and self.astuple() == other.astuple()

    def __hash__(self) -> int:
        return hash(self.astuple())

    def __repr__(self) -> str:
        return (f"BLOCK_M={self.bm} BLOCK_N={self.bn} BLOCK_K={self.bk} "
                f"num_warps={self.warps} num_stages={self.stages}")


def hopper_configs(kind: str) -> List[Cfg]:
    """Every tile config tried on Hopper for a convolution kind (before pruning)."""
    if kind == "wgrad":
        # rows = output channels, columns = input channels of one tap, reduction = pixels
        return [
            Cfg(128, 128, 64, 8, 3), Cfg(64, 128, 64, 4, 4), Cfg(128, 64, 64, 4, 4),
            Cfg(64, 64, 64, 4, 4), Cfg(64, 64, 32, 4, 3), Cfg(128, 128, 32, 8, 4),
        ]
    return [
        Cfg(128, 128, 64, 8, 3), Cfg(128, 256, 64, 8, 3), Cfg(256, 128, 64, 8, 3),
        Cfg(128, 64, 64, 4, 4), Cfg(64, 128, 64, 4, 4), Cfg(64, 64, 64, 4, 4),
        Cfg(128, 128, 32, 8, 4), Cfg(128, 64, 32, 8, 3), Cfg(64, 64, 32, 4, 3), Cfg(64, 32, 32, 2, 3),
    ]


def _pow2_at_least(v: int, lo: int) -> int:
    return max(lo, triton.next_power_of_2(max(1, v)))


def _dims(kind: str, p: Mapping[str, int], flags: Mapping[str, object]) -> Tuple[int, int, int]:
    """(rows, columns, reduction length per tap) of the GEMM a kind computes."""
    if kind == "fwd":
        return p["N"] * p["P"] * p["Q"], p["KG"], p["CG"] * (p["S"] if flags.get("MERGE_S") else 1)
    if kind == "dgrad":
        return p["N"] * p["H"] * p["W"], p["CG"], p["KG"]
    j = p["CG"] if flags.get("TAP_COLS") else p["CG"] * p["R"] * p["S"]
    if flags.get("X_ROWS"):
        return j, p["KG"], p["N"] * p["P"] * p["Q"]
    return p["KG"], j, p["N"] * p["P"] * p["Q"]


def _spills(kind: str, c: Cfg, flags: Mapping[str, object], elem: int) -> bool:
    """Configs that spill registers on sm_90, by the rules the compile-level audit
    (``benchmarks/static_audit.py`` over the ResNet-50 calls, bf16 and fp16) supports: an
    fp32 accumulator of more than 64 values per thread leaves too few registers for the
    address and mask tiles of a gathered (non-1x1, residual or prologue) convolution, and an
    operand transformed in registers (prologue, BatchNorm apply) must stay at 32 values per
    thread. 32-bit operands count double, float64 accumulators double."""
    threads = 32 * c.warps
    acc = c.bm * c.bn // threads * (2 if flags.get("ACC64") else 1)
    a_tile = c.bm * c.bk // threads * (2 if elem >= 4 else 1)
    if kind == "fwd":
        if flags.get("GATHER"):
            # gathered input: 2-D address and mask tiles next to the register A operand
            return a_tile > 16 or acc > 32
        if flags.get("HAS_PRO"):
            return a_tile > 32 or acc > 64
        if flags.get("IS_1X1") and not flags.get("HAS_RES") and elem <= 2:
            return acc > 128
        return acc > 64
    if kind == "dgrad":
        if c.warps < 4:
            return True
        if flags.get("DY_PRO"):
            return a_tile > 32 or acc > 64
        return acc > 128
    # wgrad
    if not flags.get("TAP_COLS") and c.bk > 32:
        return True  # flattened columns: 2-D address tiles
    if flags.get("HAS_PRO") and a_tile > 32:
        return True
    return acc > 64


def candidates(kind: str, problem: Mapping[str, int], flags: Mapping[str, object]) -> List[Cfg]:
    """The configs the tuner may pick for a problem: no spills, no tile far larger than the
    problem, and for the training forward only the shape-fixed statistics tile height."""
    rows, cols, red = _dims(kind, problem, flags)
    out: List[Cfg] = []
    for c in hopper_configs(kind):
        if _spills(kind, c, flags, int(problem.get("ELEM", 2))):
            continue
        if kind == "fwd" and flags.get("STATS"):
            if c.bm != stats_block_m(rows):
                continue
        elif c.bm > _pow2_at_least(rows, 64):
            continue
        if c.bn > _pow2_at_least(cols, 32) or c.bk > _pow2_at_least(red, 32):
            continue
        out.append(c)
    if not out:
        bm = stats_block_m(rows) if kind == "fwd" and flags.get("STATS") else 64
        out = [Cfg(bm, 64, 32, 8 if bm > 64 else 4, 3)]
    return out


def heuristic(kind: str, problem: Mapping[str, int], flags: Mapping[str, object]) -> Cfg:
    """The config used without benchmarking: the largest tile that the problem fills, with
    the deepest reduction step (fewest loop trips), among the candidates."""
    return ranked(kind, problem, flags)[0]


def ranked(kind: str, problem: Mapping[str, int], flags: Mapping[str, object]) -> List[Cfg]:
    rows, cols, red = _dims(kind, problem, flags)
    # programs per SM wave: prefer tiles that still give >= 1 wave on 132 SMs
    def score(c: Cfg):
        programs = triton.cdiv(rows, c.bm) * triton.cdiv(cols, c.bn)
        waste = (triton.cdiv(rows, c.bm) * c.bm * triton.cdiv(cols, c.bn) * c.bn) / max(1, rows * cols)
        return (programs < 132, round(waste, 1), -min(c.bk, _pow2_at_least(red, 16)), -c.bm * c.bn, c.warps)

    return sorted(candidates(kind, problem, flags), key=score)


def interpreter_config(kind: str, stats_m: int = 0, stats: bool = False) -> Cfg:
    # every program runs in Python: few, large programs are fastest
    return Cfg(stats_block_m(stats_m) if stats else 64, 32, 32, 4, 1)


# ------------------------------------------------------------------ device guard


def _tensor_device(args) -> Optional[torch.device]:
    for a in args:
        dev = getattr(a, "device", None)
        if isinstance(dev, torch.device):
            return dev
    return None


def device_guard(device: Optional[torch.device]):
    """The context a launch on ``device`` runs in: ``torch.cuda.device(device)`` for CUDA
    tensors (Triton launches on the current device and its current stream), else nothing."""
    if device is None or device.type != "cuda" or device.index is None:
        return contextlib.nullcontext()  # no index: the current device is the tensor's
    return torch.cuda.device(device.index)


def _capturing(device: Optional[torch.device]) -> Optional[str]:
    """Why benchmarking is not possible now, or None."""
    try:
        if torch.compiler.is_compiling():
            return "torch.compile is tracing"
    except AttributeError:  # pragma: no cover - torch without torch.compiler
        pass
    if device is not None and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return "a CUDA graph is being captured"
    return None


# ------------------------------------------------------------------ tuning cache and launch


def bucket(n: int) -> int:
    """Batch size bucket of the tuning key: the next power of two."""
    return triton.next_power_of_2(max(1, int(n)))


_GEOMETRY = ("C", "H", "W", "K", "P", "Q", "R", "S", "CG", "KG", "stride_h", "stride_w", "pad_h", "pad_w",
             "dil_h", "dil_w")


def problem_key(kind: str, problem: Mapping[str, int], flags: Mapping[str, object], dtype: str) -> tuple:
    geo = tuple((k, problem[k]) for k in _GEOMETRY if k in problem)
    fl = tuple(sorted((k, v) for k, v in flags.items()))
    key = (kind, dtype, ("N", bucket(problem["N"]))) + geo + fl
    if kind == "fwd" and flags.get("STATS"):
        # the statistics tile height is fixed by the exact shape: part of the key
        key += (("STATS_BLOCK_M", stats_block_m(problem["N"] * problem["P"] * problem["Q"])),)
    return key


class _Choice:
    __slots__ = ("cfg", "how", "timings")

    def __init__(self, cfg: Cfg, how: str, timings: Optional[Dict[Cfg, float]] = None):
        self.cfg, self.how, self.timings = cfg, how, timings or {}

    def __str__(self) -> str:
        s = f"{self.cfg} ({self.how})"
        if self.timings:
            s += "; ms: " + ", ".join(f"[{c}]={t:.4g}" for c, t in self.timings.items())
        return s


_CACHE: Dict[str, Dict[tuple, _Choice]] = {}


def _benchmark(cfgs: List[Cfg], run: Callable[[Cfg], None], mode: str) -> Dict[Cfg, float]:
    from triton.testing import do_bench

    warmup, rep = (5, 10) if mode == "fast" else (25, 100)
    times: Dict[Cfg, float] = {}
    for c in cfgs:
        try:
            times[c] = float(do_bench(lambda c=c: run(c), warmup=warmup, rep=rep))
        except Exception:  # a config the device cannot run (resources): never picked
            times[c] = float("inf")
    return times


def choose(kind: str, problem: Mapping[str, int], flags: Mapping[str, object], dtype: str,
           run: Callable[[Cfg], None], device: Optional[torch.device]) -> Cfg:
    """The config for a problem: cached, heuristic, or benchmarked (see the module doc)."""
    cache = _CACHE.setdefault(kind, {})
    key = problem_key(kind, problem, flags, dtype)
    hit = cache.get(key)
    if hit is not None:
        return hit.cfg
    mode = tune_mode()
    busy = None if mode == "off" else _capturing(device)
    if mode == "off" or busy is not None:
        cfg = heuristic(kind, problem, flags)
        cache[key] = _Choice(cfg, "heuristic: " + (f"{TUNE_ENV}=off" if busy is None else f"no benchmark, {busy}"))
        return cfg
    shortlist = ranked(kind, problem, flags)
    if mode == "fast":
        shortlist = shortlist[:3]
    if len(shortlist) == 1:
        cache[key] = _Choice(shortlist[0], "only candidate")
        return shortlist[0]
    times = _benchmark(shortlist, run, mode)
    best = min(shortlist, key=lambda c: times[c])  # ties: the heuristic order
    cache[key] = _Choice(best, f"benchmarked ({mode})", times)
    return best


def launch(kind: str, kernel, grid: Callable[[int, int], tuple], args, flags, problem: Mapping[str, int],
           stats_m: int = 0) -> None:
    """Launch a convolution ``kernel`` on ``args``; ``grid(BLOCK_M, BLOCK_N)`` gives the grid."""
    device = _tensor_device(args)
    if interpreting():
        cfg = interpreter_config(kind, stats_m, bool(flags.get("STATS")))
        with device_guard(device):
            kernel[grid(cfg.bm, cfg.bn)](*args, **flags, **cfg.meta(), **cfg.options())
        return

    def run(cfg: Cfg) -> None:
        kernel[grid(cfg.bm, cfg.bn)](*args, **flags, **cfg.meta(), **cfg.options())

    with device_guard(device):
        dtype = str(getattr(args[0], "dtype", ""))
        run(choose(kind, problem, flags, dtype, run, device))


def launch_fixed(kernel, grid: tuple, args, meta: Mapping[str, object]) -> None:
    """Launch a kernel whose config is fixed (BatchNorm kernels) under its tensors' device."""
    with device_guard(_tensor_device(args)):
        kernel[grid](*args, **meta)


def chosen_configs() -> Dict[str, Dict[str, str]]:
    """The configs picked so far: {kind: {problem key: "config (how it was chosen)"}}."""
    return {kind: {str(k): str(v) for k, v in cache.items()} for kind, cache in _CACHE.items()}


def clear_cache() -> None:
    _CACHE.clear()
