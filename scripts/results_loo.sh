#!/usr/bin/env bash
# Reproduce docs/results/{beauty,ml1m-subset}-loo and -loo-ensemble: the default configuration for the
# leave-one-out protocol (preset `loo`, the same on both) and its ensemble of three (preset `loo-ensemble`),
# trained with model selection on validation (second-to-last item, history removed from the ranking) and scored
# on the last item against the whole catalogue, with the user's history in the ranking and removed from it, beside the most-popular (and, on ML-1M, content) baselines.
# Usage: bash scripts/results_loo.sh [DATA_DIR (the public datasets, docs/data.md; default $PINNERFORMER_SHARED_DATA, else ../shared/data)] [DATASETS (default: "beauty ml1m"; also ml-latest-small, ml-100k, taobao)]
#        (and sequences:PATH, any file in Beauty.txt's format, e.g. sequences:$DATA/Sports_and_Outdoors.txt (a path
#        without spaces), prepared into $WORK (default /tmp), its report in docs/results/sports-and-outdoors-PRESET)
#        [PRESETS (default: "loo loo-ensemble loo-distilled")]
# loo-distilled: one network (preset loo) distilled from the loo-ensemble run of the same seed and dataset, with its
# item-kNN blend (loss.teacher, objectives/teacher_distillation.py); that run is trained first when its report folder
# does not hold it yet; TEACHER_WEIGHT (default 3, chosen on Beauty seed 0's validation: 0.0791 against 0.0778 with 1)
# weighs its KL term
# SEED=N (default 0) trains with another seed and writes docs/results/...-seed-N instead; once a report has two seeds
# or more, docs/results/...-seeds puts them side by side (`pinnerformer seeds`: mean, spread, validation curves)
# REFIT=1: every report also trains its network(s) again on the validation targets too, for the epochs it chose on
# validation (`experiment --refit`), and reports that beside it (not like for like with the published networks)
set -euo pipefail
CALLER=$PWD  # a sequences:PATH relative to where the script was called from
cd "$(dirname "$0")/.."
DATA=${1:-${PINNERFORMER_SHARED_DATA:-../shared/data}}
WHICH=${2:-"beauty ml1m"}
PRESETS=${3:-"loo loo-ensemble loo-distilled"}
PF=${PF:-.venv/bin/pinnerformer}
BEAUTY=${BEAUTY:-/tmp/pinnerformer-beauty}
ML1M=${ML1M:-/tmp/pinnerformer-ml1m-subset-loo}
SEED=${SEED:-0}
TEACHER_WEIGHT=${TEACHER_WEIGHT:-3}
REFIT_FLAG=$([ "${REFIT:-0}" = 1 ] && echo "--refit" || true)
SUFFIX=$([ "$SEED" = 0 ] || echo "-seed-$SEED")
# the seeds of one report side by side (pinnerformer seeds): docs/results/NAME-PRESET-seeds, once two seeds are there
seeds_summary() {
  local name=$1 p=$2 reps=()
  for d in "docs/results/$name-$p" docs/results/"$name-$p"-seed-*; do
    [ -f "$d/results.json" ] && reps+=("$d")
  done
  if [ "${#reps[@]}" -ge 2 ]; then $PF seeds "${reps[@]}" --output "docs/results/$name-$p-seeds" > /dev/null; fi
}
# one report: experiment DATASET NAME PRESET (NAME: the report folder's prefix, e.g. beauty or ml1m-subset)
report() {
  local ds=$1 name=$2 p=$3
  if [ "$p" = loo-distilled ]; then
    local teacher="docs/results/$name-loo-ensemble$SUFFIX/runs/pinnerformer"
    if [ ! -f "$teacher/summary.json" ]; then  # the teacher, never refit (a refit cannot teach)
      local refit=$REFIT_FLAG
      REFIT_FLAG=""
      report "$ds" "$name" loo-ensemble
      REFIT_FLAG=$refit
    fi
    local out="docs/results/$name-$p$SUFFIX"
    mkdir -p "$out"
    printf '{"loss": {"teacher": "%s", "teacher_weight": %s}}\n' "$teacher" "$TEACHER_WEIGHT" > "$out/distil.json"
    $PF experiment --dataset "$ds" --grid default --preset loo --config "$out/distil.json" --seed "$SEED" \
      --output "$out" --no-progress $REFIT_FLAG
    seeds_summary "$name" "$p"
  else
    $PF experiment --dataset "$ds" --grid default --preset "$p" --seed "$SEED" \
      --output "docs/results/$name-$p$SUFFIX" --no-progress $REFIT_FLAG
    seeds_summary "$name" "$p"
  fi
}
for d in $WHICH; do
  case $d in
    beauty)
      if [ ! -f "$BEAUTY/manifest.json" ]; then
        $PF data prepare --format sequences --input "$DATA/amazon-beauty" --output "$BEAUTY"
      fi
      for p in $PRESETS; do report "$BEAUTY" beauty "$p"; done
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
      for p in $PRESETS; do report "$ML1M" ml1m-subset "$p"; done
      ;;
    ml-latest-small)
      # MovieLens latest-small (610 users, 9,742 movies): every rating an interaction, the preset untouched
      MLS=${MLS:-/tmp/pinnerformer-ml-latest-small}
      if [ ! -f "$MLS/manifest.json" ]; then
        $PF data prepare --format movielens-latest --input "$DATA/movielens-latest-small" --output "$MLS" \
          --positive love,like,neutral,dislike
      fi
      for p in $PRESETS; do report "$MLS" ml-latest-small "$p"; done
      ;;
    ml-100k)
      # MovieLens-100K (943 users, 1,682 movies, `u.data`): every rating an interaction, the preset untouched
      ML100K=${ML100K:-/tmp/pinnerformer-ml-100k}
      if [ ! -f "$ML100K/manifest.json" ]; then
        $PF data prepare --format movielens --input "$DATA/movielens-100k" --output "$ML100K" \
          --positive love,like,neutral,dislike
      fi
      for p in $PRESETS; do report "$ML100K" ml-100k "$p"; done
      ;;
    taobao)
      # Taobao UserBehavior, its first 814 users (55,233 items; page views, carts, favourites, buys): every action an
      # interaction, the preset untouched; the rows outside the file's 9 days are dropped and counted
      TAOBAO=${TAOBAO:-/tmp/pinnerformer-taobao-loo}
      if [ ! -f "$TAOBAO/manifest.json" ]; then
        $PF data prepare --format taobao --input "$DATA/taobao-userbehavior-head" --skip-invalid \
          --min-time 2017-11-25 --max-time 2017-12-04 --positive pv,cart,fav,buy --output "$TAOBAO"
      fi
      for p in $PRESETS; do report "$TAOBAO" taobao "$p"; done
      ;;
    sequences:*)
      # any file of this family's format (one line per user: `user item item …` in time order, as Beauty.txt;
      # FILE-STEM_item2attributes.json beside it is read as the items' attributes): the preset untouched. The
      # report folder is named for the file (Sports_and_Outdoors.txt -> docs/results/sports-and-outdoors-loo)
      SRC=${d#sequences:}
      case $SRC in /*) ;; *) SRC=$CALLER/$SRC ;; esac
      [ -f "$SRC" ] || { echo "sequences:$SRC: no such file (expected sequences:PATH/TO/NAME.txt)" >&2; exit 2; }
      NAME=$(basename "$SRC" .txt | tr '[:upper:]_' '[:lower:]-' | tr -cd 'a-z0-9.-')
      case $NAME in
        "") echo "sequences:$SRC: no letters or digits in the file's name to name its report by; rename it" >&2
            exit 2 ;;
        beauty|ml1m-subset|ml-100k|ml-latest-small|taobao)
            echo "sequences:$SRC: '$NAME' is a report of this script's own; rename the file" >&2; exit 2 ;;
      esac
      SEQ=${WORK:-/tmp}/pinnerformer-seq-$NAME
      if [ -f "$SEQ/manifest.json" ] && ! grep -q "$(sha256sum "$SRC" | cut -d' ' -f1)" "$SEQ/manifest.json"; then
        echo "sequences:$SRC: $SEQ was prepared from another file; remove it or set WORK elsewhere" >&2; exit 2
      fi
      if [ ! -f "$SEQ/manifest.json" ]; then
        $PF data prepare --format sequences --input "$SRC" --output "$SEQ"
      fi
      for p in $PRESETS; do report "$SEQ" "$NAME" "$p"; done
      ;;
    *) echo "unknown dataset '$d' (beauty, ml1m, ml-latest-small, ml-100k, taobao or sequences:PATH)" >&2; exit 2 ;;
  esac
done
