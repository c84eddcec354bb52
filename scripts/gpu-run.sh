#!/usr/bin/env bash
# Runs on the GPU machine (PyTorch, nvcc, compute-sanitizer, ncu; no Rust):
# unpacks what scripts/gpu-pack.sh built, runs the CUDA tests, the sanitizers
# over a reduced test set, our benchmarks, the PyTorch peers and the
# criterion benches, and prints one table. Logs go to $OUT (or .gpu/out).
# Each step has its own time limit so the whole run stays under 6 minutes;
# a failing step is reported and the run goes on. Exit status: non-zero when
# the CUDA tests failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-$PWD/.gpu/out}"
mkdir -p "$out"
bin=.gpu/bin
rm -rf "$bin" && mkdir -p "$bin"
tar -xJf .gpu/bundle.tar.xz -C "$bin" || { echo "gpu-run: no .gpu/bundle.tar.xz: run scripts/gpu-pack.sh and carry .gpu" >&2; exit 2; }

nv=$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))' 2>/dev/null || true)
export LD_LIBRARY_PATH="${nv:+$nv/nvidia/cu13/lib:}/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export PYTHONUNBUFFERED=1
status=0
step() { echo; echo "=== $* ($(date +%T))"; }

step "GPU"
nvidia-smi -L | tee "$out/gpu.txt"
uname -r | tee -a "$out/gpu.txt"

step "CUDA tests vs CPU reference"
if ! timeout 150 "$bin/cuda_ops" --test-threads=1 2>&1 | tee "$out/tests.log"; then
  echo "gpu-run: CUDA TESTS FAILED (see tests.log)"; status=1
fi

step "our benchmarks"
timeout 60 "$bin/tunefuse" bench --device cuda --json "$out/ours.json" 2>&1 | tee "$out/bench.log"

step "PyTorch peers (eager, torch.compile)"
timeout 150 python3 bench/torch_peers.py --out "$out/peers.json" 2>&1 | tee "$out/peers.log"

step "compute-sanitizer (reduced test set)"
if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    if TUNEFUSE_TEST_QUICK=1 timeout 90 compute-sanitizer --tool "$tool" --error-exitcode 99 \
        "$bin/cuda_ops" --test-threads=1 >"$out/sanitizer-$tool.log" 2>&1; then
      echo "$tool: clean ($(grep -c '^test .* ok$' "$out/sanitizer-$tool.log") tests)"
    else
      rc=$?
      echo "$tool: exit $rc — could not run or found errors (kernel $(uname -r)); tail of the log:"
      tail -n 15 "$out/sanitizer-$tool.log"
      [ "$rc" = 99 ] && status=1
    fi
  done
else
  echo "compute-sanitizer not found: sanitizer runs skipped"
fi

step "criterion benches (short)"
timeout 75 "$bin/ops" --bench --warm-up-time 0.3 --measurement-time 1 2>&1 |
  grep -E "^(sym_kl|mixout|dropout|ascent|noise)|time:|thrpt:" | tee "$out/criterion.log"

step "results table"
peers=()
[ -s "$out/peers.json" ] && peers=(--peers "$out/peers.json")
"$bin/tunefuse" table --ours "$out/ours.json" "${peers[@]}" | tee "$out/table.md"
exit $status
