#!/usr/bin/env bash
# Reproduce docs/results/ranking-<dataset> (needs the [text] extra for ML-1M's content vectors): the TransAct papers' ablations (Table 1, Table 2, early fusion,
# time-window mask, output compression) on real data, one command per dataset:
#   prepare the dataset -> rank prepare (requests, time split, a PinnerFormer trained on the training period only)
#   -> rank experiment (each variant trained with selection on validation, all scored on the test period).
# Usage: bash scripts/results_ranking.sh [DATA_DIR (the public datasets, docs/data.md; default $PINNERFORMER_SHARED_DATA, else ../shared/data)] [DATASETS (default "ml1m taobao mind")]
#        [MODEL (transact, the default: TransAct's tables; v2: TransAct V2's tables into docs/results/ranking-v2-<dataset>,
#         with scripts/ranking-v2.json, reusing ranking data in $WORK that already has the int8 table; the tables
#         V2_TABLES, default v2-table2,v2-lifelong,v2-nal)]
#   The committed V2 results: bash scripts/results_ranking.sh ../shared/data ml1m v2, then
#   V2_TABLES=v2-table2 bash scripts/results_ranking.sh ../shared/data "taobao mind" v2
#   ml1m-session: ML-1M with session requests (30-minute gap: the sequence holds the same day's earlier sessions),
#   the paper's 100-action sequences, tables 1 and 2 only
# The runs (checkpoints) stay in $WORK (default /tmp/pinnerformer-ranking); the report, tables and PNGs are copied
# into docs/results/ranking-<dataset>/.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-${PINNERFORMER_SHARED_DATA:-../shared/data}}
WHICH=${2:-"ml1m taobao mind"}
MODEL=${3:-transact}
PF=${PF:-.venv/bin/pinnerformer}
WORK=${WORK:-/tmp/pinnerformer-ranking}
mkdir -p "$WORK"
for d in $WHICH; do
  extra=()
  exp=()
  src=$d
  case $d in
    # titles + genres -> all-MiniLM-L6-v2 content vectors: the frozen item vectors of sequences and candidates
    ml1m)   args=(--format movielens --input "$DATA/movielens-1m-subset"); extra=(--item-vectors content) ;;
    # the original holds timestamps far outside its 9 days: dropped and counted
    taobao) args=(--format taobao --input "$DATA/taobao-userbehavior-head" --skip-invalid --min-time 2017-11-25
                  --max-time 2017-12-04)
            extra=(--item-vectors interests) ;;  # no content: a fixed vector per category
    mind)   args=(--format mind --input "$DATA/mind-small-sample") ;;
    ml1m-session)
            src=ml1m; args=(--format movielens --input "$DATA/movielens-1m-subset")
            extra=(--item-vectors content --request session)
            exp=(--tables table1,table2 --config scripts/ranking-seq100.json) ;;
    *) echo "unknown dataset $d (expected ml1m, taobao, mind, ml1m-session)" >&2; exit 2 ;;
  esac
  out=docs/results/ranking-$d
  expdir=$WORK/$d-experiment
  if [ "$MODEL" = v2 ]; then
    exp=(--tables "${V2_TABLES:-v2-table2,v2-lifelong,v2-nal}" --config scripts/ranking-v2.json)
    out=docs/results/ranking-v2-$d
    expdir=$WORK/$d-v2-experiment
  fi
  if [ "$MODEL" != v2 ] || ! grep -q '"int8_table": {' "$WORK/$d-rank/manifest.json" 2>/dev/null; then
    if [ ! -f "$WORK/$src/manifest.json" ] || [ "$src" = "$d" ]; then
      $PF data prepare "${args[@]}" --output "$WORK/$src" --overwrite > "$WORK/$src.prepare.txt"
      if [ "$src" = ml1m ]; then $PF items embed-text "$WORK/$src" 2> "$WORK/$src.embed.log"; fi
    fi
    $PF rank prepare --dataset "$WORK/$src" --output "$WORK/$d-rank" --overwrite "${extra[@]}" 2> "$WORK/$d-rank.log"
  fi
  $PF rank experiment --data "$WORK/$d-rank" --output "$expdir" "${exp[@]}" 2> "$expdir.log" > /dev/null
  mkdir -p "$out"
  cp "$expdir"/{README.md,report.json,report.md,*.png} "$out/"
  grep -v 'it/s\|row/s\|seq/s' "$WORK/$d-rank.log" > "$out/rank-prepare.log" || true
  echo "$out"
done
