"""PinnerFormer trainer: AdamW, warm-up + cosine, clipping, bf16 autocast on GPU, early stopping on validation,
checkpoints that resume exactly, a progress bar, TensorBoard scalars, and the resolved config in the run dir.

Exact resume: every source of randomness is derived from (seed, epoch, step) rather than carried along —
the epoch's user order from (seed, epoch), a batch's examples from (seed, epoch, step), negatives and dropout
from (seed, global step) — so a run restarted from a checkpoint replays the same batches. The checkpoint
holds model, optimizer, count-min sketch, the position in the run, early-stopping state and the loss history.

Run directory:
    config.json         the full resolved config, dataset fingerprint, model shape, protocol, counts
    split.parquet       user id -> train / validation / test (future-window protocol)
    metrics.jsonl       one line per step (loss, lr, τ) and per epoch (validation metric)
    checkpoints/        last.pt (resume), best.pt (best validation metric: the model later stages use)
    tensorboard/        scalars
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import numpy as np
import polars as pl
import torch

from pinnerformer.data import schema
from pinnerformer.data.dataset import Dataset
from pinnerformer.errors import PinnerformerError
from pinnerformer.progress import progress_bar
from pinnerformer.evaluation.metrics import label_ranks, ndcg_at_k, recall_at_k, hit_rate_at_k
from pinnerformer.evaluation.protocols import (
    EvalTask, future_window_task, leave_one_out_task, positive_item_counts, training_view, user_split,
)
from pinnerformer.features.sequence_batch import build_sequence_batch, to_torch
from pinnerformer.models.pinnerformer import ModelConfig, PinnerFormer
from pinnerformer.objectives.examples import ExampleBatch, ExampleConfig, ExampleSampler
from pinnerformer.objectives.sampled_softmax import (
    CountMinSketch, build_negative_pool, full_softmax_loss, label_mask, log_q_of, own_positive_mask, own_positive_rows,
    sampled_softmax_loss, sampled_softmax_loss_fused,
)
from pinnerformer.training.config import TrainConfig

SHAPE_KEYS = ("data", "model", "loss")  # a resumed run must agree on these


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_model(ds: Dataset, cfg: TrainConfig) -> tuple[PinnerFormer, ModelConfig]:
    m = ds.manifest
    content = ds.content_vectors()
    feats = cfg.model.item_features
    if feats == "auto":
        feats = "both" if content is not None else "id"
    if feats in ("content", "both") and content is None:
        raise PinnerformerError(f"item_features={feats} needs content vectors, but {ds.path} has none "
                                "(run `pinnerformer items embed-text` or use item_features=id)")
    mc = ModelConfig(
        n_items=m.n_items, n_actions=len(m.actions), n_surfaces=len(m.surfaces), max_len=cfg.data.max_len,
        width=cfg.model.width, layers=cfg.model.layers, heads=cfg.model.heads, dim=cfg.model.dim,
        dropout=cfg.model.dropout, item_features=feats, content_dim=0 if content is None else content.shape[1],
        id_dim=cfg.model.id_dim, action_dim=cfg.model.action_dim, surface_dim=cfg.model.surface_dim,
        time_features=cfg.model.time_features and m.clock == "seconds",
        item_tower_hidden=cfg.model.item_tower_hidden, item_tower=cfg.model.item_tower,
        input_dropout=cfg.model.input_dropout, use_action=cfg.model.action_features,
        use_duration_surface=cfg.model.duration_surface_features, use_position=cfg.model.position_features,
        residual_dtype=cfg.model.residual_dtype)
    if mc.item_tower == "none" and mc.item_feature_width != mc.dim:
        raise PinnerformerError(f"model.item_tower=none uses the item features as item embeddings, so their width "
                                f"({mc.item_feature_width}: item_features={feats}) must equal model.dim ({mc.dim})")
    if mc.width % mc.heads:
        raise PinnerformerError(f"model.width {mc.width} is not divisible by model.heads {mc.heads}")
    return PinnerFormer(mc, None if content is None or feats == "id" else torch.from_numpy(np.array(content))), mc


def prefetched(fn, items, threads: int):
    """fn(x) for x in items, in order. With threads > 0 the next results are computed ahead in a thread pool
    (numpy's array work releases the GIL), so host-side preparation overlaps the GPU's work."""
    if threads <= 0:
        yield from map(fn, items)
        return
    it = iter(items)
    with ThreadPoolExecutor(threads) as pool:
        window = deque(pool.submit(fn, x) for x in itertools.islice(it, 2 * threads))
        while window:
            done = window.popleft().result()
            for x in itertools.islice(it, 1):
                window.append(pool.submit(fn, x))
            yield done


@torch.no_grad()
def embed_users(model: PinnerFormer, ds: Dataset, starts: np.ndarray, ends: np.ndarray, device: torch.device,
                batch_size: int = 256, fixed_shape: bool = False) -> torch.Tensor:
    """User embeddings from the last M actions of each [start, end) range. [U, D] float32 (on `device`).

    fixed_shape: every model call is [batch_size, max_len] (sequences padded to max_len, the last batch filled up
    with copies of its first user, results dropped). Kernels then run the same instruction sequence for every row
    whichever users share the batch, so a user's vector is bit-for-bit the same in a partial recompute and in a
    full one (same batch_size and device): what the daily job relies on. Otherwise batches are padded to their
    longest sequence only (cheaper for evaluation). On GPU, two threads build the next batches' features (into
    pinned memory) while the current one computes."""
    model.eval()
    M = model.cfg.max_len
    starts = np.maximum(starts, ends - M)
    cuda = device.type == "cuda"

    def host_batch(i: int) -> tuple[int, dict[str, torch.Tensor]]:
        s, e = starts[i:i + batch_size], ends[i:i + batch_size]
        n = len(s)
        if fixed_shape and n < batch_size:
            s, e = np.concatenate([s, np.repeat(s[:1], batch_size - n)]), np.concatenate([e, np.repeat(e[:1], batch_size - n)])
        tensors = to_torch(build_sequence_batch(ds.timelines, s, e, model.cfg.time_features,
                                                pad_to=M if fixed_shape else None))
        return n, ({k: v.pin_memory() for k, v in tensors.items()} if cuda else tensors)

    out = []
    for n, host in prefetched(host_batch, range(0, len(starts), batch_size), threads=2 if cuda else 0):
        b = to_torch(host, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            out.append(model.user_embedding(b)[:n].float())
    return torch.cat(out) if out else torch.zeros((0, model.cfg.dim), device=device)


@torch.no_grad()
def embed_items(model: PinnerFormer, device: torch.device, chunk: int = 8192) -> torch.Tensor:
    model.eval()
    n = model.cfg.n_items
    out = []
    for i in range(0, n, chunk):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out.append(model.item_embedding(torch.arange(i, min(i + chunk, n), device=device)).float())
    return torch.cat(out)


def evaluate_task(user_vecs: torch.Tensor, item_vecs: torch.Tensor | None, task: EvalTask, k: int,
                  item_scores: torch.Tensor | None = None, batch: int = 512) -> dict[str, float]:
    """Full-catalogue ranking metrics of a task; scores = user · item, or fixed per-item scores (popularity)."""
    ranks: list[np.ndarray] = []
    for i in range(0, len(task), batch):
        if item_scores is not None:
            scores = item_scores.unsqueeze(0).expand(min(batch, len(task) - i), -1)
        else:
            scores = user_vecs[i:i + batch] @ item_vecs.T
        ranks += label_ranks(scores, task.labels[i:i + batch])
    return {f"recall@{k}": float(np.nanmean(recall_at_k(ranks, k))),
            f"hr@{k}": float(np.nanmean(hit_rate_at_k(ranks, k))),
            f"ndcg@{k}": float(np.nanmean(ndcg_at_k(ranks, k))), "users": len(task)}


@dataclass
class PreparedBatch:
    """A training step's host-side work: the examples cut for it and their padded feature arrays (CPU tensors)."""
    examples: ExampleBatch
    seq: dict[str, torch.Tensor]

    def pin_memory(self) -> "PreparedBatch":  # called by the DataLoader on GPU runs
        return PreparedBatch(self.examples, {k: v.pin_memory() for k, v in self.seq.items()})


