#!/usr/bin/env bash
# The recipe's evidence: on each task of the development suite (configs/suite), tune joint training,
# plain alternation and the MIE recipe with the same number of trials on validation, then re-run each
# method's best parameters over 5 seeds (test read once per run), and write docs/recipe_suite.md.
# Two lanes of three tasks run side by side (one torch thread each). About 45 minutes on 2 cores.
#   bash scripts/recipe_suite.sh [OUT=runs/suite] [TRIALS=8] [TRIAL_SEEDS=0] [REPORT=docs/recipe_suite.md] [RECIPE=mie_recipe]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/suite}
trials=${2:-8}
trial_seeds=${3:-0}
report=${4:-docs/recipe_suite.md}
recipe=${5:-mie_recipe}
methods=joint,alternating,$recipe
lane() {
  for task in "$@"; do
    .venv/bin/mie tune --config "configs/suite/$task.yaml" --methods "$methods" --trials "$trials" \
      --trial-seeds "$trial_seeds" --seeds 0,1,2,3,4 --out "$out/$task" > "$out/$task.log" 2>&1
  done
}
mkdir -p "$out"
lane segment mfeat_fac_mor basicmotions &
lane htad mfeat_pix_zer mfeat_all_views &
wait
.venv/bin/python scripts/recipe_report.py "$out" --out "$report" --recipe "$recipe"
