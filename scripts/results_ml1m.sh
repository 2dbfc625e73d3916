#!/usr/bin/env bash
# Reproduce docs/results/ml1m-subset-*: the four ablation grids on the MovieLens-1M subset, future-window protocol.
# Usage: bash scripts/results_ml1m.sh [DATA_DIR (the public datasets, docs/data.md; default $PINNERFORMER_SHARED_DATA, else ../shared/data)] [GRIDS (default: all four, then daily)]
# "daily" replays the daily embedding job over Nov-Dec 2000 with the objectives grid's dense all-action run
# (run the objectives grid first) and writes docs/results/ml1m-subset-daily/ (the staleness curve).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-${PINNERFORMER_SHARED_DATA:-../shared/data}}
GRIDS=${2:-"objectives frequency negatives features daily"}
PF=${PF:-.venv/bin/pinnerformer}
DS=${DS:-/tmp/pinnerformer-ml1m-subset}
if [ ! -f "$DS/manifest.json" ]; then
  $PF data prepare --format movielens --input "$DATA/movielens-1m-subset" --output "$DS"
  $PF items embed-text "$DS"
fi
# Test protocol: 16 cut-offs pooled, every 14 days from 2000-10-29 to 2001-05-27 (label windows of 14 days do
# not overlap; each (user, cut-off) window counts once): ~5x the user-windows of the single best day.
CUTOFFS=$(python3 -c "import datetime as d; print(','.join(str(d.date(2000,10,29)+d.timedelta(days=14*i)) for i in range(16)))")
for grid in $GRIDS; do
  if [ "$grid" = daily ]; then
    rm -rf /tmp/pinnerformer-ml1m-daily-snapshots
    $PF simulate-daily --run docs/results/ml1m-subset-objectives/runs/dense-all-action --dataset "$DS" \
      --from 2000-11-01 --to 2000-12-31 --output docs/results/ml1m-subset-daily \
      --snapshots /tmp/pinnerformer-ml1m-daily-snapshots --no-progress
    continue
  fi
  $PF experiment --dataset "$DS" --grid "$grid" --output "docs/results/ml1m-subset-$grid" --cutoff "$CUTOFFS" --no-progress
done
