"""The ranker's training as a `TrainingTask` for the same loop as retrieval: pointwise rows (the candidates of the
training period's requests), each with its request's realtime sequence, PinnerFormer vector and context; the
weighted multi-label BCE of `objectives.multitask_bce`; validation is HIT@3 / AUC / grouped AUC on the validation
period's requests, scored by `evaluation.ranking` (the same code as `pinnerformer rank evaluate`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from pinnerformer.config import StrictModel, merge_dicts, validate
from pinnerformer.data.requests import RankData, check_periods
from pinnerformer.data.schema import DatasetRef
from pinnerformer.errors import PinnerformerError
from pinnerformer.evaluation import ranking_metrics as rm
from pinnerformer.evaluation.ranking import PerRequest, baseline_scores, score_requests, v2_spec_for
from pinnerformer.features.point_in_time import FeatureConfig
from pinnerformer.features.rank_features import feature_names, rank_features
from pinnerformer.features.rank_batch import RankBatch, build_rank_batch
from pinnerformer.models.gbdt import GbdtConfig
from pinnerformer.models.ranker import Ranker, RankerConfig, RankerInputs
from pinnerformer.objectives.multitask_bce import (
    MultiTaskLossConfig,
    label_weight_matrix,
    multitask_bce,
    row_weights,
)
from pinnerformer.objectives.next_action import next_action_loss
from pinnerformer.objectives.request_softmax import request_softmax
from pinnerformer.ops.quantize import Int8Vectors, open_int8
from pinnerformer.training.config import LoopConfig, OptimConfig, read_config_file
from pinnerformer.training.loop import TrainingLoop
from pinnerformer.training.task import StepLoss, epoch_order


class RankDataConfig(StrictModel):
    epoch_rows: int | None = Field(100_000, ge=1)  # rows per epoch (a fresh seeded sample each epoch); None: all
    max_val_requests: int = Field(3000, ge=1)  # a seeded sample of the validation period's requests
    k: int = Field(3, ge=1)  # HIT@k
    metric: str | None = None  # selection metric; default hit@3 of the first positive head (else its grouped AUC)
    # "train": the feature period's requests train the ranker too, without their PinnerFormer vector (its model
    # learned them); "skip": only the requests after the feature period train it
    feature_period: Literal["train", "skip"] = "train"


RANK_OPTIM = {"batch_size": 256, "lr": 1e-3, "warmup_steps": 100, "max_epochs": 20, "patience": 2}


class RankTrainConfig(LoopConfig):
    preset: str = "default"
    learner: Literal["neural", "gbdt"] = "neural"  # gbdt: LightGBM on the point-in-time features (models/gbdt.py)
    optim: OptimConfig = OptimConfig(**RANK_OPTIM)
    data: RankDataConfig = RankDataConfig()
    model: RankerConfig = RankerConfig()
    loss: MultiTaskLossConfig = MultiTaskLossConfig()
    features: FeatureConfig = FeatureConfig()  # the point-in-time features (both learners)
    gbdt: GbdtConfig = GbdtConfig()


RANK_PRESETS: dict[str, dict] = {
    "default": {},
    # a few minutes on 2 CPU cores (the quickstart, tests): shorter sequences, smaller epochs
    "fast": {"data": {"epoch_rows": 20_000, "max_val_requests": 1000},
             "model": {"transact": {"seq_len": 32}, "mlp": [128, 64]},
             "optim": {"max_epochs": 6, "patience": 2}},
}


def load_rank_config(preset: str = "default", config_file: Path | None = None,
                     overrides: dict | None = None) -> RankTrainConfig:
    if preset not in RANK_PRESETS:
        raise PinnerformerError(f"unknown ranking preset '{preset}': expected one of {', '.join(RANK_PRESETS)}")
    raw = merge_dicts({"preset": preset, "optim": RANK_OPTIM}, RANK_PRESETS[preset])
    if config_file is not None:
        raw = merge_dicts(raw, read_config_file(config_file))
    raw = merge_dicts(raw, overrides or {})
    return validate(RankTrainConfig, raw, f"{config_file}: invalid ranking config" if config_file
                    else "invalid ranking config")


def ranker_for(rd: RankData, cfg: RankerConfig, n_actions: int, n_surfaces: int,
               positive_actions: tuple[int, ...] = (), features: FeatureConfig | None = None) -> Ranker:
    """The ranker for this ranking data; with `cfg.features`, reading the point-in-time features `features` defines
    (`model.feature_config`; their scale is set by training, or loaded with the checkpoint)."""
    features = features or FeatureConfig()
    names = tuple(feature_names(rd, features)) if cfg.features else ()
    inputs = RankerInputs(n_items=len(rd.pf_item_vectors), n_actions=n_actions, n_surfaces=n_surfaces,
                          vector_dim=int(rd.item_vectors.shape[1]), pf_dim=int(rd.pf_item_vectors.shape[1]),
                          heads=tuple(rd.manifest.head_names), positive_actions=tuple(positive_actions),
                          feature_names=names, n_users=int(rd.request_user.max(initial=-1)) + 1)
    model = Ranker(cfg, inputs, torch.from_numpy(np.array(rd.item_vectors)),
                   torch.from_numpy(np.array(rd.pf_item_vectors)),
                   int8=stored_int8_table(rd) if cfg.sequence == "transact-v2" else None)
    model.feature_config = features
    return model


def stored_int8_table(rd: RankData) -> Int8Vectors:
    """The ranking data's int8 item table (memory-mapped), checked against its manifest record."""
    info = rd.manifest.int8_table
    if info is None:
        raise PinnerformerError(f"{rd.path}: this ranking data has no int8 item table (prepared by a version before "
                                "TransAct V2): run `pinnerformer rank prepare` again")
    return open_int8(rd.path / info.file, info.shape, info.scale, info.zero, info.lo, info.hi, info.sha256,
                     where=f"{rd.path / 'manifest.json'} int8_table")


