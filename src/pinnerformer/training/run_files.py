"""What a training run writes: the run directory's layout and its typed records (read back by `pinnerformer.runs`).

    config.json         RunDescription: the task, its full resolved config, the dataset it was trained on (path and
                        fingerprint), the model's inputs, protocol, selection metric, counts, notes
    split.parquet       user id -> train / validation / test (future-window protocol)
    metrics.jsonl       one JSON object per line: the baseline, every step, every validation (see `TrainState`)
    summary.json        TrainSummary, once training has ended
    checkpoints/        last.pt (resume), best.pt (best validation metric: the model later stages use)
    tensorboard/        scalars
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pinnerformer.config import StrictModel
from pinnerformer.data.schema import DatasetRef
from pinnerformer.errors import PinnerformerError
from pinnerformer.evaluation.protocols import Protocol
from pinnerformer.io import read_json_record
from pinnerformer.training.config import TrainConfig

CONFIG, SPLIT, METRICS, SUMMARY = "config.json", "split.parquet", "metrics.jsonl", "summary.json"
CHECKPOINTS, TENSORBOARD, EVAL = "checkpoints", "tensorboard", "eval"


class RunDescription(StrictModel):
    task: Literal["retrieval"] = "retrieval"  # which training task made the run (and how to rebuild its model)
    config: TrainConfig
    dataset: DatasetRef
    model: dict[str, Any]  # what the data fixed about the model (vocabulary sizes, M, content width, clock)
    protocol: Protocol
    metric: str  # the validation metric that selected best.pt
    eligible_training_users: int
    validation_users: int
    steps_per_epoch: int
    notes: list[str]
    parameters: int


class RankRunDescription(StrictModel):
    """A ranking run's config.json (`training.ranking`): the ranking data it was trained on, not a dataset."""

    task: Literal["ranking"] = "ranking"
    config: Any  # training.ranking.RankTrainConfig (validated there: run_files stays below the tasks)
    dataset: DatasetRef  # the ranking data directory and its fingerprint
    model: dict[str, Any]  # RankerInputs: what the data fixed about the model
    protocol: str  # "time-split"
    metric: str
    eligible_training_users: int  # training rows (candidates of training requests)
    validation_users: int  # validation requests
    steps_per_epoch: int
    notes: list[str]
    parameters: int


class TrainState(StrictModel):
    """Where a run is, saved in every checkpoint. `history` holds the records of metrics.jsonl in order:
    {"kind": "baseline", "name", <metrics>}, {"kind": "step", "step", "epoch", "loss", "lr", <task scalars, e.g. tau>,
    "grad_norm", <batch counts, e.g. queries>}, {"kind": "validation", "epoch", "step", <metrics>}."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    done: bool = False
    stopped_by: str | None = None  # why the run ended (early stop, max_steps), when it has
    history: list[dict[str, Any]] = []


class TrainSummary(StrictModel):
    stopped_by: Literal["max_epochs", "max_steps", "early stop", "refit epochs"]
    best_epoch: int
    metric: str  # the selection metric, on validation
    best: float | None  # its best value (at best_epoch); None: no validation gave a number (no best.pt, except a
    # refit's: eval.refit_epochs, whose best.pt is its last epoch's weights, never validated)
    popularity: float | None  # the most-popular baseline's value of it, on the same validation users (None: NaN, or a refit)
    steps: int
    wall_s: float  # training, every segment of a resumed run summed (work lost to a kill after the last checkpoint is not)
    empty_steps: int = 0  # steps whose batch had nothing to learn from (retrieval: no query; loss 0): reported


def missing_checkpoint(run_dir: Path, name: str) -> PinnerformerError:
    """The error for a run without checkpoint `name`, saying why it has none."""
    path, summary = Path(run_dir) / CHECKPOINTS / f"{name}.pt", Path(run_dir) / SUMMARY
    if name == "best" and summary.exists():
        s = TrainSummary.model_validate(read_json_record(summary, "training summary"))
        if s.best_epoch < 0:
            return PinnerformerError(
                f"{run_dir} has no best checkpoint: training ended ({s.stopped_by}, {s.steps} steps) without selecting "
                f"a model, because its validation {s.metric} was never defined (not a number in any epoch: the "
                "validation period holds too few requests or users, or none with a positive label); prepare the data "
                "again with a larger validation period, and train again")
    if not summary.exists() and (Path(run_dir) / CHECKPOINTS / "last.pt").exists():
        return PinnerformerError(f"{path} does not exist: the run has not finished its first validation (still "
                                 "training, or stopped: continue it with --resume)")
    return PinnerformerError(f"{path} does not exist (did the run finish an epoch?)")
