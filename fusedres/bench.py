"""Side-by-side benchmark runner: ``fusedres bench`` / ``python -m benchmarks.run``.

In ONE process and on the same inputs it times, per case (model, mode, batch, resolution,
dtype):

* ``eager``          torchvision's model (or, for models torchvision lacks, the same fusedres
                     model running its own torch.nn modules: ``fusedres.functional.unfused``)
* ``compile``        ``torch.compile`` of that model (default mode)
* ``compile-freeze`` inference only: inductor with ``freezing=True``
* ``compile-max-autotune`` inference only, GPU only: ``mode="max-autotune"``
* ``compile-cudagraphs``   latency rows (``--cuda-graphs``): ``mode="reduce-overhead"``
* ``fusedres-<backend>``   every fusedres backend usable on the device
* ``fusedres-frozen``      inference only, only when named: ``backend="auto"`` after
                           ``fusedres.freeze`` (folded weights, and on CPU their oneDNN-packed
                           copies, cached: the deployment counterpart of ``compile-freeze``)
* ``fusedres-auto``        ``backend="auto"`` (only when named: it is one of the others, or on
                           CPU in training the blocks' torch.nn modules)

Every provider starts from the same weights. Warm-up runs happen before timing and the
first call (which includes compilation) is reported separately as ``first_call_s``; times
are the median and [p20, p80] over many repetitions, with the input rotated over several
buffers; CUDA times come from device events. Rows report images/s, the ratio to eager and
to torch.compile, peak memory (training, CUDA), and achieved TFLOP/s against the ceilings
measured by the runner itself: on CUDA a large GEMM in the case dtype, on CPU the fastest
oneDNN convolution at ResNet-50 layer shapes (a matmul there runs well below what oneDNN's
direct convolutions reach), and a device copy. CPU results also name the processor, its
vector/matrix ISA, cores and threads.

Results are written as JSON (``benchmarks/results/<device>-<date>.json`` by default) and
printed as a table; ``fusedres bench --plot FILE`` renders speedup and memory charts.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import json
import os
import platform
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Case:
    model: str
    mode: str  # "train" | "infer"
    batch: int
    resolution: int
    dtype: str  # "float32" | "bfloat16" | "float16" (16-bit: autocast with fp32 weights)
    cuda_graphs: bool = False
    # this case's own provider subset (same matching as ``--providers``); None: all
    providers: Optional[Tuple[str, ...]] = None


@dataclass
class Row:
    model: str
    mode: str
    batch: int
    resolution: int
    dtype: str
    provider: str
    img_per_s: Optional[float] = None
    ms_p50: Optional[float] = None
    ms_p20: Optional[float] = None
    ms_p80: Optional[float] = None
    first_call_s: Optional[float] = None
    peak_mem_bytes: Optional[int] = None
    tflops: Optional[float] = None
    frac_of_gemm_ceiling: Optional[float] = None
    frac_of_ceiling: Optional[float] = None  # of the ceiling the tables use (ceiling_of)
    vs_eager: Optional[float] = None
    vs_compile: Optional[float] = None
    cuda_graphs: bool = False
    reps: int = 0
    error: Optional[str] = None
    extra: Dict[str, object] = field(default_factory=dict)


# ------------------------------------------------------------------------------ models


def _imagenet_models() -> List[str]:
    from . import models

    return [n for n in models.__all__ if n[0].islower() and n != "cifar_resnet"]


def _cifar_depth(name: str) -> Optional[int]:
    m = re.fullmatch(r"resnet(\d+)", name)
    if m and int(m.group(1)) >= 8 and (int(m.group(1)) - 2) % 6 == 0 and int(m.group(1)) not in (18, 34, 50, 101, 152):
        return int(m.group(1))
    return None


class ArgumentError(SystemExit):
    """A bad argument, as one line naming the valid choices (``message``). A SystemExit, so a
    script calling the checks stops with that line; ``fusedres bench`` reports it as argparse
    reports its own errors (``fusedres bench: error: ...``, exit code 2)."""

    def __init__(self, message: str):
        super().__init__(f"fusedres bench: error: {message}")
        self.message = message


def check_model(name: str) -> None:
    """ArgumentError with the valid names unless ``name`` is a model the runner can build."""
    if name not in _imagenet_models() and _cifar_depth(name) is None:
        raise ArgumentError(f"unknown model {name!r}; valid: {', '.join(_imagenet_models())}, "
                            "or a CIFAR net resnetD with D = 6n+2 (resnet20, resnet56, resnet110, ...)")


def _build_fused(name: str) -> nn.Module:
    """A fusedres builder by name: ``resnet50``, ``resnext50_32x4d``, ... or a CIFAR net
    ``resnet20`` / ``resnet56`` / ``resnet110`` (depth 6n+2, option-A shortcuts, 10 classes)."""
    import fusedres

    check_model(name)
    depth = _cifar_depth(name)
    if depth is not None:
        return fusedres.cifar_resnet(depth)
    return getattr(fusedres.models, name)()


def _torchvision_model(name: str, fused: nn.Module) -> Optional[nn.Module]:
    from . import _torchvision

    try:
        mod = _torchvision.load_resnet_module()
    except ImportError:
        return None
    if mod is None or not hasattr(mod, name):
        return None
    tv = getattr(mod, name)(num_classes=fused.fc.out_features)
    tv.load_state_dict(fused.state_dict())
    return tv


class _Unfused(nn.Module):
    """The fusedres model running its own torch.nn modules (the eager computation)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        from .functional import unfused

        with unfused():
            return self.model(x)


