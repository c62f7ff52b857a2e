"""Compile-level audit of the triton backend for Hopper (sm_90), on a machine without a GPU.

    python -m benchmarks.static_audit                       # full sweep -> benchmarks/results/static-sm90-<date>.json
    python -m benchmarks.static_audit --subset --dtypes bf16 --out -     # the CI subset, JSON on stdout
    python benchmarks/static_audit.py --all-configs         # also the configs the pruner drops

What it does: runs the triton backend's launchers for every convolution and BatchNorm call
of a channels_last ResNet-50 training step (forward and backward) and evaluation forward, at
batch 256 and 224x224, on meta tensors, recording each kernel launch instead of running it.
Each recorded call is specialised the way Triton specialises a launch (Triton's own binder:
integer arguments equal to 1 become constants, pointers and integers divisible by 16 get
``tt.divisibility = 16``) and compiled for ``GPUTarget("cuda", 90, 32)`` once per tile config
the tuner may pick for it (``_config.candidates``). Calls that specialise identically share
one compile. For every compile it reports:

- registers per thread, spill stores/loads and stack frame (``ptxas -v`` on the PTX),
- shared memory (``metadata.shared``) against the 227 KB an sm_90 block may use,
- the MMA flavour in the PTX: ``wgmma`` (warpgroup), ``mma.sync``, or none,
- the main loop (the innermost ``scf.for`` holding the MMA in the TTGIR): its nesting depth,
  whether a full wait (``ttg.async_wait {num = 0}`` / ``warp_group_dot_wait {pendings = 0}``)
  sits inside it or inside a loop around it, and whether its loads are asynchronous copies;
  "pipelined" means one loop, not nested, async copies, no full wait inside,
- the width of global loads: bytes per asynchronous copy of each 2-D operand tile (TTGIR
  ``contiguity`` x element size) and a histogram of ``ld.global`` / ``cp.async`` widths in
  the PTX.

``violations()`` lists what must not happen (a spill in a pickable config, a >= 4-warp
convolution config without wgmma, shared memory over the limit, an unpipelined convolution
main loop); the command exits non-zero if there is any. ``tests/test_static_audit.py`` runs
the subset in the default test tier and the full sweep in the heavy tier.

Compilation needs no GPU, but it must not run under ``TRITON_INTERPRET``: the command
re-runs itself without it when it is set.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, Optional, Sequence

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMEM_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (227 KB)
CAP = 90
DTYPES = ("bf16", "fp16")


def _kernel_dir() -> pathlib.Path:
    """Where the kernels audited live (see ``_kernels``), found without importing them."""
    if (ROOT / "triton_kernels" / "conv.py").exists():
        return ROOT / "triton_kernels"
    import importlib.util  # pragma: no cover - installed without the source tree

    return pathlib.Path(importlib.util.find_spec("fusedres.triton_kernels").origin).parent


def _kernels():
    """The checkout's kernels when run from a checkout, else the installed package's."""
    if (ROOT / "triton_kernels" / "conv.py").exists():
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        import triton_kernels as tk
    else:  # pragma: no cover - installed without the source tree
        from fusedres import triton_kernels as tk
    from importlib import import_module

    import_module(tk.__name__ + ".conv")
    import_module(tk.__name__ + ".bn")
    return tk


# ------------------------------------------------------------------ recording the calls


class Launch:
    """One recorded kernel launch: kernel, arguments, constexpr flags, tuning problem."""

    def __init__(self, kind, kernel, args, flags, problem, where):
        self.kind, self.kernel, self.args, self.flags, self.problem, self.where = kind, kernel, args, flags, problem, where


@contextlib.contextmanager
def _recording(tk, out: List[Launch], where: List[str]):
    cfg = tk._config
    saved = cfg.launch, cfg.launch_fixed

    def launch(kind, kernel, grid, args, flags, problem, stats_m=0):
        out.append(Launch(kind, kernel, args, dict(flags), dict(problem), where[0]))

    def launch_fixed(kernel, grid, args, meta):
        out.append(Launch("bn", kernel, args, dict(meta), None, where[0]))

    cfg.launch, cfg.launch_fixed = launch, launch_fixed
    try:
        yield
    finally:
        cfg.launch, cfg.launch_fixed = saved


def resnet50_calls(dtype: str, batch: int = 256, subset: bool = False) -> List[Launch]:
    """Every triton launch of a channels_last ResNet-50 (torchvision v1.5 layout) training
    step and evaluation forward, with the arguments fusedres's autograd passes."""
    import torch

    tk = _kernels()
    conv, bn = tk.conv, tk.bn
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    cl = torch.channels_last
    meta = torch.device("meta")
    f32 = torch.float32

    def act(n, c, h, w, d=dt):
        return torch.empty(n, c, h, w, dtype=d, device=meta).contiguous(memory_format=cl)

    def vec(c):
        return torch.empty(c, dtype=f32, device=meta)

    def weight(k, c, r):
        return torch.empty(k, c, r, r, dtype=dt, device=meta).contiguous(memory_format=cl)

    calls: List[Launch] = []
    where = [""]

    def geom(st, pad):
        return [st, st], [pad, pad], [1, 1], 1

    def train_conv(name, x, w, pro, st, pad):
        where[0] = f"{name} train"
        y, part = conv.conv_forward(x, w, None, None, *pro, *geom(st, pad), False, cl, stats=True)
        c = y.shape[1]
        stats = bn.bn_finalize(part, vec(c), vec(c), vec(c), vec(c), 0.1, 1e-5)
        return y, stats

    def coefs(c):
        return torch.empty(3, c, dtype=f32, device=meta)

    with _recording(tk, calls, where):
        n = batch
        # stem: 7x7/2 conv, BN, ReLU (the input needs no gradient)
        x = act(n, 3, 224, 224)
        w = weight(64, 3, 7)
        y, st = train_conv("stem", x, w, (None, None, False), 2, 3)
        out = bn.bn_add_act(y, st[2], st[3], None, None, None, None, True)
        where[0] = "stem train"
        sg, sgx = bn.bn_backward_reduce(out, y, st[0], st[1], st[2], st[3], out, True, None)
        dy = bn.bn_backward_apply(out, y, st[0], st[1], st[2], st[3], out, True, None, sg, sgx)
        conv.conv_wgrad(dy, x, None, None, False, list(w.shape), *geom(2, 3))
        where[0] = "stem eval"
        conv.conv_forward(x, w, vec(64).to(dt), None, None, None, False, *geom(2, 3), True, cl, stats=False)
        # ReLU backward from the output: pre-activation blocks that end in a ReLU (ResNet-50's
        # post-activation blocks store it from the last BatchNorm's apply instead)
        where[0] = "act_grad"
        bn.act_grad(out, out)

        inp, hw = 64, 56
        stages = [(3, 64, 1), (4, 128, 2), (6, 256, 2), (3, 512, 2)]
        if subset:
            stages = [(2, 64, 1)]  # a projecting and an identity block
        for si, (blocks, width, stride0) in enumerate(stages):
            for bi in range(blocks):
                name = f"layer{si + 1}.{bi}"
                st_ = stride0 if bi == 0 else 1
                outp = width * 4
                project = bi == 0
                x = act(n, inp, hw, hw)
                w1, w2, w3 = weight(width, inp, 1), weight(width, width, 3), weight(outp, width, 1)
                # training forward
                y1, s1 = train_conv(name + ".conv1", x, w1, (None, None, False), 1, 0)
                y2, s2 = train_conv(name + ".conv2", y1, w2, (s1[2], s1[3], True), st_, 1)
                y3, s3 = train_conv(name + ".conv3", y2, w3, (s2[2], s2[3], True), 1, 0)
                res, rs, rt = x, None, None
                if project:
                    wd = weight(outp, inp, 1)
                    yd, sd = train_conv(name + ".downsample", x, wd, (None, None, False), st_, 0)
                    res, rs, rt = yd, sd[2], sd[3]
                where[0] = f"{name} train"
                out = bn.bn_add_act(y3, s3[2], s3[3], res, rs, rt, None, True)
                # training backward (fusedres.autograd.PostActBlock.backward)
                dout = torch.empty_like(out)
                sg, sgx = bn.bn_backward_reduce(dout, y3, s3[0], s3[1], s3[2], s3[3], out, True, None)
                # an identity shortcut's gradient (dout through the ReLU) is stored by this apply
                g_res = None if project else torch.empty_like(y3)
                dy3 = bn.bn_backward_apply(dout, y3, s3[0], s3[1], s3[2], s3[3], out, True, None, sg, sgx, None, g_res)
                if project:
                    sg, sgx = bn.bn_backward_reduce(dout, yd, sd[0], sd[1], sd[2], sd[3], out, True, None)
                    dyd = bn.bn_backward_apply(dout, yd, sd[0], sd[1], sd[2], sd[3], out, True, None, sg, sgx)
                    where[0] = f"{name}.downsample train"
                    conv.conv_wgrad(dyd, x, None, None, False, list(wd.shape), *geom(st_, 0))
                    dx_short = conv.conv_dgrad(dyd, wd, list(x.shape), *geom(st_, 0), cl)
                else:
                    dx_short = g_res
                where[0] = f"{name}.conv3 train"
                conv.conv_wgrad(dy3, y2, s2[2], s2[3], True, list(w3.shape), *geom(1, 0))
                d2 = conv.conv_dgrad(dy3, w3, list(y2.shape), *geom(1, 0), cl)
                where[0] = f"{name} train"
                bn.bn_backward_reduce(d2, y2, s2[0], s2[1], s2[2], s2[3], None, True, None)
                where[0] = f"{name}.conv2 train"
                pend = (y2, s2[2], s2[3], coefs(width))
                d1 = conv.conv_dgrad(d2, w2, list(y1.shape), *geom(st_, 1), cl, bn=pend)
                conv.conv_wgrad(d2, y1, s1[2], s1[3], True, list(w2.shape), *geom(st_, 1), bn=pend)
                where[0] = f"{name} train"
                bn.bn_backward_reduce(d1, y1, s1[0], s1[1], s1[2], s1[3], None, True, None)
                where[0] = f"{name}.conv1 train"
                pend = (y1, s1[2], s1[3], coefs(width))
                conv.conv_dgrad(d1, w1, list(x.shape), *geom(1, 0), cl, bn=pend, add=dx_short)  # + shortcut
                conv.conv_wgrad(d1, x, None, None, False, list(w1.shape), *geom(1, 0), bn=pend)
                # evaluation forward (BatchNorm folded: bias, ReLU, residual in the epilogue)
                where[0] = f"{name} eval"
                h1 = conv.conv_forward(x, w1, vec(width).to(dt), None, None, None, False, *geom(1, 0), True, cl,
                                       stats=False)
                h2 = conv.conv_forward(h1, w2, vec(width).to(dt), None, None, None, False, *geom(st_, 1), True, cl,
                                       stats=False)
                r = x
                if project:
                    r = conv.conv_forward(x, wd, vec(outp).to(dt), None, None, None, False, *geom(st_, 0), False,
                                          cl, stats=False)
                conv.conv_forward(h2, w3, vec(outp).to(dt), r, None, None, False, *geom(1, 0), True, cl, stats=False)
                inp, hw = outp, hw // st_
    return calls


