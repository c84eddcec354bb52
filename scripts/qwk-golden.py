"""Writes tests/data/qwk.json: integer rating pairs with scikit-learn's
cohen_kappa_score(a, b, weights="quadratic"); tests/scoring.rs checks
tunefuse's quadratic weighted kappa against it.

    pip install scikit-learn && python scripts/qwk-golden.py
"""
import json
import random

from sklearn.metrics import cohen_kappa_score

rng = random.Random(3)
cases = [
    ([0, 1, 2, 3], [0, 1, 2, 3]),
    ([0, 1, 2, 3], [3, 2, 1, 0]),
    ([2, 4, 6, 12, 7], [2, 5, 6, 10, 7]),
    ([1, 1, 2, 2], [1, 2, 1, 2]),
    ([0, 0, 3], [1, 1, 3]),
]
for n, lo, hi in [(30, 0, 3), (50, 2, 12), (80, 0, 60), (25, 1, 6)]:
    a = [rng.randint(lo, hi) for _ in range(n)]
    b = [min(hi, max(lo, x + rng.choice([-2, -1, 0, 0, 0, 1, 2]))) for x in a]
    cases.append((a, b))
out = [{"a": a, "b": b, "qwk": cohen_kappa_score(a, b, weights="quadratic")} for a, b in cases]
with open("tests/data/qwk.json", "w") as f:
    json.dump(out, f, indent=1)
print(len(out), "cases")
