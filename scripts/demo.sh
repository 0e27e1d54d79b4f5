#!/usr/bin/env bash
# Set up (scripts/install.sh) and run the main comparison on UCI Multiple Features (pix + zer):
# joint training vs MIE, its ablations and the MIE recipes, 3 seeds, validation-selected;
# prints the table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
mie compare --dataset mfeat --modalities pix,zer \
    --methods joint,alternating,mie_sam_only,mie_gm_only,mie,mie_recipe,mie_recipe_heads --seeds "${SEEDS:-0,1,2}" --out runs/mfeat_pix_zer
