#!/usr/bin/env bash
# Runs the results grid of issue #6: every recipe in bench/recipes/<row>/ for
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
# release binary), DEVICE (default cpu), METHODS (default: every recipe).
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
for seed in "${seeds[@]}"; do
  for m in $methods; do
    dir="$out/$m-s$seed"
    if [ -f "$dir/summary.json" ]; then
      echo "== $row $m seed $seed: done already"
      continue
    fi
    resume=()
    [ -f "$dir/last/trainer.json" ] && resume=(--resume)
    echo "== $row $m seed $seed ($(date -u +%H:%M:%S))"
    "$bin" finetune --config "bench/recipes/$row/$m.toml" --model "$model" \
      --seed "$seed" --device "${DEVICE:-cpu}" --output "$dir" "${resume[@]}" \
      >"$dir.log" 2>&1 || { echo "   failed, see $dir.log"; tail -3 "$dir.log"; }
    tail -2 "$dir.log"
  done
done
"$bin" results "$out"
