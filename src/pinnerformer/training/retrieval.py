"""PinnerFormer's retrieval training as a `TrainingTask`: examples cut from the training users' timelines
(`objectives.examples`), the user tower's embeddings at the query positions, and the sampled softmax with mixed
negatives and logQ (`objectives.sampled_softmax`); validation is the evaluation scorer on held-out validation
users (future-window) or on every user's second-to-last item (leave-one-out).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from pinnerformer.data.dataset import Dataset
from pinnerformer.data.schema import DatasetRef
from pinnerformer.data.timelines import TimelineView
from pinnerformer.errors import PinnerformerError
from pinnerformer.evaluation.metrics import HIT_RATE, NDCG, RECALL, metric_name
from pinnerformer.evaluation.protocols import SELECTION, SPLITS, resolve_protocol, training_view, user_split
from pinnerformer.evaluation.scorer import Scorer, popularity_scores, score_task
from pinnerformer.evaluation.tasks import future_window_task, leave_one_out_task
from pinnerformer.features.sequence_batch import build_sequence_batch, to_torch
from pinnerformer.io import atomic_path
from pinnerformer.models.embedding import embed_items, embed_users
from pinnerformer.models.pinnerformer import members_of, pinnerformer_for
from pinnerformer.objectives.contrastive import newest_query_rows, twin_view_info_nce
from pinnerformer.objectives.examples import ExampleBatch, ExampleSampler
from pinnerformer.objectives.mutual_distillation import ensemble_distillation
from pinnerformer.objectives.teacher_distillation import (
    Teacher, distillation_kl, own_positive_full_mask, teacher_probabilities,
)
from pinnerformer.objectives.sampled_softmax import SampledSoftmaxLoss, sampled_softmax_loss_fused
from pinnerformer.training import run_files as rf
from pinnerformer.training.config import TrainConfig
from pinnerformer.training.loop import TrainingLoop, resolve_device
from pinnerformer.training.task import (
    StepLoss, action_budget_batches, action_budget_steps, epoch_order, length_bucketed, sorted_within_windows,
)


@dataclass
class RetrievalBatch:
    """A step's host-side work: the examples cut for it and their padded feature arrays (CPU tensors)."""

    examples: ExampleBatch
    seq: dict[str, torch.Tensor]

    def pin_memory(self) -> "RetrievalBatch":  # called by the DataLoader on GPU runs
        return RetrievalBatch(self.examples, {k: v.pin_memory() for k, v in self.seq.items()})


