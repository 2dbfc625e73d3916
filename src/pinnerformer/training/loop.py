"""The training loop, for any `TrainingTask`: AdamW, warm-up + cosine, clipping, bf16 autocast on GPU, early stopping
on validation, checkpoints that resume exactly, a progress bar with rate and ETA, TensorBoard scalars, and the run
directory (`run_files`) that every later stage reads.

Exact resume: every source of randomness is derived from (seed, epoch, step) rather than carried along — a
task's batches from (seed, epoch, step), dropout from (seed, global step), the task's own draws (negatives) from
its step seed — so a run restarted from a checkpoint replays the same batches. The checkpoint holds the model,
the optimiser, the task's state, the position in the run, early-stopping state and the log so far (and, with
`optim.ema_decay`, the moving average of the weights, which is what validation scores and best.pt keeps).

On GPU the host never waits for a step it has just queued: each step's numbers are copied to pinned memory behind
its work and read one step late (`QueuedStep.read`), and loader workers prepare the next batches meanwhile.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from pinnerformer.errors import PinnerformerError
from pinnerformer.io import (
    atomic_path, checkpoint_sha256, load_checkpoint, read_json_record, write_json_atomic, write_text_atomic,
)
from pinnerformer.progress import progress_bar
from pinnerformer.training import run_files as rf
from pinnerformer.training.config import LoopConfig
from pinnerformer.training.task import HostBatch, TrainingTask


class _NoWriter:
    """TensorBoard on ranks other than 0: nothing."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class StepBatches(torch.utils.data.Dataset):
    """Step s of an epoch -> the task's host batch (for torch's DataLoader and its worker processes)."""

    def __init__(self, task: TrainingTask, epoch: int):
        self.task, self.epoch = task, epoch

    def __len__(self) -> int:
        return self.task.steps_per_epoch

    def __getitem__(self, s: int) -> HostBatch:
        return self.task.host_batch(self.epoch, s)


