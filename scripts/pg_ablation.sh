#!/usr/bin/env bash
# The ablation of lopper's PG preset: the default run, then each piece of the preset switched off
# in turn, every run from the same seed and calibration windows, each pruned model scored on the
# same WikiText-2 windows. Prints a Markdown table (and writes it to OUT/ablation.md).
#
#   scripts/pg_ablation.sh [SPARSITY] [OUT] [EVAL_LIMIT] [STEPS]
#
# Defaults: 0.3, runs/pg-ablation, 100 windows of 128 tokens, the preset's steps.
set -euo pipefail
sparsity=${1:-0.3}
out=${2:-runs/pg-ablation}
limit=${3:-100}
steps=${4:-}
mkdir -p "$out"

variants=(
  "lopper preset (default)|"
  "1 off: per-type budget, heads and channels only|--budget per-type --units heads,channels"
  "2 off: sigmap start from Wanda-sp, no held-out choice|--init wanda-sp --plan-start false --held-out 0"
  "3 off: no bias compensation|--bias-compensation false"
  "4 off: moving-average baseline, independent masks|--baseline moving --antithetic false"
  "5 off: probabilities in [0, 1]|--prob-floor 0"
  "reference preset|--preset reference"
)

for i in "${!variants[@]}"; do
  name=${variants[$i]%%|*}
  flags=${variants[$i]#*|}
  dir="$out/v$i"
  if [[ -f "$dir/eval.json" ]]; then
    continue
  fi
  start=$(date +%s)
  # shellcheck disable=SC2086
  cargo xtask prune --model default --method pg --sparsity "$sparsity" \
    ${steps:+--steps "$steps"} $flags --eval wikitext2 --eval-limit "$limit" \
    --out "$dir" --force >"$out/v$i.log" 2>&1
  echo $(( $(date +%s) - start )) >"$dir/seconds"
  echo "done: $name" >&2
done

python3 - "$out" "$sparsity" "$limit" "${variants[@]}" <<'EOF'
import json, sys
out, sparsity, limit, variants = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
rows = [
    f"PG ablation at sparsity {sparsity}; WikiText-2 perplexity on the first {limit} windows of 128 tokens.",
    "",
    "| variant | flags | wikitext2@128 ppl | final choice (held-out loss: search / init) | start | seconds |",
    "|---|---|---:|---|---|---:|",
]
for i, v in enumerate(variants):
    name, flags = v.split("|", 1)
    d = f"{out}/v{i}"
    ev = json.load(open(f"{d}/eval.json"))
    ppl = ev["results"]["wikitext2"]["ppl"]
    plan = json.load(open(f"{d}/plan.json"))
    fc = plan.get("meta", {}).get("final_choice")
    if fc:
        losses = dict(fc["candidates"])
        choice = f"{fc['chosen']} ({losses.get('search', float('nan')):.4f} / {losses.get('init', float('nan')):.4f})"
        start = fc.get("init", {}).get("method", "")
    else:
        choice, start = "top-k (no choice)", ""
    secs = open(f"{d}/seconds").read().strip()
    rows.append(f"| {name} | `{flags or '(none)'}` | {ppl:.2f} | {choice} | {start} | {secs} |")
text = "\n".join(rows) + "\n"
open(f"{out}/ablation.md", "w").write(text)
print(text)
EOF