class RetrievalTask:
    size_key = "queries"
    resume_keys = ("data", "model", "loss")

    def __init__(self, ds: Dataset, cfg: TrainConfig, teacher: Teacher | None = None):
        self.ds, self.cfg = ds, cfg
        m = ds.manifest
        if not m.positive_codes:
            raise PinnerformerError(f"{ds.path}: the dataset has no positive action types, so there is nothing "
                                    "to learn to predict (prepare it with --positive)")
        self.dataset_fingerprint = m.fingerprint
        self.protocol = resolve_protocol(cfg.eval.protocol, m.clock)
        self.notes: list[str] = []
        if self.protocol == "leave-one-out" and not cfg.preset.startswith("loo"):
            self.notes.append(f"leave-one-out protocol with preset '{cfg.preset}': the default configuration for "
                              "this protocol is --preset loo")
        if m.clock == "order":
            self.notes.append("order-only clock: no time features; the label window is counted in actions "
                              f"(K = {cfg.data.window_actions} actions)")
        # leave-one-out refit: the validation targets are trained on, so no epoch is validated or selected
        self.fixed_epochs = cfg.eval.refit_epochs
        if self.fixed_epochs is not None:
            if self.protocol != "leave-one-out":
                raise PinnerformerError("eval.refit_epochs (train again on the validation targets too) is for the "
                                        "leave-one-out protocol, whose validation targets are each user's "
                                        "second-to-last action")
            if self.fixed_epochs > cfg.optim.max_epochs:
                raise PinnerformerError(f"eval.refit_epochs {self.fixed_epochs} is more than optim.max_epochs "
                                        f"{cfg.optim.max_epochs}: the refit repeats epochs of the same schedule")
            self.notes.append(f"refit: trained on every timeline but its last action (the validation targets too) "
                              f"for {self.fixed_epochs} epoch(s) of the {cfg.optim.max_epochs}-epoch schedule; "
                              "nothing validated, the last epoch's weights kept")
        self.split, self.view = training_range(ds, cfg, self.protocol)
        if cfg.eval.exclude_history and self.protocol != "leave-one-out":
            raise PinnerformerError("eval.exclude_history (history removed from the validation ranking) is for the "
                                    "leave-one-out protocol")
        if cfg.eval.until is not None:
            if self.protocol != "future-window":
                raise PinnerformerError("eval.until (train on a period only) needs the future-window protocol")
            self.view = self.view.before(cfg.eval.until)
            self.notes.append(f"trained and validated on events before {cfg.eval.until} (Unix s) only")
        self.sampler = ExampleSampler(ds.timelines, np.array(m.positive_codes), self.view, cfg.data, cfg.loss.objective)
        n_elig = len(self.sampler.eligible)
        self.batch_size = cfg.optim.batch_size
        if n_elig < self.batch_size and cfg.optim.batch_actions is None:
            raise PinnerformerError(
                f"only {n_elig} training users have an action followed by a positive action, fewer than one batch "
                f"(batch_size {self.batch_size}); use a smaller batch or more data")
        if self.protocol == "future-window":
            self.val_task = future_window_task(ds, np.flatnonzero(self.split == 1), cfg.eval.label_days,
                                               "future-window/validation", seed=cfg.seed,
                                               max_users=cfg.eval.max_val_users, until=cfg.eval.until)
        else:
            self.val_task = leave_one_out_task(ds, "validation")
        if len(self.val_task) == 0:
            raise PinnerformerError("no validation user has labels: cannot select a model")
        self.metric = metric_name(SELECTION[self.protocol], cfg.eval.k)
        torch.manual_seed(cfg.seed)  # the model's initial weights
        self.model = pinnerformer_for(ds, cfg.model, cfg.data.max_len)
        if self.model.spec.interests:
            with_any = int((self.model.items.interest_count > 0).sum())
            self.notes.append(f"item interests: {len(self.model.spec.interests):,} learned interest embeddings, "
                              f"{with_any:,} of {m.n_items:,} items have interests")
        self.objective = SampledSoftmaxLoss(cfg.loss, m.n_items, seed=cfg.seed)
        if cfg.loss.distill_weight:
            if cfg.model.members < 2:
                raise PinnerformerError(f"loss.distill_weight {cfg.loss.distill_weight}: mutual distillation is "
                                        "between an ensemble's members; set model.members to 2 or more")
            if cfg.loss.negatives == "full":
                raise PinnerformerError("loss.distill_weight needs sampled negatives (mixed, in-batch, random): "
                                        "not negatives=full")
        # GPU: fixed-length batches (static shapes for compiled kernels); CPU: padded to the longest sequence only
        self.pad_to = cfg.data.max_len if resolve_device(cfg.device).type == "cuda" else None
        # every epoch: each eligible user `sequences_per_user` times; the ragged last batch is dropped
        self.steps_per_epoch = n_elig * cfg.data.sequences_per_user // self.batch_size
        # each user's input length: its training range capped at M (cutoff=last's exact length, random's bound)
        self.lengths = np.minimum(self.view.end - self.view.start, cfg.data.max_len)
        budget = cfg.optim.batch_actions
        if budget is not None:
            if budget < cfg.data.max_len:
                raise PinnerformerError(f"optim.batch_actions {budget} is below data.max_len {cfg.data.max_len}: "
                                        "a batch must hold at least one whole sequence")
            total = int(self.lengths[self.sampler.eligible].sum()) * cfg.data.sequences_per_user
            self.steps_per_epoch = action_budget_steps(total, budget)
            self.batch_size = max(1, round(n_elig * cfg.data.sequences_per_user / self.steps_per_epoch))  # average
            self.notes.append(f"batches of about {budget} input actions: {self.steps_per_epoch} steps/epoch, "
                              f"{self.batch_size} users per batch on average")
        self._order: tuple[int, list[np.ndarray]] | None = None  # (epoch, its batches of users)
        self.dist = None  # set by a distributed TrainingLoop (distributed.context.DistContext)
        self._distill_kl: torch.Tensor | None = None  # the last step's mean mutual term (loss.distill_weight)
        self.teacher = teacher
        self._teacher_kl: torch.Tensor | None = None  # the last step's mean teacher term (loss.teacher_weight)
        if cfg.loss.teacher_weight:
            if teacher is None:
                raise PinnerformerError(f"loss.teacher_weight {cfg.loss.teacher_weight}: no teacher was loaded "
                                        f"(loss.teacher {cfg.loss.teacher!r}); train through pinnerformer train / "
                                        "api.train, which load it")
            self.notes.append(f"distilled from {teacher.source} (weight {cfg.loss.teacher_weight:g}, item-kNN blend "
                              f"λ {teacher.blend_weight:g}, temperature {cfg.loss.teacher_temperature:g})")

    def distribute(self, ctx) -> None:
        """Run as one rank of `ctx`: this rank encodes its share of every batch's examples (see
        distributed/context.py); the batch itself, its negatives and the sketch stay the whole batch's."""
        if self.cfg.optim.batch_actions is not None:
            raise PinnerformerError("optim.batch_actions (batches by input actions) is for one process: distributed "
                                    "training splits batches of optim.batch_size users")
        if self.batch_size % ctx.world:
            raise PinnerformerError(f"optim.batch_size {self.batch_size} is not a multiple of the {ctx.world} "
                                    "processes: the global batch must split evenly")
        if self.cfg.loss.contrastive_weight:
            raise PinnerformerError("loss.contrastive_weight is for one process: distributed training does not "
                                    "gather the second views across ranks")
        if self.cfg.loss.distill_weight:
            raise PinnerformerError("loss.distill_weight is for one process: distributed training does not gather "
                                    "the members' logits across ranks")
        if self.cfg.loss.teacher_weight:
            raise PinnerformerError("loss.teacher_weight is for one process: distributed training does not split the "
                                    "teacher's work across ranks")
        if self.cfg.loss.negatives == "full" or self.cfg.compile:
            raise PinnerformerError("distributed training supports the sampled negatives (mixed, in-batch, random) "
                                    "without compile: not negatives=full, not compile")
        self.dist = ctx

    # ---- batches -----------------------------------------------------------------------------------------
    def batch_for(self, users: np.ndarray, rng: np.random.Generator) -> RetrievalBatch:
        """The batch's examples (all of them: the loss needs the whole batch's labels) and the padded features of
        the examples this process encodes (all, or this rank's share)."""
        ex = self.sampler.sample(users, rng)
        mine = slice(None) if self.dist is None else self.dist.share(len(ex.starts))
        return RetrievalBatch(ex, to_torch(build_sequence_batch(self.ds.timelines, ex.starts[mine], ex.ends[mine],
                                                                self.model.time_features, pad_to=self.pad_to)))

    def host_batch(self, epoch: int, step: int) -> RetrievalBatch:
        if self._order is None or self._order[0] != epoch:
            cfg = self.cfg
            order = epoch_order(cfg.seed, epoch, self.sampler.eligible, cfg.data.sequences_per_user)
            if cfg.optim.batch_actions is not None:
                if cfg.data.length_buckets:
                    order = sorted_within_windows(order, self.lengths, self.batch_size * cfg.data.length_buckets)
                batches = action_budget_batches(order, self.lengths, self.steps_per_epoch, cfg.seed, epoch)
            else:
                if cfg.data.length_buckets:
                    order = length_bucketed(order, self.lengths, self.batch_size, cfg.data.length_buckets, cfg.seed,
                                            epoch)
                batches = [order[i * self.batch_size:(i + 1) * self.batch_size] for i in range(self.steps_per_epoch)]
            self._order = (epoch, batches)
        users = self._order[1][step]
        return self.batch_for(users, np.random.default_rng([self.cfg.seed, epoch, step]))

    # ---- the loss --------------------------------------------------------------------------------------
    def loss(self, batch: RetrievalBatch, global_step: int, device: torch.device) -> StepLoss:
        """Nothing here waits for the GPU: the sketch, the negative pool, its log Q and the de-duplication of item
        ids are host work on host arrays (`SampledSoftmaxLoss.host_inputs`), moved to the device in one go."""
        ex = batch.examples
        negatives = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + global_step)
        t = to_torch(self.objective.host_inputs(ex, negatives), device)
        seq = to_torch(batch.seq, device)
        B = len(ex.starts)
        if self.dist is not None:
            return self._distributed_loss(ex, t, seq, B, device)
        losses, member_logits = [], []
        distill = self.cfg.loss.distill_weight > 0
        teacher = self._teacher_targets(ex, t, seq, B) if self.teacher is not None else None
        teacher_terms = []
        for member in members_of(self.model):  # an ensemble's members: each its own loss, on the same batch
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out = member.encode_sequence(seq)  # [B, T, D]
                # index_select rather than out[q_example, q_position]: the backward of advanced indexing accumulates
                # with several CPU threads in a run-dependent order; index_select's does not (bit-exact resume)
                T = out.shape[1]
                q = out.reshape(B * T, -1).index_select(0, t["q_example"] * T + t["q_position"])
            if distill:  # the same loss, and the logits it normalises, for the members' mutual term below
                loss, logits = self.objective(q, member.item_embedding, member.temperature, t, B, with_logits=True)
                member_logits.append(logits)
            else:
                loss = self.objective(q, member.item_embedding, member.temperature, t, B)
            if self.cfg.loss.contrastive_weight:
                twin_term = self._contrastive(member, seq, batch.seq["length"], q, ex, device)
                loss = loss + self.cfg.loss.contrastive_weight * twin_term
            if teacher is not None:
                teacher_p, mask = teacher
                every = member.item_embedding(torch.arange(mask.shape[1], device=device))
                term = distillation_kl((q.float() / member.temperature) @ every.float().T, teacher_p, mask,
                                       t["q_example"], B, self.cfg.loss.weighting, self.cfg.loss.teacher_temperature)
                teacher_terms.append(term.detach())
                loss = loss + self.cfg.loss.teacher_weight * term
            losses.append(loss)
        if teacher_terms:
            self._teacher_kl = torch.stack(teacher_terms).mean()
        if distill:
            terms = ensemble_distillation(member_logits, t["q_example"], B, self.cfg.loss.weighting)
            losses = [loss + self.cfg.loss.distill_weight * term for loss, term in zip(losses, terms)]
            self._distill_kl = torch.stack(terms).mean().detach()  # the members' disagreement, in the step log
        loss = losses[0] if len(losses) == 1 else torch.stack(losses).mean()
        return StepLoss(loss, {"queries": len(ex.q_item)})

    def _teacher_targets(self, ex: ExampleBatch, t: dict, seq: dict, B: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's distribution over the catalogue for each query, and the items masked from it (the
        example's other positives): objectives/teacher_distillation.py. A query at position p reads the prefix of
        its example's window up to p (the neighbours' votes)."""
        n_items, dev = self.ds.manifest.n_items, t["q_example"].device
        if self.cfg.loss.mask_own_positives:
            mask = own_positive_full_mask(t["q_example"], t["label_items"], t["label_example"], t["label_item"], B,
                                          n_items)
        else:
            mask = torch.zeros(len(ex.q_item), n_items, dtype=torch.bool, device=dev)
        starts = ex.starts[ex.q_example]
        p = teacher_probabilities(self.teacher, seq, t["q_example"], t["q_position"], mask, self.ds.timelines,
                                  starts, starts + ex.q_position + 1)
        return p, mask

    def _contrastive(self, member, seq: dict, lengths: np.ndarray, q: torch.Tensor, ex: ExampleBatch,
                     device: torch.device) -> torch.Tensor:
        """The twin-view loss (objectives/contrastive.py): each example's newest query, from this pass (q) and from
        a second pass with its own dropout (the last block at that position only); examples without a query are
        left out (zero examples: a zero term that still carries a gradient)."""
        rows = newest_query_rows(ex.q_example, ex.q_position)
        if len(rows) < 2:  # no negative to tell the twin from
            return q.sum() * 0.0
        examples = ex.q_example[rows]
        at = np.asarray(lengths, dtype=np.int64) - 1  # each example's second-view position: its newest query's
        at[examples] = ex.q_position[rows]  # (examples without one: any position; their rows are not read)
        # one host-to-device copy: the query rows, their examples, targets and the second-view positions
        packed = torch.from_numpy(np.concatenate([rows, examples, ex.q_item[rows], at]).astype(np.int64)).to(device)
        r_rows, r_examples, r_targets, r_at = packed.split([len(rows), len(rows), len(rows), len(at)])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            twin = member.user_embedding(seq, r_at).index_select(0, r_examples)
        return twin_view_info_nce(q.index_select(0, r_rows), twin, r_targets, self.cfg.loss.contrastive_temperature)

    def _distributed_loss(self, ex: ExampleBatch, t: dict, seq: dict, B: int, device: torch.device) -> StepLoss:
        """This rank's share of the batch's loss: its examples' queries against the whole batch's pool, the
        pool's embeddings gathered across ranks with their gradients (distributed/context.py)."""
        mine = self.dist.share(B)
        queries = np.flatnonzero((ex.q_example >= mine.start) & (ex.q_example < mine.stop))
        local = torch.from_numpy(ex.q_example[queries] - mine.start)
        losses = []
        for member in members_of(self.model):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out = member.encode_sequence(seq)  # [B / N, T, D]
                T = out.shape[1]
                rows = local.to(device) * T + torch.from_numpy(ex.q_position[queries]).to(device)
                q = out.reshape(out.shape[0] * T, -1).index_select(0, rows)
            losses.append(self.objective(q, lambda ids, m=member: self.dist.gather_embeddings(m.item_embedding, ids),
                                         member.temperature, t, B, queries=torch.from_numpy(queries).to(device)))
        loss = losses[0] if len(losses) == 1 else torch.stack(losses).mean()
        return StepLoss(loss, {"queries": len(queries)})

    def step_scalars(self) -> dict[str, torch.Tensor]:
        # (read without waiting for the GPU: the loop copies scalars behind the step)
        tau = self.model.temperature
        zero = lambda kl: kl if kl is not None else torch.zeros((), device=tau.device)  # noqa: E731 (before step 1)
        out = {"tau": tau}
        if self.cfg.loss.distill_weight:
            out["distill_kl"] = zero(self._distill_kl)
        if self.cfg.loss.teacher_weight:
            out["teacher_kl"] = zero(self._teacher_kl)
        return out

    def compile(self, mode: str) -> None:
        # the encoder with static shapes; the loss in its fused form, with dynamic shapes (see SampledSoftmaxLoss)
        for member in members_of(self.model):
            member.encode_sequence = torch.compile(member.encode_sequence, mode=mode)
        if not self.cfg.loss.distill_weight:  # (the mutual term reads the eager loss's logits)
            self.objective.fused = torch.compile(sampled_softmax_loss_fused, dynamic=True)

    # ---- validation ------------------------------------------------------------------------------------
    def _scores(self, scorer: Scorer) -> dict[str, float]:
        history = self.ds.timelines if self.cfg.eval.exclude_history else None
        values, _ = score_task(self.val_task, scorer, self.cfg.eval.k, [RECALL, HIT_RATE, NDCG], intervals=False,
                               history=history)
        return {name: v.mean for name, v in values.items()} | {"users": len(self.val_task)}

    def validate(self, device: torch.device) -> dict[str, float]:
        t = self.val_task
        return self._scores(Scorer("model", embed_users(self.model, self.ds.timelines, t.starts, t.ends, device),
                                   embed_items(self.model, device)))

    def baseline(self) -> tuple[str, dict[str, float]]:
        """Most-popular positives in the training data, ranked by the same code: context for every number."""
        pop = popularity_scores(self.ds, self.val_task, self.protocol, view=self.view)
        return "popularity", self._scores(Scorer("popularity", None, None, fixed=pop))

    # ---- the run directory -----------------------------------------------------------------------------
    def describe(self) -> dict:
        return {"task": "retrieval", "config": self.cfg,
                "dataset": DatasetRef(path=str(self.ds.path.resolve()), fingerprint=self.dataset_fingerprint),
                "model": {**asdict(self.model.spec), "item_features": self.model.item_feature_kind,
                          "time_features": self.model.time_features},
                "protocol": self.protocol, "metric": self.metric,
                "eligible_training_users": int(len(self.sampler.eligible)), "validation_users": len(self.val_task),
                "notes": self.notes}

    def write_inputs(self, run_dir: Path) -> None:
        if self.protocol == "future-window":
            split = pl.DataFrame({"user_id": self.ds.users["user_id"],
                                  "split": pl.Series(self.split).replace_strict([0, 1, 2], SPLITS)})
            with atomic_path(Path(run_dir) / rf.SPLIT) as tmp:
                split.write_parquet(tmp)

    def state_dict(self) -> dict:
        return {"sketch": self.objective.sketch.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.objective.sketch.load_state_dict(state["sketch"])


def training_range(ds: Dataset, cfg: TrainConfig, protocol: str, refit: bool | None = None
                   ) -> tuple[np.ndarray, TimelineView]:
    """The user split (future-window: 0 train, 1 validation, 2 test; leave-one-out: all 0) and the events training
    may see (evaluation/protocols.py `training_view`), before eval.until. refit: the refit's view (default: as
    eval.refit_epochs says)."""
    user_ids = ds.users["user_id"].to_list()
    split = (user_split(user_ids, cfg.seed, cfg.eval.val_fraction, cfg.eval.test_fraction)
             if protocol == "future-window" else np.zeros(len(user_ids), dtype=np.int8))
    refit = cfg.eval.refit_epochs is not None if refit is None else refit
    return split, training_view(ds, protocol, split, refit=refit)


LENGTH_QUANTILE = 0.9  # data.max_len_cap: M covers this share of the users' timelines whole


def fitted_max_len(cfg: TrainConfig, ds: Dataset) -> TrainConfig:
    """`cfg` with data.max_len fitted to the dataset when data.max_len_cap is set: the 90th percentile of the
    training part's timeline lengths (held-out actions not counted), clipped to [max_len, max_len_cap].
    Idempotent (a fitted config fits to itself), so a saved run's config compares equal to a fresh fit of the same
    preset on the same data."""
    d = cfg.data
    if d.max_len_cap is None:
        return cfg
    fitted = min(d.max_len_cap, max(d.max_len, training_length_quantile(cfg, ds)))
    return cfg.model_copy(update={"data": d.model_copy(update={"max_len": fitted})})


def training_length_quantile(cfg: TrainConfig, ds: Dataset) -> int:
    """The LENGTH_QUANTILE of the training part's timeline lengths (held-out actions not counted); 0 without any."""
    # the selection run's training part, also for its refit: the refit reads windows as long as the run it repeats
    _, view = training_range(ds, cfg, resolve_protocol(cfg.eval.protocol, ds.manifest.clock), refit=False)
    lengths = (view.end - view.start)[view.end > view.start]
    return int(np.ceil(np.quantile(lengths, LENGTH_QUANTILE))) if len(lengths) else 0


def retrieval_loop(ds: Dataset, cfg: TrainConfig, run_dir: Path, log=print, dist=None,
                   teacher: Teacher | None = None) -> TrainingLoop:
    """The training loop over PinnerFormer's retrieval task: `retrieval_loop(ds, cfg, run_dir).fit()`; with `dist`
    (a DistContext), this process is one rank of a distributed run; `teacher`: the frozen model that
    `loss.teacher_weight` distils from (runs.evaluate.load_teacher). The run's saved config is `cfg` with its
    M fitted to the data (`fitted_max_len`)."""
    fitted = fitted_max_len(cfg, ds)
    if cfg.data.max_len_cap is not None:
        # cfg may arrive fitted already (experiment fits to compare with a finished run), so its max_len is not
        # the preset's floor: say what the fit read from the data instead
        log(f"data.max_len fitted to the data: M = {fitted.data.max_len} (the {LENGTH_QUANTILE:.0%} quantile of the "
            f"training timelines' lengths is {training_length_quantile(cfg, ds)}; the cap is {cfg.data.max_len_cap})")
    return TrainingLoop(RetrievalTask(ds, fitted, teacher), fitted, run_dir, log=log, dist=dist)
