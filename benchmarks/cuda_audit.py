"""Compile-level audit of the cuda backend's kernels for Hopper (sm_90a), no GPU needed.

Every torch-free CUDA source of ``csrc/kernels`` is compiled to an sm_90a cubin with the
flags of the extension build (CUTLASS included), and for every kernel in it this reads:

* registers, stack frame, spill stores and loads, static shared memory (``ptxas -v``);
* the matrix instructions in its machine code (``cuobjdump -sass``): ``HMMA`` (the Sm80
  ``mma.sync`` path that Hopper still runs) and ``HGMMA`` (Hopper's warpgroup MMA).

A kernel that spills is a violation (exit code 1): a spill is local-memory traffic in a
kernel whose whole point is to move less memory. There are no exceptions. The MMA flavour
is reported, not judged: the CUTLASS 2.x kernels are Sm80 kernels by design (benchmarks/README.md says
what that costs on Hopper). The report records a hash of the sources it was made from, so
a test can tell a stale report from a current one.

    python -m benchmarks.cuda_audit                     # -> benchmarks/results/cuda-sm90a-<date>.json
    python -m benchmarks.cuda_audit --out - --jobs 2    # JSON on stdout
    python -m benchmarks.cuda_audit --table benchmarks/results/cuda-sm90a-<date>.json

Needs nvcc (any CUDA 12.x/13.x), the CUTLASS headers (``csrc/find_cutlass.py``) and a
``cuobjdump`` (the toolkit's, else the copy bundled with triton).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import glob
import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Sequence

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARCH = "sm_90a"
FLAGS = ["-std=c++17", "-O3", "--expt-relaxed-constexpr", "-DFUSEDRES_WITH_CUDA", "-DFUSEDRES_WITH_CUTLASS",
         "-DFUSEDRES_WITH_CUTLASS_SM90"]


def sources() -> List[str]:
    """The kernel sources, relative to the checkout (the bindings hold no device code)."""
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(str(ROOT / "csrc" / "kernels" / "*.cu")))


def sources_sha256() -> str:
    """Hash of every file the kernels are built from (sources and headers of csrc/kernels)."""
    h = hashlib.sha256()
    files = sorted(glob.glob(str(ROOT / "csrc" / "kernels" / "*")))
    for f in files:
        h.update(os.path.relpath(f, ROOT).encode())
        h.update(pathlib.Path(f).read_bytes())
    return h.hexdigest()


# ------------------------------------------------------------------ readers


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:, used (\d+) barriers)?(?:, (\d+) bytes cumulative stack size)?"
                   r"(?:, (\d+) bytes smem)?")


def ptxas_info(log: str) -> Dict[str, dict]:
    """{mangled kernel name: registers, stack, spills, shared memory} from ``ptxas -v``.

    ptxas prints, per entry function: "Compiling entry function 'NAME' for 'sm_90a'", then
    "Function properties for NAME" with the stack frame and spill bytes, then "Used N
    registers, ... M bytes smem". Non-entry functions (device functions not inlined) also get
    "Function properties" lines; their spills count against the kernel being compiled."""
    out: Dict[str, dict] = {}
    current: Optional[str] = None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = m.group(1)
            out[current] = {"arch": m.group(2), "registers": None, "stack_frame": 0, "spill_stores": 0,
                            "spill_loads": 0, "shared": 0, "barriers": 0}
            continue
        if _PROPS.search(line):
            continue
        m = _FRAME.search(line)
        if m and current is not None:
            rec = out[current]
            # the kernel's own properties, or those of a device function it calls
            rec["stack_frame"] = max(rec["stack_frame"], int(m.group(1)))
            rec["spill_stores"] += int(m.group(2))
            rec["spill_loads"] += int(m.group(3))
            continue
        m = _USED.search(line)
        if m and current is not None:
            rec = out[current]
            rec["registers"] = int(m.group(1))
            rec["barriers"] = int(m.group(2) or 0)
            rec["shared"] = int(m.group(4) or 0)
    return out


_SASS_FN = re.compile(r"Function : (\S+)")
_MMA = re.compile(r"\b(HGMMA|HMMA|IMMA|DMMA)\.[A-Z0-9._]+")


def sass_mma(sass: str) -> Dict[str, Dict[str, int]]:
    """{mangled kernel name: {MMA opcode family: count}} from ``cuobjdump -sass``."""
    out: Dict[str, Dict[str, int]] = {}
    current = None
    for line in sass.splitlines():
        m = _SASS_FN.search(line)
        if m:
            current = m.group(1)
            out.setdefault(current, {})
            continue
        if current is None:
            continue
        for mm in _MMA.finditer(line):
            fam = mm.group(1)
            out[current][fam] = out[current].get(fam, 0) + 1
    return out


def mma_flavour(counts: Dict[str, int]) -> str:
    if counts.get("HGMMA"):
        return "wgmma"
    if counts.get("HMMA") or counts.get("IMMA") or counts.get("DMMA"):
        return "mma.sync"
    return "none"


def demangle(names: Sequence[str]) -> Dict[str, str]:
    filt = shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    res = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True)
    lines = res.stdout.splitlines()
    return {n: (lines[i] if i < len(lines) else n) for i, n in enumerate(names)}


def short_name(demangled: str) -> str:
    """A readable kernel name: CUTLASS kernels by their kernel and mainloop templates, element
    type and tile shapes (read off the mangled name, which c++filt gives up on for these),
    fusedres's own kernels by their name and template arguments."""
    if "ConvUniversal" in demangled and "Sm90" in demangled:  # CUTLASS 3.x
        main = re.search(r"(Mainloop\w+?ImplicitGemm)I", demangled)
        stages = re.search(r"ImplicitGemmIL\w+?_(\d)ELi(\d+)E", demangled)
        atom = re.search(r"MMA_(\d+x\d+x\d+)_", demangled)
        elem = "bf16" if "bfloat16_t" in demangled else ("f16" if "half_t" in demangled else "?")
        source = ", residual source" if "Sm90SrcFetch" in demangled else ""
        return (f"cutlass ConvUniversal/{main.group(1) if main else '?'} {elem}, "
                f"{stages.group(2) if stages else '?'} stages, wgmma {atom.group(1) if atom else '?'}{source}")
    if demangled.startswith("_ZN7cutlass") or demangled.startswith("cutlass::"):
        names = re.findall(r"(?:kernel|threadblock)\d+(ImplicitGemm\w+?)I", demangled)
        tiles = re.findall(r"GemmShapeILi(\d+)ELi(\d+)ELi(\d+)E", demangled)
        elem = "bf16" if "bfloat16_t" in demangled else ("f16" if "half_t" in demangled else "?")
        tile = "x".join(tiles[0]) if tiles else "?"
        wm = re.search(r"MmaTensorOpIN\w*?ILi(\d+)ELi(\d+)ELi(\d+)E", demangled)
        warp = "x".join(wm.groups()) if wm else "?"
        return f"cutlass {'/'.join(names[:2]) or '?'} {elem}, tile {tile}, warp {warp}"
    return re.sub(r"\s+", " ", demangled.replace("fusedres::(anonymous namespace)::", ""))[:160]


