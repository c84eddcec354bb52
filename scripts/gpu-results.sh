#!/usr/bin/env bash
# Runs on the GPU machine: the fine-tuning results of issue #6 on CUDA with
# the binaries and data scripts/gpu-pack.sh carried (MiniLM with bf16-rounded
# weights, trained with f32 master weights and bf16 activations), in order of
# priority until DEADLINE seconds (default 480) have passed:
#   1. sst2-full: vanilla and SMART, seed 1 (against 89.2 % / 44.5 s and
#      89.1 % / 92.1 s on an H200),
#   2. rte: the seven methods, seeds 1-3, seed by seed,
#   3. sst2-1k: the seven methods, seeds 1-3.
# A run cut by the deadline is left unfinished (scripts/results.sh resumes
# it). Writes to $OUT: one results table per row (results-<row>.md), the run
# log, and results-runs.tar.xz (each run's summary, metrics.jsonl, config and
# log; no checkpoints).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-$PWD/.gpu/out}"
mkdir -p "$out"
exec > >(tee "$out/results.log") 2>&1
source scripts/gpu-env.sh
deadline=${1:-480}
start=$(date +%s)
runs=.gpu/runs
nvidia-smi -L
export DEVICE=cuda TUNEFUSE_BIN="$PWD/$bin/tunefuse" MODEL="$TUNEFUSE_MODEL_DIR"
export TUNEFUSE_DATA="$PWD/$bin/data" RESULTS_DIR="$runs"
for spec in "sst2-full:1" "rte:1 2 3" "sst2-1k:1 2 3"; do
  row=${spec%%:*}
  left=$(( deadline - ($(date +%s) - start) ))
  [ "$left" -gt 20 ] || { echo "== $row: skipped, the ${deadline}-s budget is spent"; continue; }
  echo "== $row (${left} s left)"
  # shellcheck disable=SC2086
  timeout "$left" scripts/results.sh "$row" ${spec#*:} || echo "== $row: stopped (deadline or failure)"
  [ -d "$runs/$row" ] && "$TUNEFUSE_BIN" results "$runs/$row" | tee "$out/results-$row.md"
done
tar -C "$runs" -cJf "$out/results-runs.tar.xz" \
  $(cd "$runs" && find . -maxdepth 3 \( -name summary.json -o -name metrics.jsonl -o -name config.toml -o -name '*.log' \) | sort) 2>/dev/null
echo "gpu-results: done in $(( $(date +%s) - start )) s"
