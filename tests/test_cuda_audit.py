"""The compile-level audit of the cuda backend's kernels (``benchmarks/cuda_audit.py``): its
ptxas and SASS readers on hand-written snippets, the spill rule, and the committed report,
which must be clean and made from the kernel sources as they are now (the heavy tier
recompiles every source)."""

import importlib.util
import json
import pathlib
import shutil

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("cuda_audit", ROOT / "benchmarks" / "cuda_audit.py")
ca = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ca)

PTXAS = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z4gemmPf' for 'sm_90a'
ptxas info    : Function properties for _Z4gemmPf
    56 bytes stack frame, 52 bytes spill stores, 52 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 56 bytes cumulative stack size
ptxas info    : Compiling entry function '_Z5statsPKfPf' for 'sm_90a'
ptxas info    : Function properties for _Z5statsPKfPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 80 registers, used 1 barriers, 4096 bytes smem
ptxas info    : Compile time = 48.113 ms
"""

SASS = """\
\tcode for sm_90a
\t\tFunction : _Z4gemmPf
        /*0100*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0110*/                   HMMA.16816.F32.BF16 R16, R8, R14, R16 ;
\t\tFunction : _Z6hopperPf
        /*0100*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
\t\tFunction : _Z5statsPKfPf
        /*0100*/                   FADD R1, R2, R3 ;
"""


def test_ptxas_reader():
    info = ca.ptxas_info(PTXAS)
    assert set(info) == {"_Z4gemmPf", "_Z5statsPKfPf"}
    g = info["_Z4gemmPf"]
    assert (g["registers"], g["stack_frame"], g["spill_stores"], g["spill_loads"], g["shared"]) == (255, 56, 52, 52, 0)
    s = info["_Z5statsPKfPf"]
    assert (s["registers"], s["spill_stores"], s["shared"], s["barriers"]) == (80, 0, 4096, 1)


def test_sass_reader_and_mma_flavour():
    mma = ca.sass_mma(SASS)
    assert mma == {"_Z4gemmPf": {"HMMA": 2}, "_Z6hopperPf": {"HGMMA": 1}, "_Z5statsPKfPf": {}}
    assert [ca.mma_flavour(mma[k]) for k in ("_Z4gemmPf", "_Z6hopperPf", "_Z5statsPKfPf")] == [
        "mma.sync", "wgmma", "none"]


def _kernel(**kw):
    r = dict(source="csrc/kernels/x.cu", name="k", demangled="k", registers=64, spill_stores=0, spill_loads=0)
    r.update(kw)
    return r


def test_every_spill_is_a_violation():
    assert ca.violations([_kernel()]) == []
    assert "spills" in ca.violations([_kernel(spill_stores=4, spill_loads=4)])[0]
    assert "spills" in ca.violations([_kernel(spill_loads=4)])[0]


def test_cutlass_names_are_read_off_the_mangled_name():
    mangled = ("_ZN7cutlass6KernelINS_4conv6kernel29ImplicitGemmConvolutionFusionINS1_11threadblock33"
               "ImplicitGemmWgradFusionMultistageINS_4gemm9GemmShapeILi128ELi128ELi32EEENS_10bfloat16_tE"
               "NS6_4warp11MmaTensorOpINS7_ILi64ELi32ELi32EEEEEEEEvNT_6ParamsE")
    assert ca.short_name(mangled) == ("cutlass ImplicitGemmConvolutionFusion/ImplicitGemmWgradFusionMultistage "
                                      "bf16, tile 128x128x32, warp 64x32x32")


def _committed():
    files = sorted((ROOT / "benchmarks" / "results").glob("cuda-sm90a-*.json"))
    assert files, "no committed CUDA audit (python -m benchmarks.cuda_audit)"
    return files[-1], json.loads(files[-1].read_text())


def test_committed_audit_is_clean_and_current():
    path, report = _committed()
    assert report["sources_sha256"] == ca.sources_sha256(), (
        f"{path.name} was made from other kernel sources: rerun python -m benchmarks.cuda_audit")
    assert report["violations"] == [], report["violations"]
    assert set(report["sources"]) == set(ca.sources())
    kinds = {r["source"].rsplit("/", 1)[-1] for r in report["results"]}
    assert {"bn_cuda.cu", "bn_reduce_cuda.cu", "bn_backward_cuda.cu", "conv_wgrad_fused_bf16.cu"} <= kinds
    assert [r["name"] for r in report["results"] if r["spill_stores"] or r["spill_loads"]] == []
    convs = [r for r in report["results"] if r["source"].rsplit("/", 1)[-1].startswith("conv_")
             and "cutlass" in r["name"]]
    assert convs and all(r["mma"] in ("mma.sync", "wgmma") for r in convs)
    # the Hopper-native forward runs warpgroup MMA, with and without the residual source
    hopper = [r for r in report["results"] if "_sm90" in r["source"]]
    assert len(hopper) == 2 and all(r["mma"] == "wgmma" for r in hopper), [r["name"] for r in hopper]


@pytest.mark.heavy
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_the_sources_compile_clean_for_sm90a():
    report = ca.run(jobs=2)
    assert report["violations"] == [], "\n".join(report["violations"])
    assert report["sources_sha256"] == _committed()[1]["sources_sha256"]
