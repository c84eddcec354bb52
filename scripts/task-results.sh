#!/usr/bin/env bash
# The non-sentence tasks on MiniLM, one JSON line per (task, recipe, seed)
# in $OUT/tasks.jsonl, each with the dev metrics of the final weights and
# the test evaluation of best/:
#   ner-conll:   CoNLL-2003, 3 epochs; test entity F1 with 10 random halves
#                and seen / unseen mentions (eval --resplits 10),
#   ner-ncbi:    NCBI-disease, 3 epochs, the same evaluation,
#   ner-ncbi-tri: the same after Tri-Train's pre-fine-tuning: 2 epochs of
#                masked LM on NCBI-disease's training sentences with only
#                distant-labelled entity candidates maskable (posttrain
#                --candidates distant:ner:ncbi-disease, head rate 1e-3: the
#                model has no masked-LM head of its own),
#   sst5-mse:    SST-5 scored by the score head with MSE alone, 4 epochs,
#   sst5-r2bert: the same with R2BERT's MSE + ListNet schedule.
# Environment: TUNEFUSE_BIN (default: the release build), MODEL (default:
# scripts/fetch-model.sh), TUNEFUSE_DATA (default ../shared/data), DEVICE
# (default cpu), SEEDS (default "1"), RECIPES (default: all four), OUT
# (default target/tasks), NER_EPOCHS (default 3). On 2 CPU cores CoNLL-2003 takes about 45 minutes
# an epoch; a GPU is the place for the grid.
set -euo pipefail
cd "$(dirname "$0")/.."
default_out=target/tasks
# shellcheck source=scripts/results-env.sh
source scripts/results-env.sh
for seed in ${SEEDS:-1}; do
  for r in ${RECIPES:-ner-conll ner-ncbi ner-ncbi-tri sst5-mse sst5-r2bert}; do
    base=$model
    ner_epochs=${NER_EPOCHS:-3}
    case $r in
      ner-conll) args=(--task ner:conll2003 --epochs "$ner_epochs" --lr 1e-4) ev=(--resplits 10) ;;
      ner-ncbi) args=(--task ner:ncbi-disease --epochs "$ner_epochs" --lr 1e-4) ev=(--resplits 10) ;;
      ner-ncbi-tri)
        base="$out/tri-mlm-s$seed"
        "$bin" posttrain --model "$model" --data-dir "$data" --device "${DEVICE:-cpu}" \
          --corpus ner:ncbi-disease@train --candidates distant:ner:ncbi-disease --epochs 2 \
          --batch-size 32 --lr 5e-5 --head-lr 1e-3 --seed "$seed" --output "$base" --overwrite \
          >"$base.log" 2>&1 || { echo "task-results: posttrain for $r seed $seed failed (see $base.log)" >&2; exit 1; }
        args=(--task ner:ncbi-disease --epochs "$ner_epochs" --lr 1e-4) ev=(--resplits 10) ;;
      sst5-mse) args=(--task sst5 --score --epochs 4 --lr 1e-4 --set score_ranking=false) ev=() ;;
      sst5-r2bert) args=(--task sst5 --score --epochs 4 --lr 1e-4) ev=() ;;
      *) echo "task-results: unknown recipe $r" >&2; exit 1 ;;
    esac
    run="$out/$r-s$seed"
    "$bin" finetune --model "$base" --data-dir "$data" --device "${DEVICE:-cpu}" \
      --batch-size 16 --max-len 128 --seed "$seed" "${args[@]}" --output "$run" --overwrite \
      >"$run.log" 2>&1 || { echo "task-results: $r seed $seed failed (see $run.log)" >&2; exit 1; }
    test=$("$bin" eval --checkpoint "$run/best" --split test "${ev[@]}" | tr -d '\n')
    dev=$(tr -d '\n' <"$run/summary.json")
    echo "{\"recipe\": \"$r\", \"seed\": $seed, \"summary\": $dev, \"test\": $test}" | tee -a "$out/tasks.jsonl"
  done
done