# ------------------------------------------------------------------------------ timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_calls(fn: Callable[[int], None], device: torch.device, reps: int, min_time: float) -> List[float]:
    """Milliseconds of each call of fn(i); at least ``reps`` calls and ``min_time`` seconds."""
    out: List[float] = []
    start = time.perf_counter()
    i = 0
    while i < reps or (time.perf_counter() - start) < min_time and i < reps * 20:
        out.append(_time_one(fn, i, device))
        i += 1
    return out


def _quantile(v: List[float], q: float) -> float:
    s = sorted(v)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


# ResNet-50 convolutions (in channels, out channels, kernel, input size at 224², stride 1)
# whose oneDNN speed gives the CPU ceiling: each stage's 3x3 and its 1x1 reduce/expand
CONV_CEILING_SHAPES: Tuple[Tuple[int, int, int, int], ...] = (
    (64, 64, 3, 56), (256, 64, 1, 56), (64, 256, 1, 56),
    (128, 128, 3, 28), (512, 128, 1, 28),
    (256, 256, 3, 14), (1024, 256, 1, 14), (256, 1024, 1, 14),
    (512, 512, 3, 7),
)
CONV_CEILING_BATCH = 8


def _conv_label(c: int, k: int, r: int, hw: int) -> str:
    return f"{r}x{r} {c}->{k} {hw}x{hw}"


def measure_conv_ceiling(dtype: torch.dtype, batch: int = CONV_CEILING_BATCH,
                         shapes: Sequence[Tuple[int, int, int, int]] = CONV_CEILING_SHAPES,
                         reps: int = 3, min_time: float = 0.05) -> Dict[str, object]:
    """The CPU compute ceiling: TFLOP/s of oneDNN forward convolutions (``F.conv2d``,
    channels_last input and weight, no autograd) at ResNet-50 layer ``shapes`` in ``dtype``,
    the median of ``reps`` calls each; the best shape is the ceiling."""
    per: Dict[str, float] = {}
    with torch.no_grad():
        for c, k, r, hw in shapes:
            x = torch.randn(batch, c, hw, hw).to(dtype).contiguous(memory_format=torch.channels_last)
            w = torch.randn(k, c, r, r).to(dtype).contiguous(memory_format=torch.channels_last)
            run = lambda i, x=x, w=w, p=r // 2: F.conv2d(x, w, padding=p)  # noqa: E731
            for i in range(2):
                run(i)
            ms = statistics.median(_time_calls(run, torch.device("cpu"), reps, min_time))
            per[_conv_label(c, k, r, hw)] = 2 * batch * hw * hw * k * c * r * r / (ms * 1e-3) / 1e12
    best = max(per, key=per.get)
    return {"conv_tflops": per[best], "conv_dtype": str(dtype).replace("torch.", ""), "conv_shape": best,
            "conv_batch": batch, "conv_shapes_tflops": per}


def ceiling_of(c: Dict[str, object]) -> Tuple[float, str]:
    """(TFLOP/s, "conv" | "gemm"): the compute ceiling of one ``ceilings`` entry of a results
    file that tables and the traffic model use: the conv ceiling where the run measured one
    (CPU), else the GEMM's (CUDA, and CPU files written before the conv ceiling existed)."""
    if c.get("conv_tflops"):
        return float(c["conv_tflops"]), "conv"
    return float(c["gemm_tflops"]), "gemm"


