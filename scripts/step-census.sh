#!/usr/bin/env bash
# The step census: what each method's training step asks of the GPU, counted
# call by call (src/census.rs, census/census.c). Works without a GPU.
#
#   scripts/step-census.sh            print the table (and write target/step_census.json)
#   scripts/step-census.sh --record   also write bench/step_census.json
#   scripts/step-census.sh --check    fail when any count rises above bench/step_census.json,
#                                     or when the interposer over the stand-in counts otherwise (CI)
#   scripts/step-census.sh --driver   on a GPU machine: count in front of the real driver
#                                     (the interposer) instead of the stand-in
# Further arguments go to `tunefuse census` (e.g. --case smart --steps 5).
#
# Builds the `cuda` binary (scripts/cuda-toolchain.sh) and the census library
# with gcc, then runs `tunefuse census` with the library LD_PRELOADed. The
# model is $TUNEFUSE_MODEL_DIR or all-MiniLM-L6-v2 (scripts/fetch-model.sh);
# the data $TUNEFUSE_DATA or ../shared/data.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=standin
action=print
args=()
for a in "$@"; do
  case "$a" in
    --record) action=record ;;
    --check) action=check ;;
    --driver) mode=driver ;;
    *) args+=("$a") ;;
  esac
done

cache="${TUNEFUSE_CACHE:-$HOME/.cache/tunefuse}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/target}"
source "$(scripts/cuda-toolchain.sh --env-file)"
cargo build --release --features cuda --bin tunefuse >&2
bin="$CARGO_TARGET_DIR/release/tunefuse"

lib="$cache/census"
mkdir -p "$lib/run"
# Both builds of the library, every time (a second each): the stand-in,
# and the interposer (CI's check below; scripts/gpu-pack.sh carries it).
flags=(-O2 -Wall -Wextra -Wno-unused-parameter -Werror -shared -fPIC)
standin="$lib/libtunefuse_census_standin.so"
interposer="$lib/libtunefuse_census.so"
gcc "${flags[@]}" -DCENSUS_STANDIN -o "$standin" census/census.c -ldl -lpthread
gcc "${flags[@]}" -o "$interposer" census/census.c -ldl -lpthread
if [ "$mode" = standin ]; then
  so="$standin"
  # The binary needs libraries with the CUDA sonames to start; on a machine
  # without CUDA those are the empty link stubs, and every symbol comes from
  # the preloaded stand-in.
  if [ -n "${TUNEFUSE_CUDA_STUBS:-}" ]; then
    for soname in libcuda.so.1 libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
      ln -sf "$TUNEFUSE_CUDA_STUBS/${soname%%.so*}.so" "$lib/run/$soname"
    done
    export LD_LIBRARY_PATH="$lib/run${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fi
else
  so="$interposer"
fi

model="${TUNEFUSE_MODEL_DIR:-$(scripts/fetch-model.sh)}"
data="${TUNEFUSE_DATA:-../shared/data}"
stamp="$(date -u +%F) $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src kernels census vendor Cargo.toml Cargo.lock || echo +changes)"
out="$CARGO_TARGET_DIR/step_census.json"
extra=()
case "$action" in
  record) out=bench/step_census.json ;;
  check) extra=(--check bench/step_census.json) ;;
esac
LD_PRELOAD="$so" "$bin" census --model "$model" --data-dir "$data" --stamp "$stamp" \
  --json "$out" "${extra[@]}" "${args[@]}"
echo "step-census: wrote $out" >&2

# CI also checks the interposer without a GPU: preloaded in front of the
# stand-in (which then plays the real driver), it must forward every call
# (arguments, return values) and count exactly what the stand-in counted.
if [ "$action" = check ] && [ "$mode" = standin ]; then
  LD_PRELOAD="$interposer $so" "$bin" census --model "$model" --data-dir "$data" \
    --stamp "$stamp interposer over the stand-in" --agree "$out" "${args[@]}" >/dev/null
  echo "step-census: the interposer over the stand-in counts what the stand-in counts" >&2
  # The ratchet's own tests (src/census.rs) and the multi-tensor optimiser's
  # host-side tests need the cuda build, whose test binary starts only with
  # the stand-in's symbols.
  test_bin=$(cargo test --release --features cuda --lib --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["lib"]:
        print(m["executable"])')
  LD_PRELOAD="$so" "$test_bin" census:: ops::adamw::multi:: >&2
  # A whole fine-tuning run with the step as CUDA graphs: 3 epochs of two
  # captured shapes (gradient accumulation over 2 batches, and the odd last
  # batch of each epoch alone, whose gradients come in another dtype and so
  # another optimiser table) with evaluations between (with mixout, the
  # first makes weight copies, so the graphs are dropped and captured
  # again). The stand-in fails it on anything the driver would refuse, and
  # on a replay that names memory freed since its capture.
  graph_run=$(mktemp -d)
  LD_PRELOAD="$so" "$bin" finetune --model "$model" --task amazon:books --data-dir "$data" --device cuda \
    --cuda-graph --method mixout --set grad_accum=2 --train-examples 80 --batch-size 16 --epochs 3 --max-len 64 \
    --set pad_to_multiple=64 --set eval_examples=16 --output "$graph_run/out" >/dev/null
  rm -rf "$graph_run"
  echo "step-census: a fine-tuning run with cuda_graph runs under the stand-in" >&2
fi
