"""Build of fusedres: the Python package, the Triton kernels (as fusedres.triton_kernels) and
the C++/CUDA extension fusedres._C.

    pip install --no-build-isolation .        # torch must already be installed

Environment:
    FUSEDRES_SKIP_EXT=1     no extension at all (reference and triton backends only)
    FUSEDRES_FORCE_CUDA=1   build the CUDA sources even if torch has no CUDA (needs nvcc)
    TORCH_CUDA_ARCH_LIST    CUDA architectures, default "8.0;9.0a"
    MAX_JOBS                parallel compile jobs
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


def _extensions():
    if os.environ.get("FUSEDRES_SKIP_EXT", "0") == "1":
        print("fusedres: FUSEDRES_SKIP_EXT=1, building without the C++ extension")
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    force = os.environ.get("FUSEDRES_FORCE_CUDA", "0") == "1"
    with_cuda = force or (torch.version.cuda is not None and CUDA_HOME is not None)
    cpu_sources = ["csrc/bindings.cpp", "csrc/kernels/bn_cpu.cpp"]
    cxx = ["-O3", "-std=c++17"]
    common = dict(include_dirs=[os.path.join(ROOT, "csrc")])
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        cu = sorted(glob.glob("csrc/**/*.cu", recursive=True))
        cu = [s for s in cu if not s.startswith("csrc/tests/")]
        ext = CUDAExtension(
            "fusedres._C",
            cpu_sources + cu,
            extra_compile_args={"cxx": cxx + ["-DFUSEDRES_WITH_CUDA"], "nvcc": ["-O3", "-std=c++17", "-DFUSEDRES_WITH_CUDA"]},
            **common,
        )
        print(f"fusedres: building the extension with CUDA for {os.environ['TORCH_CUDA_ARCH_LIST']}")
    else:
        ext = CppExtension("fusedres._C", cpu_sources, extra_compile_args={"cxx": cxx}, **common)
        print("fusedres: building the extension without CUDA (CPU kernels only)")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    version=_version(),
    packages=["fusedres", "fusedres.triton_kernels"],
    package_dir={"fusedres": "fusedres", "fusedres.triton_kernels": "triton_kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
