#!/usr/bin/env bash
# Runs the fine-tuning reference grid: every recipe in bench/recipes/<row>/ for
# each seed, seed by seed (so a partial grid stays balanced across methods),
# then prints the mean ± std table with `tunefuse results`.
#
#   scripts/results.sh ROW [SEED...]          (default seeds: 1 2 3)
#
# ROW is a folder of bench/recipes (sst2-1k, rte, sst2-full). Runs go to
# $RESULTS_DIR/<ROW>/<method>-s<seed> (default runs/results); a run whose
# summary.json exists is skipped, an interrupted one is continued with
# --resume. Environment: TUNEFUSE_DATA (default ../shared/data), MODEL
# (default: scripts/fetch-model.sh), TUNEFUSE_BIN (default: build the
# release binary), DEVICE (default cpu), METHODS (default: every recipe),
# JOBS (default 1): runs at a time, in the same order. With JOBS > 1 on the
# CPU each run gets RAYON_NUM_THREADS = cores / JOBS (at least 1) unless
# RAYON_NUM_THREADS is set: candle's CPU thread pool waits for its workers
# by spinning, so runs sharing cores with more threads than cores lose time
# in the spin (14 % of the samples of a SMART run beside a second run), while
# single-threaded runs keep every core busy. bench/RESULTS.md has the figures.
set -euo pipefail
cd "$(dirname "$0")/.."
row=${1:?usage: scripts/results.sh ROW [SEED...]}
shift
seeds=("$@")
[ ${#seeds[@]} -gt 0 ] || seeds=(1 2 3)
[ -d "bench/recipes/$row" ] || { echo "no recipes in bench/recipes/$row" >&2; exit 2; }
export TUNEFUSE_DATA="${TUNEFUSE_DATA:-../shared/data}"
model="${MODEL:-$(scripts/fetch-model.sh)}"
bin="${TUNEFUSE_BIN:-}"
if [ -z "$bin" ]; then
  cargo build --release --quiet
  bin="${CARGO_TARGET_DIR:-target}/release/tunefuse"
fi
methods=${METHODS:-$(cd "bench/recipes/$row" && ls *.toml | sed 's/\.toml$//' | tr '\n' ' ')}
out="${RESULTS_DIR:-runs/results}/$row"
mkdir -p "$out"
jobs=${JOBS:-1}
[[ "$jobs" =~ ^[1-9][0-9]*$ ]] || { echo "JOBS must be a positive integer, got '$jobs'" >&2; exit 2; }
if [ "$jobs" -gt 1 ] && [ "${DEVICE:-cpu}" = cpu ] && [ -z "${RAYON_NUM_THREADS:-}" ]; then
  threads=$(( $(nproc) / jobs ))
  export RAYON_NUM_THREADS=$(( threads > 0 ? threads : 1 ))
fi

# One run: METHOD SEED.
run_one() {
  local m=$1 seed=$2
  local dir="$out/$m-s$seed"
  if [ -f "$dir/summary.json" ]; then
    echo "== $row $m seed $seed: done already"
    return 0
  fi
  # Continue from the last checkpoint; a run stopped before its first one
  # starts again (its partial record is replaced).
  local resume=(--overwrite)
  [ -f "$dir/last/trainer.json" ] && resume=(--resume)
  echo "== $row $m seed $seed ($(date -u +%H:%M:%S))"
  "$bin" finetune --config "bench/recipes/$row/$m.toml" --model "$model" \
    --seed "$seed" --device "${DEVICE:-cpu}" --output "$dir" "${resume[@]}" \
    >"$dir.log" 2>&1 || { echo "   $m seed $seed failed, see $dir.log"; tail -3 "$dir.log"; }
  echo "   $m seed $seed: $(tail -1 "$dir.log")"
}
export -f run_one
export out row bin model

for seed in "${seeds[@]}"; do
  for m in $methods; do
    echo "$m $seed"
  done
done | xargs -P "$jobs" -L 1 bash -c 'run_one "$@"' _
"$bin" results "$out"