def violations(results: List[dict]) -> List[str]:
    out = []
    for r in results:
        if r["spill_stores"] or r["spill_loads"]:
            out.append(f"{r['source']}: {r['name']}: spills ({r['spill_stores']} B stored, "
                       f"{r['spill_loads']} B loaded, {r['registers']} registers)")
    return out


# ------------------------------------------------------------------ compile


def _tools():
    nvcc = os.environ.get("NVCC") or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    cuobjdump = shutil.which("cuobjdump")
    if cuobjdump is None:
        try:
            import triton

            cand = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
            cuobjdump = cand if os.path.exists(cand) else None
        except ImportError:
            cuobjdump = None
    if cuobjdump is None:
        raise SystemExit("cuda_audit: no cuobjdump (CUDA toolkit, or triton's bundled copy)")
    sys.path.insert(0, str(ROOT / "csrc"))
    from find_cutlass import find_cutlass, find_cutlass_util

    cutlass = find_cutlass()
    util = find_cutlass_util(cutlass) if cutlass is not None else None
    if cutlass is None or util is None:
        raise SystemExit("cuda_audit: CUTLASS headers or their tools/util/include not found (pip install --no-deps "
                         "nvidia-cutlass==4.2.0.0, or CUTLASS_DIR)")
    return nvcc, cuobjdump, [cutlass, util]


