"""How reproducible is the regression estimator's linear surrogate? Fits it separately on two
disjoint sets of pairs, taken from two checkpoints of one run (`--estimator regression`,
copied when the run passed steps A and B), and prints the correlation of the two fits' per-unit
coefficients for each unit kind. A coefficient that is mostly noise correlates near 0.

    cargo xtask prune ... --estimator regression --channel-block 64 --warmup 600 --checkpoint-every 50 --out RUN
    # copy RUN/checkpoint.json when its "step" is 300 and again at 600
    python scripts/surrogate_halves.py ckpt-300.json ckpt-600.json

Needs numpy (a scratch venv: `python3 -m venv /tmp/np && /tmp/np/bin/pip install numpy`).
"""

import json
import sys

import numpy as np

RIDGE = 1.0  # lopper-policy's ridge, in pairs

first, second = (json.load(open(p)) for p in sys.argv[1:3])
units = first["config"]["units"]
if not first.get("channel_blocks"):
    sys.exit("these checkpoints have no channel blocks: run the search with --channel-block N")
n = len(first["probs"])
ga = np.array(first["surrogate"]["gram"]).reshape(n, n)
ra = np.array(first["surrogate"]["rhs"])
gb = np.array(second["surrogate"]["gram"]).reshape(n, n) - ga
rb = np.array(second["surrogate"]["rhs"]) - ra
eye = np.eye(n)
wa = np.linalg.solve(ga + eye * RIDGE, ra)
wb = np.linalg.solve(gb + eye * RIDGE, rb)
w = np.linalg.solve(ga + gb + eye * RIDGE, ra + rb)
pairs = (first["surrogate"]["pairs"], second["surrogate"]["pairs"] - first["surrogate"]["pairs"])
print(f"{n} units; pairs in the two halves: {pairs[0]}, {pairs[1]}")
print("| units | count | correlation of the halves | mean coefficient | sd of coefficients |")
print("|---|---:|---:|---:|---:|")
# The space's order: KV groups, then channel blocks, then layers.
n_layers = len(first["channel_blocks"]) if "layer" in units else 0
n_blocks = sum(len(b) for b in first["channel_blocks"]) if "channel" in units else 0
n_kv = n - n_layers - n_blocks
slices = [("KV groups", 0, n_kv), ("channel blocks", n_kv, n - n_layers), ("layers", n - n_layers, n)]
for name, s, e in slices:
    if e > s:
        c = np.corrcoef(wa[s:e], wb[s:e])[0, 1]
        print(f"| {name} | {e - s} | {c:.3f} | {w[s:e].mean():.4f} | {w[s:e].std():.4f} |")
