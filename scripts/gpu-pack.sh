#!/usr/bin/env bash
# Runs here (no GPU needed): builds the release CUDA binaries for sm_90
# (H100/H200), strips and packs them with what the device run reads into
# .gpu/ (git-ignored), and prints the device call to make.
set -euo pipefail
cd "$(dirname "$0")/.."
source "$(scripts/cuda-toolchain.sh --env-file)"
export CUDA_COMPUTE_CAP=90
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tunefuse/target}"

# Binaries: the CLI (bench table), the CUDA tests, the criterion benches;
# data: the goldens, SST-2 and RTE (for the fine-tuning runs), and
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
for f in glue/SST-2/train.tsv glue/SST-2/dev.tsv glue/RTE/train.tsv glue/RTE/val.tsv glue/RTE/dev.tsv; do
  mkdir -p ".gpu/stage/data/$(dirname "$f")"
  cp "$data/$f" ".gpu/stage/data/$f"
done
model=$(scripts/fetch-model.sh)
cargo run --release --quiet --bin tunefuse -- convert-checkpoint --input "$model" --output .gpu/stage/model --dtype bf16 >&2
tar -C .gpu/stage -cJf .gpu/bundle.tar.xz .
rm -rf .gpu/stage
size=$(du -sm .gpu | cut -f1)
echo "gpu-pack: .gpu/ holds $(ls .gpu) (${size} MiB)" >&2
[ "$size" -lt 60 ] || { echo "gpu-pack: .gpu is ${size} MiB, over what travels (64 MiB)" >&2; exit 1; }

cat <<CALL
Device calls (a machine's start cost about 30 s on 2026-11-26, and a warm
machine goes back after 30 s idle, so the second call must follow the first
at once). The checks (tests, benches, PyTorch peers, sanitizers, ncu, phase
times; under 7.5 minutes):
  command: bash scripts/gpu-run.sh
  carry:   [".gpu"]
  timeout_s: 450
then, on the same warm machine, the fine-tuning reference grid with the rest:
  command: bash scripts/gpu-results.sh 300
  carry:   [".gpu"]
  timeout_s: 330
(Or both in one call: bash scripts/gpu-run.sh; bash scripts/gpu-results.sh 130
with timeout_s 595.) Then copy the table at the end of \$OUT/run.log into
bench/RESULTS.md with the card's name, and the tables of \$OUT/results.log
into its fine-tuning section.
CALL
