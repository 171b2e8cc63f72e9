#!/usr/bin/env bash
# The acceptance grid of issues 17 and 18: every structured method, each of its cuts, at 20%,
# 30% and 50% on the default model, under the full protocol (every WikiText-2 and PTB window at
# 128 and 2,048 tokens, the seven tasks on their first 500 examples), bf16, in one `compare`
# folder. On the 2-core CPU a cell takes 15-25 minutes, the grid about 18 hours, more than one
# working session: finished cells are kept in docs/results/grid/ (committed), every run seeds
# runs/grid from them, resumes where the last one stopped, and copies each newly finished cell
# back as soon as it is written (with the commit that computed it). The cell in progress keeps
# the tasks its evaluation finished (`eval-partial.json`, copied here too and reused by the
# next run where its model is the same to the bit), so an interruption loses at most that
# cell's plan and the task in progress.
#
#   scripts/grid.sh            compute the missing cells (in the order of `methods` below)
#   scripts/grid.sh --report   only rewrite docs/results/grid/results.md from the kept cells
set -euo pipefail
cd "$(dirname "$0")/.."
keep=docs/results/grid
out=${GRID_OUT:-runs/grid}
# Issue 17's list first (pg with its defaults, the others as their papers cut, and FLAP
# without its compensation), then the least-squares cells, then the other cuts issue 18
# compares.
methods=dense,pg+ls,flap,sleb,llm-bip,block-influence,ifso,llm-pruner,wanda-sp,flap+none
methods+=,flap+ls,sleb+ls,llm-bip+ls,wanda-sp+ls
methods+=,pg+bias,pg+none,sleb+bias,llm-bip+bias,wanda-sp+bias
# The OBS cut where it runs (issue 18): on PG's plans and on FLAP's, the two it helps or ties.
methods+=,pg+obs,flap+obs
# shellcheck disable=SC2054 # commas separate compare's list values, not elements
args=(--model default --dtype bf16 --methods "$methods" --exact-size --sparsity 0.2,0.3,0.5
  --tasks wikitext2,ptb,boolq,piqa,hellaswag,arc_easy,arc_challenge,openbookqa,winogrande
  --seq-lens 128,2048 --mc-limit 500 --out "$out")

# Seed the folder from the kept cells (never overwriting what the folder already holds); with
# none kept yet, `compare` makes the folder.
mkdir -p "$keep/cells"
if [[ -f $keep/settings.json ]]; then
  mkdir -p "$out"
  [[ -f $out/settings.json ]] || cp "$keep/settings.json" "$out/"
  for d in "$keep"/cells/*/ "$keep"/layer-orders/; do
    [[ -d $d ]] || continue
    rel=${d#"$keep"/}
    mkdir -p "$out/$rel"
    cp -n "$d"* "$out/$rel" 2>/dev/null || true
  done
fi

# Copy what the folder holds and the kept cells lack.
commit="$(git rev-parse HEAD)$(git diff --quiet HEAD -- crates xtask Cargo.lock || echo '+uncommitted')"
keep_cells() {
  [[ -f $out/settings.json ]] && cp "$out/settings.json" "$keep/"
  for c in "$out"/cells/*/cell.json; do
    [[ -f $c ]] || continue
    id=$(basename "$(dirname "$c")")
    if [[ ! -f $keep/cells/$id/cell.json ]]; then
      mkdir -p "$keep/cells/$id"
      cp "$c" "$keep/cells/$id/cell.json"
      echo "$commit" >"$keep/cells/$id/commit"
      echo "grid: kept $id" >&2
    fi
  done
  # The finished tasks of the cell in progress; a whole cell needs none.
  for p in "$out"/cells/*/eval-partial.json; do
    [[ -f $p ]] || continue
    id=$(basename "$(dirname "$p")")
    [[ -f $keep/cells/$id/cell.json ]] && continue
    mkdir -p "$keep/cells/$id"
    cp "$p" "$keep/cells/$id/"
  done
  for c in "$keep"/cells/*/cell.json; do
    [[ -f $c ]] && rm -f "$(dirname "$c")/eval-partial.json"
  done
  # compare rewrites the table (marked partial) and its plots after every cell.
  cp "$out"/results.md "$out"/results.json "$out"/*.png "$keep/" 2>/dev/null || true
  if [[ -d $out/layer-orders ]]; then
    mkdir -p "$keep/layer-orders"
    cp "$out"/layer-orders/* "$keep/layer-orders/" 2>/dev/null || true
  fi
}

if [[ ${1:-} != --report ]]; then
  cargo xtask compare "${args[@]}" &
  pid=$!
  # (bash runs the trap when the `sleep` below ends: stopping takes up to 30 s)
  trap 'kill $pid 2>/dev/null; keep_cells; exit 130' INT TERM
  while kill -0 "$pid" 2>/dev/null; do
    sleep 30
    keep_cells
  done
  wait "$pid" || echo "grid: compare stopped before the grid was done" >&2
  keep_cells
fi
cargo xtask compare "${args[@]}" --report-only >/dev/null
keep_cells
echo "grid: $(find "$keep/cells" -name cell.json | wc -l) cells kept in $keep" >&2