def prepare_batch(sampler: ExampleSampler, timelines, time_features: bool, pad_to: int | None, users: np.ndarray,
                  rng: np.random.Generator) -> PreparedBatch:
    ex = sampler.sample(users, rng)
    return PreparedBatch(ex, to_torch(build_sequence_batch(timelines, ex.starts, ex.ends, time_features, pad_to=pad_to)))


class StepBatches(torch.utils.data.Dataset):
    """Step s of an epoch -> its PreparedBatch; the example rng is derived from (seed, epoch, s)."""

    def __init__(self, trainer: "Trainer", order: np.ndarray, epoch: int):
        self.sampler, self.timelines = trainer.sampler, trainer.ds.timelines
        self.time_features, self.pad_to = trainer.model_cfg.time_features, trainer.pad_to
        self.order, self.epoch, self.seed, self.B = order, epoch, trainer.cfg.seed, trainer.cfg.optim.batch_size

    def __len__(self) -> int:
        return len(self.order) // self.B

    def __getitem__(self, s: int) -> PreparedBatch:
        users = self.order[s * self.B:(s + 1) * self.B]
        return prepare_batch(self.sampler, self.timelines, self.time_features, self.pad_to, users,
                             np.random.default_rng([self.seed, self.epoch, s]))


class Trainer:
    def __init__(self, ds: Dataset, cfg: TrainConfig, run_dir: Path, log=print):
        self.ds, self.cfg, self.run_dir, self.log = ds, cfg, Path(run_dir), log
        m = ds.manifest
        if not m.positive_codes:
            raise PinnerformerError(f"{ds.path}: the dataset has no positive action types, so there is nothing "
                                    "to learn to predict (prepare it with --positive)")
        self.device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.protocol = cfg.eval.protocol
        if self.protocol == "auto":
            self.protocol = "leave-one-out" if m.clock == "order" else "future-window"
        if self.protocol == "future-window" and m.clock == "order":
            raise PinnerformerError("the future-window protocol needs real timestamps; this dataset is order-only "
                                    "(use --protocol leave-one-out)")
        self.notes: list[str] = []
        if self.protocol == "leave-one-out" and cfg.preset != "loo":
            self.notes.append(f"leave-one-out protocol with preset '{cfg.preset}': the default configuration for "
                              "this protocol is --preset loo")
        if m.clock == "order":
            self.notes.append("order-only clock: no time features; the label window is counted in actions "
                              f"(K = {cfg.data.window_actions} actions)")
        user_ids = ds.users["user_id"].to_list()
        self.split = (user_split(user_ids, cfg.seed, cfg.eval.val_fraction, cfg.eval.test_fraction)
                      if self.protocol == "future-window" else np.zeros(len(user_ids), dtype=np.int8))
        view = training_view(ds, self.protocol, self.split)
        order = m.clock == "order"
        self.sampler = ExampleSampler(
            ds.timelines, np.array(m.positive_codes), view,
            ExampleConfig(objective=cfg.loss.objective, max_len=cfg.data.max_len, positions=cfg.data.positions,
                          labels_per_position=cfg.data.labels_per_position, max_labels=cfg.data.max_labels,
                          window=cfg.data.window_actions if order else cfg.data.window_days * 86400.0,
                          window_in_actions=order, cutoff=cfg.data.cutoff))
        n_elig = len(self.sampler.eligible)
        if n_elig < cfg.optim.batch_size:
            raise PinnerformerError(
                f"only {n_elig} training users have an action followed by a positive action, fewer than one batch "
                f"(batch_size {cfg.optim.batch_size}); use a smaller batch or more data")
        if self.protocol == "future-window":
            val_users = np.flatnonzero(self.split == 1)
            self.val_task = future_window_task(ds, val_users, cfg.eval.label_days, cfg.seed, "future-window/validation",
                                               cfg.eval.max_val_users)
            self.metric = f"recall@{cfg.eval.k}"
        else:
            self.val_task = leave_one_out_task(ds, "validation")
            self.metric = f"ndcg@{cfg.eval.k}"
        if len(self.val_task) == 0:
            raise PinnerformerError("no validation user has labels: cannot select a model")
        self.model, self.model_cfg = build_model(ds, cfg)
        self.model.to(self.device)
        decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.ndim < 2]
        cuda = self.device.type == "cuda"
        # fused: one kernel for the whole update on GPU (the CPU keeps the default, whose results tests pin down)
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=cfg.optim.lr,
                                     fused=True if cuda else None)
        # GPU: fixed-length batches (static shapes for compiled kernels); CPU: padded to the longest sequence only
        self.pad_to = cfg.data.max_len if cuda else None
        self.workers = cfg.loader_workers if cfg.loader_workers >= 0 else (
            min(8, max(1, (os.cpu_count() or 1) - 2)) if cuda else 0)
        if cuda:
            # The host only does bookkeeping (sketch, pool, copies) while loader workers and the pinning thread
            # run beside it; a full-width CPU thread pool for those small ops oversubscribes the cores and stalls
            # the thread that feeds the GPU.
            torch.set_num_threads(min(torch.get_num_threads(), 2))
        # compile: the encoder (static shapes), and the loss in its fused form (query and pool sizes vary per batch,
        # hence dynamic; no CUDA graphs for it, which would be recorded again for every new size)
        self.fused_loss = None
        if cfg.compile:
            self.model.encode_sequence = torch.compile(self.model.encode_sequence, mode=cfg.compile_mode)
            self.fused_loss = torch.compile(sampled_softmax_loss_fused, dynamic=True)
        self.seqs_per_epoch = n_elig * cfg.data.sequences_per_user
        self.steps_per_epoch = self.seqs_per_epoch // cfg.optim.batch_size  # drop the ragged last batch
        self.total_steps = self.steps_per_epoch * cfg.optim.max_epochs
        self.sketch = CountMinSketch(cfg.loss.sketch_width, cfg.loss.sketch_depth, seed=cfg.seed)
        self.state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best": -math.inf, "best_epoch": -1,
                      "bad_epochs": 0, "history": [], "done": False}

    # ---- schedule ----------------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        o = self.cfg.optim
        if step < o.warmup_steps:
            return o.lr * (step + 1) / o.warmup_steps
        progress = (step - o.warmup_steps) / max(1, self.total_steps - o.warmup_steps)
        return o.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    # ---- one step --------------------------------------------------------------------------------------
    def prepare(self, users: np.ndarray, rng: np.random.Generator) -> "PreparedBatch":
        """The host-side half of a step (examples and padded feature arrays); runs in loader workers."""
        return prepare_batch(self.sampler, self.ds.timelines, self.model_cfg.time_features, self.pad_to, users, rng)

    def loss_on(self, users: np.ndarray, rng: np.random.Generator, gen: torch.Generator) -> torch.Tensor:
        return self.loss_on_prepared(self.prepare(users, rng), gen)

    def loss_on_prepared(self, prep: "PreparedBatch", gen: torch.Generator) -> torch.Tensor:
        """The loss of one prepared batch. Nothing here waits for the GPU: the sketch, the negative pool, its log Q
        and the de-duplication of item ids are host work on host arrays, moved to the device in one go."""
        cfg, dev = self.cfg, self.device
        batch = prep.examples
        B = len(batch.starts)
        label_items_host = torch.from_numpy(batch.q_item)
        self.sketch.update(label_items_host)
        n_items = self.model_cfg.n_items
        full = cfg.loss.negatives == "full"
        host: dict[str, np.ndarray | torch.Tensor] = {"q_example": batch.q_example, "q_position": batch.q_position,
                                                      "label_items": batch.q_item}
        if cfg.loss.mask_own_positives:
            host.update(label_example=batch.label_example, label_item=batch.label_item)
        if not full:
            pool = build_negative_pool(label_items_host, cfg.loss.negatives, cfg.loss.n_random, n_items, self.sketch,
                                       cfg.loss.logq, gen)
            n_ib = len(label_items_host) if cfg.loss.negatives in ("in-batch", "mixed") else 0
            n_rand = cfg.loss.n_random if cfg.loss.negatives in ("random", "mixed") else 0
            pos_log_q = (log_q_of(label_items_host, cfg.loss.negatives, n_ib, n_rand, n_items, self.sketch)
                         if cfg.loss.logq else torch.zeros(len(label_items_host)))
            uniq, inv = np.unique(np.concatenate([batch.q_item, pool.items.numpy()]), return_inverse=True)
            host.update(pool_items=pool.items, pool_log_q=pool.log_q, pos_log_q=pos_log_q, uniq=uniq, inv=inv)
        t = to_torch(host, dev)
        seq = to_torch(prep.seq, dev)
        q_example, label_items = t["q_example"], t["label_items"]
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            out = self.model.encode_sequence(seq)  # [B, T, D]
            # index_select rather than out[q_example, q_position]: the backward of advanced indexing accumulates
            # with several CPU threads in a run-dependent order; index_select's does not (bit-exact resume)
            T = out.shape[1]
            q = out.reshape(B * T, -1).index_select(0, q_example * T + t["q_position"])
            if full:  # the pool is every item, in id order: embed the catalogue once
                all_e = self.model.item_embedding(torch.arange(n_items, device=dev))
            else:
                emb = self.model.item_embedding(t["uniq"])
                inv = t["inv"]
                pos_e, neg_e = emb.index_select(0, inv[:len(label_items)]), emb.index_select(0, inv[len(label_items):])
                tau = self.model.temperature
                if self.fused_loss is not None:  # the same loss, fused by torch.compile (see its docstring)
                    own = cfg.loss.mask_own_positives
                    rows = (own_positive_rows(t["pool_items"], t["label_example"], t["label_item"], B, n_items)
                            if own else None)
                    return self.fused_loss(q, pos_e, neg_e, tau, t["pos_log_q"], t["pool_log_q"], q_example, B,
                                           own_rows=rows, q_item=None if own else label_items,
                                           pool_items=None if own else t["pool_items"])
                # on GPU both products take bf16 operands with fp32 accumulation, like the rest of the model
                pos_logit = torch.bmm(q.unsqueeze(1), pos_e.unsqueeze(2)).view(-1) / tau
                neg_logit = (q @ neg_e.T) / tau
        if full:  # one fused cross-entropy over the catalogue (the same loss as below with this pool)
            logits = (q.float() / self.model.temperature) @ all_e.float().T
            mask = None
            if cfg.loss.mask_own_positives:  # the example's positives, as own_positive_mask, without a sort
                per_example = torch.zeros(B, n_items, dtype=torch.bool, device=dev)
                per_example.index_put_((t["label_example"], t["label_item"]),
                                       torch.ones(len(t["label_item"]), dtype=torch.bool, device=dev))
                mask = per_example[q_example]
            return full_softmax_loss(logits, label_items, mask, q_example, B)
        if cfg.loss.mask_own_positives:
            mask = own_positive_mask(q_example, t["pool_items"], t["label_example"], t["label_item"], B, n_items)
        else:
            mask = label_mask(label_items, t["pool_items"])
        return sampled_softmax_loss(pos_logit.float(), neg_logit.float(), t["pos_log_q"], t["pool_log_q"], mask,
                                    q_example, B)

    def train_step(self, prep: "PreparedBatch", g: int) -> dict:
        """One optimiser step at global step g. Returns its (loss, τ, gradient norm) still in flight, and the lr;
        reading them (`read_step`) is left to the caller, after the next step is queued, so the GPU never idles."""
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + g)  # negatives
        torch.manual_seed(cfg.seed * 7_919 + g)  # dropout
        lr = self.lr_at(g)
        for group in self.opt.param_groups:
            group["lr"] = lr
        loss = self.loss_on_prepared(prep, gen)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        self.opt.step()
        stats = torch.stack([loss.detach().float(), self.model.temperature.detach().float(), gnorm.detach().float()])
        ready = None
        if self.device.type == "cuda":
            # Copied to pinned host memory behind this step's work, with an event to wait on: `.item()` would wait
            # for everything queued by then, i.e. also the next step, and the GPU would idle while the host queues.
            host = torch.empty(3, pin_memory=True)
            host.copy_(stats, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            stats = host
        return {"stats": stats, "ready": ready, "lr": lr, "queries": len(prep.examples.q_item)}

    @staticmethod
    def read_step(out: dict) -> tuple[float, float, float]:
        """(loss, τ, gradient norm) of a `train_step`, waiting for that step only."""
        if out["ready"] is not None:
            out["ready"].synchronize()
        loss, tau, grad_norm = out["stats"].tolist()
        return loss, tau, grad_norm

    def loader(self, order: np.ndarray, epoch: int, first_step: int, steps: int):
        """Prepared batches for steps first_step..steps-1 of an epoch, in order. With loader workers (GPU runs),
        worker processes prepare them ahead, into pinned memory. Every batch is a function of (seed, epoch, step)
        alone, so the batches are the same with any number of workers, and after a resume."""
        batches = StepBatches(self, order, epoch)
        if self.workers == 0:
            return (batches[s] for s in range(first_step, steps))
        return torch.utils.data.DataLoader(batches, batch_size=None, sampler=range(first_step, steps),
                                           num_workers=self.workers, pin_memory=self.device.type == "cuda",
                                           prefetch_factor=4, multiprocessing_context="fork")

    # ---- validation ------------------------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        t = self.val_task
        users = embed_users(self.model, self.ds, t.starts, t.ends, self.device)
        items = embed_items(self.model, self.device)
        return evaluate_task(users, items, t, self.cfg.eval.k)

    def popularity_baseline(self) -> dict[str, float]:
        """Most-popular positives in the training data, ranked by the same code: context for every number."""
        counts = positive_item_counts(self.ds, training_view(self.ds, self.protocol, self.split))
        return evaluate_task(None, None, self.val_task, self.cfg.eval.k, item_scores=torch.from_numpy(counts))

    # ---- persistence -----------------------------------------------------------------------------------
    def _describe(self) -> dict:
        return {"config": self.cfg.model_dump(), "dataset": {"path": str(self.ds.path.resolve()),
                                                            "fingerprint": self.ds.manifest.fingerprint},
                "model": asdict(self.model_cfg), "protocol": self.protocol, "metric": self.metric,
                "eligible_training_users": int(len(self.sampler.eligible)), "validation_users": len(self.val_task),
                "steps_per_epoch": self.steps_per_epoch, "notes": self.notes,
                "parameters": sum(p.numel() for p in self.model.parameters())}

    def _check_resume_compatible(self) -> None:
        path = self.run_dir / "config.json"
        if not path.exists():
            raise PinnerformerError(f"--resume: {self.run_dir} has no config.json (not a training run)")
        old = json.loads(path.read_text())
        if old["dataset"]["fingerprint"] != self.ds.manifest.fingerprint:
            raise PinnerformerError(
                f"--resume: {self.run_dir} was trained on a different dataset (fingerprint "
                f"{old['dataset']['fingerprint']}, this one is {self.ds.manifest.fingerprint})")
        new = self.cfg.model_dump()
        # a run written before a config key existed has that key's default (validation fills it in)
        try:
            old_cfg = TrainConfig.model_validate(old["config"]).model_dump()
        except ValueError as e:  # pydantic's ValidationError is a ValueError
            raise PinnerformerError(f"--resume: {path} holds a config this version cannot read: {e}") from None
        old_model = {**{f.name: f.default for f in fields(ModelConfig) if f.default is not MISSING}, **old["model"]}
        diffs = [k for k in SHAPE_KEYS if old_cfg.get(k) != new.get(k)] + \
                (["model shape"] if old_model != json.loads(json.dumps(asdict(self.model_cfg))) else [])
        if diffs:
            raise PinnerformerError(f"--resume: the run was made with a different model/objective configuration "
                                    f"({', '.join(diffs)} differ); use the same preset and config, or a new run dir")

    def save_checkpoint(self, name: str) -> None:
        folder = self.run_dir / "checkpoints"
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{name}.tmp-{os.getpid()}"
        torch.save({"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                    "sketch": self.sketch.state_dict(), "state": self.state,
                    "model_config": asdict(self.model_cfg), "fingerprint": self.ds.manifest.fingerprint}, tmp)
        os.replace(tmp, folder / name)

    def load_checkpoint(self) -> None:
        ck = torch.load(self.run_dir / "checkpoints" / "last.pt", map_location=self.device, weights_only=False)
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sketch.load_state_dict(ck["sketch"])
        self.state = ck["state"]

    def _write_metrics(self) -> None:
        path = self.run_dir / "metrics.jsonl"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(json.dumps(h) + "\n" for h in self.state["history"]))
        os.replace(tmp, path)

    # ---- the loop --------------------------------------------------------------------------------------
    def fit(self, resume: bool = False, max_steps: int | None = None, stop_after: int | None = None,
            progress: bool = True) -> dict:
        """Train to early stop (or max_epochs / max_steps). `stop_after` simulates a kill (tests)."""
        from tensorboardX import SummaryWriter

        cfg = self.cfg
        if resume:
            self._check_resume_compatible()
            if (self.run_dir / "checkpoints" / "last.pt").exists():
                self.load_checkpoint()
                self.log(f"resumed at epoch {self.state['epoch']}, step {self.state['global_step']}")
        elif (self.run_dir / "checkpoints").exists():
            raise PinnerformerError(f"{self.run_dir} already holds a training run: use --resume or a new directory")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        schema.write_json_atomic(self.run_dir / "config.json", self._describe())
        if self.protocol == "future-window":
            pl.DataFrame({"user_id": self.ds.users["user_id"],
                          "split": pl.Series(self.split).replace_strict([0, 1, 2], ["train", "validation", "test"])}
                         ).write_parquet(self.run_dir / "split.parquet")
        for n in self.notes:
            self.log("note: " + n)
        self.log(f"protocol {self.protocol}; {len(self.sampler.eligible):,} training users, "
                 f"{len(self.val_task):,} validation users; {self.steps_per_epoch} steps/epoch; "
                 f"device {self.device}; {self._describe()['parameters']:,} parameters")
        if not self.state["history"]:
            pop = self.popularity_baseline()
            self.state["history"].append({"kind": "baseline", "name": "popularity", **pop})
            self.log(f"popularity baseline on validation: {self.metric} {pop[self.metric]:.4f}")
        self._write_metrics()
        tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        B = cfg.optim.batch_size
        stopped_by = "max_epochs"
        t_start = time.perf_counter()
        pending: list[dict] = []  # queued steps whose numbers have not been read back from the device yet

        def record_pending(keep: int = 0) -> None:
            # Reading a loss makes the host wait for that step; the loop reads step g only once step g+1 is
            # queued (keep=1), so the GPU is never idle while the host logs. Records land in step order.
            while len(pending) > keep:
                p = pending.pop(0)
                loss, tau, grad_norm = self.read_step(p)
                rec = {"kind": "step", "step": p["step"], "epoch": p["epoch"], "loss": loss, "lr": p["lr"],
                       "tau": tau, "grad_norm": grad_norm, "queries": p["queries"]}
                self.state["history"].append(rec)
                with (self.run_dir / "metrics.jsonl").open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                tb.add_scalar("train/loss", rec["loss"], rec["step"])
                tb.add_scalar("train/lr", rec["lr"], rec["step"])
                tb.add_scalar("train/temperature", rec["tau"], rec["step"])
                bar.set_postfix(loss=f"{rec['loss']:.3f}")

        while self.state["epoch"] < cfg.optim.max_epochs and not self.state["done"]:
            epoch = self.state["epoch"]
            order = np.random.default_rng([cfg.seed, epoch]).permutation(
                np.repeat(self.sampler.eligible, cfg.data.sequences_per_user))
            bar = progress_bar(total=self.steps_per_epoch * B, initial=self.state["step_in_epoch"] * B, unit="seq",
                               desc=f"epoch {epoch}", disable=not progress)
            self.model.train()
            batches = iter(self.loader(order, epoch, self.state["step_in_epoch"], self.steps_per_epoch))
            while self.state["step_in_epoch"] < self.steps_per_epoch:
                g = self.state["global_step"]
                if max_steps is not None and g >= max_steps:
                    self.state["done"], stopped_by = True, "max_steps"
                    break
                if stop_after is not None and g >= stop_after:
                    record_pending()
                    bar.close()
                    return {"stopped_by": "simulated kill"}
                out = self.train_step(next(batches), g)
                pending.append({"step": g, "epoch": epoch, **out})
                record_pending(keep=1)
                self.state["step_in_epoch"] += 1
                self.state["global_step"] += 1
                bar.update(B)
                if self.state["global_step"] % cfg.checkpoint_every == 0:
                    record_pending()
                    self.save_checkpoint("last.pt")
            record_pending()
            del batches  # stops loader workers
            bar.close()
            if self.state["step_in_epoch"] >= self.steps_per_epoch or self.state["done"]:
                val = self.validate()
                improved = val[self.metric] > self.state["best"]
                rec = {"kind": "validation", "epoch": epoch, "step": self.state["global_step"], **val}
                self.state["history"].append(rec)
                with (self.run_dir / "metrics.jsonl").open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                tb.add_scalar(f"validation/{self.metric}", val[self.metric], epoch)
                self.log(f"epoch {epoch}: validation {self.metric} {val[self.metric]:.4f}"
                         + (" (best)" if improved else "") + f"  [{len(self.val_task)} users, {self.protocol}]")
                if improved:
                    self.state.update(best=val[self.metric], best_epoch=epoch, bad_epochs=0)
                    self.save_checkpoint("best.pt")
                else:
                    self.state["bad_epochs"] += 1
                    if self.state["bad_epochs"] >= cfg.optim.patience:
                        self.state["done"], stopped_by = True, "early stop"
                self.state["epoch"] += 1
                self.state["step_in_epoch"] = 0
                self.save_checkpoint("last.pt")
        tb.close()
        summary = {"stopped_by": stopped_by, "best_epoch": self.state["best_epoch"], self.metric: self.state["best"],
                   "popularity": self.state["history"][0][self.metric], "steps": self.state["global_step"],
                   "wall_s": round(time.perf_counter() - t_start, 1)}
        # a batch whose sampled positions all lack a positive in their window has no query: its loss is 0 and it
        # teaches nothing; never silent (each step's record carries its query count)
        empty = sum(1 for r in self.state["history"] if r["kind"] == "step" and r.get("queries", 1) == 0)
        if empty:
            summary["steps_without_queries"] = empty
            self.log(f"note: {empty} step(s) had no training query (no positive in any sampled window): loss 0")
        schema.write_json_atomic(self.run_dir / "summary.json", summary)
        self.log(f"done ({stopped_by}): best validation {self.metric} {self.state['best']:.4f} at epoch "
                 f"{self.state['best_epoch']} vs popularity {summary['popularity']:.4f}")
        return summary
