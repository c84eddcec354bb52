#!/usr/bin/env bash
# Training throughput on the CPU, side by side with the Hugging Face peer
# (../shared/bench/hf_finetune.py: transformers + PyTorch eager), same
# recipe: all-MiniLM-L6-v2, SST-2, 1,000 training sentences, one epoch,
# batch 16, AdamW (wd 0.01), linear warm-up 10 % then decay, clip 1.0, max
# length 128, dynamic padding, f32, the same number of threads. The two run
# in turns (ours, peer, ours, peer, ...) so that a drift of the shared
# machine's speed falls on both; each round's ratio is ours / peer in
# examples per second over the training steps (model load and evaluation
# excluded on both sides).
#
#   scripts/compare-hf.sh [ROUNDS]        (default 3)
#
# Environment: HF_PYTHON (a python with torch, transformers and tokenizers;
# default python3), THREADS (default 2: RAYON_NUM_THREADS for ours, --threads
# for the peer), METHOD (vanilla or smart, default vanilla), TUNEFUSE_DATA
# (default ../shared/data), MODEL (default: scripts/fetch-model.sh),
# TUNEFUSE_BIN (default: build the release binary), OUT (default
# target/compare-hf). Prints one line per round and a summary line, and
# writes $OUT/compare-hf.json (every round, the median ratio, the machine).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
[[ "$rounds" =~ ^[1-9][0-9]*$ ]] || { echo "compare-hf: ROUNDS must be a positive integer, got '$rounds'" >&2; exit 2; }
py=${HF_PYTHON:-python3}
threads=${THREADS:-2}
method=${METHOD:-vanilla}
case "$method" in vanilla | smart) ;; *) echo "compare-hf: METHOD must be vanilla or smart, got '$method'" >&2; exit 2 ;; esac
data="${TUNEFUSE_DATA:-../shared/data}"
peer="${HF_PEER:-../shared/bench/hf_finetune.py}"
[ -f "$peer" ] || { echo "compare-hf: no peer script at $peer (set HF_PEER)" >&2; exit 2; }
"$py" -c 'import torch, transformers, tokenizers' 2>/dev/null ||
  { echo "compare-hf: $py cannot import torch, transformers and tokenizers (set HF_PYTHON)" >&2; exit 2; }
model="${MODEL:-$(scripts/fetch-model.sh)}"
bin="${TUNEFUSE_BIN:-}"
if [ -z "$bin" ]; then
  cargo build --release --quiet --bin tunefuse
  bin="${CARGO_TARGET_DIR:-target}/release/tunefuse"
fi
out="${OUT:-target/compare-hf}"
mkdir -p "$out"
lr=1e-4
seed=1
rows=()
for r in $(seq 1 "$rounds"); do
  run="$out/ours-$method-r$r"
  RAYON_NUM_THREADS=$threads "$bin" finetune --model "$model" --data-dir "$data" --task sst2 \
    --method "$method" --train-examples 1000 --epochs 1 --batch-size 16 --lr $lr \
    --seed $seed --max-len 128 --device cpu --set eval_every=0 --set log_every=1000000 \
    --output "$run" --overwrite >"$run.log" 2>&1 ||
    { tail -n 5 "$run.log" >&2; echo "compare-hf: our run failed (log: $run.log)" >&2; exit 1; }
  "$py" "$peer" --model "$model" --data "$data" --task sst2 --method "$method" \
    --train-examples 1000 --epochs 1 --batch-size 16 --lr $lr --seed $seed --device cpu \
    --threads "$threads" >"$out/peer-$method-r$r.json" 2>"$out/peer-$method-r$r.log" ||
    { tail -n 5 "$out/peer-$method-r$r.log" >&2; echo "compare-hf: the peer failed" >&2; exit 1; }
  # scripts/e2e-compare.py reads both sides (ours: the last logged step's
  # examples/s and the final dev accuracy; the peer: its JSON line).
  both=$("$py" scripts/e2e-compare.py "$run" "$out/peer-$method-r$r.json")
  row=$("$py" - "$r" "$(sed -n 's/^e2e json: //p' <<<"$both")" <<'EOF'
import json, sys
r, e = int(sys.argv[1]), json.loads(sys.argv[2])
p = e["peer"]
print(json.dumps({"round": r, "ours_examples_per_s": round(e["ours_examples_per_s"], 1),
                  "ours_dev_accuracy": e["ours_dev_accuracy"],
                  "peer_examples_per_s": p["examples_per_s"], "peer_dev_accuracy": p["dev_accuracy"],
                  "ratio": round(e["ours_examples_per_s"] / p["examples_per_s"], 3),
                  "peer": p["peer"], "device": p["device"]}))
EOF
)
  echo "$row"
  rows+=("$row")
done
"$py" - "$out/compare-hf.json" "$method" "$threads" "$(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo +changes)" "${rows[@]}" <<'EOF'
import json, platform, statistics, sys, time
path, method, threads, commit = sys.argv[1:5]
rows = [json.loads(a) for a in sys.argv[5:]]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
med = statistics.median(r["ratio"] for r in rows)
doc = {"date": time.strftime("%Y-%m-%d"), "commit": commit, "machine": cpu, "threads": int(threads),
       "method": method, "recipe": "SST-2, 1,000 sentences, 1 epoch, batch 16, lr 1e-4, f32",
       "rounds": rows, "median_ratio": med}
json.dump(doc, open(path, "w"), indent=1)
print(f"compare-hf: {method}, {len(rows)} rounds, ours/peer examples/s median {med:.2f}x "
      f"(min {min(r['ratio'] for r in rows):.2f}, max {max(r['ratio'] for r in rows):.2f}); {path}")
EOF