def measure_ceilings(device: torch.device, dtype: torch.dtype) -> Dict[str, float]:
    """Achievable GEMM TFLOP/s (in ``dtype``, fp32 on CPU) and copy GB/s on this device; on
    CPU also the oneDNN convolution ceiling in ``dtype`` (:func:`measure_conv_ceiling`)."""
    if device.type == "cuda":
        n, gemm_dt, nbytes = 8192, dtype, 1 << 30
    else:
        n, gemm_dt, nbytes = 1024, torch.float32, 1 << 27
    a = torch.randn(n, n, device=device).to(gemm_dt)
    b = torch.randn(n, n, device=device).to(gemm_dt)
    for _ in range(3):
        a @ b
    _sync(device)
    ms = statistics.median(_time_calls(lambda i: a @ b, device, 10, 0.5))
    src = torch.empty(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    ms_copy = statistics.median(_time_calls(lambda i: dst.copy_(src), device, 10, 0.5))
    out = {
        "gemm_tflops": 2 * n**3 / (ms * 1e-3) / 1e12,
        "gemm_dtype": str(gemm_dt).replace("torch.", ""),
        "gemm_n": n,
        "copy_gb_s": 2 * nbytes / (ms_copy * 1e-3) / 1e9,
        "copy_bytes": nbytes,
    }
    if device.type == "cpu":
        out.update(measure_conv_ceiling(dtype))
    return out


def _flops(model: nn.Module, x: torch.Tensor, train: bool) -> Optional[float]:
    try:
        from torch.utils.flop_counter import FlopCounterMode

        m = copy.deepcopy(model).train(train)
        with FlopCounterMode(display=False) as fc:
            if train:
                F.cross_entropy(m(x), torch.zeros(x.shape[0], dtype=torch.long, device=x.device)).backward()
            else:
                with torch.no_grad():
                    m(x)
        return float(fc.get_total_flops())
    except Exception:  # noqa: BLE001  (a FLOP count is informative, never required)
        return None


# ------------------------------------------------------------------------------ runner


BASE_PROVIDERS = ("eager", "compile", "compile-freeze", "compile-max-autotune", "compile-cudagraphs")
# providers selected only by their full name, never by the "fusedres" group
NAMED_ONLY = ("fusedres-auto", "fusedres-frozen")


def provider_names() -> List[str]:
    """Every provider name the runner knows (whether or not usable on this machine)."""
    from . import backends

    return list(BASE_PROVIDERS) + [f"fusedres-{b}" for b in backends.BACKEND_NAMES] + list(NAMED_ONLY)


def check_providers(names: Sequence[str]) -> None:
    """ArgumentError naming the valid choices if any name is neither a provider nor a prefix
    group (``compile``: every compile-*, ``fusedres``: every fusedres backend)."""
    valid = provider_names() + ["fusedres"]
    bad = [n for n in names if n not in valid]
    if bad:
        raise ArgumentError(f"argument --providers: unknown provider{'s' if len(bad) > 1 else ''} "
                            f"{', '.join(repr(b) for b in bad)}; valid: {', '.join(valid)}")


def _providers(case: Case, device: torch.device, include: Optional[List[str]], exact: bool = False) -> List[str]:
    """The providers of ``case`` usable on ``device``, in the order of ``include`` (eager
    always first). ``include`` names match a provider exactly or as a prefix group
    (``compile`` also selects ``compile-freeze``, ...); with ``exact`` they match exactly and
    eager is kept only if named (rows to be merged with an eager row timed before)."""
    import fusedres

    names = ["eager", "compile"]
    if case.mode == "infer":
        names.append("compile-freeze")
        if device.type == "cuda":
            names.append("compile-max-autotune")
        if case.cuda_graphs and device.type == "cuda":
            names.append("compile-cudagraphs")
    for b, st in fusedres.available_backends().items():
        if st.available and fusedres.backends._device_error(b, device) is None:
            if b == "triton" and device.type != "cuda":
                continue  # the interpreter is a correctness tool, not something to time
            names.append(f"fusedres-{b}")
    named = list(case.providers or ()) + list(include or ())
    for p in NAMED_ONLY:  # only by the full name: not one of "every fusedres backend"
        if p in named and (p != "fusedres-frozen" or case.mode == "infer"):
            names.append(p)

    def select(names, wanted, exact):
        out = ["eager"] if "eager" in names and not exact else []
        for p in wanted:
            out += [n for n in names if (n == p or (not exact and n.startswith(p + "-"))) and n not in out]
        return out

    if case.providers is not None:
        names = select(names, case.providers, False)
    if include:
        names = select(names, include, exact)
    return names


def _make_model(provider: str, fused: nn.Module, baseline: nn.Module, device) -> nn.Module:
    import fusedres

    if provider == "fusedres-frozen":
        return fusedres.freeze(fusedres.set_backend(copy.deepcopy(fused), "auto").to(device))
    if provider.startswith("fusedres-"):
        return fusedres.set_backend(copy.deepcopy(fused), provider[len("fusedres-"):]).to(device)
    return copy.deepcopy(baseline).to(device)


def compile_provider(model: nn.Module, provider: str, backend: str = "inductor") -> Callable:
    """``model`` compiled as the ``compile-*`` ``provider`` says.

    ``compile-freeze``: inductor freezes only where its *global* ``freezing`` config is on
    while dynamo traces (dynamo lifts parameters to graph inputs unless
    ``torch._inductor.config.freezing`` is set at that moment; ``options={"freezing": True}``
    alone reaches inductor after that and gives an unfrozen graph), so every call, and with
    it every (re)compile, runs under ``config.patch(freezing=True)``. The option is passed
    too: torch.compile backends with equal options are one backend to dynamo, and a frozen
    model compiled after an unfrozen one of the same class would otherwise reuse its graph."""
    if not provider.startswith("compile"):
        raise ValueError(f"provider must be one of the compile-* providers, got {provider!r}")
    mode = {"compile-max-autotune": "max-autotune", "compile-cudagraphs": "reduce-overhead"}.get(provider)
    freeze = provider == "compile-freeze" and backend == "inductor"
    fn = torch.compile(model, mode=mode, backend=backend, options={"freezing": True} if freeze else None)
    if not freeze:
        return fn
    import torch._inductor.config as inductor_config

    def frozen(*args, **kwargs):
        with inductor_config.patch(freezing=True):
            return fn(*args, **kwargs)

    return frozen


def _time_one(fn: Callable[[int], None], i: int, device: torch.device) -> float:
    if device.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(i)
        b.record()
        b.synchronize()
        return a.elapsed_time(b)
    t0 = time.perf_counter()
    fn(i)
    return (time.perf_counter() - t0) * 1e3


def _time_interleaved(fns: List[Callable[[int], None]], device: torch.device, reps: int,
                      min_time: float) -> List[List[float]]:
    """Milliseconds per call of each fn, timed in rounds (one call of each per round), so a
    machine whose speed drifts during the run (shared hosts, boost clocks) slows every
    provider alike instead of whichever happened to be timed at the time. At least ``reps``
    rounds and ``min_time`` seconds per fn."""
    out: List[List[float]] = [[] for _ in fns]
    i = 0
    while i < reps or (min(sum(v) for v in out) * 1e-3 < min_time and i < reps * 20):
        for fn, ms in zip(fns, out):
            ms.append(_time_one(fn, i, device))
        i += 1
    return out


def _ratios(rows: List[Row], mode: str) -> None:
    """vs_eager / vs_compile (compile-freeze for inference) of the rows of one case, and for
    interleaved rows the median of the per-round ratios; rows whose base is missing keep None."""
    eager = next((r for r in rows if r.provider == "eager" and r.ms_p50), None)
    comp = next((r for r in rows if r.provider == ("compile-freeze" if mode == "infer" else "compile")
                 and r.ms_p50), None)
    for r in rows:
        if r.ms_p50:
            r.vs_eager = eager.ms_p50 / r.ms_p50 if eager else None
            r.vs_compile = comp.ms_p50 / r.ms_p50 if comp else None
            # interleaved rows: also the median of the per-round ratios (each round times
            # every provider back to back, so these pair calls made at the same machine speed)
            for key, base in (("vs_eager_paired", eager), ("vs_compile_paired", comp)):
                if base is not None and "ms_per_round" in r.extra and "ms_per_round" in base.extra:
                    pairs = zip(base.extra["ms_per_round"], r.extra["ms_per_round"])
                    r.extra[key] = statistics.median(b / t for b, t in pairs)


def run_case(case: Case, device: torch.device, reps: int, min_time: float, n_inputs: int = 4,
             include: Optional[List[str]] = None, progress=None, seed: int = 0,
             interleave: Optional[bool] = None, on_row: Optional[Callable[[Row], None]] = None,
             exact: bool = False, compile_backend: str = "inductor") -> List[Row]:
    """Rows of one case, one per provider. ``interleave`` (default: on CPU) sets every
    provider up first and times them round by round (``_time_interleaved``); otherwise each
    provider is timed alone, in turn, which keeps CUDA peak-memory figures per provider
    (interleaved rows report no peak memory, every model being resident at once).
    ``on_row(row)`` is called as each row is complete (sequential: after each provider),
    with ``vs_eager`` already set. ``compile_backend`` is torch.compile's backend for the
    compile-* rows (a rehearsal on a slow machine may pass "eager": dynamo alone)."""
    torch.manual_seed(seed)
    if interleave is None:
        interleave = device.type != "cuda"
    dtype = DTYPES[case.dtype]
    train = case.mode == "train"
    fused = _build_fused(case.model)
    tv = _torchvision_model(case.model, fused)
    baseline = tv if tv is not None else _Unfused(fused)
    baseline_src = "torchvision" if tv is not None else "fusedres.unfused"
    classes = fused.fc.out_features
    cl = torch.channels_last
    inputs = [
        torch.randn(case.batch, 3, case.resolution, case.resolution, device=device).contiguous(memory_format=cl)
        for _ in range(n_inputs)
    ]
    targets = [torch.randint(0, classes, (case.batch,), device=device) for _ in range(n_inputs)]
    flops = _flops(baseline.to(device), inputs[0][:1], train)
    flops = flops * case.batch if flops is not None else None
    autocast = (
        torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    )

    def finish(row: Row, ms: List[float]) -> None:
        row.reps = len(ms)
        row.ms_p50 = statistics.median(ms)
        row.ms_p20, row.ms_p80 = _quantile(ms, 0.2), _quantile(ms, 0.8)
        row.img_per_s = case.batch / (row.ms_p50 * 1e-3)
        if flops is not None:
            row.tflops = flops / (row.ms_p50 * 1e-3) / 1e12

    def failed(row: Row, e: Exception) -> None:
        row.error = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"

    rows: List[Row] = []
    pending = []  # interleaved: (row, timed call, the objects it keeps alive)
    for prov in _providers(case, device, include, exact):
        row = Row(case.model, case.mode, case.batch, case.resolution, case.dtype, prov, cuda_graphs=case.cuda_graphs)
        row.extra["baseline"] = baseline_src
        if interleave:
            row.extra["timing"] = "interleaved"
        if progress is not None:
            progress.set_postfix_str(f"{case.model} {case.mode} b{case.batch} {prov}")
        try:
            model = _make_model(prov, fused, baseline, device).to(memory_format=cl).train(train)
            fn = model
            if prov.startswith("compile"):
                if not interleave:  # interleaved compiled models must keep their code caches
                    torch._dynamo.reset()
                if compile_backend != "inductor":
                    row.extra["compile_backend"] = compile_backend
                fn = compile_provider(model, prov, compile_backend)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9) if train else None

            def step(i, fn=fn, model=model, opt=opt):
                x, t = inputs[i % n_inputs], targets[i % n_inputs]
                if train:
                    with autocast:
                        loss = F.cross_entropy(fn(x), t)
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                else:
                    with torch.no_grad(), autocast:
                        fn(x)

            graph_fn = None
            t0 = time.perf_counter()
            step(0)
            _sync(device)
            row.first_call_s = time.perf_counter() - t0
            for i in range(1, 3):
                step(i)
            if case.cuda_graphs and device.type == "cuda" and not train and not prov.startswith("compile"):
                graph_fn = _cuda_graph(lambda x, fn=fn: fn(x), inputs[0], autocast)
            _sync(device)
            timed = (lambda i, g=graph_fn: g(inputs[i % n_inputs])) if graph_fn is not None else step
            if interleave:
                pending.append((row, timed, (model, fn, opt)))
            else:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                finish(row, _time_calls(timed, device, reps, min_time))
                if device.type == "cuda" and train:
                    row.peak_mem_bytes = int(torch.cuda.max_memory_allocated(device))
            del model, fn, opt
        except Exception as e:  # noqa: BLE001  (one failing provider must not lose the others' rows)
            failed(row, e)
        rows.append(row)
        if not (interleave and row.error is None):  # interleaved rows are complete after the rounds
            _ratios(rows, case.mode)
            if on_row is not None:
                on_row(row)
        if progress is not None and not interleave:
            progress.update(1)
    if pending:
        if progress is not None:
            progress.set_postfix_str(f"{case.model} {case.mode} b{case.batch} interleaved")
        try:
            times = _time_interleaved([t for _, t, _ in pending], device, reps, min_time)
            for (row, _, _), ms in zip(pending, times):
                finish(row, ms)
                row.extra["ms_per_round"] = [round(t, 4) for t in ms]
        except Exception as e:  # noqa: BLE001
            for row, _, _ in pending:
                failed(row, e)
        _ratios(rows, case.mode)
        if on_row is not None:
            for row, _, _ in pending:
                on_row(row)
        pending.clear()
    if progress is not None and interleave:
        progress.update(len(rows))
    _ratios(rows, case.mode)
    return rows


