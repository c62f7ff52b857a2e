#!/usr/bin/env bash
# The GPU tier in one call, for a machine with a CUDA device and a CUDA build of torch
# (2.11+), triton 3.6+, nvcc: builds the extension with its CUDA kernels, runs the CUDA
# CTest, the whole test suite on the GPU (tests/test_gpu.py and the triton kernel tests
# run on CUDA tensors there), the block benchmarks at ResNet shapes, and records the
# autotuner's choices for the ResNet-50 layer shapes, and the side-by-side runner
# (fusedres bench; its JSON is what goes to benchmarks/results/ unchanged). Everything lands in $OUT (default
# ./gpu-out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export MAX_JOBS=${MAX_JOBS:-16} TRITON_INTERPRET=0
status=0
# STEPS: space-separated subset of: build ctest gpu-tests all-tests benchmarks runner configs
STEPS=${STEPS:-build ctest gpu-tests all-tests benchmarks runner configs}
step() {
  local name=$1; shift
  case " $STEPS " in *" $name "*) ;; *) echo "== $name (skipped)"; return 0 ;; esac
  echo "== $name"; "$@" || { echo "FAILED: $name"; status=1; }
}

{
  nvidia-smi
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1

step build bash -c "FUSEDRES_FORCE_CUDA=1 pip install --no-build-isolation --no-deps . > '$OUT/build.log' 2>&1"
step ctest bash -c "cmake -S . -B build/cmake -DFUSEDRES_WITH_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90a > '$OUT/ctest.log' 2>&1 \
  && cmake --build build/cmake -j8 >> '$OUT/ctest.log' 2>&1 && ctest --test-dir build/cmake --output-on-failure >> '$OUT/ctest.log' 2>&1"
step gpu-tests bash -c "pytest -q -x tests/test_gpu.py tests/test_triton.py --junitxml='$OUT/gpu-tests.xml' > '$OUT/gpu-tests.log' 2>&1"
step all-tests bash -c "pytest -q tests --junitxml='$OUT/all-tests.xml' > '$OUT/all-tests.log' 2>&1"
step benchmarks bash -c "FUSEDRES_BENCH_BATCH=256 FUSEDRES_BENCH_SCALE=1 pytest -q benchmarks/ \
  --benchmark-json='$OUT/bench-blocks.json' > '$OUT/bench-blocks.log' 2>&1"
step runner bash -c "fusedres bench --no-progress --out '$OUT/runner.json' > '$OUT/runner.log' 2>&1 \
  && fusedres bench --plot '$OUT/runner.json' --png '$OUT/runner.png' >> '$OUT/runner.log' 2>&1"
step configs python - "$OUT/triton-configs.json" <<'PY'
import json, sys, torch, torch.nn as nn, fusedres
from fusedres import triton_kernels as tk

def proj(cin, cout, s):
    return nn.Sequential(nn.Conv2d(cin, cout, 1, s, bias=False), nn.BatchNorm2d(cout))

blocks = [(fusedres.Bottleneck(64, 64, 1, proj(64, 256, 1)), 64, 56), (fusedres.Bottleneck(256, 64), 256, 56),
          (fusedres.Bottleneck(256, 128, 2, proj(256, 512, 2)), 256, 56), (fusedres.Bottleneck(512, 128), 512, 28),
          (fusedres.Bottleneck(512, 256, 2, proj(512, 1024, 2)), 512, 28), (fusedres.Bottleneck(1024, 256), 1024, 14),
          (fusedres.Bottleneck(1024, 512, 2, proj(1024, 2048, 2)), 1024, 14), (fusedres.Bottleneck(2048, 512), 2048, 7)]
for b, c, hw in blocks:
    m = fusedres.set_backend(b, "triton").cuda().to(torch.bfloat16).to(memory_format=torch.channels_last)
    x = torch.randn(256, c, hw, hw, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    m.train()(x.requires_grad_()).sum().backward()
    with torch.no_grad():
        m.eval()(x)
torch.cuda.synchronize()
json.dump(tk.chosen_configs(), open(sys.argv[1], "w"), indent=1)
print("recorded", sum(len(v) for v in tk.chosen_configs().values()), "configs")
PY
echo "gpu check status: $status"
exit $status
