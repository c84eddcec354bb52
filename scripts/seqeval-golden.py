"""Writes tests/data/seqeval.json: hand-made and random tag sequences with
the entities, micro precision / recall / F1 and per-type scores that
seqeval (1.2.2, default mode) computes for them; tests/ner.rs checks
tunefuse's entity scores against it.

    pip install seqeval==1.2.2 && python scripts/seqeval-golden.py
"""
import json
import random

from seqeval.metrics import classification_report, f1_score, precision_score, recall_score
from seqeval.metrics.sequence_labeling import get_entities

cases = [
    ("exact IOB2", [["B-PER", "I-PER", "O", "B-LOC"]], [["B-PER", "I-PER", "O", "B-LOC"]]),
    ("partial span", [["B-PER", "I-PER", "I-PER", "O"]], [["B-PER", "I-PER", "O", "O"]]),
    ("type mismatch", [["B-ORG", "I-ORG", "O"]], [["B-LOC", "I-LOC", "O"]]),
    ("IOB1 runs", [["I-PER", "I-PER", "O", "I-LOC", "B-LOC"]], [["I-PER", "I-PER", "O", "I-LOC", "I-LOC"]]),
    ("I after O starts", [["O", "I-MISC", "I-MISC", "O"]], [["O", "B-MISC", "I-MISC", "O"]]),
    ("type change mid-run", [["B-PER", "I-LOC", "I-LOC"]], [["B-PER", "B-LOC", "I-LOC"]]),
    ("across sentences", [["B-PER"], ["I-PER", "O"]], [["B-PER"], ["B-PER", "O"]]),
    ("nothing predicted", [["B-PER", "O"]], [["O", "O"]]),
    ("nothing true", [["O", "O"]], [["B-PER", "O"]]),
    ("B after B", [["B-PER", "B-PER", "I-PER"]], [["B-PER", "I-PER", "I-PER"]]),
]
rng = random.Random(7)
tags = ["O", "O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "I-ORG", "B-ORG"]
for k in range(6):
    truth, pred = [], []
    for _ in range(rng.randint(3, 8)):
        n = rng.randint(1, 12)
        t = [rng.choice(tags) for _ in range(n)]
        p = [x if rng.random() < 0.7 else rng.choice(tags) for x in t]
        truth.append(t)
        pred.append(p)
    cases.append((f"random {k}", truth, pred))

out = []
for name, truth, pred in cases:
    report = classification_report(truth, pred, output_dict=True, zero_division=0)
    per_type = {
        k: {"precision": v["precision"], "recall": v["recall"], "f1": v["f1-score"], "support": int(v["support"])}
        for k, v in report.items()
        if k not in ("micro avg", "macro avg", "weighted avg")
    }
    out.append({
        "name": name,
        "truth": truth,
        "pred": pred,
        "entities": [list(e) for e in get_entities(truth)],
        "precision": precision_score(truth, pred),
        "recall": recall_score(truth, pred),
        "f1": f1_score(truth, pred),
        "per_type": per_type,
    })
with open("tests/data/seqeval.json", "w") as f:
    json.dump(out, f, indent=1)
print(f"{len(out)} cases")
