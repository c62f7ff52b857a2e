"""Build of fusedres: the Python package, the Triton kernels (as fusedres.triton_kernels) and
the C++/CUDA extension fusedres._C.

    pip install --no-build-isolation .        # torch must already be installed

Environment:
    FUSEDRES_SKIP_EXT=1     no extension at all (reference and triton backends only)
    FUSEDRES_FORCE_CUDA=1   require the CUDA kernels: fail instead of falling back to a CPU-only
                            extension (needs a CUDA build of torch and the CUDA toolkit)
    TORCH_CUDA_ARCH_LIST    CUDA architectures, default "8.0;9.0a"
    MAX_JOBS                parallel compile jobs (ninja)
    FUSEDRES_CXX_STD        C++ standard of the extension, default c++17
    CUTLASS_DIR             CUTLASS headers for the CUDA convolution kernels (a checkout or its
                            include/ directory); default: the nvidia-cutlass wheel
                            (pip install --no-deps nvidia-cutlass==4.2.0.0). CUDA builds without
                            CUTLASS leave the convolutions to ATen (cuDNN).
"""

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _version():
    scope = {}
    with open(os.path.join(ROOT, "fusedres", "_version.py")) as f:
        exec(f.read(), scope)
    return scope["__version__"]


def _flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _cutlass_include():
    """(the CUTLASS include directory, its tools/util/include) (csrc/find_cutlass.py); None where absent."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_fusedres_find_cutlass", os.path.join(ROOT, "csrc", "find_cutlass.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    inc = mod.find_cutlass()
    return inc, mod.find_cutlass_util(inc) if inc is not None else None


def _extensions():
    if _flag("FUSEDRES_SKIP_EXT"):
        print("fusedres: FUSEDRES_SKIP_EXT=1, building without the C++ extension")
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    force = _flag("FUSEDRES_FORCE_CUDA")
    with_cuda = force or (torch.version.cuda is not None and CUDA_HOME is not None)
    std = "-std=" + os.environ.get("FUSEDRES_CXX_STD", "c++17")
    cpu_sources = [
        "csrc/bindings.cpp", "csrc/conv_bindings.cpp", "csrc/kernels/bn_cpu.cpp", "csrc/kernels/pool_cpu.cpp",
        "csrc/kernels/fold_cpu.cpp",
    ]
    cxx = ["-O3", std, "-fno-trapping-math"]
    common = dict(include_dirs=[os.path.join(ROOT, "csrc")])
    if force and (torch.version.cuda is None or CUDA_HOME is None):
        why = "torch is a CPU-only build" if torch.version.cuda is None else "no CUDA toolkit (set CUDA_HOME)"
        raise SystemExit(f"fusedres: FUSEDRES_FORCE_CUDA=1 but {why}; the CUDA extension cannot be built")
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        cu = sorted(glob.glob("csrc/**/*.cu", recursive=True))
        cu = [s for s in cu if not s.startswith(os.path.join("csrc", "tests"))]
        defs = ["-DFUSEDRES_WITH_CUDA"]
        cutlass, cutlass_util = _cutlass_include()
        if cutlass is not None:
            defs.append("-DFUSEDRES_WITH_CUTLASS")
            common["include_dirs"].append(cutlass)
            if cutlass_util is not None:  # the Hopper-native (CUTLASS 3.x) forward
                defs.append("-DFUSEDRES_WITH_CUTLASS_SM90")
                common["include_dirs"].append(cutlass_util)
        ext = CUDAExtension(
            "fusedres._C",
            cpu_sources + cu,
            extra_compile_args={
                "cxx": cxx + defs,
                "nvcc": ["-O3", std, "--expt-relaxed-constexpr"] + defs,
            },
            **common,
        )
        print(f"fusedres: building the extension with CUDA for {os.environ['TORCH_CUDA_ARCH_LIST']}")
        if cutlass is not None:
            print(f"fusedres: CUTLASS convolution kernels with the headers in {cutlass}")
        else:
            print(
                "fusedres: CUTLASS headers not found (set CUTLASS_DIR or pip install --no-deps "
                "nvidia-cutlass==4.2.0.0): convolutions will run through ATen"
            )
    else:
        ext = CppExtension("fusedres._C", cpu_sources, extra_compile_args={"cxx": cxx}, **common)
        print("fusedres: building the extension without CUDA (CPU kernels only)")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    version=_version(),
    packages=["fusedres", "fusedres.backends", "fusedres.triton_kernels"],
    package_dir={"fusedres": "fusedres", "fusedres.triton_kernels": "triton_kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
