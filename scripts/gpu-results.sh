#!/usr/bin/env bash
# Runs on the GPU machine: the fine-tuning reference results on CUDA with
# the binaries and data scripts/gpu-pack.sh carried (MiniLM with bf16-rounded
# weights, trained with f32 master weights and bf16 activations), in order of
# priority until DEADLINE seconds (default 480) have passed:
#   1. sst2-full (the GPU row): vanilla, seed 1 (against 89.2 % /
#      44.5 s on an H200), then SMART (against 89.1 % / 92.1 s),
#   2. rte, seeds 1-3: vanilla, SMART and SMART with smart-pytorch's `sum`
#      reduction (smart-sum.toml), the recipes whose calibration differs
#      from the reference on the CPU,
#   3. sst2-full: smart-sum, seed 1,
#   4. rte: the other methods (and SMART's direction-step variant), seeds
#      1-3 (the CPU takes 20-95 minutes a run here),
#   5. sst2-1k: every recipe, seeds 1-3,
#   6. calibration and OOD detection (scripts/calibration-results.sh):
#      vanilla and manifold smoothing, seeds 1-3,
#   7. active-learning curves on SST-2 (scripts/active-results.sh): random,
#      entropy and BALD at freezing 0 and -3, seeds 1-3, the paper's pool
#      cap of 20 000 (active.json of each run and the pooled curves),
#   8. the non-sentence tasks (scripts/task-results.sh): CoNLL-2003 and
#      NCBI-disease NER, SST-5 scored with MSE alone and with R2BERT's
#      ranking schedule, Tri-Train's candidate-masked pre-fine-tuning on
#      NCBI-disease, seed 1,
#   9. cross-domain Amazon sentiment (scripts/domain-results.sh): vanilla,
#      AFTER, BERT-DAAT and Meta Fine-Tuning on all 12 source → target pairs, seeds 1-3,
#  10. clustering (tunefuse cluster): k-means and DEC + MLM on
#      SearchSnippets and StackOverflow, seed 1.
# A run cut by the deadline is left unfinished (scripts/results.sh resumes
# it). Runs already recorded under bench/runs/<card> are not run again; add
# the new ones there afterwards (summary.json, metrics.jsonl, config.toml,
# from results-runs.tar.xz). Writes two files to $OUT: the log (results.log, which holds the
# tables too) and results-runs.tar.xz (one table per row, results-<row>.md,
# and each run's summary, metrics.jsonl, config and log; no checkpoints).
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
# Finished runs recorded in the repo for this card (bench/runs/<card>, e.g.
# nvidia-h200) are copied in first, so scripts/results.sh skips them and the
# tables cover every seed run so far on this kind of card.
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1 | tr 'A-Z ' 'a-z-')
if [ -d "bench/runs/$card" ]; then
  mkdir -p "$runs"
  cp -rn "bench/runs/$card/." "$runs/"
  echo "recorded runs for $card: $(find "bench/runs/$card" -name summary.json | wc -l)"
fi
export DEVICE=cuda TUNEFUSE_BIN="$PWD/$bin/tunefuse" MODEL="$TUNEFUSE_MODEL_DIR"
export TUNEFUSE_DATA="$PWD/$bin/data" RESULTS_DIR="$runs"
# ROW:SEEDS[:METHODS]; a finished run is skipped by scripts/results.sh.
# The baseline and SMART first in each seed, so a cut grid still has them.
order="vanilla smart smart-sum r3f mixout adapter lora recadam smart-direction"
for spec in "sst2-full:1:vanilla" "sst2-full:1:smart" "rte:1 2 3:vanilla smart smart-sum" \
  "sst2-full:1:smart-sum" "rte:1 2 3:$order" "sst2-1k:1 2 3:$order"; do
  IFS=: read -r row seeds methods <<<"$spec"
  left=$(( deadline - ($(date +%s) - start) ))
  [ "$left" -gt 20 ] || { echo "== $row: skipped, the ${deadline}-s budget is spent"; continue; }
  echo "== $row, seeds $seeds${methods:+, $methods} (${left} s left)"
  # shellcheck disable=SC2086
  METHODS="$methods" timeout "$left" scripts/results.sh "$row" $seeds || echo "== $row: stopped (deadline or failure)"
  [ -d "$runs/$row" ] && "$TUNEFUSE_BIN" results "$runs/$row" | tee "$runs/results-$row.md"
