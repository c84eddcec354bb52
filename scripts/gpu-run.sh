#!/usr/bin/env bash
# Runs on the GPU machine (PyTorch, nvcc, compute-sanitizer, ncu; no Rust):
# unpacks what scripts/gpu-pack.sh built and runs, in order of priority until
# the deadline (first argument, seconds, default 330 so that the call stays
# under 6 minutes and a second fits the session's device time):
#   tests      the CUDA tests against the CPU reference (all but the adapter)
#   census     the step census on the real driver (the interposer), which
#              must equal the stand-in's census of the same binary
#   e2e        ours against Hugging Face eager on the same card: SST-2, 300
#              steps of 32, lr 5e-5, bf16, vanilla and SMART
#   graph      the same two runs with the step as a CUDA graph (cuda_graph,
#              batches padded to multiples of 16), against the same peer
#   bench      our kernel benchmarks and the PyTorch peers, one table
#   sanitizer  compute-sanitizer over a reduced test set
#   adapter    the adapter / LoRA kernel tests
#   phases     the phase times of a training step
#   ncu        ncu on the adapter and sym_kl kernels
#   criterion  the criterion benches
#   pad16      the e2e vanilla run with batches padded to multiples of 16
# SKIP="tests census" leaves steps out (e.g. for a second call that goes on
# where the first stopped). Logs go to $OUT (or .gpu/out). Fine-tuning
# grids are scripts/gpu-results.sh. A failing step is reported and the run
# goes on. Exit status: non-zero when the CUDA tests failed or the census
# differs.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-$PWD/.gpu/out}"
mkdir -p "$out"
# Everything printed (the results table included) also goes to run.log; with
# the two JSON files, the test log and the one sanitizer log that is at most
# 6 files (fewer when steps are skipped), which leaves 2 for
# scripts/gpu-results.sh in the same call (the device tool returns 8 at most).
exec > >(tee "$out/run.log") 2>&1
source scripts/gpu-env.sh
status=0
start=$(date +%s)
deadline=${1:-330} # seconds
step() { echo; echo "=== $* ($(( $(date +%s) - start )) s in)"; }
# budget WANT: prints the seconds a step may take (WANT, or what is left
# before the deadline); prints 0 when too little is left to start it.
budget() {
  local left=$(( deadline - ($(date +%s) - start) ))
  if [ "$left" -lt 10 ]; then echo 0; elif [ "$left" -lt "$1" ]; then echo "$left"; else echo "$1"; fi
}
skip() { echo "skipped: the time budget is spent"; }
# want KEY: whether step KEY is not listed in $SKIP.
want() { [[ " ${SKIP:-} " != *" $1 "* ]]; }
# ours SECONDS NAME METHOD [FLAG...]: our end-to-end run (SST-2, 9,600
# examples, one epoch of batch 32, lr 5e-5, seed 1) into $bin/e2e-NAME,
# printing its last TAIL lines (default 1).
ours() {
  local t=$1 name=$2 method=$3; shift 3
  timeout "$t" "$bin/tunefuse" finetune --model "$TUNEFUSE_MODEL_DIR" --task sst2 --data-dir "$bin/data" \
    --method "$method" --train-examples 9600 --epochs 1 --batch-size 32 --lr 5e-5 --seed 1 --device cuda \
    "$@" --output "$bin/e2e-$name" 2>&1 | tail -n "${TAIL:-1}"
}
# compare NAME METHOD: our run $bin/e2e-NAME against the peer's run of
# METHOD (the e2e step's).
compare() {
  [ -s "$bin/e2e-$2.peer.json" ] || { echo "e2e $1: no peer run of $2 to compare with"; return; }
  scripts/e2e-compare.py "$bin/e2e-$1" "$bin/e2e-$2.peer.json" || echo "e2e $1: no comparison"
}

step "GPU"
nvidia-smi -L
uname -r

if want tests; then
  step "CUDA tests vs CPU reference (all but the adapter)"
  if ! timeout "$(budget 150)" "$bin/cuda_ops" --test-threads=1 --skip adapter --skip lora 2>&1 | tee "$out/tests.log"; then
    echo "gpu-run: CUDA TESTS FAILED or timed out (see tests.log)"; status=1
  fi
