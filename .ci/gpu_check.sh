#!/usr/bin/env bash
# The GPU check in one command, sized for a machine lent for minutes with no package index:
# installs the carried wheels (.whl/, the CUTLASS headers), builds the extension for sm_90a
# while the triton kernels are checked from a copy of the sources, then block correctness
# of every backend, the runner's ResNet-50 rows, and whatever else fits in the time budget
# (default 510 s), each result written as soon as it exists. Steps, files and how to carry
# the wheels: benchmarks/gpu_check.py and benchmarks/README.md.
#
#   bash .ci/gpu_check.sh                           # into $OUT (default /tmp/fusedres-gpu-out)
#   bash .ci/gpu_check.sh --steps cuda-fp16,gpu-tests   # a continuation (also STEPS=...)
#   bash .ci/gpu_check.sh --dry-run --out /tmp/x    # the rehearsal on CPU (CI runs it)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec python3 benchmarks/gpu_check.py "$@"
