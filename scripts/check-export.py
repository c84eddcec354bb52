#!/usr/bin/env python3
"""Checks a `tunefuse export` directory against transformers.

Loads DIR with AutoModelForSequenceClassification and AutoTokenizer,
failing on any warning transformers logs while loading (missing or
unexpected weights, a newly initialised head, ...), then compares its
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
with warnings.catch_warnings(record=True) as py_warnings:
    warnings.simplefilter("always")
    model = AutoModelForSequenceClassification.from_pretrained(a.export).eval()
    tok = AutoTokenizer.from_pretrained(a.export)
problems = catch.seen + [str(w.message) for w in py_warnings]

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
labels_ok = all(model.config.id2label[ours_i] == r["predicted"]
                for ours_i, r in zip(ours.argmax(-1).tolist(), rows))
out = {
    "examples": len(rows),
    "max_abs_prob_diff": diff,
    "argmax_agreement": agree,
    "id2label_matches": labels_ok,
    "load_warnings": problems,
    "transformers": transformers.__version__,
    "torch": torch.__version__,
}
print(json.dumps(out))
sys.exit(0 if diff <= a.atol and labels_ok and not problems else 1)