# ------------------------------------------------------------------ specialisation and jobs


def _binder(kernel, backend):
    from triton.runtime.jit import create_function_from_signature

    return create_function_from_signature(kernel.signature, kernel.params, backend)


def specialise(kernel, args, kwargs, backend):
    """(signature, constexprs, attrs, options) exactly as ``kernel[grid](*args, **kwargs)``
    would compile them (Triton's own binder and argument packing)."""
    bound, spec, opts = _binder(kernel, backend)(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, dict(kwargs), bound, spec, opts)
    return signature, constexprs, attrs, options


def _kernel_kind(name: str) -> str:
    return {"_conv_fwd_kernel": "fwd", "_conv_dgrad_kernel": "dgrad", "_conv_wgrad_kernel": "wgrad"}.get(name, name)


def _variant(name: str, flags: Dict[str, object]) -> str:
    keep = ("HAS_BIAS", "HAS_RES", "HAS_PRO", "IN_RELU", "RELU", "STATS", "IS_1X1", "DY_PRO", "TAP_COLS", "UPDATE",
            "DUAL", "HAS_OUT", "HAS_SAMPLE", "OUT_CL", "MERGE_S", "X_ROWS", "GATHER")
    on = [k for k in keep if flags.get(k)]
    return ",".join(on) or "-"


