#!/usr/bin/env bash
# Reproduce docs/results/beauty-loo and docs/results/ml1m-subset-loo: the default configuration for the
# leave-one-out protocol (preset `loo`, the same on both), trained with model selection on validation (second-to-last
# item, history removed from the ranking) and scored on the last item against the whole catalogue, with the user's
# history in the ranking and removed from it, beside the most-popular (and, on ML-1M, content) baselines.
# Usage: bash scripts/results_loo.sh [DATA_DIR (default ../shared/data)] [DATASETS (default: "beauty ml1m")]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data}
WHICH=${2:-"beauty ml1m"}
PF=${PF:-.venv/bin/pinnerformer}
BEAUTY=${BEAUTY:-/tmp/pinnerformer-beauty}
ML1M=${ML1M:-/tmp/pinnerformer-ml1m-subset-loo}
for d in $WHICH; do
  case $d in
    beauty)
      if [ ! -f "$BEAUTY/manifest.json" ]; then
        $PF data prepare --format sequences --input "$DATA/amazon-beauty" --output "$BEAUTY"
      fi
      $PF experiment --dataset "$BEAUTY" --grid default --preset loo --output docs/results/beauty-loo --no-progress
      ;;
    ml1m)
      # every rating is an interaction (the leave-one-out target is the last rated movie, whatever its rating);
      # the rating itself stays the action type
      if [ ! -f "$ML1M/manifest.json" ]; then
        $PF data prepare --format movielens --input "$DATA/movielens-1m-subset" --output "$ML1M" \
          --positive love,like,neutral,dislike
        $PF items embed-text "$ML1M"
      fi
      # the preset as chosen on Beauty, untouched (issue 19: the configuration must carry over without retuning)
      $PF experiment --dataset "$ML1M" --grid default --preset loo --output docs/results/ml1m-subset-loo --no-progress
      ;;
    *) echo "unknown dataset '$d' (beauty or ml1m)" >&2; exit 2 ;;
  esac
done
