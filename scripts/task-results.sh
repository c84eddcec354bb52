#!/usr/bin/env bash
# The non-sentence tasks on MiniLM, one JSON line per (task, recipe, seed)
# in $OUT/tasks.jsonl, each with the dev metrics of the final weights and
# the test evaluation of best/:
#   ner-conll:   CoNLL-2003, 3 epochs; test entity F1 with 10 random halves
#                and seen / unseen mentions (eval --resplits 10),
#   ner-ncbi:    NCBI-disease, 3 epochs, the same evaluation,
#   sst5-mse:    SST-5 scored by the score head with MSE alone, 4 epochs,
#   sst5-r2bert: the same with R2BERT's MSE + ListNet schedule.
# Environment: TUNEFUSE_BIN (default: the release build), MODEL (default:
# scripts/fetch-model.sh), TUNEFUSE_DATA (default ../shared/data), DEVICE
# (default cpu), SEEDS (default "1"), RECIPES (default: all four), OUT
# (default target/tasks). On 2 CPU cores CoNLL-2003 takes about 45 minutes
# an epoch; a GPU is the place for the grid.
set -euo pipefail
cd "$(dirname "$0")/.."
default_out=target/tasks
# shellcheck source=scripts/results-env.sh
source scripts/results-env.sh
for seed in ${SEEDS:-1}; do
  for r in ${RECIPES:-ner-conll ner-ncbi sst5-mse sst5-r2bert}; do
    case $r in
      ner-conll) args=(--task ner:conll2003 --epochs 3 --lr 1e-4) ev=(--resplits 10) ;;
      ner-ncbi) args=(--task ner:ncbi-disease --epochs 3 --lr 1e-4) ev=(--resplits 10) ;;
      sst5-mse) args=(--task sst5 --score --epochs 4 --lr 1e-4 --set score_ranking=false) ev=() ;;
      sst5-r2bert) args=(--task sst5 --score --epochs 4 --lr 1e-4) ev=() ;;
      *) echo "task-results: unknown recipe $r" >&2; exit 1 ;;
    esac
    run="$out/$r-s$seed"
    "$bin" finetune --model "$model" --data-dir "$data" --device "${DEVICE:-cpu}" \
      --batch-size 16 --max-len 128 --seed "$seed" "${args[@]}" --output "$run" --overwrite \
      >"$run.log" 2>&1 || { echo "task-results: $r seed $seed failed (see $run.log)" >&2; exit 1; }
    test=$("$bin" eval --checkpoint "$run/best" --split test "${ev[@]}" | tr -d '\n')
    dev=$(tr -d '\n' <"$run/summary.json")
    echo "{\"recipe\": \"$r\", \"seed\": $seed, \"summary\": $dev, \"test\": $test}" | tee -a "$out/tasks.jsonl"
  done
done