def audit_source(src: str, nvcc: str, cuobjdump: str, cutlass: Sequence[str], work: str) -> dict:
    cubin = os.path.join(work, src.replace("/", "_") + ".cubin")
    cmd = [nvcc, *FLAGS, f"-gencode=arch=compute_{ARCH[3:]},code={ARCH}", "-cubin", "-Xptxas", "-v",
           f"-I{ROOT / 'csrc'}", f"-I{ROOT / 'csrc' / 'kernels'}", *[f"-I{d}" for d in cutlass], str(ROOT / src),
           "-o", cubin]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"source": src, "error": proc.stderr[-4000:], "kernels": []}
    info = ptxas_info(proc.stderr)
    sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True).stdout
    mma = sass_mma(sass)
    names = demangle(sorted(info))
    kernels = []
    for mangled in sorted(info):
        rec = dict(info[mangled])
        counts = mma.get(mangled, {})
        rec.update(source=src, name=short_name(names[mangled]), demangled=names[mangled], mangled=mangled,
                   mma_counts=counts, mma=mma_flavour(counts))
        kernels.append(rec)
    return {"source": src, "error": None, "kernels": kernels}


def run(jobs: int) -> dict:
    import time

    nvcc, cuobjdump, cutlass = _tools()
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as work, cf.ThreadPoolExecutor(max(1, jobs)) as pool:
        per_source = list(pool.map(lambda s: audit_source(s, nvcc, cuobjdump, cutlass, work), sources()))
    results = [k for s in per_source for k in s["kernels"]]
    errors = [f"{s['source']}: compile failed\n{s['error']}" for s in per_source if s["error"]]
    return {
        "target": ARCH, "date": datetime.date.today().isoformat(), "nvcc": version,
        "cutlass": os.path.basename(os.path.dirname(os.path.dirname(cutlass[0]))) or cutlass[0],
        "sources": sources(), "sources_sha256": sources_sha256(), "wall_s": round(time.monotonic() - t0, 1),
        "violations": errors + violations(results), "results": results,
    }


def table(report: dict) -> str:
    """Markdown: one row per kernel of an audit report."""
    rows = ["| source | kernels | max registers | spilling | max static shared (B) | MMA |",
            "|---|---|---|---|---|---|"]
    by_source: Dict[str, List[dict]] = {}
    for r in report["results"]:
        by_source.setdefault(r["source"], []).append(r)
    for src, ks in by_source.items():
        spilling = [k for k in ks if k["spill_stores"] or k["spill_loads"]]
        mma = sorted({f"{k['mma']} ({', '.join(f'{n} {c}' for n, c in sorted(k['mma_counts'].items()))})"
                      for k in ks if k["mma"] != "none"}) or ["-"]
        names = "; ".join(sorted({k["name"] for k in ks})) if any(k["mma"] != "none" for k in ks) else str(len(ks))
        rows.append(f"| {os.path.basename(src)} | {names} | {max(k['registers'] or 0 for k in ks)} | "
                    f"{len(spilling)} | {max(k['shared'] for k in ks)} | {'; '.join(mma)} |")
    return "\n".join(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cuda_audit", description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    p.add_argument("--out", default=None, help="output JSON path, '-' for stdout "
                   "(default benchmarks/results/cuda-sm90a-<date>.json)")
    p.add_argument("--table", default=None, metavar="AUDIT_JSON", help="print the markdown table of a saved audit")
    a = p.parse_args(argv)
    if a.table:
        print(table(json.loads(pathlib.Path(a.table).read_text())))
        return 0
    report = run(a.jobs)
    text = json.dumps(report, indent=1)
    if a.out == "-":
        print(text)
    else:
        out = pathlib.Path(a.out) if a.out else ROOT / "benchmarks" / "results" / f"cuda-sm90a-{report['date']}.json"
        out.write_text(text + "\n")
        print(f"wrote {out}", file=sys.stderr)
    for v in report["violations"]:
        print("VIOLATION:", v, file=sys.stderr)
    print(f"{len(report['results'])} kernels from {len(report['sources'])} sources in {report['wall_s']} s",
          file=sys.stderr)
    return 1 if report["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
