#!/usr/bin/env bash
# Calibration and OOD-detection comparison on SST-2 (Kong et al. 2020's
# evaluation): for each seed, MiniLM fine-tuned on 1,000 sentences drawn
# from the first 20,000 rows of SST-2's train.tsv, vanilla and with Kong's
# manifold smoothing (--method manifold); each evaluated on the 872 dev
# sentences as is, with MC dropout (10 passes), and with a temperature fitted
# on the last 2,000 rows of train.tsv (held out: never drawn for training),
# with OOD detection against 1,000 test sentences each of TREC, SNLI and
# AG News. Prints one JSON line per (method, seed, evaluation) and writes
# them to $OUT/calibration.jsonl.
#
# Environment: TUNEFUSE_BIN (default: the release build), MODEL (default:
# scripts/fetch-model.sh), TUNEFUSE_DATA (default ../shared/data), DEVICE
# (default cpu), SEEDS (default "1"), METHODS (default "vanilla manifold"),
# EPOCHS (default 1), OUT (default target/calibration). A CPU run of one
# seed and both methods takes about 20 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
default_out=target/calibration
# shellcheck source=scripts/results-env.sh
source scripts/results-env.sh
sst=$data/glue/SST-2
# The split files: training rows and held-out calibration rows of train.tsv.
head -n 1 "$sst/train.tsv" >"$out/train-part.tsv"
sed -n '2,20001p' "$sst/train.tsv" >>"$out/train-part.tsv"
head -n 1 "$sst/train.tsv" >"$out/calib.tsv"
tail -n 2000 "$sst/train.tsv" >>"$out/calib.tsv"
ood=(--ood trec,snli,agnews --ood-examples 1000 --data-dir "$data")
: >"$out/calibration.jsonl"
for seed in ${SEEDS:-1}; do
  for m in ${METHODS:-vanilla manifold}; do
    run="$out/$m-s$seed"
    "$bin" finetune --model "$model" --train-file "$out/train-part.tsv" --dev-file "$sst/dev.tsv" \
      --train-examples 1000 --epochs "${EPOCHS:-1}" --batch-size 16 --lr 1e-4 --seed "$seed" \
      --max-len 128 --device "${DEVICE:-cpu}" --method "$m" --output "$run" --overwrite \
      >"$run.log" 2>&1 || { echo "calibration-results: $m seed $seed failed (see $run.log)" >&2; exit 1; }
    rm -f "$run/best/temperature.json"
    for ev in plain mc10 temperature; do
      extra=()
      case $ev in
        mc10) extra=(--mc-dropout 10) ;;
        temperature) "$bin" calibrate --checkpoint "$run/best" --file "$out/calib.tsv" >/dev/null ;;
      esac
      r=$("$bin" eval --checkpoint "$run/best" --file "$sst/dev.tsv" "${ood[@]}" "${extra[@]}")
      line=$(printf '%s' "$r" | tr -d '\n' | sed "s/^{/{\"method\": \"$m\", \"seed\": $seed, \"eval\": \"$ev\", /")
      echo "$line" | tee -a "$out/calibration.jsonl"
    done
  done
done