fi

if want census; then
  step "step census on the real driver (interposer) against the stand-in's census of this binary"
  t=$(budget 100); if [ "$t" -gt 0 ]; then
    if ! LD_PRELOAD="$PWD/$bin/libtunefuse_census.so" timeout "$t" "$bin/tunefuse" census \
        --model "$TUNEFUSE_MODEL_DIR" --data-dir "$bin/data" --stamp "$(date -u +%F) real driver" \
        --agree "$bin/census_standin.json"; then
      echo "gpu-run: THE CENSUS ON THE DRIVER DIFFERS from the stand-in's (or failed; see above)"; status=1
    fi
  else skip; fi
fi

if want e2e; then
  # Ours and the peer alternate on the same card; each prints its throughput
  # (training steps only) and dev accuracy. The subsets are each program's own
  # 9,600-example sample of SST-2's training set.
  for method in vanilla smart; do
    step "end to end, $method: ours vs Hugging Face eager (SST-2, 300 steps of 32, lr 5e-5, bf16)"
    t=$(budget 75); [ "$t" -gt 0 ] || { skip; continue; }
    ours "$t" "$method" "$method"
    t=$(budget 60); [ "$t" -gt 0 ] || { skip; continue; }
    timeout "$t" python3 "$bin/hf_finetune.py" --model "$TUNEFUSE_MODEL_DIR" --data "$bin/data" --task sst2 \
      --method "$method" --train-examples 9600 --epochs 1 --batch-size 32 --lr 5e-5 --seed 1 --device cuda \
      --bf16 >"$bin/e2e-$method.peer.json" 2>"$bin/e2e-$method.peer.log" || tail -n 5 "$bin/e2e-$method.peer.log"
    compare "$method" "$method"
  done
fi

if want graph; then
  # The e2e runs with each batch shape's step captured once and replayed
  # (tests/cuda_ops.rs captured_steps_equal_eager_steps checks the values);
  # compared with the peer of the e2e step.
  for method in vanilla smart; do
    step "end to end, $method as CUDA graphs (pad_to_multiple = 16)"
    t=$(budget 60); [ "$t" -gt 0 ] || { skip; continue; }
    # Two lines: the run's report of replayed, captured and eager steps.
    TAIL=2 ours "$t" "graph-$method" "$method" --cuda-graph --set pad_to_multiple=16
    compare "graph-$method" "$method"
  done
fi

if want bench; then
  step "our benchmarks"
  t=$(budget 45); if [ "$t" -gt 0 ]; then
    timeout "$t" "$bin/tunefuse" bench --device cuda --json "$out/ours.json"
  else skip; fi

  step "PyTorch peers (eager, torch.compile)"
  t=$(budget 110); if [ "$t" -gt 0 ]; then
    timeout "$t" python3 bench/torch_peers.py --out "$out/peers.json"
  else skip; fi
fi

if want sanitizer; then
  step "compute-sanitizer (reduced test set)"
  if command -v compute-sanitizer >/dev/null; then
    # racecheck is slow: on an H200 neither the adapter's quick grid (90 s) nor
    # the other tests with the MiniLM golden (40 s) finished under it. So the
    # adapter and LoRA get the tiny grid, and the model test is left out (its
    # kernels are candle's). initcheck (reads of device memory never
    # written) runs on the same reduced set as the second racecheck.
    for spec in "memcheck:40:1:" "racecheck:60:tiny:adapter lora" \
        "racecheck:50:1:--skip adapter --skip lora --skip minilm" \
        "initcheck:40:1:--skip adapter --skip lora --skip minilm"; do
      IFS=: read -r tool want grid filter <<<"$spec"
      t=$(budget "$want"); [ "$t" -gt 0 ] || { skip; continue; }
      # One log for every tool: the device returns 8 files at most.
      log="$out/sanitizer.log"
      echo "=== compute-sanitizer --tool $tool ${filter:-(all)}" >>"$log"
      # shellcheck disable=SC2086
      if TUNEFUSE_TEST_QUICK=$grid timeout "$t" compute-sanitizer --tool "$tool" --error-exitcode 99 \
          "$bin/cuda_ops" --test-threads=1 $filter >>"$log" 2>&1; then
        echo "$tool ${filter:-(all)}: clean ($(grep -c '^test .* ok$' "$log") tests ok in the sanitizer log so far)"
      else
        rc=$?
        echo "$tool ${filter:-(all)}: exit $rc — timed out (124), test failures (101) or sanitizer errors (99); tail of the log:"
        tail -n 15 "$log"
        [ "$rc" = 99 ] && status=1
      fi
    done
  else
    echo "compute-sanitizer not found: sanitizer runs skipped"
  fi
