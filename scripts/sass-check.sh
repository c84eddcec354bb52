#!/usr/bin/env bash
# Checks the machine code of kernels/adapter.cu for sm_90 without a GPU:
# compiles it to a cubin with the pinned nvcc/ptxas (scripts/cuda-toolchain.sh),
# disassembles it with cuobjdump + nvdisasm (NVIDIA's PyPI wheels, pinned,
# cached in $TUNEFUSE_CACHE/cuda-tools), and fails unless
#   - every bf16/f16 adapter kernel that multiplies matrices runs on tensor
#     cores (HMMA instructions in its SASS),
#   - the f32 kernels have none (they are the full-precision SIMT path),
#   - ptxas reports at most 8 bytes of spills in the kernels of the fast path
#     (r ≤ 128, warp tiles nf1..nf8) and at most 64 bytes in the r ∈ (128,
#     256] ones (nf16: 128 f32 accumulators per thread). The 8 bytes seen
#     (2026-11-26, e.g. adapter_fwd_f16_nf8_v0) are one 64-bit value stored
#     before the K loop and reloaded once per 32-wide K chunk, outside the
#     tensor-core inner loop.
# Prints the HMMA count, registers and spills of every kernel.
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${TUNEFUSE_CACHE:-$HOME/.cache/tunefuse}"
tools="$cache/cuda-tools"
source "$(scripts/cuda-toolchain.sh --env-file)"
# cuobjdump/nvdisasm 13.0 are not on PyPI; 13.2 reads sm_90 cubins from ptxas 13.0.
if [ ! -x "$tools/nvidia/cu13/bin/cuobjdump" ] || [ ! -x "$tools/nvidia/cu13/bin/nvdisasm" ]; then
  echo "sass-check: installing cuobjdump and nvdisasm 13.2.51 into $tools" >&2
  python3 -m pip install -q --disable-pip-version-check --target "$tools" \
    nvidia-cuda-cuobjdump==13.2.51 nvidia-cuda-nvdisasm==13.2.51
fi
export PATH="$tools/nvidia/cu13/bin:$PATH"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$NVCC" -cubin -arch=sm_90 -O3 -std=c++17 -Xptxas -v -I kernels kernels/adapter.cu \
  -o "$work/adapter.cubin" 2>"$work/ptxas.log"
cuobjdump -sass "$work/adapter.cubin" >"$work/adapter.sass"
python3 - "$work/adapter.sass" "$work/ptxas.log" <<'EOF'
import re, sys
sass, ptxas = open(sys.argv[1]).read(), open(sys.argv[2]).read()
hmma, fn = {}, None
for line in sass.splitlines():
    m = re.search(r"Function : (\S+)", line)
    if m:
        fn = m.group(1)
        hmma[fn] = 0
    elif fn and "HMMA" in line:
        hmma[fn] += 1
info, fn = {}, None
for line in ptxas.splitlines():
    m = re.search(r"Compiling entry function '(\S+)'", line)
    if m:
        fn = m.group(1)
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m and fn:
        info.setdefault(fn, {})["spill"] = max(int(m.group(1)), int(m.group(2)))
    m = re.search(r"Used (\d+) registers", line)
    if m and fn:
        info.setdefault(fn, {})["regs"] = int(m.group(1))
bad = []
for f in sorted(hmma):
    n, i = hmma[f], info.get(f, {})
    half = "_bf16_" in f or "_f16_" in f
    mma = not f.startswith("adapter_cast")
    print(f"{f:44s} HMMA {n:4d}  regs {i.get('regs', '?'):>3}  spill {i.get('spill', '?')} B")
    if mma and half and n == 0:
        bad.append(f"{f}: no HMMA (tensor cores unused)")
    if not half and n > 0:
        bad.append(f"{f}: HMMA in an f32 kernel")
    limit = 64 if "_nf16_" in f else 8
    if i.get("spill", 0) > limit:
        bad.append(f"{f}: {i['spill']} bytes of spills (limit {limit})")
if not hmma:
    bad.append("no kernels found in the SASS")
print(f"sass-check: {len(hmma)} kernels")
if bad:
    print("sass-check FAILED:\n  " + "\n  ".join(bad))
    sys.exit(1)
print("sass-check: every bf16/f16 product runs on tensor cores (HMMA); f32 on CUDA cores")
EOF
