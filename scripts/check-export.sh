#!/usr/bin/env bash
# Fine-tunes the real all-MiniLM-L6-v2 briefly on SST-2 read as the user's
# own TSV files (--train-file / --dev-file), fully and with LoRA, exports
# both (LoRA merged) with `tunefuse export`, and checks each export against
# transformers: AutoModelForSequenceClassification must load it without a
# warning and give tunefuse's probabilities on the 872 dev sentences
# (scripts/check-export.py). Then the same for tiny random RoBERTa,
# XLM-RoBERTa, ELECTRA, DistilBERT, DeBERTa-v3-style and ModernBERT base
# models that transformers itself saves (MiniLM's tokenizer), trained
# briefly with SMART + LoRA and exported merged. Prints one JSON line per
# case.
#
# Environment: HF_PYTHON (a python with torch, transformers and peft;
# default python3), TUNEFUSE_DATA (the data folder, default ../shared/data),
# CARGO_TARGET_DIR as for the build. About 5 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${HF_PYTHON:-python3}
data=${TUNEFUSE_DATA:-../shared/data}
sst=$data/glue/SST-2
"$py" -c "import torch, transformers, peft" 2>/dev/null ||
  { echo "check-export: $py cannot import torch, transformers and peft (set HF_PYTHON)" >&2; exit 2; }
model=$(scripts/fetch-model.sh)
cargo build --release --quiet
bin=${CARGO_TARGET_DIR:-target}/release/tunefuse
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail=0
for case in full lora; do
  extra=()
  merge=()
  if [ "$case" = lora ]; then
    extra=(--method lora --lr 1e-3)
    merge=(--merge)
  fi
  "$bin" finetune --model "$model" --train-file "$sst/train.tsv" --dev-file "$sst/dev.tsv" \
    --train-examples 400 --epochs 1 --batch-size 16 --device cpu --set pooling=pooler \
    --output "$work/$case" "${extra[@]}" >/dev/null 2>&1
  "$bin" export --checkpoint "$work/$case/best" --output "$work/$case-hf" "${merge[@]}" >/dev/null
  "$bin" predict --checkpoint "$work/$case/best" --file "$sst/dev.tsv" >"$work/$case.jsonl"
  out=$("$py" scripts/check-export.py --export "$work/$case-hf" --predictions "$work/$case.jsonl" 2>/dev/null) ||
    fail=1
  echo "{\"case\": \"$case\", \"check\": $out}"
done
# The LoRA run again, as a PEFT adapter directory on the base model.
"$bin" export --checkpoint "$work/lora/best" --output "$work/lora-peft" >/dev/null
out=$("$py" scripts/check-export.py --export "$work/lora-peft" --predictions "$work/lora.jsonl" \
  --labels 0,1 2>/dev/null) || fail=1
echo "{\"case\": \"lora-peft\", \"check\": $out}"

# The other families: base models saved by transformers.
"$py" - "$work" "$model/tokenizer.json" <<'PY' 2>/dev/null
import json, shutil, sys, torch
from transformers import (RobertaConfig, RobertaModel, XLMRobertaConfig, XLMRobertaModel,
    ElectraConfig, ElectraModel, DistilBertConfig, DistilBertModel, DebertaV2Config, DebertaV2Model,
    ModernBertConfig, ModernBertModel)
work, tok = sys.argv[1], sys.argv[2]
c = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
         intermediate_size=64, max_position_embeddings=64)
torch.manual_seed(0)
for name, m in {
    "roberta": RobertaModel(RobertaConfig(**c, type_vocab_size=1, pad_token_id=1)),
    "xlm-roberta": XLMRobertaModel(XLMRobertaConfig(**c, type_vocab_size=1, pad_token_id=1)),
    "electra": ElectraModel(ElectraConfig(**c, embedding_size=16)),
    "distilbert": DistilBertModel(DistilBertConfig(vocab_size=30522, dim=32, n_layers=2,
        n_heads=4, hidden_dim=64, max_position_embeddings=64)),
    # DeBERTa-v3's settings: relative attention with log buckets, both
    # relative terms, shared projections, no absolute positions or types.
    "deberta-v2": DebertaV2Model(DebertaV2Config(**c, type_vocab_size=0, relative_attention=True,
        position_buckets=16, max_relative_positions=-1, pos_att_type=["p2c", "c2p"],
        position_biased_input=False, norm_rel_ebd="layer_norm", share_att_key=True,
        layer_norm_eps=1e-7)),
    # Local layers of ±4 tokens (sentences of up to 32 tokens cross them),
    # mean pooling in the head.
    "modernbert": ModernBertModel(ModernBertConfig(vocab_size=30522, hidden_size=32,
        num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, global_attn_every_n_layers=3, local_attention=8,
        pad_token_id=0, cls_token_id=101, sep_token_id=102, bos_token_id=101,
        eos_token_id=102, classifier_pooling="mean")),
}.items():
    d = f"{work}/base-{name}"
    m.save_pretrained(d)
    shutil.copy(tok, f"{d}/tokenizer.json")
    json.dump({"tokenizer_class": "BertTokenizerFast", "do_lower_case": True},
              open(f"{d}/tokenizer_config.json", "w"))
PY
for case in roberta xlm-roberta electra distilbert deberta-v2 modernbert; do
  "$bin" finetune --model "$work/base-$case" --train-file "$sst/train.tsv" --dev-file "$sst/dev.tsv" \
    --train-examples 64 --epochs 1 --batch-size 16 --max-len 32 --device cpu --lr 1e-3 \
    --method smart,lora --set pooling=pooler --output "$work/$case" >/dev/null 2>&1
  "$bin" export --merge --checkpoint "$work/$case/best" --output "$work/$case-hf" >/dev/null
  "$bin" predict --checkpoint "$work/$case/best" --file "$sst/dev.tsv" >"$work/$case.jsonl"
  out=$("$py" scripts/check-export.py --export "$work/$case-hf" --predictions "$work/$case.jsonl" \
    --max-len 32 2>/dev/null) || fail=1
  echo "{\"case\": \"$case\", \"check\": $out}"
done
exit "$fail"
