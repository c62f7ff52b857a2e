#!/usr/bin/env bash
# Compile every CUDA source for Hopper (sm_90a) and Ampere (sm_80; the Hopper-native
# *_sm90* sources for sm_90a only) with nvcc, without a GPU,
# so CUDA code cannot rot on machines that never run it. Binding sources get torch's
# headers (present in CPU wheels too); every source gets the CUTLASS headers, which must be
# found (csrc/find_cutlass.py: CUTLASS_DIR or `pip install --no-deps nvidia-cutlass==4.2.0.0`),
# so the CUTLASS convolution kernels are compiled with FUSEDRES_WITH_CUTLASS. Nothing is
# linked or run. Prints each file's compile time.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
TORCH_INC=$(python -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I'+p for p in include_paths()))")
# CPU wheels of torch ship c10/cuda headers but not the one header the CUDA build generates;
# for this compile-only check supply it as CUDA builds define it (shared libraries).
if ! python -c "import torch, os, sys; sys.exit(0 if os.path.exists(os.path.join(os.path.dirname(torch.__file__), 'include/c10/cuda/impl/cuda_cmake_macros.h')) else 1)"; then
  mkdir -p "$OUT/gen/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$OUT/gen/c10/cuda/impl/cuda_cmake_macros.h"
  TORCH_INC="$TORCH_INC -I$OUT/gen"
fi
PY_INC=$(python -c "import sysconfig; print(sysconfig.get_paths()['include'])")
if ! CUTLASS_INC=$(python csrc/find_cutlass.py) || ! CUTLASS_UTIL=$(python csrc/find_cutlass.py --util); then
  echo "CUDA compile check needs the CUTLASS headers and their tools/util/include (see above)" >&2
  exit 1
fi
GENCODE="-gencode arch=compute_90a,code=sm_90a -gencode arch=compute_80,code=sm_80"
mapfile -t SOURCES < <(find csrc -name '*.cu' | sort)
echo "compiling ${#SOURCES[@]} CUDA sources with $("$NVCC" --version | tail -1)"
compile() {
  local src=$1 start=$SECONDS
  local gencode=$GENCODE
  # the Hopper-native kernels (CUTLASS 3.x) are for sm_90a alone
  case "$src" in *_sm90*) gencode="-gencode arch=compute_90a,code=sm_90a" ;; esac
  local flags="-std=c++17 -O3 $gencode -Icsrc -Icsrc/kernels -I$CUTLASS_INC -I$CUTLASS_UTIL -DFUSEDRES_WITH_CUDA"
  flags="$flags -DFUSEDRES_WITH_CUTLASS -DFUSEDRES_WITH_CUTLASS_SM90"
  flags="$flags --expt-relaxed-constexpr"
  if grep -q '<torch/\|<ATen/' "$src"; then
    flags="$flags $TORCH_INC -I$PY_INC -D_GLIBCXX_USE_CXX11_ABI=1 -diag-suppress=20012"
  fi
  local obj="$OUT/$(echo "$src" | tr '/' '_').o"
  if "$NVCC" $flags -c "$src" -o "$obj" 2> "$obj.log"; then
    echo "  ok   $src ($((SECONDS - start)) s)"
  else
    echo "  FAIL $src"; cat "$obj.log"; return 1
  fi
}
export -f compile
export NVCC OUT TORCH_INC PY_INC GENCODE CUTLASS_INC CUTLASS_UTIL
start_all=$SECONDS
if ! printf '%s\n' "${SOURCES[@]}" | xargs -P 2 -I{} bash -c 'compile "$@"' _ {}; then
  echo "CUDA compile check FAILED" >&2
  exit 1
fi
echo "all ${#SOURCES[@]} CUDA sources compiled in $((SECONDS - start_all)) s"