def make_jobs(dtypes: Sequence[str], subset: bool, all_configs: bool) -> List[dict]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    tk = _kernels()
    cfg = tk._config
    backend = make_backend(GPUTarget("cuda", CAP, 32))
    jobs: Dict[tuple, dict] = {}
    for dtype in dtypes:
        for call in resnet50_calls(dtype, subset=subset):
            name = call.kernel.__name__
            if call.kind == "bn":
                configs = [(None, True, dict(call.flags))]
            else:
                pick = cfg.candidates(call.kind, call.problem, call.flags)
                every = cfg.hopper_configs(call.kind) + [c for c in pick if c not in cfg.hopper_configs(call.kind)] \
                    if all_configs else pick
                configs = [(c, c in pick, dict(call.flags, **c.meta(), **c.options())) for c in every]
                if subset:
                    # the CI subset: the config used without benchmarking (FUSEDRES_TRITON_TUNE=off)
                    keep = cfg.heuristic(call.kind, call.problem, call.flags)
                    configs = [t for t in configs if t[0] == keep]
            for c, pickable, kwargs in configs:
                sig, constexprs, attrs, options = specialise(call.kernel, call.args, kwargs, backend)
                key = (name, tuple(sorted(sig.items())), tuple(sorted(constexprs.items())),
                       tuple(sorted((k, str(v)) for k, v in attrs.items())), options.num_warps, options.num_stages)
                job = jobs.get(key)
                if job is None:
                    job = jobs[key] = dict(
                        kernel=name, module=call.kernel.__module__, kind=_kernel_kind(name), dtype=dtype,
                        variant=_variant(name, kwargs), config=repr(c) if c is not None else _bn_meta(kwargs),
                        pickable=pickable, signature=sig, constexprs=constexprs, attrs=attrs,
                        options={"num_warps": options.num_warps, "num_stages": options.num_stages},
                        calls=[],
                    )
                job["pickable"] = job["pickable"] or pickable
                if call.where not in job["calls"]:
                    job["calls"].append(call.where)
    del triton
    return list(jobs.values())


