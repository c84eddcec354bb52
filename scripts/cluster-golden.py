"""Writes tests/data/clustering.json: label / cluster pairs with
scikit-learn's normalized_mutual_info_score (arithmetic normalisation, its
default) and the clustering accuracy of the best one-to-one map (scipy's
linear_sum_assignment on the contingency table); tests/cluster.rs checks
tunefuse's NMI and accuracy against them.

    pip install scikit-learn && python scripts/cluster-golden.py
"""
import json
import random

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import normalized_mutual_info_score


def accuracy(t, p):
    n = max(max(t), max(p)) + 1
    c = np.zeros((n, n), dtype=np.int64)
    for a, b in zip(t, p):
        c[b, a] += 1
    r, k = linear_sum_assignment(-c)
    return c[r, k].sum() / len(t)


rng = random.Random(5)
cases = [
    ([0, 0, 1, 1, 2, 2], [2, 2, 0, 0, 1, 1]),
    ([0, 0, 1, 1], [0, 1, 0, 1]),
    ([0, 1, 2, 3], [0, 0, 0, 0]),
    ([0, 0, 0, 1], [1, 1, 1, 1]),
    ([0, 0, 1, 1, 1], [0, 1, 1, 2, 2]),
]
for n, kt, kp, noise in [(40, 3, 3, 0.2), (100, 5, 7, 0.4), (200, 8, 8, 0.6), (60, 4, 2, 0.1)]:
    t = [rng.randrange(kt) for _ in range(n)]
    perm = list(range(kp))
    rng.shuffle(perm)
    p = [perm[x % kp] if rng.random() > noise else rng.randrange(kp) for x in t]
    cases.append((t, p))
out = [
    {
        "truth": t,
        "pred": p,
        "nmi": normalized_mutual_info_score(t, p),
        "acc": accuracy(t, p),
    }
    for t, p in cases
]
with open("tests/data/clustering.json", "w") as f:
    json.dump(out, f, indent=1)
print(len(out), "cases")
