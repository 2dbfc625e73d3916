"""Training configuration: the loop's settings, the retrieval task's sections (each owned by its stage), presets,
and overrides from a JSON file. Unknown keys are errors (a typo must not silently fall back to a default)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field

from pinnerformer.config import StrictModel, merge_dicts, validate
from pinnerformer.errors import PinnerformerError
from pinnerformer.evaluation.blend import BlendConfig
from pinnerformer.models.pinnerformer import PinnerFormerConfig
from pinnerformer.objectives.examples import ExampleConfig
from pinnerformer.objectives.sampled_softmax import LossConfig


class OptimConfig(StrictModel):
    batch_size: int = Field(64, ge=1)
    # None: batches of batch_size users. N: batches of about N input actions each, as many users as fit (a dataset
    # of long histories gets more, smaller steps per epoch than one of short ones, at the same work per step);
    # retrieval training, one process; at least data.max_len
    batch_actions: int | None = Field(None, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(100, ge=1)
    max_epochs: int = Field(40, ge=1)
    grad_clip: float = Field(1.0, gt=0)
    patience: int = Field(3, ge=1)  # epochs without validation improvement before stopping
    # None: validate and keep the trained weights. d: validate and keep (best.pt) an exponential moving average of
    # the weights, avg = d·avg + (1 - d)·w after each step (d warmed up as (1 + step) / (10 + step))
    ema_decay: float | None = Field(None, ge=0, lt=1)


class LoopConfig(StrictModel):
    """What the training loop itself reads, whatever the task."""

    seed: int = 0
    optim: OptimConfig = OptimConfig()
    device: str = "auto"  # auto: cuda when available (bf16 autocast), else cpu (fp32)
    checkpoint_every: int = Field(200, ge=1)  # steps; a checkpoint is also written at every epoch end
    # Batches are prepared (examples cut, features padded) by this many worker processes, ahead of the GPU.
    # -1 = auto: none on CPU (the cores are busy training), min(8, cores - 2) on GPU. Results do not depend on it.
    loader_workers: int = -1
    # torch.compile the task's model and loss (retrieval: the sequence encoder, and the sampled-softmax loss in its
    # fused form; negatives=full keeps its own fused cross-entropy). Worth it on GPU; slow to start on CPU.
    compile: bool = False
    # reduce-overhead: the compiled encoder also runs as CUDA graphs (one launch instead of hundreds per step);
    # max-autotune(-no-cudagraphs): also times Triton matmul templates, which can fuse bias/GELU into the matmul
    # (minutes of compilation on first use)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"


class EvalConfig(StrictModel):
    protocol: Literal["auto", "future-window", "leave-one-out"] = "auto"  # auto: by the dataset's clock
    val_fraction: float = 0.1  # future-window: held-out validation users
    test_fraction: float = 0.1  # future-window: held-out test users (never touched by training)
    label_days: float = 14.0
    max_val_users: int = 2000
    k: int = 10
    # Unix seconds: training and validation read only events before this time (a model trained on one period, such
    # as the ranking feature's PinnerFormer, which must never see the ranker's validation or test period)
    until: int | None = None
    # leave-one-out: remove each user's input items from the validation ranking, as `evaluate --exclude-history`
    # does at test: select the model on the protocol its number is reported under
    exclude_history: bool = False
    # leave-one-out refit: train again on every timeline but its last action (each user's validation target becomes
    # a training target) for this many epochs of the same schedule (optim.max_epochs), the number a run of the same
    # config chose on validation (its best epoch + 1; `experiment --refit`), and keep the last epoch's weights. Nothing
    # is left to validate on, so nothing is selected or scored before the test, and no blend λ can be chosen. The
    # published leave-one-out networks are not refit: a refit number is not like for like with theirs.
    refit_epochs: int | None = Field(None, ge=1)


class TrainConfig(LoopConfig):
    """PinnerFormer retrieval training: the loop's settings plus the task's sections."""

    preset: str = "small"
    data: ExampleConfig = ExampleConfig()
    model: PinnerFormerConfig = PinnerFormerConfig()
    loss: LossConfig = LossConfig()
    eval: EvalConfig = EvalConfig()
    # leave-one-out: rank by the network mixed with item-to-item neighbours, λ chosen on validation after training
    # (evaluation/blend.py); does not change training
    blend: BlendConfig = BlendConfig()


PRESETS: dict[str, dict] = {
    # Sized for the ML-1M subset on 2 CPU cores (about 15 minutes to early stop).
    "small": {},
    # The default configuration for the leave-one-out protocol, chosen on validation NDCG@10 with each user's
    # history removed from the ranking (Amazon Beauty; the scouting rounds are in docs/results/README.md). The
    # target is literally the next item, so the SASRec objective (the next item at every position) on whole
    # training sequences; the user's own items are not negatives (they are not ranked at evaluation either);
    # mixed negatives + logQ. SASRec's model shape: items scored with the input item-ID table itself (no item
    # tower), dropout 0.5 on the input embedding and in every block, the final LayerNorm as the head and a
    # point-wise feed-forward of width H (the paper's MLP head and 4H feed-forward memorised the training
    # sequences); decoupled weight decay 1.0 (against the early peak). The items' interests (attributes, genres)
    # where the data has them, added to the ID embedding; an input item's ID left out 30% of the time in training
    # (its interests stay), and a scored item's ID as often (it is then scored by its interests alone); a moving
    # average of the weights validated and kept; width 256; a 30-epoch cosine schedule with early stopping (ML-1M
    # still rose at epoch 20; Beauty peaks at epoch 8 under a 20- or a 30-epoch schedule alike). Batches of
    # ~1,536 input actions of users of similar length: as many steps per epoch on a dataset of long histories
    # (ML-1M) as on one of short ones, and little padding on CPU. Ranked by the network blended with item-to-item
    # neighbours (evaluation/blend.py), λ chosen on validation after training (eighth round: validation +5% on
    # ML-1M, more on Beauty). The window M fitted to the data (data.max_len_cap): the 90th percentile of the
    # training timelines' lengths between 50 (SASRec's Beauty setting) and 200 (its MovieLens one), so a file of
    # long histories is read further back (eleventh round: ML-1M validation up, Beauty's M stays 50).
    "loo": {"eval": {"protocol": "leave-one-out", "exclude_history": True},
            "loss": {"objective": "sasrec", "negatives": "mixed", "mask_own_positives": True},
            "data": {"max_len": 50, "max_len_cap": 200, "sequences_per_user": 1, "cutoff": "last",
                     "length_buckets": 16},
            "model": {"dropout": 0.5, "input_dropout": 0.5, "item_features": "id", "item_tower": "none",
                      "width": 256, "dim": 256, "id_dim": 256, "head": "norm", "ffn_mult": 1,
                      "item_interests": "auto", "id_dropout": 0.3, "target_id_dropout": 0.3},
            "optim": {"batch_size": 256, "batch_actions": 1536, "lr": 1e-3, "weight_decay": 1.0, "max_epochs": 30,
                      "patience": 5, "ema_decay": 0.995},
            "blend": {"item_knn": True}},
    # The paper's shape: M=256, 6 layers, H=768, 8 heads, D=256.
    "paper": {"data": {"max_len": 256, "positions": 32}, "model": {"width": 768, "layers": 6, "heads": 8, "dim": 256},
              "optim": {"batch_size": 128, "lr": 5e-4, "warmup_steps": 1000}, "loss": {"n_random": 8192}},
}


# `loo` as an ensemble of three models trained side by side (model.members): three times the work, scored by the
# members' mean
PRESETS["loo-ensemble"] = merge_dicts(PRESETS["loo"], {"model": {"members": 3}})


def read_config_file(config_file: Path) -> dict:
    """A JSON config file's overrides, or a clear error naming the file (and the line of a JSON mistake)."""
    try:
        text = Path(config_file).read_text()
    except (FileNotFoundError, IsADirectoryError):
        raise PinnerformerError(f"{config_file}: config file not found") from None
    except UnicodeDecodeError:
        raise PinnerformerError(f"{config_file}: not a text file (expected JSON)") from None
    try:
        over = json.loads(text)
    except json.JSONDecodeError as e:
        raise PinnerformerError(f"{config_file}, line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(over, dict):
        raise PinnerformerError(f"{config_file}: the config must be a JSON object of sections "
                                f"(found a {type(over).__name__})")
    return over


def load_config(preset: str = "small", config_file: Path | None = None, overrides: dict | None = None) -> TrainConfig:
    if preset not in PRESETS:
        raise PinnerformerError(f"unknown preset '{preset}': expected one of {', '.join(PRESETS)}")
    raw = merge_dicts({"preset": preset}, PRESETS[preset])
    if config_file is not None:
        raw = merge_dicts(raw, read_config_file(config_file))
    raw = merge_dicts(raw, overrides or {})
    return validate(TrainConfig, raw, f"{config_file}: invalid training config" if config_file
                    else "invalid training config")