done
# 6. Calibration and OOD detection (vanilla and manifold smoothing, seeds
# 1-3, each as is, with MC dropout and with a held-out temperature).
left=$(( deadline - ($(date +%s) - start) ))
if [ "$left" -gt 60 ]; then
  echo "== calibration, seeds 1 2 3 (${left} s left)"
  SEEDS="1 2 3" OUT="$runs/calibration" timeout "$left" scripts/calibration-results.sh ||
    echo "== calibration: stopped (deadline or failure)"
  cp "$runs/calibration/calibration.jsonl" "$out/" 2>/dev/null || true
else
  echo "== calibration: skipped, the ${deadline}-s budget is spent"
fi
# 7. Active-learning learning curves (a cut run resumes at its round).
left=$(( deadline - ($(date +%s) - start) ))
if [ "$left" -gt 60 ]; then
  echo "== active learning, seeds 1 2 3 (${left} s left)"
  SEEDS="1 2 3" OUT="$runs/active" timeout "$left" scripts/active-results.sh ||
    echo "== active learning: stopped (deadline or failure)"
  "$TUNEFUSE_BIN" curves "$runs/active" --output "$out/active-curves" 2>/dev/null || true
else
  echo "== active learning: skipped, the ${deadline}-s budget is spent"
fi
# 8. NER and essay-style scoring.
left=$(( deadline - ($(date +%s) - start) ))
if [ "$left" -gt 60 ]; then
  echo "== tasks (NER, score head), seed 1 (${left} s left)"
  SEEDS="1" OUT="$runs/tasks" timeout "$left" scripts/task-results.sh ||
    echo "== tasks: stopped (deadline or failure)"
  cp "$runs/tasks/tasks.jsonl" "$out/" 2>/dev/null || true
else
  echo "== tasks: skipped, the ${deadline}-s budget is spent"
fi
# 9. Cross-domain sentiment.
left=$(( deadline - ($(date +%s) - start) ))
if [ "$left" -gt 60 ]; then
  echo "== cross-domain Amazon, 12 pairs, seeds 1 2 3 (${left} s left)"
  PAIRS=all SEEDS="1 2 3" OUT="$runs/domain" timeout "$left" scripts/domain-results.sh ||
    echo "== domain: stopped (deadline or failure)"
  cp "$runs/domain/domain.jsonl" "$out/" 2>/dev/null || true
else
  echo "== domain: skipped, the ${deadline}-s budget is spent"
fi
# 10. Clustering.
for set in SearchSnippets StackOverflow; do
  left=$(( deadline - ($(date +%s) - start) ))
  if [ "$left" -gt 60 ]; then
    echo "== cluster $set (${left} s left)"
    timeout "$left" "$TUNEFUSE_BIN" cluster --model "$MODEL" --stc "$set" --data-dir "$TUNEFUSE_DATA" \
      --device cuda --steps 1000 --output "$runs/cluster-$set" --overwrite \
      >"$runs/cluster-$set.log" 2>&1 || echo "== cluster $set: stopped (deadline or failure)"
    cp "$runs/cluster-$set/cluster.json" "$out/cluster-$set.json" 2>/dev/null || true
  else
    echo "== cluster $set: skipped, the ${deadline}-s budget is spent"
  fi
done
tar -C "$runs" -cJf "$out/results-runs.tar.xz" \
  $(cd "$runs" && find . -maxdepth 3 \( -name summary.json -o -name metrics.jsonl -o -name config.toml -o -name '*.log' -o -name 'results-*.md' -o -name active.json -o -name cluster.json -o -name posttrain.json \) | sort) 2>/dev/null
echo "gpu-results: done in $(( $(date +%s) - start )) s"
