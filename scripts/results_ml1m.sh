#!/usr/bin/env bash
# Reproduce docs/results/ml1m-subset-*: the four ablation grids on the MovieLens-1M subset, future-window protocol.
# Usage: bash scripts/results_ml1m.sh [DATA_DIR (default ../shared/data)] [GRIDS (default: all four)]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data}
GRIDS=${2:-"objectives frequency negatives features"}
PF=${PF:-.venv/bin/pinnerformer}
DS=${DS:-/tmp/pinnerformer-ml1m-subset}
if [ ! -f "$DS/manifest.json" ]; then
  $PF data prepare --format movielens --input "$DATA/movielens-1m-subset" --output "$DS"
  $PF items embed-text "$DS"
fi
for grid in $GRIDS; do
  $PF experiment --dataset "$DS" --grid "$grid" --output "docs/results/ml1m-subset-$grid" --no-progress
done
