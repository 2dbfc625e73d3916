"""`pinnerformer rank train --model gbdt`: gradient-boosted trees (models/gbdt.py) on the same training rows, labels
and point-in-time features as the neural ranker, one model per head, each stopped early on the validation period's
log loss; the run directory has the same config.json and summary.json as a neural run (selection metric measured on
the same validation requests by the same code), and the boosters in gbdt/<head>.txt. Written aside and renamed
into place: a killed run leaves nothing that looks finished; a re-run gives the same trees (deterministic LightGBM,
fixed seed)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from pinnerformer.data.requests import RankData, check_periods
from pinnerformer.data.schema import DatasetRef
from pinnerformer.errors import PinnerformerError
from pinnerformer.evaluation.ranking import PerRequest, baseline_scores
from pinnerformer.io import atomic_dir, write_json_atomic
from pinnerformer.models.gbdt import GbdtRanker, gbdt_inputs
from pinnerformer.objectives.multitask_bce import row_weights
from pinnerformer.progress import progress_bar
from pinnerformer.training import run_files as rf
from pinnerformer.training.ranking import RankTrainConfig, selection_metric, training_requests


def train_gbdt(rd: RankData, cfg: RankTrainConfig, run_dir: Path, log=print, progress: bool = True
               ) -> rf.TrainSummary:
    import lightgbm as lgb

    run_dir = Path(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise PinnerformerError(f"{run_dir} already exists and is not empty: give a new --output")
    check_periods(rd.manifest.splits, rd.heads, rd.path)
    metric = selection_metric(rd, cfg.data)
    t0 = time.perf_counter()
    train_req, val_req = training_requests(rd, cfg.data), rd.requests_in("validation")
    train_rows, _ = rd.candidate_rows(train_req)
    val_rows, _ = rd.candidate_rows(val_req)
    log(f"gbdt: point-in-time features of {len(train_rows) + len(val_rows):,} rows")
    x_train, names = gbdt_inputs(rd, train_rows, cfg.features)
    x_val, _ = gbdt_inputs(rd, val_rows, cfg.features)
    weight = row_weights(cfg.loss, rd.request_user[rd.cand_request[train_rows]], rd.cand_request[train_rows],
                         rd.dataset().manifest.n_users)
    boosters, rounds = [], {}
    bar = progress_bar(total=cfg.gbdt.max_rounds * len(rd.heads), unit="tree", desc="gbdt", disable=not progress)
    for h, head in enumerate(rd.heads):
        train = lgb.Dataset(x_train, rd.labels[train_rows, h], weight=weight, feature_name=names,
                            free_raw_data=False)
        valid = lgb.Dataset(x_val, rd.labels[val_rows, h], reference=train)
        b = lgb.train(cfg.gbdt.params(cfg.seed), train, cfg.gbdt.max_rounds, valid_sets=[valid],
                      callbacks=[lgb.early_stopping(cfg.gbdt.early_stopping_rounds, verbose=False),
                                 lambda env: bar.update(1)])
        bar.update(cfg.gbdt.max_rounds * (h + 1) - bar.n)  # the rounds early stopping skipped
        boosters.append(b)
        rounds[head.name] = int(b.best_iteration)
        log(f"gbdt head {head.name}: {b.best_iteration} trees (validation log loss "
            f"{b.best_score['valid_0']['binary_logloss']:.4f})")
    bar.close()
    ranker = GbdtRanker(boosters, rd.manifest.head_names, cfg.features)
    val = PerRequest(ranker.score_rows(rd, val_rows), rd, val_req, cfg.data.k, seed=cfg.seed).means()
    pop = PerRequest(baseline_scores("popularity", rd, val_req), rd, val_req, cfg.data.k, seed=cfg.seed).means()
    wall = time.perf_counter() - t0
    summary = rf.TrainSummary(stopped_by="early stop", best_epoch=0, metric=metric,
                              best=_finite(val[metric]), popularity=_finite(pop[metric]),
                              steps=int(sum(rounds.values())), wall_s=round(wall, 1))
    description = rf.RankRunDescription(
        config=cfg.model_dump(), dataset=DatasetRef(path=str(rd.path.resolve()), fingerprint=rd.manifest.fingerprint),
        model={"kind": "gbdt", "inputs": names, "trees": rounds}, protocol="time-split", metric=metric,
        eligible_training_users=int(len(train_rows)), validation_users=int(len(val_req)), steps_per_epoch=0,
        notes=[f"LightGBM, one binary model per head, early stopping on validation log loss: {rounds}"],
        parameters=int(sum(b.num_trees() for b in boosters)))
    with atomic_dir(run_dir) as tmp:
        ranker.save(tmp)
        write_json_atomic(tmp / rf.CONFIG, description)
        (tmp / rf.METRICS).write_text(json.dumps({"kind": "validation", "epoch": 0,
                                                   **{k: _finite(v) for k, v in val.items()}}) + "\n")
        write_json_atomic(tmp / rf.SUMMARY, summary)
    log(f"gbdt done in {wall:.0f}s: validation {metric} {val[metric]:.4f} vs popularity {pop[metric]:.4f} -> {run_dir}")
    return summary


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None
