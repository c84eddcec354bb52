#!/usr/bin/env bash
# The static kernel report, without a GPU: compiles every kernels/*.cu for
# sm_90 with the pinned nvcc/ptxas (scripts/cuda-toolchain.sh, the flags of
# build.rs), disassembles it with cuobjdump (NVIDIA's PyPI wheels, pinned,
# cached in $TUNEFUSE_CACHE/cuda-tools), and prints per kernel: registers,
# the occupancy they allow, spills, stack, static shared memory, global
# loads and stores by width, MUFU, barriers, shuffles, HMMA and
# asynchronous copies (static counts: instructions in the code, not
# executed ones). scripts/kernel_report.py holds the rules:
#   - spills at most 8 bytes, but for the kernels it names with the reason,
#   - every bf16/f16 adapter kernel that multiplies matrices runs on tensor
#     cores (HMMA), the f32 ones have none,
#   - kernels written to load 16 (or 8) bytes at a time show such loads.
#
#   scripts/kernel-report.sh            print (and write target/kernel_report.json)
#   scripts/kernel-report.sh --check    also fail when a rule is broken (CI)
#   scripts/kernel-report.sh --record   also write bench/kernel_report.json
set -euo pipefail
cd "$(dirname "$0")/.."
check=""
record=0
for a in "$@"; do
  case "$a" in
    --check) check=--check ;;
    --record) record=1; check=--check ;;
    *) echo "kernel-report: unknown argument $a" >&2; exit 2 ;;
  esac
done
cache="${TUNEFUSE_CACHE:-$HOME/.cache/tunefuse}"
tools="$cache/cuda-tools"
source "$(scripts/cuda-toolchain.sh --env-file)"
# cuobjdump 13.0 is not on PyPI; 13.2 reads sm_90 cubins from ptxas 13.0.
if [ ! -x "$tools/nvidia/cu13/bin/cuobjdump" ]; then
  echo "kernel-report: installing cuobjdump 13.2.51 into $tools" >&2
  python3 -m pip install -q --disable-pip-version-check --target "$tools" \
    nvidia-cuda-cuobjdump==13.2.51
fi
export PATH="$tools/nvidia/cu13/bin:$PATH"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for src in kernels/*.cu; do
  stem=$(basename "$src" .cu)
  "$NVCC" -cubin -arch=sm_90 -O3 -std=c++17 --expt-relaxed-constexpr -Xptxas -v -I kernels \
    "$src" -o "$work/$stem.cubin" 2>"$work/$stem.ptxas" ||
    { cat "$work/$stem.ptxas" >&2; echo "kernel-report: nvcc failed on $src" >&2; exit 1; }
  cuobjdump -sass "$work/$stem.cubin" >"$work/$stem.sass"
done
target="${CARGO_TARGET_DIR:-target}"
mkdir -p "$target"
KERNEL_REPORT_STAMP="$(date -u +%F) $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- kernels || echo +changes), $("$NVCC" --version | grep -o 'release [0-9.]*')" \
  python3 scripts/kernel_report.py "$work" "$target/kernel_report.json" $check
if [ "$record" = 1 ]; then
  cp "$target/kernel_report.json" bench/kernel_report.json
  echo "kernel-report: wrote bench/kernel_report.json" >&2
fi