def _cuda_graph(fn, example: torch.Tensor, autocast):
    static_x = example.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.no_grad(), autocast:
        for _ in range(3):
            fn(static_x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g), torch.no_grad(), autocast:
        static_y = fn(static_x)

    def run(x):
        static_x.copy_(x)
        g.replay()
        return static_y

    return run


# ------------------------------------------------------------------------------ suites


def default_cases(device: torch.device, quick: bool = False) -> List[Case]:
    if device.type == "cuda":
        cases = [
            Case("resnet50", "train", 256, 224, "bfloat16"),
            Case("resnet50", "infer", 256, 224, "bfloat16"),
            Case("resnet50", "infer", 1, 224, "bfloat16", cuda_graphs=True),
            Case("resnet18", "train", 128, 224, "bfloat16"),
            Case("resnet56", "train", 128, 32, "bfloat16"),
        ]
        if quick:  # no max-autotune or training compile: those take minutes by themselves
            cases = [Case("resnet50", "infer", 64, 224, "bfloat16", providers=("eager", "compile-freeze", "fusedres")),
                     Case("resnet56", "train", 128, 32, "bfloat16", providers=("eager", "fusedres"))]
        return cases
    cases = [Case("resnet50", "infer", 8, 224, "float32",
                  providers=("eager", "compile", "fusedres", "fusedres-frozen"))]
    if quick:
        # a smoke run of every provider kind in about a minute on 2 cores: compiling a
        # training step takes that long by itself on such a machine, so training is timed
        # for eager and the fusedres backends only
        cases = [Case("resnet20", "infer", 2, 32, "float32"),
                 Case("resnet20", "train", 4, 32, "float32", providers=("eager", "fusedres"))]
    return cases