fi

if want adapter; then
  step "adapter / LoRA kernels vs reference (act x dtype x T x d x r)"
  t=$(budget 120); if [ "$t" -gt 0 ]; then
    if ! timeout "$t" "$bin/cuda_ops" --test-threads=1 adapter lora 2>&1 | tee -a "$out/tests.log"; then
      echo "gpu-run: ADAPTER TESTS FAILED or timed out (see tests.log)"; status=1
    fi
  else skip; fi
fi

if want phases; then
  # Where a training step's time goes (the first H200 run trained SST-2 at
  # 631 examples/s, 50 ms a step, against 1,512 for PyTorch eager; the fused
  # AdamW and LayerNorm came after it): early, so the deadline cannot skip it.
  for method in vanilla smart; do
    step "phase times of a training step: SST-2 1k, $method, one epoch"
    t=$(budget 40); if [ "$t" -gt 0 ]; then
      timeout "$t" "$bin/tunefuse" finetune --config "bench/recipes/sst2-1k/$method.toml" \
        --model "$TUNEFUSE_MODEL_DIR" --data-dir "$bin/data" --seed 1 --epochs 1 --device cuda \
        --output "$bin/phases-$method" --phase-times 2>&1 | sed -n '/best /,$p' ||
        echo "phase-time run ($method) failed or timed out"
    else skip; fi
  done
fi

if want ncu; then
  # Where the time goes in the two ops furthest from their floors (RESULTS.md,
  # first H200 run): one profiled launch of each kernel, after two warm-up
  # iterations, with the clocks left alone (METHOD.md).
  for spec in "adapter_:adapter fwd+bwd 16384x768 r64 bf16:8:4" "sym_kl:sym_kl fwd+bwd 16384x30522 bf16:4:2"; do
    IFS=: read -r kernels case skip count <<<"$spec"
    step "ncu: $case (kernels matching $kernels)"
    t=$(budget 40); if [ "$t" -gt 0 ] && command -v ncu >/dev/null; then
      timeout "$t" ncu --clock-control none --kernel-name "regex:$kernels" --launch-skip "$skip" \
        --launch-count "$count" --section SpeedOfLight --section Occupancy --section LaunchStats \
        --section MemoryWorkloadAnalysis "$bin/tunefuse" bench --device cuda --only "$case" 2>&1 |
        grep -v '^==PROF==' | tail -n 160
    else skip; fi
  done
fi

if want criterion; then
  step "criterion benches (short)"
  t=$(budget 30); if [ "$t" -gt 0 ]; then
    timeout "$t" "$bin/ops" --bench --warm-up-time 0.2 --measurement-time 0.5 2>&1 |
      grep -E "^(sym_kl|mixout|dropout|ascent|noise|adapter)|time:|thrpt:"
  else skip; fi
fi

if want pad16; then
  # The same vanilla run with batches padded to multiples of 16 tokens: a
  # few batch shapes instead of one per length (more GEMM work on padding,
  # fewer new shapes); compared with the same peer as the e2e step.
  step "end to end, vanilla with pad_to_multiple = 16"
  t=$(budget 75); if [ "$t" -gt 0 ]; then
    ours "$t" pad16 vanilla --set pad_to_multiple=16
    compare pad16 vanilla
  else skip; fi
fi

step "results table"
peers=()
[ -s "$out/peers.json" ] && peers=(--peers "$out/peers.json")
if [ -s "$out/ours.json" ]; then
  "$bin/tunefuse" table --ours "$out/ours.json" "${peers[@]}"
else
  echo "no results table: our benchmark step did not finish"
fi
echo "gpu-run: done in $(( $(date +%s) - start )) s, status $status"
exit $status
