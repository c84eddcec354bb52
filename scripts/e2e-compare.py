#!/usr/bin/env python3
"""One line comparing a tunefuse fine-tuning run with the Hugging Face peer's
JSON line (../shared/bench/hf_finetune.py), then the same as JSON for
bench/e2e_gpu.json. Our throughput is the last logged step's examples/s
(training steps only, as the peer's); accuracy is the final dev evaluation.

  scripts/e2e-compare.py RUN_DIR PEER_JSON
"""
import json
import sys

run, peer = sys.argv[1], sys.argv[2]
steps = [json.loads(l) for l in open(f"{run}/metrics.jsonl") if '"examples_per_s"' in l]
if not steps:
    sys.exit(f"e2e-compare: {run}/metrics.jsonl has no logged step")
ours = steps[-1]["examples_per_s"]
acc = json.load(open(f"{run}/summary.json"))["last"]["accuracy"]
lines = open(peer).read().strip().splitlines()
if not lines:
    sys.exit(f"e2e-compare: {peer} is empty (the peer failed)")
p = json.loads(lines[-1])
print(
    f"e2e {p['method']} on {p['device']}: ours {ours:.0f} ex/s, dev {acc:.4f}; "
    f"peer {p['examples_per_s']:.0f} ex/s, dev {p['dev_accuracy']:.4f}; "
    f"ours/peer {ours / p['examples_per_s']:.2f}x"
)
print("e2e json:", json.dumps({"method": p["method"], "device": p["device"],
                               "ours_examples_per_s": ours, "ours_dev_accuracy": acc, "peer": p}))
