#!/usr/bin/env python3
"""Checks a `tunefuse export` directory against transformers.

Loads DIR with AutoModelForSequenceClassification and AutoTokenizer (a
PEFT adapter directory: its base model with --labels, then
PeftModel.from_pretrained), failing on any warning logged while loading
(missing or unexpected weights, a newly initialised head, ...; for an
adapter, while the adapter loads), then compares its
class probabilities on the examples of PREDICTIONS (the JSON lines of
`tunefuse predict`) with tunefuse's, and its id2label with tunefuse's label
names.

    python3 scripts/check-export.py --export DIR --predictions preds.jsonl \
        [--max-len 128] [--atol 1e-4]

Prints one JSON line (examples, max |Δp|, agreement of the argmax, the
transformers version) and exits 1 when a check fails.
"""
import argparse
import json
import logging
import sys
import warnings

ap = argparse.ArgumentParser()
ap.add_argument("--export", required=True)
ap.add_argument("--predictions", required=True)
ap.add_argument("--max-len", type=int, default=128)
ap.add_argument("--atol", type=float, default=1e-4)
ap.add_argument("--labels", help="comma-separated label names, for a PEFT adapter directory "
                "(its base model is loaded with them; only the adapter's load is checked)")
a = ap.parse_args()

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402


class Catch(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.seen = []

    def emit(self, record):
        self.seen.append(record.getMessage())


catch = Catch()
transformers.logging.get_logger().addHandler(catch)
transformers.logging.set_verbosity_warning()
import os  # noqa: E402

peft_dir = os.path.exists(os.path.join(a.export, "adapter_config.json"))
if peft_dir:
    # The base model gets a new head here (transformers warns about it);
    # PeftModel then replaces it with the adapter's saved head.
    from peft import PeftModel  # noqa: E402
    base_path = json.load(open(os.path.join(a.export, "adapter_config.json")))["base_model_name_or_path"]
    labels = a.labels.split(",")
    base = AutoModelForSequenceClassification.from_pretrained(
        base_path, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={l: i for i, l in enumerate(labels)})
    catch.seen.clear()
with warnings.catch_warnings(record=True) as py_warnings:
    warnings.simplefilter("always")
    if peft_dir:
        model = PeftModel.from_pretrained(base, a.export).eval()
    else:
        model = AutoModelForSequenceClassification.from_pretrained(a.export).eval()
    tok = AutoTokenizer.from_pretrained(a.export)
# Deprecation notices from the libraries' own code (peft calling a renamed
# transformers method, say) say nothing about the files and are reported
# apart; every other warning fails the check.
deprecation = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
problems = catch.seen + [str(w.message) for w in py_warnings if not issubclass(w.category, deprecation)]
notices = [str(w.message) for w in py_warnings if issubclass(w.category, deprecation)]

rows = [json.loads(l) for l in open(a.predictions) if l.strip()]
texts = [r["text"] for r in rows]
pairs = [r.get("pair") for r in rows]
ours = torch.tensor([r["probabilities"] for r in rows], dtype=torch.float64)
theirs = []
with torch.no_grad():
    for i in range(0, len(texts), 64):
        t, p = texts[i : i + 64], pairs[i : i + 64]
        enc = tok(t, p if any(x is not None for x in p) else None, padding=True,
                  truncation=True, max_length=a.max_len, return_tensors="pt")
        theirs.append(torch.softmax(model(**enc).logits.double(), -1))
theirs = torch.cat(theirs)
diff = (ours - theirs).abs().max().item()
agree = (ours.argmax(-1) == theirs.argmax(-1)).double().mean().item()
config = model.base_model.model.config if peft_dir else model.config
labels_ok = all(config.id2label[ours_i] == r["predicted"]
                for ours_i, r in zip(ours.argmax(-1).tolist(), rows))
out = {
    "examples": len(rows),
    "max_abs_prob_diff": diff,
    "argmax_agreement": agree,
    "id2label_matches": labels_ok,
    "load_warnings": problems,
    "library_deprecation_notices": notices,
    "transformers": transformers.__version__,
    "torch": torch.__version__,
}
print(json.dumps(out))
sys.exit(0 if diff <= a.atol and labels_ok and not problems else 1)
