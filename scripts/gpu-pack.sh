#!/usr/bin/env bash
# Runs here (no GPU needed): builds the release CUDA binaries for sm_90
# (H100/H200), strips and packs them with what the device run reads into
# .gpu/ (git-ignored), and prints the device call to make.
set -euo pipefail
cd "$(dirname "$0")/.."
source "$(scripts/cuda-toolchain.sh --env-file)"
export CUDA_COMPUTE_CAP=90
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tunefuse/target}"

# Binaries: the CLI (bench table, census, fine-tuning), the CUDA tests, the
# criterion benches; data: the goldens, SST-2 and RTE (for the fine-tuning
# runs), Amazon books (the census's long-sequence case), the test sets of
# TREC, SNLI and AG News (OOD detection in scripts/calibration-results.sh),
# CoNLL-2003, NCBI-disease and SST-5 (scripts/task-results.sh), and
# all-MiniLM-L6-v2 with bf16 weights (fp32 is 87 MiB, over what travels),
# which the CUDA golden test and the fine-tuning runs load upcast to f32.
targets=(--bin tunefuse --test cuda_ops --bench ops)
cargo build --release --features cuda "${targets[@]}" >&2
mapfile -t exes < <(cargo build --release --features cuda "${targets[@]}" --message-format=json 2>/dev/null |
  python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["executable"])')
[ "${#exes[@]}" -eq 3 ] || { echo "gpu-pack: expected 3 executables, got: ${exes[*]}" >&2; exit 1; }

rm -rf .gpu && mkdir -p .gpu/stage
for exe in "${exes[@]}"; do
  name=$(basename "$exe" | sed 's/-[0-9a-f]\{16\}$//')
  strip -o ".gpu/stage/$name" "$exe"
done
mkdir -p .gpu/stage/golden
cp "${TUNEFUSE_GOLDEN:-../shared/golden}"/*.json .gpu/stage/golden/
data="${TUNEFUSE_DATA:-../shared/data}"
for f in glue/SST-2/train.tsv glue/SST-2/dev.tsv glue/RTE/train.tsv glue/RTE/val.tsv glue/RTE/dev.tsv \
    amazon/books/train.tsv amazon/books/dev.tsv ood/TREC/TREC_10.label ood/SNLI/s1.test \
    ood/SNLI/s2.test ood/SNLI/labels.test ood/AGNews/test.tsv \
    ner/conll2003/train.txt ner/conll2003/dev.txt ner/conll2003/test.txt \
    ner/ncbi-disease/train.txt ner/ncbi-disease/dev.txt ner/ncbi-disease/test.txt \
    extra/SST-5/sentiment-train extra/SST-5/sentiment-dev extra/SST-5/sentiment-test; do
  mkdir -p ".gpu/stage/data/$(dirname "$f")"
  cp "$data/$f" ".gpu/stage/data/$f"
done
# The step census: the stand-in's census of this very binary, which the
# real driver's must equal, and the interposer that counts there (both
# built by scripts/step-census.sh).
scripts/step-census.sh >&2
cp "$CARGO_TARGET_DIR/step_census.json" .gpu/stage/census_standin.json
cp "${TUNEFUSE_CACHE:-$HOME/.cache/tunefuse}/census/libtunefuse_census.so" .gpu/stage/
# The Hugging Face peer of the end-to-end comparison (../shared does not
# travel).
cp "${TUNEFUSE_PEER:-../shared/bench/hf_finetune.py}" .gpu/stage/hf_finetune.py
model=$(scripts/fetch-model.sh)
cargo run --release --quiet --bin tunefuse -- convert-checkpoint --input "$model" --output .gpu/stage/model --dtype bf16 >&2
tar -C .gpu/stage -cJf .gpu/bundle.tar.xz .
rm -rf .gpu/stage
size=$(du -sm .gpu | cut -f1)
echo "gpu-pack: .gpu/ holds $(ls .gpu) (${size} MiB)" >&2
[ "$size" -lt 60 ] || { echo "gpu-pack: .gpu is ${size} MiB, over what travels (64 MiB)" >&2; exit 1; }

cat <<CALL
The device call (the checks in order of priority, under 6 minutes, so that a
second call fits the session's 15 minutes of device time: tests, the census on
the real driver, ours vs Hugging Face end to end, kernel benchmarks and
peers, sanitizers, adapter tests, phase times, ncu, criterion):
  command: bash scripts/gpu-run.sh
  carry:   [".gpu"]
  timeout_s: 360
A second call, if time is left, goes on where the first stopped, e.g.
  command: SKIP="tests census e2e bench" bash scripts/gpu-run.sh 300
or runs the fine-tuning grid: bash scripts/gpu-results.sh 300 (timeout_s 330).
Then record the figures with the card's name: the census agreement and the
end-to-end lines ("e2e json:") in bench/RESULTS.md and bench/e2e_gpu.json,
the results table at the end of \$OUT/run.log in bench/RESULTS.md.
CALL