def _bn_meta(kwargs):
    return " ".join(f"{k}={v}" for k, v in kwargs.items() if k.startswith(("BLOCK", "TILES", "num_")))


# ------------------------------------------------------------------ compile and analyse


def _ptxas_usage(ptx: str) -> Dict[str, int]:
    import triton

    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(CAP).path
    except Exception:  # pragma: no cover - other triton layouts
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    arch = "sm_90a"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(d, "k.cubin")],
                              capture_output=True, text=True, check=True)
    log = proc.stderr + proc.stdout

    def grab(pat):
        m = re.search(pat, log)
        return int(m.group(1)) if m else 0

    return {
        "registers": grab(r"Used (\d+) registers"),
        "spill_stores": grab(r"(\d+) bytes spill stores"),
        "spill_loads": grab(r"(\d+) bytes spill loads"),
        "stack_frame": grab(r"(\d+) bytes stack frame"),
    }


_DOT = re.compile(r"\b(tt\.dot|ttng\.warp_group_dot)\s")
_FULL_WAIT = re.compile(r"(ttg\.async_wait\b.*\{num = 0 : i32\})|(warp_group_dot_wait\b.*\{pendings = 0 : i32\})")
_ASYNC = re.compile(r"\b(ttg\.async_copy_global_to_local|ttng\.async_tma_copy_global_to_local)\b")
_COPY = re.compile(r"ttg\.async_copy_global_to_local .*\{contiguity = (\d+) : i32\} : tensor<([0-9x]+)x!tt\.ptr<(\w+)>")
_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "f64": 8, "i32": 4, "i64": 8, "i8": 1, "i1": 1}