@dataclass
class QueuedStep:
    """A step whose numbers may still be in flight on the device."""

    step: int
    epoch: int
    lr: float
    stats: torch.Tensor  # [loss, *task scalars, grad norm], on the host (pinned on GPU)
    scalar_names: list[str]
    ready: torch.cuda.Event | None  # recorded behind the step's work on GPU
    counts: dict[str, int]

    def read(self) -> list[float]:
        """The step's numbers, waiting for that step only."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.stats.tolist()


class TrainingLoop:
    def __init__(self, task: TrainingTask, cfg: LoopConfig, run_dir: Path, log=print, dist=None):
        """dist: a `distributed.context.DistContext` when this process is one rank of several (torchrun): the task
        encodes its share of each batch, gradients are summed over ranks, rank 0 validates, writes and logs."""
        self.task, self.cfg, self.run_dir, self.dist = task, cfg, Path(run_dir), dist
        self.main = dist is None or dist.main
        self.log = log if self.main else (lambda *a, **k: None)
        self.device = resolve_device(cfg.device) if dist is None else dist.device
        if dist is not None:
            task.distribute(dist)
        self.model = task.model.to(self.device)
        decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.ndim < 2]
        cuda = self.device.type == "cuda"
        # fused: one kernel for the whole update on GPU (the CPU keeps the default, whose results tests pin down)
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=cfg.optim.lr,
                                     fused=True if cuda else None)
        self.workers = cfg.loader_workers if cfg.loader_workers >= 0 else (
            min(8, max(1, (os.cpu_count() or 1) - 2)) if cuda else 0)
        if cuda:
            # The host only does bookkeeping while loader workers and the pinning thread run beside it; a full-width
            # CPU thread pool for those small ops oversubscribes the cores and stalls the thread that feeds the GPU.
            torch.set_num_threads(min(torch.get_num_threads(), 2))
        if cfg.compile:
            task.compile(cfg.compile_mode)
        self.total_steps = task.steps_per_epoch * cfg.optim.max_epochs
        self.state = rf.TrainState()
        # an exponential moving average of the weights (optim.ema_decay): what is validated and saved as best.pt
        self.ema = [p.detach().clone() for p in self.model.parameters()] if cfg.optim.ema_decay is not None else None

    # ---- schedule ----------------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        o = self.cfg.optim
        if step < o.warmup_steps:
            return o.lr * (step + 1) / o.warmup_steps
        progress = (step - o.warmup_steps) / max(1, self.total_steps - o.warmup_steps)
        return o.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    # ---- one step --------------------------------------------------------------------------------------
    def train_step(self, batch: HostBatch, g: int, epoch: int) -> QueuedStep:
        """One optimiser step at global step g. Its numbers are left in flight; reading them (`QueuedStep.read`) is
        left to the caller, after the next step is queued, so the GPU never idles."""
        torch.manual_seed(self.cfg.seed * 7_919 + g)  # dropout
        lr = self.lr_at(g)
        for group in self.opt.param_groups:
            group["lr"] = lr
        out = self.task.loss(batch, g, self.device)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        counts = out.counts
        if self.dist is not None:  # the whole batch's gradient, loss and counts (each rank holds a share)
            self.dist.all_reduce_grads(self.model)
            names = list(counts)
            summed = self.dist.sum(torch.tensor([float(out.loss.detach()), *(counts[k] for k in names)],
                                                dtype=torch.float64, device=self.device))
            out = type(out)(summed[0].float(), {k: int(v) for k, v in zip(names, summed[1:].tolist())})
            counts = out.counts
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.opt.step()
        if self.ema is not None:
            with torch.no_grad():  # the usual warm-up of the decay: early weights are forgotten quickly
                keep = min(self.cfg.optim.ema_decay, (1 + g) / (10 + g))
                for e, p in zip(self.ema, self.model.parameters()):
                    e.lerp_(p.detach(), 1 - keep)
        scalars = self.task.step_scalars()
        stats = torch.stack([out.loss.detach().float(), *(v.detach().float() for v in scalars.values()),
                             gnorm.detach().float()])
        ready = None
        if self.device.type == "cuda":
            # Copied to pinned host memory behind this step's work, with an event to wait on: `.item()` would wait
            # for everything queued by then, i.e. also the next step, and the GPU would idle while the host queues.
            host = torch.empty(len(stats), pin_memory=True)
            host.copy_(stats, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            stats = host
        return QueuedStep(g, epoch, lr, stats, list(scalars), ready, counts)

    def loader(self, epoch: int, first_step: int):
        """Host batches for steps first_step.. of an epoch, in order. With loader workers (GPU runs), worker
        processes prepare them ahead, into pinned memory. Every batch is a function of (seed, epoch, step) alone, so
        the batches are the same with any number of workers, and after a resume."""
        batches = StepBatches(self.task, epoch)
        steps = self.task.steps_per_epoch
        if self.workers == 0:
            return (batches[s] for s in range(first_step, steps))
        return torch.utils.data.DataLoader(batches, batch_size=None, sampler=range(first_step, steps),
                                           num_workers=self.workers, pin_memory=self.device.type == "cuda",
                                           prefetch_factor=4, multiprocessing_context="fork")

    # ---- persistence -----------------------------------------------------------------------------------
    def save_checkpoint(self, name: str) -> None:
        if not self.main:
            return
        folder = self.run_dir / rf.CHECKPOINTS
        folder.mkdir(parents=True, exist_ok=True)
        ck = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "task": self.task.state_dict(),
              "state": self.state.model_dump(), "fingerprint": self.task.dataset_fingerprint}
        if self.ema is not None:
            ck["ema"] = self.ema
        ck["tensors_sha256"] = checkpoint_sha256(ck)
        if getattr(self, "_segment_start", None) is not None:  # the time this state took, resumed segments summed
            ck["train_s"] = round(self._train_s_before + time.perf_counter() - self._segment_start, 1)
        with atomic_path(folder / name) as tmp:
            torch.save(ck, tmp)

    def load_checkpoint(self) -> None:
        ck = load_checkpoint(self.run_dir / rf.CHECKPOINTS / "last.pt", map_location=self.device)
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        if self.ema is not None:
            for e, saved in zip(self.ema, ck["ema"]):
                e.copy_(saved)
        self.task.load_state_dict(ck["task"] if "task" in ck else {"sketch": ck["sketch"]})  # (older checkpoints)
        self.state = rf.TrainState.model_validate(ck["state"])
        self._loaded_train_s = float(ck.get("train_s", 0.0))

    def describe(self) -> rf.RunDescription | rf.RankRunDescription:
        kind = rf.RankRunDescription if self.task.describe().get("task") == "ranking" else rf.RunDescription
        return kind(**self.task.describe(), steps_per_epoch=self.task.steps_per_epoch,
                    parameters=sum(p.numel() for p in self.model.parameters()))

    def _check_resume_compatible(self) -> None:
        path = self.run_dir / rf.CONFIG
        if not path.exists():
            raise PinnerformerError(f"--resume: {self.run_dir} has no {rf.CONFIG} (not a training run)")
        raw = read_json_record(path, "run description")
        try:  # a run written before a config key existed has that key's default (validation fills it in)
            old = type(self.cfg).model_validate(raw["config"])
        except ValueError as e:  # pydantic's ValidationError is a ValueError
            raise PinnerformerError(f"--resume: {path} holds a config this version cannot read: {e}") from None
        if raw.get("task", "retrieval") != self.task.describe().get("task", "retrieval"):
            raise PinnerformerError(f"--resume: {self.run_dir} is a {raw.get('task', 'retrieval')} run, not a "
                                    f"{self.task.describe().get('task')} run")
        if raw["dataset"]["fingerprint"] != self.task.dataset_fingerprint:
            raise PinnerformerError(
                f"--resume: {self.run_dir} was trained on a different dataset (fingerprint "
                f"{raw['dataset']['fingerprint']}, this one is {self.task.dataset_fingerprint})")
        old, new = old.model_dump(), self.cfg.model_dump()
        diffs = [k for k in self.task.resume_keys if old.get(k) != new.get(k)]
        if diffs:
            raise PinnerformerError(f"--resume: the run was made with a different model/objective configuration "
                                    f"({', '.join(diffs)} differ); use the same preset and config, or a new run dir")

    def _append(self, rec: dict) -> None:
        self.state.history.append(rec)
        if not self.main:
            return
        with (self.run_dir / rf.METRICS).open("a") as f:
            f.write(json.dumps(rec) + "\n")

    # ---- the loop --------------------------------------------------------------------------------------
    def fit(self, resume: bool = False, max_steps: int | None = None, progress: bool = True,
            on_step: Callable[[int], None] | None = None) -> rf.TrainSummary:
        """Train to early stop (or max_epochs / max_steps). on_step(global step) runs after each step is queued
        (progress reporting; the tests inject faults with it)."""
        from tensorboardX import SummaryWriter

        cfg, task = self.cfg, self.task
        if resume:
            self._check_resume_compatible()
            if (self.run_dir / rf.CHECKPOINTS / "last.pt").exists():
                self.load_checkpoint()
                self.log(f"resumed at epoch {self.state.epoch}, step {self.state.global_step}")
        elif (self.run_dir / rf.CHECKPOINTS).exists():
            raise PinnerformerError(f"{self.run_dir} already holds a training run: use --resume or a new directory")
        s = self.state
        if s.done and s.stopped_by == "max_steps" and (max_steps is None or max_steps > s.global_step):
            s.done = False  # stopped at a step budget, resumed with a larger one (or none): go on
        if (s.done and s.stopped_by == "early stop" and s.bad_epochs < cfg.optim.patience
                and s.epoch < cfg.optim.max_epochs):
            # early-stopped, resumed with a larger patience that would not have stopped it: the steps after the stop
            # are the ones a run started with that patience takes (patience changes no step)
            self.log(f"the run early-stopped after {s.bad_epochs} epoch(s) without improvement; optim.patience is "
                     f"now {cfg.optim.patience}: going on")
            s.done, s.stopped_by = False, None
        if s.done and (self.run_dir / rf.SUMMARY).exists():
            self.log(f"the run already ended ({s.stopped_by or 'done'} at epoch {s.epoch - 1}, step {s.global_step}): "
                     "nothing to continue")
            return rf.TrainSummary.model_validate(read_json_record(self.run_dir / rf.SUMMARY, "training summary"))
        if s.epoch >= cfg.optim.max_epochs and (self.run_dir / rf.SUMMARY).exists():
            self.log(f"the run already trained {s.epoch} epoch(s), optim.max_epochs is {cfg.optim.max_epochs}: "
                     "nothing to continue (raise --max-epochs to train more)")
            return rf.TrainSummary.model_validate(read_json_record(self.run_dir / rf.SUMMARY, "training summary"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.desc = desc = self.describe()
        if self.main:
            write_json_atomic(self.run_dir / rf.CONFIG, desc)
            task.write_inputs(self.run_dir)
        for n in desc.notes:
            self.log("note: " + n)
        train_unit, val_unit = getattr(task, "units", ("users", "users"))
        self.log(f"protocol {desc.protocol}; {desc.eligible_training_users:,} training {train_unit}, "
                 f"{desc.validation_users:,} validation {val_unit}; "
                 f"{task.steps_per_epoch} steps/epoch; "
                 f"device {self.device}; {desc.parameters:,} parameters")
        fixed = getattr(task, "fixed_epochs", None)  # a refit's epoch count: trained without validation
        if fixed is not None:
            # a refit trains on the validation targets: a baseline scored on them would count them in its own
            # popularity and stand beside a model that is never validated
            if not self.state.history:
                self.log("no baseline on validation: a refit trains on the validation targets")
        elif not self.state.history:
            name, scores = self._on_main(task.baseline)
            self.state.history.append({"kind": "baseline", "name": name, **scores})
            self.log(f"{name} baseline on validation: {task.metric} {scores[task.metric]:.4f}")
        # the log on disk is the checkpoint's: steps after the last checkpoint are dropped, to be replayed
        if self.main:
            write_text_atomic(self.run_dir / rf.METRICS, "".join(json.dumps(h) + "\n" for h in self.state.history))
        tb = SummaryWriter(str(self.run_dir / rf.TENSORBOARD)) if self.main else _NoWriter()
        stopped_by = s.stopped_by or "max_epochs"
        t_start = self._segment_start = time.perf_counter()
        self._train_s_before = getattr(self, "_loaded_train_s", 0.0)  # what earlier segments of a resumed run took
        pending: list[QueuedStep] = []  # queued steps whose numbers have not been read back from the device yet

        def record_pending(keep: int = 0) -> None:
            # Reading a loss makes the host wait for that step; the loop reads step g only once step g+1 is
            # queued (keep=1), so the GPU is never idle while the host logs. Records land in step order.
            while len(pending) > keep:
                p = pending.pop(0)
                loss, *scalars, grad_norm = p.read()
                rec = {"kind": "step", "step": p.step, "epoch": p.epoch, "loss": loss, "lr": p.lr,
                       **dict(zip(p.scalar_names, scalars)), "grad_norm": grad_norm, **p.counts}
                self._append(rec)
                tb.add_scalar("train/loss", loss, p.step)
                tb.add_scalar("train/lr", p.lr, p.step)
                for name, v in zip(p.scalar_names, scalars):
                    tb.add_scalar(f"train/{name}", v, p.step)
                bar.set_postfix(loss=f"{loss:.3f}")

        while s.epoch < cfg.optim.max_epochs and not s.done:
            epoch = s.epoch
            B = task.batch_size
            bar = progress_bar(total=task.steps_per_epoch * B, initial=s.step_in_epoch * B,
                               unit=getattr(task, "batch_unit", "seq"),
                               desc=f"epoch {epoch}", disable=not progress or not self.main)
            self.model.train()
            batches = iter(self.loader(epoch, s.step_in_epoch))
            while s.step_in_epoch < task.steps_per_epoch:
                g = s.global_step
                if max_steps is not None and g >= max_steps:
                    s.done, s.stopped_by = True, "max_steps"
                    stopped_by = s.stopped_by
                    break
                pending.append(self.train_step(next(batches), g, epoch))
                record_pending(keep=1)
                s.step_in_epoch += 1
                s.global_step += 1
                bar.update(B)
                if s.global_step % cfg.checkpoint_every == 0:
                    record_pending()
                    self.save_checkpoint("last.pt")
                if on_step is not None:
                    on_step(g)
            record_pending()
            del batches  # stops loader workers
            bar.close()
            if s.step_in_epoch >= task.steps_per_epoch or s.done:
                if fixed is None:
                    self._validate(epoch, tb)
                    if s.bad_epochs >= cfg.optim.patience:
                        s.done, s.stopped_by = True, "early stop"
                        stopped_by = s.stopped_by
                else:  # a refit: nothing to validate on; the weights at the end of the epoch are the ones kept
                    with self._weights_validated():
                        s.best_epoch = epoch
                        self.save_checkpoint("best.pt")
                    self.log(f"epoch {epoch}: kept (a refit, {epoch + 1} of {fixed} epochs: not validated)")
                    if epoch + 1 >= fixed and not s.done:
                        s.done, s.stopped_by = True, "refit epochs"
                        stopped_by = s.stopped_by
                s.epoch += 1
                s.step_in_epoch = 0
                self.save_checkpoint("last.pt")
        tb.close()
        summary = self._summary(stopped_by, self._train_s_before + time.perf_counter() - t_start)
        if self.main:
            write_json_atomic(self.run_dir / rf.SUMMARY, summary)
        if fixed is not None:
            self.log(f"done ({stopped_by}): kept the weights of epoch {s.best_epoch} (a refit: not validated)")
        else:
            self.log(f"done ({stopped_by}): best validation {task.metric} {s.best:.4f} at epoch {s.best_epoch} vs "
                     f"{self.state.history[0]['name']} {self.state.history[0][task.metric]:.4f}")
        return summary

    def _on_main(self, fn):
        """fn() on rank 0, its result on every rank (alone: fn())."""
        if self.dist is None:
            return fn()
        return self.dist.broadcast(fn() if self.main else None)

    @contextlib.contextmanager
    def _weights_validated(self):
        """The weights that validation scores and best.pt keeps: the model's own, or (optim.ema_decay) their
        moving average, swapped in for the duration and the training weights put back after."""
        if self.ema is None:
            yield
            return
        params = list(self.model.parameters())
        training = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, e in zip(params, self.ema):
                p.copy_(e)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, t in zip(params, training):
                    p.copy_(t)

    def _validate(self, epoch: int, tb) -> None:
        with self._weights_validated():
            self._validate_weights(epoch, tb)

    def _validate_weights(self, epoch: int, tb) -> None:
        s, task = self.state, self.task
        val = self._on_main(lambda: task.validate(self.device))
        improved = val[task.metric] > s.best
        self._append({"kind": "validation", "epoch": epoch, "step": s.global_step, **val})
        tb.add_scalar(f"validation/{task.metric}", val[task.metric], epoch)
        self.log(f"epoch {epoch}: validation {task.metric} {val[task.metric]:.4f}" + (" (best)" if improved else "")
                 + f"  [{self.desc.validation_users} {getattr(task, 'units', ('', 'users'))[1]}, {self.desc.protocol}]")
        if improved:
            s.best, s.best_epoch, s.bad_epochs = val[task.metric], epoch, 0
            self.save_checkpoint("best.pt")
        else:
            s.bad_epochs += 1

    def _summary(self, stopped_by: str, wall_s: float) -> rf.TrainSummary:
        # an empty batch (retrieval: no sampled position has a positive in its window) has loss 0 and teaches
        # nothing; never silent (each step's record carries its counts)
        key = self.task.size_key
        empty = sum(1 for r in self.state.history if r["kind"] == "step" and r.get(key, 1) == 0)
        if empty:
            self.log(f"note: {empty} step(s) had no training {key} ({key} = 0): loss 0")
        finite = lambda x: x if math.isfinite(x) else None  # noqa: E731  (JSON has no NaN nor infinity)
        baseline = next((r for r in self.state.history if r["kind"] == "baseline"), None)  # a refit has none
        popularity = None if baseline is None else finite(baseline[self.task.metric])
        return rf.TrainSummary(stopped_by=stopped_by, best_epoch=self.state.best_epoch, metric=self.task.metric,
                               best=finite(self.state.best), popularity=popularity,
                               steps=self.state.global_step, wall_s=round(wall_s, 1), empty_steps=empty)
