#!/usr/bin/env bash
# Make a `cuda` build of tunefuse possible on this machine, GPU or not.
#
# Idempotent. When an nvcc is already reachable (NVCC, CUDA_ROOT/CUDA_PATH or
# PATH) it is used as is; otherwise the pinned nvcc of DESIGN.md is installed
# from PyPI into a cached virtual environment. When the CUDA runtime libraries
# are not installed (a machine without a GPU), empty stub libraries with the
# right sonames are built so the final link succeeds; the binaries then load
# the real libraries on the GPU machine.
#
# Writes the environment a `cuda` build needs to $TUNEFUSE_CACHE/cuda-env.sh
# and prints it. Use:   source "$(scripts/cuda-toolchain.sh --env-file)"
set -euo pipefail

cache="${TUNEFUSE_CACHE:-$HOME/.cache/tunefuse}"
venv="$cache/cuda-venv"
stubs="$cache/cuda-stubs"
env_file="$cache/cuda-env.sh"
mkdir -p "$cache"

log() { echo "cuda-toolchain: $*" >&2; }

# The pins are those verified in DESIGN.md: an unpinned nvidia-nvvm pulls a
# newer ptxas whose PTX ISA the GPU machines' driver (CUDA 13.0) rejects.
pins=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
)

find_nvcc() {
  if [ -n "${NVCC:-}" ] && [ -x "$NVCC" ]; then echo "$NVCC"; return 0; fi
  for root in "${CUDA_ROOT:-}" "${CUDA_PATH:-}"; do
    if [ -n "$root" ] && [ -x "$root/bin/nvcc" ]; then echo "$root/bin/nvcc"; return 0; fi
  done
  command -v nvcc 2>/dev/null && return 0
  local cached
  cached=$(ls "$venv"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc 2>/dev/null | head -n 1 || true)
  if [ -n "$cached" ] && [ -x "$cached" ]; then echo "$cached"; return 0; fi
  return 1
}

pinned_ok() {
  [ -x "$venv/bin/python" ] || return 1
  local p
  for p in "${pins[@]}"; do
    [ "$("$venv/bin/python" -m pip show "${p%%==*}" 2>/dev/null | sed -n 's/^Version: //p')" = "${p##*==}" ] || return 1
  done
}

if ! nvcc_bin=$(find_nvcc) || { [[ "$nvcc_bin" == "$venv"/* ]] && ! pinned_ok; }; then
  log "no nvcc found; installing the pinned nvcc into $venv"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "${pins[@]}"
  nvcc_bin=$(ls "$venv"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc | head -n 1)
fi
cuda_root=$(dirname "$(dirname "$nvcc_bin")")
log "nvcc: $nvcc_bin ($("$nvcc_bin" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'))"

# Stub libraries, only when the real ones are absent.
libs=(libcuda.so.1 libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13)
have_real=1
for so in "${libs[@]}"; do
  ldconfig -p 2>/dev/null | grep -q "$so" || [ -e "$cuda_root/lib/$so" ] || [ -e "$cuda_root/lib64/$so" ] || have_real=0
done
stub_line=""
if [ "$have_real" = 0 ]; then
  mkdir -p "$stubs"
  echo 'void tunefuse_cuda_stub(void) {}' > "$stubs/empty.c"
  for so in "${libs[@]}"; do
    base=${so%%.so*}
    if [ ! -e "$stubs/$base.so" ]; then
      gcc -shared -fPIC -o "$stubs/$base.so" -Wl,-soname,"$so" "$stubs/empty.c"
    fi
  done
  log "CUDA libraries absent: linking against stubs in $stubs"
  stub_line="export TUNEFUSE_CUDA_STUBS=\"$stubs\""
fi

# Without a GPU to ask, build for Hopper (the lent H100/H200 machines); with
# one, build.rs and candle's build ask nvidia-smi.
cap_line=""
command -v nvidia-smi >/dev/null 2>&1 || cap_line='export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"'

cat > "$env_file" <<ENV
# written by scripts/cuda-toolchain.sh
export NVCC="$nvcc_bin"
export CUDA_ROOT="$cuda_root"
export PATH="$cuda_root/bin:\$PATH"
$cap_line
$stub_line
ENV

if [ "${1:-}" = "--env-file" ]; then echo "$env_file"; else cat "$env_file"; fi
