# Sourced by the scripts that run on the GPU machine (gpu-run.sh,
# gpu-results.sh): unpacks what scripts/gpu-pack.sh built into .gpu/bin and
# sets the library path and the locations the binaries read.
bin=.gpu/bin
rm -rf "$bin" && mkdir -p "$bin"
tar -xJf .gpu/bundle.tar.xz -C "$bin" || { echo "no .gpu/bundle.tar.xz: run scripts/gpu-pack.sh and carry .gpu" >&2; exit 2; }
nv=$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))' 2>/dev/null || true)
export LD_LIBRARY_PATH="${nv:+$nv/nvidia/cu13/lib:}/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export PYTHONUNBUFFERED=1
export TUNEFUSE_GOLDEN="$PWD/$bin/golden" TUNEFUSE_MODEL_DIR="$PWD/$bin/model" TUNEFUSE_DATA="$PWD/$bin/data"
