#!/usr/bin/env bash
# Numbers must not move when the trainer is restructured: runs one short
# CPU fine-tuning per method (and per option that changes the arithmetic)
# with two binaries and requires bit-identical metrics.jsonl — every
# logged step's loss, learning rate, gradient norm and regulariser value,
# every evaluation — ignoring only the wall-clock throughput.
#
#   scripts/bit-identity.sh BASE NEW [OUT]
#
# BASE and NEW are tunefuse binaries, or commits (anything `git rev-parse`
# takes; built in release mode in a scratch worktree). The configs are in
# the form every binary since the typed method list reads (a method list of
# names plus a section per method), so one file feeds both.
#
# How the regulariser's value is matched: binaries that log a single
# `penalty` (the SMART or R3F term; 0 without one) are compared with the
# `terms` object of later ones by name (`smart`, `r3f`), and the proximal
# term (`bregman`), which older binaries did not log, is reported but not
# compared. Needs the real all-MiniLM-L6-v2 (scripts/fetch-model.sh) and the
# data folder (TUNEFUSE_DATA, default ../shared/data). About 2–4 minutes of
# runs per binary on 2 cores, plus the builds.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { sed -n '2,20p' "$0"; exit 2; }
out="${3:-$(mktemp -d)}"
mkdir -p "$out"
model="$(scripts/fetch-model.sh)"
data="${TUNEFUSE_DATA:-../shared/data}"
[ -d "$data" ] || { echo "bit-identity: no data folder $data (set TUNEFUSE_DATA)" >&2; exit 2; }

binary() { # a binary path, or a commit to build
  if [ -x "$1" ]; then echo "$1"; return; fi
  local rev wt target
  rev=$(git rev-parse --verify "$1^{commit}") || { echo "bit-identity: $1 is neither a binary nor a commit" >&2; exit 2; }
  wt="$out/src-$rev"
  target="${CARGO_TARGET_DIR:-$HOME/.cache/tunefuse/target}"
  [ -d "$wt" ] || git worktree add --detach "$wt" "$rev" >&2
  (cd "$wt" && CARGO_TARGET_DIR="$target" cargo build --release --bin tunefuse >&2)
  cp "$target/release/tunefuse" "$out/tunefuse-$rev"
  git worktree remove --force "$wt" >&2
  echo "$out/tunefuse-$rev"
}
base=$(binary "$1")
new=$(binary "$2")

# name | TOML lines (\n-separated) on top of the common settings below.
cases=$(cat <<'EOF'
vanilla|methods = ["vanilla"]
smart|methods = ["smart"]
smart-direction|methods = ["smart"]\n[smart]\nmode = "direction"
smart-sum|methods = ["smart"]\n[smart]\nreduction = "sum"
smart-pgd-l2-example|methods = ["smart"]\n[smart]\nmode = "pgd"\nnorm = "l2"\ngranularity = "example"\neps = 0.01\nsteps = 2
smart-bregman|methods = ["smart"]\n[bregman]\nmu = 1.0\nbeta = 0.5
r3f|methods = ["r3f"]
r3f-normal|methods = ["r3f"]\n[r3f]\nnoise = "normal"\nsigma = 1e-4
freelb|methods = ["freelb"]
freelb-3-ball|methods = ["freelb"]\n[freelb]\nsteps = 3\neps = 0.05
mixout|methods = ["mixout"]\nmixout = 0.2
adapter|methods = ["adapter"]\nadapter_r = 16
adapter-pfeiffer-ln|methods = ["adapter"]\nadapter_r = 8\nadapter_placement = "pfeiffer"\npeft_layernorm = true
lora|methods = ["lora"]\nlora_r = 4\nlr = 1e-3
recadam|methods = ["vanilla"]\nrecadam = { k = 0.5, t0 = 4.0, gamma = 50.0 }
ulmfit|methods = ["vanilla"]\nschedule = { kind = "slanted_triangular", cut_frac = 0.1, ratio = 32.0 }\nlayer_lr_decay = 0.385\ngradual_unfreezing = true\nunfreeze_every_steps = 2
accum-smoothing|methods = ["vanilla"]\ngrad_accum = 2\nlabel_smoothing = 0.1\npooling = "mean"
regression|methods = ["vanilla"]\ntask = "sst5"\nregression = true\nmetric = "pearson"
regression-smart|methods = ["smart"]\ntask = "sst5"\nregression = true\nmetric = "spearman"\n[bregman]\nmu = 0.5
EOF
)

common='epochs = 2
batch_size = 8
train_examples = 32
eval_examples = 32
eval_every = 2
log_every = 1
max_len = 32
seed = 3
device = "cpu"'

mkdir -p "$out/configs"
fail=0
while IFS='|' read -r name extra; do
  cfg="$out/configs/$name.toml"
  # Top-level keys first (TOML puts everything after a [section] into it).
  body=$(printf '%b\n' "$extra")
  top=$(printf '%s\n' "$body" | sed -n '/^\[/q;p')
  rest=$(printf '%s\n' "$body" | sed -n '/^\[/,$p')
  { grep -q '^task' <<<"$top" || echo 'task = "sst2"'; echo "$common"; echo "$top"; echo "$rest"; } >"$cfg"
  for side in base new; do
    bin=$base; [ $side = new ] && bin=$new
    dir="$out/$side/$name"
    rm -rf "$dir"
    if ! RAYON_NUM_THREADS=1 "$bin" finetune --config "$cfg" --model "$model" --data-dir "$data" \
        --output "$dir" >"$out/$side-$name.log" 2>&1; then
      echo "FAIL $name: the $side binary failed (see $out/$side-$name.log)"; fail=1; continue 2
    fi
  done
  if python3 - "$out/base/$name/metrics.jsonl" "$out/new/$name/metrics.jsonl" "$name" <<'PY'
import json, sys
a = [json.loads(l) for l in open(sys.argv[1])]
b = [json.loads(l) for l in open(sys.argv[2])]
name = sys.argv[3]
def norm(line):
    line = dict(line)
    line.pop("examples_per_s", None)
    terms = line.pop("terms", None)
    pen = line.pop("penalty", None)
    if terms is not None:
        adv = {k: v for k, v in terms.items() if k != "bregman"}
        pen = next(iter(adv.values())) if adv else 0.0
    if "loss" in line:
        line["penalty"] = pen
    return line
if len(a) != len(b):
    print(f"FAIL {name}: {len(a)} lines against {len(b)}"); sys.exit(1)
for i, (x, y) in enumerate(zip(a, b)):
    if norm(x) != norm(y):
        print(f"FAIL {name}: line {i + 1} differs\n  base {json.dumps(norm(x))}\n  new  {json.dumps(norm(y))}")
        sys.exit(1)
extra = sorted({k for l in b for k in l.get("terms", {})})
print(f"same {name}: {len(a)} lines" + (f" (terms logged: {', '.join(extra)})" if extra else ""))
PY
  then :; else fail=1; fi
done <<<"$cases"
[ $fail = 0 ] && echo "bit-identity: every case identical ($out)" || { echo "bit-identity: differences ($out)"; exit 1; }
