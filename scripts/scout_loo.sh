#!/usr/bin/env bash
# Reproduce the scouting rounds of docs/results/README.md (leave-one-out, chosen on validation only): each variant
# trains with the preset `loo` of its time plus its overrides, and prints its validation NDCG@10 per epoch: rows
# of the first three rounds on the preset before 2026-11-27 ($BEFORE and $PRE5 set back on today's preset), `final`
# and `final-*` (fourth and fifth rounds) on the preset of the fourth round ($PRE5), `now*` (the fifth round's
# seeds and the sixth round) on the fifth round's preset ($PRE6), `today*` (the sixth round's last rows and the
# seventh round) on the sixth round's preset ($PRE7: today's preset with its 20-epoch schedule).
# Usage: bash scripts/scout_loo.sh [DATA_DIR (the public datasets, docs/data.md; default $PINNERFORMER_SHARED_DATA, else ../shared/data)] [VARIANTS (default: all)]
# Runs go to $SCOUT (default /tmp/pinnerformer-scout/VARIANT); finished ones are only printed again. Rows the
# table marks "stopped" were cut short by hand to save CPU time; here they run to their end (same curve prefix).
# On Beauty item_features auto and id are the same model (no content vectors).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-${PINNERFORMER_SHARED_DATA:-../shared/data}}
PF=${PF:-.venv/bin/pinnerformer}
PY=${PY:-.venv/bin/python}
SCOUT=${SCOUT:-/tmp/pinnerformer-scout}
BEAUTY=${BEAUTY:-/tmp/pinnerformer-beauty}
ML1M=${ML1M:-/tmp/pinnerformer-ml1m-subset-loo}
# the first preset `loo` (64-d, MLP item tower, content vector where there is one, no input dropout)
PREV='"item_features": "auto", "item_tower": "mlp", "input_dropout": 0.0, "width": 64, "dim": 64, "id_dim": 64'
TIED='"item_features": "id", "item_tower": "none", "width": 64, "dim": 64, "id_dim": 64'
# the preset `loo` of the fourth round (2026-11-27, before the items' interests, ID dropout and the weight average):
# the `final*` rows ran on it, with their overrides on top
PRE5='{"model": {"item_interests": "off", "id_dropout": 0.0, "target_id_dropout": 0.0, "width": 128, "dim": 128, "id_dim": 128},
  "optim": {"ema_decay": null}}'
# the preset `loo` of the fifth round (before the scored items' ID dropout): the `now*` rows ran on it
PRE6='{"model": {"target_id_dropout": 0.0}}'
# the preset `loo` of the sixth and seventh rounds (before the 30-epoch schedule): the `today*` rows ran on it;
# every earlier row also had the 20-epoch schedule, so it is set back under every base
PRE7='{"optim": {"max_epochs": 20}}'
# the preset `loo` as the first three rounds knew it (what today's preset changed, set back)
BEFORE='{"eval": {"exclude_history": false}, "loss": {"mask_own_positives": false}, "data": {"length_buckets": 0},
  "model": {"head": "mlp", "ffn_mult": 4}, "optim": {"batch_actions": null, "lr": 0.002, "weight_decay": 0.01, "patience": 3}}'