@dataclass(frozen=True)
class EpochBatches:
    rows: np.ndarray  # the epoch's training rows in their seeded order
    start: np.ndarray  # batch k is rows[start[k]:start[k + 1]]


def whole_requests(seed: int, epoch: int, rows: np.ndarray, row_request: np.ndarray, batch_size: int
                   ) -> EpochBatches:
    """The epoch's batches of whole requests: the requests in a seeded order, each batch the requests that start
    within its `batch_size` rows of that order (about `batch_size` rows; the last, partial batch is dropped as the
    row order drops it)."""
    req = row_request[rows]
    cut = np.flatnonzero(np.diff(req)) + 1  # rows are in data order: a request's rows are contiguous
    blocks = np.split(rows, cut)
    perm = np.random.default_rng([seed, epoch]).permutation(len(blocks))
    sizes = np.array([len(blocks[p]) for p in perm])
    if len(sizes) and sizes.max() > batch_size:
        raise PinnerformerError(f"loss.listwise: a training request has {sizes.max()} candidate rows, more than "
                                f"optim.batch_size {batch_size}: raise the batch size")
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    first = np.searchsorted(offsets[:-1], np.arange(0, offsets[-1] // batch_size + 1) * batch_size)
    ordered = np.concatenate([blocks[p] for p in perm]) if len(perm) else rows
    return EpochBatches(ordered, offsets[first])


def training_requests(rd: RankData, cfg: RankDataConfig) -> np.ndarray:
    """The requests the ranker learns from: the training period's, and the feature period's unless skipped."""
    extra = rd.requests_in("feature") if cfg.feature_period == "train" else np.zeros(0, np.int64)
    return np.sort(np.concatenate([rd.requests_in("train"), extra]))


def selection_metric(rd: RankData, cfg: RankDataConfig) -> str:
    positive = [h.name for h in rd.heads if not h.negative]
    default = rm.metric_key(rm.HIT, positive[0], cfg.k) if positive else rm.metric_key(rm.GAUC, rd.heads[0].name)
    metric = cfg.metric or default
    known = [rm.metric_key(m, h.name, cfg.k) for h in rd.heads for m in (rm.HIT, rm.AUC, rm.GAUC)]
    if metric not in known:
        raise PinnerformerError(f"data.metric: unknown metric '{metric}' (expected one of: {', '.join(known)})")
    if metric.startswith(rm.HIT) and any(h.negative and metric.endswith("/" + h.name) for h in rd.heads):
        raise PinnerformerError(f"data.metric: {metric} is lower-is-better (a negative head): select on a positive "
                                "head's HIT or on an AUC")
    return metric


class RankingTask:
    size_key = "rows"
    resume_keys = ("data", "model", "loss")
    units = ("rows", "requests")
    batch_unit = "row"

    def __init__(self, rd: RankData, cfg: RankTrainConfig):
        self.rd, self.cfg = rd, cfg
        self.ds = rd.dataset()
        self.tl = self.ds.timelines
        self.dataset_fingerprint = rd.manifest.fingerprint
        train_req = training_requests(rd, cfg.data)
        self.rows = np.flatnonzero(np.isin(rd.cand_request, train_req))
        self.row_weight = np.ones(len(rd.cand_item), np.float32)
        self.row_weight[self.rows] = row_weights(cfg.loss, rd.request_user[rd.cand_request[self.rows]],
                                                 rd.cand_request[self.rows], self.ds.manifest.n_users)
        self.batch_size = cfg.optim.batch_size
        per_epoch = len(self.rows) if cfg.data.epoch_rows is None else min(len(self.rows), cfg.data.epoch_rows)
        self.steps_per_epoch = per_epoch // self.batch_size
        if self.steps_per_epoch == 0:
            raise PinnerformerError(f"{rd.path}: {len(self.rows)} training rows, fewer than one batch "
                                    f"({self.batch_size}); use a smaller batch or more data")
        val = rd.requests_in("validation")
        if len(val) > cfg.data.max_val_requests:
            val = np.sort(np.random.default_rng(cfg.seed).choice(val, cfg.data.max_val_requests, replace=False))
        self.val_requests = val
        self.metric = selection_metric(rd, cfg.data)
        check_periods(rd.manifest.splits, rd.heads, rd.path)  # (ranking data prepared before prepare checked it)
        if not len(val):
            raise PinnerformerError(f"{rd.path}: no validation request: cannot select a model")
        m = self.ds.manifest
        torch.manual_seed(cfg.seed)
        self.model = ranker_for(rd, cfg.model, len(m.actions), len(m.surfaces), tuple(m.positive_codes),
                                cfg.features)
        self.model.set_user_rows(rd.request_user[rd.cand_request[self.rows]])
        self.features = rank_features(rd, cfg.features).values if cfg.model.features else None
        if self.features is not None:
            self.model.set_feature_scale(self.features[self.rows])
        nal = cfg.loss.next_action
        self.model.collect_next_action = cfg.model.sequence == "transact-v2" and nal.weight > 0
        self.weight_matrix = label_weight_matrix(cfg.loss, rd.manifest.head_names)
        self.v2_spec = v2_spec_for(self.model, rd, m.action_names(), m.positive_codes)
        self.notes = [f"item vectors: {rd.manifest.item_vectors['source']} ({rd.manifest.item_vectors['dim']}-d, "
                      "frozen)", f"sequence: {cfg.model.sequence}; PinnerFormer feature: "
                      f"{'on' if cfg.model.use_pinnerformer else 'off'}"]
        self._order: tuple[int, EpochBatches] | None = None
        self.dist = None  # set by a distributed TrainingLoop

    def distribute(self, ctx) -> None:
        """Run as one rank of `ctx`: this rank scores its contiguous share of every batch's rows; the loss is its
        share of the batch's loss (the whole batch's Σ row weight as denominator); gradients are summed by the loop."""
        if self.batch_size % ctx.world:
            raise PinnerformerError(f"optim.batch_size {self.batch_size} is not a multiple of the {ctx.world} "
                                    "processes: the global batch must split evenly")
        if self.cfg.loss.listwise > 0:
            raise PinnerformerError("loss.listwise needs each request's rows in one process: train on one process, "
                                    "or set loss.listwise to 0")
        if self.model.collect_next_action:
            raise PinnerformerError("distributed training of a transact-v2 ranker with the next-action loss is not "
                                    "supported yet (its positions are normalised per rank): set "
                                    "loss.next_action.weight to 0, or train on one process")
        self.dist = ctx

    # ---- batches -----------------------------------------------------------------------------------------
    def host_batch(self, epoch: int, step: int) -> RankBatch:
        if self._order is None or self._order[0] != epoch:
            if self.cfg.loss.listwise > 0:  # whole requests: the listwise loss orders a request's rows together
                batches = whole_requests(self.cfg.seed, epoch, self.rows, self.rd.cand_request, self.batch_size)
            else:
                order = epoch_order(self.cfg.seed, epoch, self.rows, 1)
                batches = EpochBatches(order, np.arange(0, len(order) + 1, self.batch_size))
            self._order = (epoch, batches)
        batches = self._order[1]
        rows = np.sort(batches.rows[batches.start[step]:batches.start[step + 1]])
        total = None
        if self.dist is not None:  # this rank's share of the rows; the loss keeps the whole batch's denominator
            total = torch.tensor(float(self.row_weight[rows].astype(np.float64).sum()))
            rows = rows[self.dist.share(len(rows))]
        requests = np.unique(self.rd.cand_request[rows])
        batch = build_rank_batch(self.rd, self.tl, requests, self.seq_len, rows=rows, row_weight=self.row_weight,
                                 v2=self.v2_spec, features=self.features)
        batch.weight_total = total
        return batch

    @property
    def seq_len(self) -> int:
        return self.cfg.model.transact.seq_len

    def loss(self, batch: RankBatch, global_step: int, device: torch.device) -> StepLoss:
        b = batch.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = self.model(b)
        loss = multitask_bce(logits, b.labels, self.weight_matrix.to(device), b.weight, b.weight_total)
        if self.cfg.loss.listwise > 0:
            loss = loss + self.cfg.loss.listwise * request_softmax(logits, b.labels, b.row_request)
        counts = {"rows": b.n_rows}
        if b.streams is not None:  # lifelong actions older than lifelong_max, left out of this batch's requests
            counts["lifelong_cut"] = int(b.streams["lifelong.cut"])
        if self.model.collect_next_action:
            nal, counts["next_action_positions"], counts["next_action_skipped"] = self.next_action(device)
            loss = loss + self.cfg.loss.next_action.weight * nal
        return StepLoss(loss, counts)

    def next_action(self, device: torch.device) -> tuple[torch.Tensor, int, int]:
        """TransAct V2's auxiliary loss on what the model collected in this step's forward; negatives the row's
        selected impressions, or (`in-batch`) up to 512 of the batch's targets that are not the position's own."""
        x, cfg = self.model.next_action_inputs, self.cfg.loss.next_action
        neg, valid = x["negatives"], x["neg_valid"]
        if cfg.negatives == "in-batch":
            t = x["target"]
            shared = t[:512]
            neg = shared.unsqueeze(0).expand(len(t), -1, -1)
            valid = ~torch.isclose(t @ shared.T, torch.ones((), device=device))  # not the position's own item
        loss, used = next_action_loss(x["query"], x["target"], neg, valid, cfg.temperature)
        return loss, used, int(x["positions"]) - used

    def step_scalars(self) -> dict[str, torch.Tensor]:
        return {}

    def compile(self, mode: str) -> None:
        self.model.forward = torch.compile(self.model.forward, mode=mode, dynamic=True)

    # ---- validation ------------------------------------------------------------------------------------
    def _metrics(self, scores: np.ndarray) -> dict[str, float]:
        per = PerRequest(scores, self.rd, self.val_requests, self.cfg.data.k, seed=self.cfg.seed)
        return per.means() | {"requests": len(self.val_requests)}

    def validate(self, device: torch.device) -> dict[str, float]:
        return self._metrics(score_requests(self.model, self.rd, self.tl, self.val_requests, device, v2=self.v2_spec))

    def baseline(self) -> tuple[str, dict[str, float]]:
        return "popularity", self._metrics(baseline_scores("popularity", self.rd, self.val_requests))

    # ---- the run directory -----------------------------------------------------------------------------
    def describe(self) -> dict:
        return {"task": "ranking", "config": self.cfg.model_dump(),
                "dataset": DatasetRef(path=str(self.rd.path.resolve()), fingerprint=self.dataset_fingerprint),
                "model": asdict(self.model.inputs), "protocol": "time-split", "metric": self.metric,
                "eligible_training_users": int(len(self.rows)), "validation_users": int(len(self.val_requests)),
                "notes": self.notes}

    def write_inputs(self, run_dir: Path) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def ranking_loop(rd: RankData, cfg: RankTrainConfig, run_dir: Path, log=print, dist=None) -> TrainingLoop:
    return TrainingLoop(RankingTask(rd, cfg), cfg, run_dir, log=log, dist=dist)