def main_loop(ttgir: str) -> dict:
    """Loop structure around the MMA ops of a TTGIR module (see the module doc)."""
    stack: List[dict] = []
    loops: List[dict] = []
    for line in ttgir.splitlines():
        s = line.strip()
        if stack:
            dot = bool(_DOT.search(s))
            wait = bool(_FULL_WAIT.search(s))
            cp = bool(_ASYNC.search(s))
            for fr in stack:
                if fr["for"]:
                    fr["dot"] |= dot
                    fr["full_wait"] |= wait
                    fr["async"] |= cp
        net = s.count("{") - s.count("}")
        if net > 0:
            depth = sum(fr["for"] for fr in stack)
            fr = {"for": " scf.for " in f" {s}", "dot": False, "full_wait": False, "async": False,
                  "depth": depth + 1, "inner": []}
            for parent in stack:
                parent["inner"].append(fr)
            stack.append(fr)
        elif net < 0 and stack:
            for _ in range(-net):
                if stack:
                    fr = stack.pop()
                    if fr["for"]:
                        loops.append(fr)
    with_dot = [fr for fr in loops if fr["dot"]]
    # main loops: MMA loops with no inner MMA loop
    mains = [fr for fr in with_dot if not any(c["for"] and c["dot"] for c in fr["inner"])]
    if not mains:
        return {"mma_loops": 0, "depth": 0, "full_wait_inside": False, "async_copies": False, "pipelined": False}
    depth = max(fr["depth"] for fr in mains)
    full_wait = any(fr["full_wait"] for fr in with_dot)  # inside the main loop or a loop around it
    async_ = all(fr["async"] for fr in mains)
    return {"mma_loops": len(mains), "depth": depth, "full_wait_inside": full_wait, "async_copies": async_,
            "pipelined": len(mains) == 1 and depth == 1 and async_ and not full_wait}


def load_widths(ttgir: str, ptx: str) -> dict:
    copies = collections.Counter()
    for m in _COPY.finditer(ttgir):
        contig, shape, ty = int(m.group(1)), m.group(2), m.group(3)
        if shape.count("x") == 1:  # 2-D operand tiles
            copies[f"{shape} {ty}: {contig * _BYTES.get(ty, 0)} B"] += 1
    ld = collections.Counter()
    for m in re.finditer(r"\bld\.global((?:\.[a-z0-9]+)*)\s", ptx):
        parts = m.group(1).split(".")
        vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
        size = next((int(p[1:]) for p in parts if re.fullmatch(r"[bfsu]\d+", p)), 0)
        ld[f"ld.global {vec * size}-bit"] += 1
    for m in re.finditer(r"\bcp\.async\.c[ag]\.shared\.global[^\[]*\[[^\]]+\],\s*\[[^\]]+\],\s*(\d+)", ptx):
        ld[f"cp.async {int(m.group(1))}-byte"] += 1
    op_bytes = [int(k.rsplit(": ", 1)[1].split()[0]) for k in copies]
    return {"operand_copies": dict(sorted(copies.items())), "min_operand_copy_bytes": min(op_bytes) if op_bytes else None,
            "ptx": dict(sorted(ld.items()))}


