#!/usr/bin/env bash
# Active-learning learning curves on SST-2 (Grießhaber, Maucher & Vu, COLING
# 2020's setting): start from 10 labelled sentences, acquire 100 a round for
# 9 rounds (10 … 910 labels), with each of $STRATEGIES at each freezing in
# $FREEZE (0: none; -3: the 3 layers nearest the output, the paper's best),
# for each seed; the dev accuracy of each round's final weights. Writes the
# runs to $OUT/<strategy>-f<freeze>-s<seed> and the pooled curves to
# $OUT/curves.{json,png,svg}, and prints the table.
#
# Environment: TUNEFUSE_BIN (default: the release build), MODEL (default:
# scripts/fetch-model.sh), TUNEFUSE_DATA (default ../shared/data), DEVICE
# (default cpu), SEEDS (default "1"), STRATEGIES (default "random entropy
# bald"), FREEZE (default "0 -3"), POOL_CAP (default 20000, the paper's),
# EPOCHS (default 3), OUT (default target/active). One run (ten
# rounds, 10 … 910 labels) with POOL_CAP=5000 took 25-37 minutes on 2 CPU
# cores shared with other jobs (2026-12-07).
set -euo pipefail
cd "$(dirname "$0")/.."
default_out=target/active
# shellcheck source=scripts/results-env.sh
source scripts/results-env.sh
for seed in ${SEEDS:-1}; do
  for f in ${FREEZE:-0 -3}; do
    for s in ${STRATEGIES:-random entropy bald}; do
      run="$out/$s-f$f-s$seed"
      resume=(--overwrite)
      [ -f "$run/active.json" ] && resume=(--resume)
      "$bin" active --model "$model" --task sst2 --data-dir "$data" --device "${DEVICE:-cpu}" \
        --strategy "$s" --start 10 --query 100 --rounds 9 --pool-cap "${POOL_CAP:-20000}" \
        --passes 50 --epochs "${EPOCHS:-3}" --batch-size 16 --lr 1e-4 --max-len 64 \
        --seed "$seed" --set "freeze_layers=$f" --output "$run" "${resume[@]}" \
        >"$run.log" 2>&1 || { echo "active-results: $s f$f seed $seed failed (see $run.log)" >&2; exit 1; }
      tail -n 11 "$run.log"
    done
  done
done
"$bin" curves "$out" --output "$out/curves"