ALL="today-members-3 today-ml1m-members-3 today-members-3-distill-1 today-members-3-distill-0.3 today-ml1m-members-3-distill-1 today-ml1m-members-3-distill-0.3 today-max-epochs-30 today-ml1m-max-epochs-30 today-position-from-newest today-ml1m-position-from-newest today-seed-1 now-seed-1 now-seed-2 now-members-5 now-id-dropout-0.5 now-frequency-0.7 now-frequency-0.7-cutoff-3 now-contrastive-0.1 now-contrastive-0.3 now-target-id-dropout-0.3 now-target-id-dropout-0.5 now-width-384 now-width-384-target-id-dropout-0.3 final final-heads-1 final-layers-3 final-interests final-interests-10-epochs final-interests-dropout-0.6 final-interests-id-dropout-0.3 final-interests-gated final-interests-ema final-interests-width-256 final-interests-ema-id-dropout final-interests-ema-id-dropout-members-3 final-interests-ema-id-dropout-seed-1 final-interests-ema-id-dropout-0.6 final-interests-ema-id-dropout-width-256 final-seed-1 final-seed-2 final-width-256 final-dropout-0.6 final-weight-decay-0.01 final-batch-actions-768 final-lr-5e-4 final-weight-decay-0.1 final-weight-decay-1 previous input-dropout tied tied-input-dropout tied-input-dropout-40-epochs tied-input-dropout-full-softmax
     preset-loo preset-loo-input-dropout-0.2 ml1m-preset-loo preset-loo-60-epochs
     preset-loo-60-epochs-full-softmax buckets buckets-dot-query buckets-crop buckets-width-64 buckets-query
     buckets-mask-own buckets-mask-own-sasrec-shape sasrec-shape-crop sasrec-shape-lr-1e-3
     ml1m-sasrec-shape ml1m-sasrec-shape-batch-actions"