def mma_flavour(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync\b", ptx):
        return "mma.sync"
    return "none"


def compile_job(job: dict) -> dict:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    _kernels()
    fn = getattr(importlib.import_module(job["module"]), job["kernel"])
    t0 = time.time()
    src = ASTSource(fn, job["signature"], job["constexprs"], job["attrs"])
    k = triton.compile(src, target=GPUTarget("cuda", CAP, 32), options=job["options"])
    secs = time.time() - t0
    ttgir, ptx = k.asm["ttgir"], k.asm["ptx"]
    res = {key: job[key] for key in ("kernel", "kind", "dtype", "variant", "config", "pickable", "options")}
    res["calls"] = job["calls"][:6] + ([f"... {len(job['calls']) - 6} more"] if len(job["calls"]) > 6 else [])
    res["n_calls"] = len(job["calls"])
    res.update(_ptxas_usage(ptx))
    res["shared"] = int(k.metadata.shared)
    res["mma"] = mma_flavour(ptx)
    res["main_loop"] = main_loop(ttgir) if job["kind"] in ("fwd", "dgrad", "wgrad") else None
    res["loads"] = load_widths(ttgir, ptx)
    res["compile_s"] = round(secs, 2)
    return res


def violations(results: Sequence[dict]) -> List[str]:
    """What the audit forbids, one line per finding (empty: clean)."""
    bad = []
    for r in results:
        if not r["pickable"]:
            continue
        tag = f"{r['kernel']} [{r['dtype']} {r['variant']}] {r['config']}"
        if r["spill_stores"] or r["spill_loads"]:
            bad.append(f"{tag}: spills {r['spill_stores']} B stored / {r['spill_loads']} B loaded")
        if r["shared"] > SMEM_LIMIT:
            bad.append(f"{tag}: {r['shared']} B shared memory > {SMEM_LIMIT}")
        if r["kind"] in ("fwd", "dgrad", "wgrad"):
            if r["options"]["num_warps"] >= 4 and r["mma"] != "wgmma":
                bad.append(f"{tag}: {r['options']['num_warps']} warps but MMA is {r['mma']}, not wgmma")
            if not r["main_loop"]["pipelined"]:
                bad.append(f"{tag}: main loop not pipelined {r['main_loop']}")
    return bad


def summary(results: Sequence[dict]) -> List[dict]:
    """One row per (kernel kind, dtype) for the README table."""
    rows = collections.OrderedDict()
    for r in results:
        if not r["pickable"]:
            continue
        key = (r["kind"], r["dtype"])
        row = rows.setdefault(key, {"kind": r["kind"], "dtype": r["dtype"], "compiles": 0, "spilling": 0,
                                    "max_spill_bytes": 0, "max_registers": 0, "max_shared": 0, "wgmma": 0,
                                    "mma_compiles": 0, "pipelined": 0, "loops": 0, "min_operand_copy_bytes": None,
                                    "ptx_load_bits": collections.Counter()})
        row["compiles"] += 1
        sp = max(r["spill_stores"], r["spill_loads"])
        row["spilling"] += bool(sp)
        row["max_spill_bytes"] = max(row["max_spill_bytes"], sp)
        row["max_registers"] = max(row["max_registers"], r["registers"])
        row["max_shared"] = max(row["max_shared"], r["shared"])
        if r["kind"] in ("fwd", "dgrad", "wgrad"):
            row["mma_compiles"] += 1
            row["wgmma"] += r["mma"] == "wgmma"
            row["loops"] += 1
            row["pipelined"] += bool(r["main_loop"]["pipelined"])
        mb = r["loads"]["min_operand_copy_bytes"]
        if mb is not None:
            cur = row["min_operand_copy_bytes"]
            row["min_operand_copy_bytes"] = mb if cur is None else min(cur, mb)
        for k, v in r["loads"]["ptx"].items():
            if k.startswith("ld.global"):
                row["ptx_load_bits"][k] += v
    out = []
    for row in rows.values():
        row["ptx_load_bits"] = dict(sorted(row["ptx_load_bits"].items()))
        out.append(row)
    return out


def sources_sha256() -> str:
    """Hash of the kernel sources the audit compiled (a committed audit must match them)."""
    import hashlib

    h = hashlib.sha256()
    base = _kernel_dir()
    for name in SOURCES:
        h.update(name.encode() + b"\0" + (base / name).read_bytes())
    return h.hexdigest()


SOURCES = ("_common.py", "_config.py", "bn.py", "conv.py")


def run(dtypes: Sequence[str], subset: bool, all_configs: bool, jobs: int) -> dict:
    import torch
    import triton

    t0 = time.time()
    work = make_jobs(dtypes, subset, all_configs)
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as ex:
        results = list(ex.map(compile_job, work, chunksize=1))
    results.sort(key=lambda r: (r["kind"], r["dtype"], r["variant"], r["config"]))
    return {
        "target": f"cuda sm_{CAP} (GPUTarget('cuda', {CAP}, 32)), no GPU: compile only",
        "date": datetime.date.today().isoformat(),
        "triton": triton.__version__, "torch": torch.__version__,
        "model": "ResNet-50 v1.5, channels_last, batch 256, 224x224: training step and evaluation forward",
        "dtypes": list(dtypes), "subset": subset, "all_configs": all_configs,
        "sources": [f"triton_kernels/{n}" for n in SOURCES], "sources_sha256": sources_sha256(),
        "shared_limit": SMEM_LIMIT,
        "wall_s": round(time.time() - t0, 1), "jobs": jobs,
        "violations": violations(results),
        "summary": summary(results),
        "results": results,
    }


def table(report: dict) -> str:
    """Markdown: one row per kernel kind and dtype of an audit report (its ``summary``)."""
    rows = ["| kernel | dtype | compiles | spilling | max registers | max shared (B) | wgmma / MMA compiles "
            "| pipelined / loops | narrowest operand copy |", "|---|---|---|---|---|---|---|---|---|"]
    for s in report["summary"]:
        copy = "-" if s["min_operand_copy_bytes"] is None else f"{s['min_operand_copy_bytes']} B"
        mma = f"{s['wgmma']} / {s['mma_compiles']}" if s["mma_compiles"] else "-"
        loops = f"{s['pipelined']} / {s['loops']}" if s["loops"] else "-"
        rows.append(f"| {s['kind']} | {s['dtype']} | {s['compiles']} | {s['spilling']} | {s['max_registers']} | "
                    f"{s['max_shared']} | {mma} | {loops} | {copy} |")
    return "\n".join(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.static_audit", description=__doc__.splitlines()[0])
    p.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated: bf16,fp16")
    p.add_argument("--subset", action="store_true", help="CI subset: stem, layer1.0 and layer1.1, the heuristic config")
    p.add_argument("--all-configs", action="store_true", help="also compile the configs the pruner drops")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    p.add_argument("--out", default=None, help="output JSON path, '-' for stdout "
                   "(default benchmarks/results/static-sm90-<date>.json)")
    p.add_argument("--table", default=None, metavar="AUDIT_JSON", help="print the markdown table of a saved audit")
    a = p.parse_args(argv)
    if a.table:
        print(table(json.loads(pathlib.Path(a.table).read_text())))
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:])],
                               env=env)
    report = run([d for d in a.dtypes.split(",") if d], a.subset, a.all_configs, a.jobs)
    text = json.dumps(report, indent=1, sort_keys=False)
    if a.out == "-":
        print(text)
    else:
        out = pathlib.Path(a.out) if a.out else ROOT / "benchmarks" / "results" / f"static-sm90-{report['date']}.json"
        out.write_text(text + "\n")
        print(f"wrote {out}", file=sys.stderr)
    for v in report["violations"]:
        print("VIOLATION:", v, file=sys.stderr)
    for row in report["summary"]:
        print(f"{row['kind']:>22} {row['dtype']}: {row['compiles']:3d} compiles, {row['spilling']} spilling, "
              f"regs <= {row['max_registers']}, smem <= {row['max_shared']}, wgmma {row['wgmma']}/"
              f"{row['mma_compiles']}, pipelined {row['pipelined']}/{row['loops']}, min operand copy "
              f"{row['min_operand_copy_bytes']} B", file=sys.stderr)
    print(f"{len(report['results'])} compiles in {report['wall_s']} s", file=sys.stderr)
    return 1 if report["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