# the /proc/cpuinfo flags that decide how fast oneDNN's convolutions can be
CPU_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
                 "amx_fp16")


def cpu_info() -> Dict[str, object]:
    """This machine's processor: ``model`` (/proc/cpuinfo's model name), ``isa`` (which of
    CPU_ISA_FLAGS it has), ``cores`` (physical cores), ``cpus`` (logical CPUs this process
    may run on) and ``threads`` (torch's intra-op threads)."""
    name, flags, cores, phys = None, None, set(), None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = (part.strip() for part in line.partition(":"))
                if key == "model name" and name is None:
                    name = val
                elif key == "flags" and flags is None:
                    flags = set(val.split())
                elif key == "physical id":
                    phys = val
                elif key == "core id":
                    cores.add((phys, val))
    except OSError:
        pass
    name, flags = name or platform.processor() or platform.machine(), flags or set()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)
    return {"model": name, "isa": [f for f in CPU_ISA_FLAGS if f in flags], "cores": len(cores) or None,
            "cpus": cpus, "threads": torch.get_num_threads()}


def cpu_has_bf16(info: Dict[str, object]) -> bool:
    """Whether the CPU computes bf16 natively (AVX-512 BF16 or AMX): then the runner also
    measures its bf16 convolution ceiling."""
    return bool({"avx512_bf16", "amx_bf16"} & set(info.get("isa") or ()))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    info = cpu_info()
    return f"{info['model']} ({info['threads']} threads)"


def _versions() -> Dict[str, Optional[str]]:
    from . import __version__

    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = None
    return {"torch": torch.__version__, "triton": tv, "fusedres": __version__}