for v in ${2:-$ALL}; do
  ds=$BEAUTY
  case $v in
    # today's preset `loo` as is, another seed (test: pinnerformer evaluate --run $SCOUT/today-seed-1 --dataset
    # $BEAUTY --exclude-history)
    today-seed-1) over='{"seed": 1}' ;;
    # seventh round (2026-11-27): the ensemble of three (the preset loo-ensemble) with mutual distillation, each
    # member also pulled toward the ensemble's distribution over its candidates (objectives/mutual_distillation.py);
    # the same on ML-1M (adopted only if both datasets' validation rise)
    today-members-3) over='{"model": {"members": 3}}' ;;  # the sixth round's loo-ensemble (report at 77cf50c)
    today-ml1m-members-3) ds=$ML1M; over='{"model": {"members": 3}}' ;;
    today-members-3-distill-1) over='{"model": {"members": 3}, "loss": {"distill_weight": 1.0}}' ;;
    today-members-3-distill-0.3) over='{"model": {"members": 3}, "loss": {"distill_weight": 0.3}}' ;;
    today-ml1m-members-3-distill-1) ds=$ML1M; over='{"model": {"members": 3}, "loss": {"distill_weight": 1.0}}' ;;
    today-ml1m-members-3-distill-0.3) ds=$ML1M; over='{"model": {"members": 3}, "loss": {"distill_weight": 0.3}}' ;;
    # a 30-epoch cosine schedule (ML-1M's curve is still rising when the 20-epoch schedule ends), on both datasets
    today-max-epochs-30) over='{"optim": {"max_epochs": 30}}' ;;
    today-ml1m-max-epochs-30) ds=$ML1M; over='{"optim": {"max_epochs": 30}}' ;;
    # positions counted from the newest action (SASRec's left padding: the position read at inference is always
    # index 0, trained on every sequence's last transition), on both datasets
    today-position-from-newest) over='{"model": {"position_from": "newest"}}' ;;
    today-ml1m-position-from-newest) ds=$ML1M; over='{"model": {"position_from": "newest"}}' ;;
    # the fifth round's preset, other seeds (test: pinnerformer evaluate --run $SCOUT/now-seed-N --dataset $BEAUTY
    # --exclude-history)
    now-seed-1) over='{"seed": 1}' ;;
    now-seed-2) over='{"seed": 2}' ;;
    # an ensemble of five (loo-ensemble has three)
    now-members-5) over='{"model": {"members": 5}}' ;;
    # sixth round (2026-11-27): levers on the fifth round's preset
    now-id-dropout-0.5) over='{"model": {"id_dropout": 0.5}}' ;;
    # BSARec's frequency branch beside attention, causal: α 0.7 (its Beauty setting) with 5 kept Fourier terms (its
    # c = 8 or 9: BSARec keeps c // 2 + 1), then its Beauty cut-off itself, c = 5: 3 kept terms
    now-frequency-0.7) over='{"model": {"frequency_mix": 0.7, "frequency_cutoff": 5}}' ;;
    now-frequency-0.7-cutoff-3) over='{"model": {"frequency_mix": 0.7, "frequency_cutoff": 3}}' ;;
    # the twin-view contrastive term (CL4SRec / DuoRec's unsupervised view; DuoRec's weight 0.1)
    now-contrastive-0.1) over='{"loss": {"contrastive_weight": 0.1, "contrastive_temperature": 0.1}}' ;;
    now-contrastive-0.3) over='{"loss": {"contrastive_weight": 0.3, "contrastive_temperature": 0.1}}' ;;
    # ID dropout on the scored side too (positives and negatives read through their interests 30% of the time)
    now-target-id-dropout-0.3) over='{"model": {"target_id_dropout": 0.3}}' ;;
    now-target-id-dropout-0.5) over='{"model": {"target_id_dropout": 0.5}}' ;;
    now-width-384) over='{"model": {"width": 384, "dim": 384, "id_dim": 384}}' ;;
    now-width-384-target-id-dropout-0.3) over='{"model": {"width": 384, "dim": 384, "id_dim": 384, "target_id_dropout": 0.3}}' ;;
    final) over='{}' ;;
    # the seed spread of the preset (test number: pinnerformer evaluate --run $SCOUT/final-seed-N --dataset $BEAUTY
    # --exclude-history)
    final-seed-1) over='{"seed": 1}' ;;
    final-width-256) over='{"model": {"width": 256, "dim": 256, "id_dim": 256}}' ;;
    final-dropout-0.6) over='{"model": {"dropout": 0.6, "input_dropout": 0.6}}' ;;
    final-seed-2) over='{"seed": 2}' ;;
    # the fifth round (2026-11-27), on today's preset: one attention head (SASRec's and FMLP-Rec's setting for
    # Beauty), a third block
    final-heads-1) over='{"model": {"heads": 1}}' ;;
    final-layers-3) over='{"model": {"layers": 3}}' ;;
    # the items' attributes (Beauty_item2attributes.json: brand and categories, 637 in all, ~3.7 per item) as
    # learned interest embeddings added to the item-ID embedding
    final-interests) over='{"model": {"item_interests": "on"}}' ;;
    # on top of the interests (which peak at epoch 6 of 20): a schedule whose cosine anneals by the peak; more dropout
    final-interests-10-epochs) over='{"model": {"item_interests": "on"}, "optim": {"max_epochs": 10}}' ;;
    final-interests-dropout-0.6) over='{"model": {"item_interests": "on", "dropout": 0.6, "input_dropout": 0.6}}' ;;
    # the input item's ID left out 30% of the time in training (its attributes stay): against reading items by ID alone
    final-interests-id-dropout-0.3) over='{"model": {"item_interests": "on", "id_dropout": 0.3}}' ;;
    # the eSASRec / LiGR-style layer: gated residual branches, SwiGLU feed-forward
    final-interests-gated) over='{"model": {"item_interests": "on", "block": "gated"}}' ;;
    # validate and keep a moving average of the weights (decay 0.995: a horizon of ~2 epochs of 97 steps)
    final-interests-ema) over='{"model": {"item_interests": "on"}, "optim": {"ema_decay": 0.995}}' ;;
    final-interests-width-256) over='{"model": {"item_interests": "on", "width": 256, "dim": 256, "id_dim": 256}}' ;;
    final-interests-ema-id-dropout) over='{"model": {"item_interests": "on", "id_dropout": 0.3}, "optim": {"ema_decay": 0.995}}' ;;
    final-interests-ema-id-dropout-seed-1) over='{"seed": 1, "model": {"item_interests": "on", "id_dropout": 0.3}, "optim": {"ema_decay": 0.995}}' ;;
    final-interests-ema-id-dropout-0.6) over='{"model": {"item_interests": "on", "id_dropout": 0.3, "dropout": 0.6, "input_dropout": 0.6}, "optim": {"ema_decay": 0.995}}' ;;
    final-interests-ema-id-dropout-width-256) over='{"model": {"item_interests": "on", "id_dropout": 0.3, "width": 256, "dim": 256, "id_dim": 256}, "optim": {"ema_decay": 0.995}}' ;;
    # an ensemble of three such models trained side by side (model.members)
    final-interests-ema-id-dropout-members-3) over='{"model": {"item_interests": "on", "id_dropout": 0.3, "members": 3}, "optim": {"ema_decay": 0.995}}' ;;
    # the fourth round, on today's preset: smaller batches (more steps), a lower peak learning rate
    final-batch-actions-768) over='{"optim": {"batch_actions": 768, "weight_decay": 0.01}}' ;;
    final-lr-5e-4) over='{"optim": {"lr": 0.0005, "weight_decay": 0.01}}' ;;
    # against the early peak: stronger decoupled weight decay (0.01 in the preset)
    # (`final-*` rows ran before the preset took weight decay 1.0: they set the 0.01 of their time)
    final-weight-decay-0.01) over='{"optim": {"weight_decay": 0.01}}' ;;
    final-weight-decay-0.1) over='{"optim": {"weight_decay": 0.1}}' ;;
    final-weight-decay-1) over='{"optim": {"weight_decay": 1.0}}' ;;
    previous) over="{\"model\": {$PREV}}" ;;
    input-dropout) over="{\"model\": {$PREV, \"input_dropout\": 0.5}}" ;;
    tied) over="{\"model\": {$TIED, \"input_dropout\": 0.0}}" ;;
    tied-input-dropout) over="{\"model\": {$TIED}}" ;;
    tied-input-dropout-40-epochs) over="{\"model\": {$TIED}, \"optim\": {\"max_epochs\": 40}}" ;;
    tied-input-dropout-full-softmax) over="{\"model\": {$TIED}, \"loss\": {\"negatives\": \"full\"}}" ;;
    preset-loo) over="{}" ;;
    # issue 19's first lever: the preset with a 60-epoch cosine schedule (the 20-epoch curve was still rising)
    preset-loo-60-epochs) over='{"optim": {"max_epochs": 60, "patience": 8}}' ;;
    preset-loo-60-epochs-full-softmax) over='{"optim": {"max_epochs": 60, "patience": 8}, "loss": {"negatives": "full"}}' ;;
    # the third round (issue 19): batches of similar lengths (4x less padding on CPU), then SASRec's scoring and
    # weighting: the unnormalised dot product with the raw item table, every position weighing the same
    buckets) over='{"data": {"length_buckets": 16}}' ;;
    buckets-dot-query) over='{"data": {"length_buckets": 16}, "model": {"score": "dot"}, "loss": {"weighting": "query"}}' ;;
    # against memorising the same whole sequences every epoch: random crops, a narrower model
    buckets-crop) over='{"data": {"length_buckets": 16, "crop": 0.5}, "optim": {"patience": 20}}' ;;
    buckets-width-64) over='{"data": {"length_buckets": 16}, "model": {"width": 64, "dim": 64, "id_dim": 64}, "optim": {"patience": 20}}' ;;
    buckets-query) over='{"data": {"length_buckets": 16}, "loss": {"weighting": "query"}, "optim": {"patience": 20}}' ;;
    # history removed at evaluation: the user's other items need not be pushed down in training either
    buckets-mask-own) over='{"data": {"length_buckets": 16}, "loss": {"mask_own_positives": true}, "eval": {"exclude_history": true}, "optim": {"patience": 20}}' ;;
    # SASRec's shape: the final LayerNorm as the head, a point-wise FFN of width H (a tenth of the non-embedding
    # weights: the model memorised its training sequences, training loss 2.6 at epoch 10 vs validation's ~7)
    buckets-mask-own-sasrec-shape) over='{"data": {"length_buckets": 16}, "model": {"head": "norm", "ffn_mult": 1}, "loss": {"mask_own_positives": true}, "eval": {"exclude_history": true}, "optim": {"patience": 20}}' ;;
    sasrec-shape-crop) over='{"data": {"length_buckets": 16, "crop": 0.5}, "model": {"head": "norm", "ffn_mult": 1}, "loss": {"mask_own_positives": true}, "eval": {"exclude_history": true}, "optim": {"patience": 20}}' ;;
    sasrec-shape-lr-1e-3) over='{"data": {"length_buckets": 16}, "model": {"head": "norm", "ffn_mult": 1}, "loss": {"mask_own_positives": true}, "eval": {"exclude_history": true}, "optim": {"patience": 20, "lr": 0.001}}' ;;
    ml1m-sasrec-shape) ds=$ML1M
      over='{"data": {"length_buckets": 16}, "model": {"head": "norm", "ffn_mult": 1}, "loss": {"mask_own_positives": true}, "eval": {"exclude_history": true}, "optim": {"patience": 20}}' ;;
    # 11 steps/epoch of 256 users with 50 actions each: far too few updates; batches of ~1,536 actions instead
    ml1m-sasrec-shape-batch-actions) ds=$ML1M
      over='{"data": {"length_buckets": 16}, "model": {"head": "norm", "ffn_mult": 1}, "loss": {"mask_own_positives": true}, "eval": {"exclude_history": true}, "optim": {"patience": 20, "batch_actions": 1536}}' ;;
    preset-loo-input-dropout-0.2) over='{"model": {"input_dropout": 0.2}}' ;;
    # the preset's model on ML-1M with the data-shape settings of the earlier ML-1M report; its test number (quoted for
    # context only): pinnerformer evaluate --run $SCOUT/ml1m-preset-loo --dataset $ML1M
    ml1m-preset-loo) ds=$ML1M
      over='{"loss": {"negatives": "full"}, "data": {"cutoff": "random", "sequences_per_user": 2}, "optim": {"batch_size": 128}}' ;;
    *) echo "unknown variant '$v' (one of: $ALL)" >&2; exit 2 ;;
  esac
  if [ "$ds" = "$BEAUTY" ] && [ ! -f "$BEAUTY/manifest.json" ]; then
    $PF data prepare --format sequences --input "$DATA/amazon-beauty" --output "$BEAUTY"
  fi
  if [ "$ds" = "$ML1M" ] && [ ! -f "$ML1M/manifest.json" ]; then
    $PF data prepare --format movielens --input "$DATA/movielens-1m-subset" --output "$ML1M" \
      --positive love,like,neutral,dislike
    $PF items embed-text "$ML1M"
  fi
  run=$SCOUT/$v
  mkdir -p "$SCOUT"
  if [[ $v == today* ]]; then base='{}'
  elif [[ $v == now* ]]; then base=$PRE6
  elif [[ $v == final* ]]; then base=$PRE5
  else base=$($PY -c "import json, sys
from pinnerformer.config import merge_dicts
print(json.dumps(merge_dicts(json.loads(sys.argv[1]), json.loads(sys.argv[2]))))" "$PRE5" "$BEFORE")
  fi
  # every row ran with the 20-epoch schedule of its time ($PRE7) unless it sets its own
  $PY -c "import json, sys
from pinnerformer.config import merge_dicts
print(json.dumps(merge_dicts(merge_dicts(json.loads(sys.argv[1]), json.loads(sys.argv[2])), json.loads(sys.argv[3]))))" "$PRE7" "$base" "$over" > "$SCOUT/$v.json"
  if [ ! -f "$run/summary.json" ]; then
    resume=(); [ -f "$run/config.json" ] && resume=(--resume)
    $PF train --dataset "$ds" --output "$run" --preset loo --config "$SCOUT/$v.json" --no-progress "${resume[@]}"
  fi
  $PY -c "import json, sys; print(sys.argv[1] + ':', ', '.join(f\"{r['ndcg@10']:.4f}\" for r in map(json.loads, open(sys.argv[2])) if r['kind'] == 'validation'))" "$v" "$run/metrics.jsonl"
done
