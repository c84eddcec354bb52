#!/usr/bin/env bash
# Runs on the GPU machine (PyTorch, nvcc, compute-sanitizer, ncu; no Rust):
# unpacks what scripts/gpu-pack.sh built, runs the CUDA tests, the sanitizers
# over a reduced test set, our benchmarks, the PyTorch peers, three short
# fine-tuning runs (vanilla, SMART, adapters) and the criterion benches, and
# prints one table. Logs go to $OUT (or .gpu/out).
# Each step has its own time limit so the whole run stays under 6 minutes;
# a failing step is reported and the run goes on. Exit status: non-zero when
# the CUDA tests failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-$PWD/.gpu/out}"
mkdir -p "$out"
# Everything printed also goes to run.log; with the JSON, the table and the
# test and sanitizer logs that is 7 files (the device tool returns 8 at most).
exec > >(tee "$out/run.log") 2>&1
source scripts/gpu-env.sh
status=0
start=$(date +%s)
deadline=345 # seconds: the whole run stays under 6 minutes
step() { echo; echo "=== $* ($(( $(date +%s) - start )) s in)"; }
# budget WANT: prints the seconds a step may take (WANT, or what is left
# before the deadline); prints 0 when too little is left to start it.
budget() {
  local left=$(( deadline - ($(date +%s) - start) ))
  if [ "$left" -lt 10 ]; then echo 0; elif [ "$left" -lt "$1" ]; then echo "$left"; else echo "$1"; fi
}
skip() { echo "skipped: the 6-minute budget is spent"; }

step "GPU"
nvidia-smi -L
uname -r

step "CUDA tests vs CPU reference (all but the adapter)"
if ! timeout "$(budget 150)" "$bin/cuda_ops" --test-threads=1 --skip adapter --skip lora 2>&1 | tee "$out/tests.log"; then
  echo "gpu-run: CUDA TESTS FAILED or timed out (see tests.log)"; status=1
fi

step "adapter / LoRA kernels vs reference (act x dtype x T x d x r)"
t=$(budget 120); if [ "$t" -gt 0 ]; then
  if ! timeout "$t" "$bin/cuda_ops" --test-threads=1 adapter lora 2>&1 | tee -a "$out/tests.log"; then
    echo "gpu-run: ADAPTER TESTS FAILED or timed out (see tests.log)"; status=1
  fi
else skip; fi

step "our benchmarks"
t=$(budget 45); if [ "$t" -gt 0 ]; then
  timeout "$t" "$bin/tunefuse" bench --device cuda --json "$out/ours.json"
else skip; fi

step "PyTorch peers (eager, torch.compile)"
t=$(budget 110); if [ "$t" -gt 0 ]; then
  timeout "$t" python3 bench/torch_peers.py --out "$out/peers.json"
else skip; fi

step "compute-sanitizer (reduced test set)"
if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    t=$(budget 40); [ "$t" -gt 0 ] || { skip; continue; }
    if TUNEFUSE_TEST_QUICK=1 timeout "$t" compute-sanitizer --tool "$tool" --error-exitcode 99 \
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

step "fine-tuning MiniLM on SST-2 (bench/recipes/sst2-1k: 1,000 sentences, 3 epochs; bf16 activations, f32 weights)"
for method in vanilla smart adapter; do
  t=$(budget 60); [ "$t" -gt 0 ] || { skip; continue; }
  timeout "$t" "$bin/tunefuse" finetune --config "bench/recipes/sst2-1k/$method.toml" --model "$TUNEFUSE_MODEL_DIR" \
    --data-dir "$bin/data" --seed 1 --device cuda --output "$bin/run-sst2-$method" 2>&1 |
    grep -E "eval step|best|error" || echo "fine-tuning ($method) failed or timed out"
done

step "criterion benches (short)"
t=$(budget 60); if [ "$t" -gt 0 ]; then
  timeout "$t" "$bin/ops" --bench --warm-up-time 0.2 --measurement-time 0.5 2>&1 |
    grep -E "^(sym_kl|mixout|dropout|ascent|noise|adapter)|time:|thrpt:"
else skip; fi

step "results table"
peers=()
[ -s "$out/peers.json" ] && peers=(--peers "$out/peers.json")
if [ -s "$out/ours.json" ]; then
  "$bin/tunefuse" table --ours "$out/ours.json" "${peers[@]}" | tee "$out/table.md"
else
  echo "no results table: our benchmark step did not finish"
fi
echo "gpu-run: done in $(( $(date +%s) - start )) s, status $status"
exit $status