def run(cases: List[Case], device: torch.device, reps: int, min_time: float, include=None,
        progress: bool = True, interleave: Optional[bool] = None,
        on_update: Optional[Callable[[dict], None]] = None, exact: bool = False,
        compile_backend: str = "inductor", ceilings: Optional[Dict[str, dict]] = None) -> dict:
    """Every case's rows as one result dict (the JSON format). ``on_update(result)`` is called
    after each row, with the rows so far and ``complete`` False, and once at the end (True),
    so a caller can persist partial results. ``ceilings`` ({dtype: ...}) reuses ceilings
    measured earlier on this device instead of measuring them."""
    total = sum(len(_providers(c, device, include, exact)) for c in cases)
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=total, desc="fusedres bench", unit="row")
        except ImportError:
            bar = None
    ceilings = dict(ceilings or {})
    cpu = cpu_info() if device.type == "cpu" else None
    dts = {c.dtype for c in cases} | ({"bfloat16"} if cpu is not None and cpu_has_bf16(cpu) else set())
    for dt in sorted(dts):
        if dt not in ceilings:
            ceilings[dt] = measure_ceilings(device, DTYPES[dt])
    env = {k: v for k, v in sorted(os.environ.items()) if k.startswith("FUSEDRES_") or k == "TORCH_CUDA_ARCH_LIST"}
    result = {
        "device": device_name(device),
        "device_type": device.type,
        **_versions(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **({"cpu": cpu} if cpu is not None else {}),
        "ceilings": ceilings,
        "settings": {"reps": reps, "min_time_s": min_time, "tf32_conv": torch.backends.cudnn.allow_tf32,
                     "threads": torch.get_num_threads(),
                     "timing": "interleaved" if (device.type != "cuda" if interleave is None else interleave)
                     else "sequential", "env": env},
        "complete": False,
        "cases": [],
    }
    if compile_backend != "inductor":
        result["settings"]["compile_backend"] = compile_backend
    done: List[Row] = []

    def on_row(r: Row) -> None:
        c = result["ceilings"][r.dtype]
        if r.tflops is not None and c["gemm_tflops"]:
            r.frac_of_gemm_ceiling = r.tflops / c["gemm_tflops"]
            r.frac_of_ceiling = r.tflops / ceiling_of(c)[0]
        done.append(r)
        result["cases"] = [asdict(x) for x in done]
        if on_update is not None:
            on_update(result)

    for c in cases:
        first = len(done)
        run_case(c, device, reps, min_time, include=include, progress=bar, interleave=interleave, on_row=on_row,
                 exact=exact, compile_backend=compile_backend)
        _ratios(done[first:], c.mode)  # ratios to bases timed after a row (compile after fusedres)
    if bar is not None:
        bar.close()
    result["cases"] = [asdict(x) for x in done]
    result["complete"] = True
    if on_update is not None:
        on_update(result)
    return result


# ------------------------------------------------------------------------------ results files


def write_json(path: str, obj) -> None:
    """Write ``obj`` as JSON atomically (a reader, or a kill, never sees a half-written file)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def unused_path(path: str) -> str:
    """``path``, or ``<stem>-2<ext>``, ``-3``, ... : the first that does not exist yet."""
    if not os.path.exists(path):
        return path
    stem, ext = os.path.splitext(path)
    i = 2
    while os.path.exists(f"{stem}-{i}{ext}"):
        i += 1
    return f"{stem}-{i}{ext}"


def _case_key(r: dict) -> tuple:
    return (r["model"], r["mode"], r["batch"], r["resolution"], r["dtype"], bool(r.get("cuda_graphs")))


def recompute_ratios(result: dict) -> dict:
    """vs_eager / vs_compile of every row against the rows of its case in ``result`` (for
    results merged from several runs on one device); returns ``result``."""
    by_case: Dict[tuple, List[dict]] = {}
    for r in result["cases"]:
        by_case.setdefault(_case_key(r), []).append(r)
    for key, rows in by_case.items():
        eager = next((r for r in rows if r["provider"] == "eager" and r["ms_p50"]), None)
        base = "compile-freeze" if key[1] == "infer" else "compile"
        comp = next((r for r in rows if r["provider"] == base and r["ms_p50"]), None)
        for r in rows:
            if r["ms_p50"]:
                r["vs_eager"] = eager["ms_p50"] / r["ms_p50"] if eager else None
                r["vs_compile"] = comp["ms_p50"] / r["ms_p50"] if comp else None
    return result


def merge_results(old: Optional[dict], new: dict) -> dict:
    """``new``'s rows appended to ``old``'s (a row of the same case and provider replaces the
    old one); ceilings and settings of both kept, ratios recomputed across the merged rows."""
    if old is None:
        return recompute_ratios(copy.deepcopy(new))
    out = copy.deepcopy(old)
    keys = {(_case_key(r), r["provider"]) for r in new["cases"]}
    out["cases"] = [r for r in out["cases"] if (_case_key(r), r["provider"]) not in keys] + copy.deepcopy(new["cases"])
    for dt, c in new["ceilings"].items():
        out["ceilings"].setdefault(dt, c)
    out["complete"] = bool(old.get("complete", True)) and bool(new.get("complete", True))
    runs = out.setdefault("runs", [dict(date=old["date"], settings=old["settings"])])
    runs.append(dict(date=new["date"], settings=new["settings"]))
    return recompute_ratios(out)


# ------------------------------------------------------------------------------ report


def predictions(result: dict) -> Dict[tuple, float]:
    """{(case key, provider): predicted ms} from the traffic model at the ceilings measured in
    ``result``, for the providers the model has; GPU results only (the model counts
    device-memory traffic)."""
    if result.get("device_type", "cuda" if "threads)" not in result.get("device", "") else "cpu") != "cuda":
        return {}
    from . import roofline

    return roofline.predict_results(result)


def format_table(result: dict, predicted: Optional[Dict[tuple, float]] = None) -> str:
    """The rows as a text table; with ``predicted`` ({(case key, provider): ms}, see
    :func:`predictions`) also the traffic model's time and measured/model ratio."""
    hdr = ["model", "mode", "batch", "res", "dtype", "provider", "img/s", "ms p50 [p20,p80]", "x eager", "x compile",
           "peak MiB", "TFLOP/s", "of ceil"]
    ceils = {dt: ceiling_of(c) for dt, c in result["ceilings"].items() if c.get("gemm_tflops") or c.get("conv_tflops")}
    if predicted:
        hdr += ["model ms", "of model"]
    lines = []

    def paired(r, key):  # interleaved runs: the median per-round ratio, in parentheses
        v = (r.get("extra") or {}).get(key)
        return "" if v is None else f" ({v:.2f})"

    for r in result["cases"]:
        pred = (predicted or {}).get((_case_key(r), r["provider"]))
        if r["error"]:
            cells = [r["model"], r["mode"], str(r["batch"]), str(r["resolution"]), r["dtype"], r["provider"],
                     "error: " + r["error"][:60], "", "", "", "", "", ""]
        else:
            f = lambda v, fmt: "" if v is None else format(v, fmt)  # noqa: E731
            cells = [r["model"], r["mode"], str(r["batch"]), str(r["resolution"]), r["dtype"], r["provider"],
                     f(r["img_per_s"], ".1f"), f"{r['ms_p50']:.2f} [{r['ms_p20']:.2f},{r['ms_p80']:.2f}]",
                     f(r["vs_eager"], ".2f") + paired(r, "vs_eager_paired"),
                     f(r["vs_compile"], ".2f") + paired(r, "vs_compile_paired"),
                     f(r["peak_mem_bytes"] / 2**20 if r["peak_mem_bytes"] else None, ".0f"), f(r["tflops"], ".3g"),
                     f(r["tflops"] / ceils[r["dtype"]][0] if r["tflops"] and r["dtype"] in ceils else None, ".2f")]
        if predicted:
            ok = pred is not None and not r["error"] and r["ms_p50"]
            cells += [f"{pred:.2f}" if pred is not None else "", f"{pred / r['ms_p50']:.2f}" if ok else ""]
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(hdr)]
    out = ["  ".join(h.ljust(w) for h, w in zip(hdr, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(cells, widths)) for cells in lines]
    def ceiling(v):
        conv = (f"conv {v['conv_tflops']:.3g} TFLOP/s ({v['conv_dtype']}, {v['conv_shape']}), "
                if v.get("conv_tflops") else "")
        return f"{conv}GEMM {v['gemm_tflops']:.3g} TFLOP/s ({v['gemm_dtype']}), copy {v['copy_gb_s']:.0f} GB/s"

    ceil = "; ".join(f"{k}: {ceiling(v)}" for k, v in result["ceilings"].items())
    cpu = result.get("cpu")
    head = result["device"] if not cpu else (
        f"{cpu['model']} [{' '.join(cpu['isa']) or 'no AVX2'}], {cpu['cores']} cores, {cpu['threads']} threads")
    kinds = {k for _, k in ceils.values()}
    note = "\nof ceil: TFLOP/s / " + (
        "the conv ceiling of the row's dtype (the fastest oneDNN convolution at ResNet-50 layer shapes, "
        "channels_last, batch 8; the traffic model prices this file at it too)" if kinds == {"conv"} else
        "the GEMM ceiling of the row's dtype (a matmul; this file has no convolution ceiling)" if kinds == {"gemm"}
        else "the conv ceiling of the row's dtype where measured, else the GEMM ceiling")
    if any("vs_eager_paired" in (r.get("extra") or {}) for r in result["cases"]):
        note += "\n(x.xx): median of per-round ratios (interleaved timing)"
    if predicted:
        note += ("\nmodel ms: fusedres.roofline at the ceilings above (each launch at max(FLOPs/GEMM rate, "
                 "bytes/copy rate)); of model: model ms / measured ms")
    if not result.get("complete", True):
        note += "\n(incomplete: the run was stopped before its last row)"
    return (f"{head} | torch {result['torch']} | triton {result['triton']} | ceilings {ceil}\n"
            + "\n".join(out) + note)


def plot(result: dict, out_png: str) -> List[str]:
    """Speedup-vs-eager bars per case, and training peak memory bars; returns files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in result["cases"] if not r["error"] and r["vs_eager"]]
    keyf = lambda r: f"{r['model']} {r['mode']}\nb{r['batch']} {r['resolution']}² {r['dtype']}"  # noqa: E731
    keys = list(dict.fromkeys(keyf(r) for r in ok))
    provs = list(dict.fromkeys(r["provider"] for r in ok))
    written = []
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(keys) + 2), 4.5))
    w = 0.8 / max(1, len(provs))
    for j, p in enumerate(provs):
        vals = [next((r["vs_eager"] for r in ok if keyf(r) == k and r["provider"] == p), 0) for k in keys]
        ax.bar([i + j * w for i in range(len(keys))], vals, w, label=p)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([i + w * (len(provs) - 1) / 2 for i in range(len(keys))], keys, fontsize=8)
    ax.set_ylabel("speed-up vs eager (median)")
    ax.set_title(result["device"], fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    written.append(out_png)
    mem = [r for r in ok if r["peak_mem_bytes"]]
    if mem:
        keys_m = list(dict.fromkeys(keyf(r) for r in mem))
        provs_m = list(dict.fromkeys(r["provider"] for r in mem))
        fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(keys_m) + 2), 4.5))
        w = 0.8 / max(1, len(provs_m))
        for j, p in enumerate(provs_m):
            vals = [next((r["peak_mem_bytes"] / 2**30 for r in mem if keyf(r) == k and r["provider"] == p), 0)
                    for k in keys_m]
            ax.bar([i + j * w for i in range(len(keys_m))], vals, w, label=p)
        ax.set_xticks([i + w * (len(provs_m) - 1) / 2 for i in range(len(keys_m))], keys_m, fontsize=8)
        ax.set_ylabel("training peak memory (GiB)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = re.sub(r"(\.png)?$", "-memory.png", out_png, count=1)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


_CPU_NAME_NOISE = {"r", "tm", "intel", "amd", "processor", "cpu", "core", "with", "radeon", "graphics"}


def default_output(result: dict, root: str = os.path.join("benchmarks", "results")) -> str:
    """``<root>/<device>-<date>.json``; for a CPU (``result["cpu"]``, see :func:`cpu_info`) the
    device part says the machine: ``cpu-<model words>-<amx|avx512|avx2>-<N>thread(s)``, e.g.
    ``cpu-xeon-amx-1thread-2026-12-05.json``."""
    day = result["date"][:10]
    cpu = result.get("cpu")
    if cpu:
        words = [w for w in re.findall(r"[a-z0-9]+", re.sub(r"@.*", "", cpu["model"].lower()))
                 if w not in _CPU_NAME_NOISE and not w.endswith("ghz")][:2]
        isa = set(cpu["isa"])
        tier = "amx" if "amx_tile" in isa else "avx512" if "avx512f" in isa else "avx2" if "avx2" in isa else ""
        n = cpu["threads"]
        slug = "-".join(["cpu"] + words + ([tier] if tier else []) + [f"{n}thread{'s' if n != 1 else ''}"])
    else:
        slug = re.sub(r"[^A-Za-z0-9]+", "-", result["device"]).strip("-").lower()[:60]
    return os.path.join(root, f"{slug}-{day}.json")


def _results_file(text: str) -> str:
    if not os.path.isfile(text):
        raise ValueError(f"{text!r}: no such results file (benchmarks/results/*.json)")
    return text


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .cli import arg_type, device_arg, nonnegative_float, positive_int

    p.add_argument("--device", default=None, type=device_arg, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run of the runner end to end, 3 timed calls per row: on CPU, CIFAR ResNet-20 "
                        "inference (batch 2, 32x32) with every provider, two torch.compile variants included, and "
                        "its training step (batch 4) with eager and the fusedres backends (under a minute on 2 cores: "
                        "about 35 s with an empty compile cache, 20 s with a warm one); "
                        "on CUDA, ResNet-50 inference (batch 64, bf16) with eager, compile-freeze and fusedres, and "
                        "CIFAR ResNet-56 training with eager and fusedres")
    p.add_argument("--case", action="append", default=[],
                   help="MODEL:MODE:BATCH:RES:DTYPE[:graphs], e.g. resnet50:infer:8:224:float32 (repeatable)")
    p.add_argument("--providers", default=None,
                   help="comma-separated subset (eager is always kept), e.g. compile-freeze,fusedres-cpu; "
                        "'compile' and 'fusedres' also select every compile-* / fusedres-<backend> provider; "
                        "fusedres-auto (backend='auto') and fusedres-frozen (inference, backend='auto' after "
                        "fusedres.freeze) only by their names")
    p.add_argument("--reps", type=positive_int, default=None,
                   help="timed repetitions (default 50 on CUDA, 10 on CPU, 3 quick)")
    p.add_argument("--min-time", type=nonnegative_float, default=None, help="minimum timed seconds per row")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch's intra-op threads for the run (default: torch's own, OMP_NUM_THREADS or every core)")
    p.add_argument("--out", default=None,
                   help="JSON path (default benchmarks/results/<device>-<date>.json); an existing file is never "
                        "overwritten: -2, -3, ... is added to the name")
    p.add_argument("--plot", default=None, metavar="RESULTS_JSON", type=arg_type(_results_file),
                   help="render PNG charts from a results file instead of running")
    p.add_argument("--png", default=None, help="PNG path for --plot (default: next to the JSON)")
    p.add_argument("--table", default=None, metavar="RESULTS_JSON", type=arg_type(_results_file),
                   help="print the table of a results file instead of running (GPU results: with the traffic "
                        "model's prediction per row)")
    p.add_argument("--timing", choices=("auto", "interleaved", "sequential"), default="auto",
                   help="interleaved: every provider set up first, then timed round by round (robust to a "
                        "machine whose speed drifts; no per-provider peak memory); sequential: one provider "
                        "after another; auto (default): interleaved on CPU, sequential on CUDA")
    p.add_argument("--no-progress", action="store_true")


def parse_case(spec: str) -> Case:
    """``MODEL:MODE:BATCH:RES:DTYPE[:graphs]``; ArgumentError with the valid choices otherwise."""
    parts = spec.split(":")
    form = f"expected MODEL:train|infer:BATCH:RES:{'|'.join(DTYPES)}[:graphs]"
    if len(parts) not in (5, 6) or parts[1] not in ("train", "infer") or parts[4] not in DTYPES:
        raise ArgumentError(f"argument --case: {spec!r}: {form}")
    if not (parts[2].isdigit() and parts[3].isdigit() and int(parts[2]) > 0 and int(parts[3]) > 0):
        raise ArgumentError(f"argument --case: {spec!r}: BATCH and RES must be positive integers ({form})")
    if len(parts) == 6 and parts[5] != "graphs":
        raise ArgumentError(f"argument --case: {spec!r}: the optional sixth field can only be 'graphs' ({form})")
    try:
        check_model(parts[0])
    except ArgumentError as e:
        raise ArgumentError(f"argument --case: {spec!r}: {e.message}") from None
    return Case(parts[0], parts[1], int(parts[2]), int(parts[3]), parts[4], len(parts) == 6)


def main(args) -> int:
    if args.plot:
        with open(args.plot) as f:
            result = json.load(f)
        png = args.png or re.sub(r"\.json$", "", args.plot) + ".png"
        for path in plot(result, png):
            print("wrote", path)
        return 0
    if args.table:
        with open(args.table) as f:
            result = json.load(f)
        print(format_table(result, predictions(result)))
        return 0
    # every argument is checked before anything runs
    include = [p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None
    if include is not None:
        check_providers(include)
    cases = [parse_case(s) for s in args.case]
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cases = cases or default_cases(dev, args.quick)
    reps = args.reps or (3 if args.quick else 50 if dev.type == "cuda" else 10)
    min_time = args.min_time if args.min_time is not None else (1.0 if dev.type == "cuda" and not args.quick else 0.0)
    interleave = {"auto": None, "interleaved": True, "sequential": False}[args.timing]
    if include is not None:
        unusable = [p for p in include if p != "eager" and not any(len(_providers(c, dev, [p])) > 1 for c in cases)]
        if unusable:
            print(f"fusedres bench: not usable here, skipped: {', '.join(unusable)} (see `fusedres info`)")
    # the output path is fixed before the run and the file rewritten after every row, so an
    # interrupted run leaves the rows it finished; an existing file is never replaced
    out = unused_path(args.out or default_output({"device": device_name(dev), "date": _dt.datetime.now(
        _dt.timezone.utc).strftime("%Y-%m-%d"), **({"cpu": cpu_info()} if dev.type == "cpu" else {})}))
    result = run(cases, dev, reps, min_time, include=include, progress=not args.no_progress, interleave=interleave,
                 on_update=lambda res: write_json(out, res))
    print(format_table(result, predictions(result)))
    print("wrote", out)
    return 0 if not any(r["error"] for r in result["cases"]) else 1
