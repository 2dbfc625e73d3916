"""Training configuration: one pydantic model, two presets, JSON/YAML-free overrides from a JSON file.

Unknown keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from pinnerformer.errors import PinnerformerError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    max_len: int = 64  # M: actions per input sequence
    positions: int = 16  # dense-all-action: positions sampled per sequence
    labels_per_position: int = 1
    max_labels: int = 32  # all-action: labels per sequence
    sequences_per_user: int = 4  # examples per training user per epoch
    window_days: float = 28.0  # K, for real clocks
    window_actions: int = 20  # K, for order-only clocks
    cutoff: Literal["random", "last"] = "random"  # example cut-off: random, or the end of the training range


class ModelSection(_Strict):
    width: int = 64
    layers: int = 2
    heads: int = 2
    dim: int = 64
    dropout: float = 0.1
    item_features: Literal["auto", "content", "id", "both"] = "auto"  # auto: both if vectors exist, else id
    id_dim: int = 64
    action_dim: int = 16
    surface_dim: int = 8
    item_tower_hidden: int = 256
    item_tower: Literal["mlp", "linear", "none"] = "mlp"  # none: score with the input item features (width D)
    input_dropout: float = 0.0  # dropout on the summed input embedding, before the first block
    # residual stream between blocks: float32, or (compute) the autocast dtype, i.e. bf16 on GPU; no effect on CPU
    residual_dtype: Literal["float32", "compute"] = "float32"
    time_features: bool = True
    action_features: bool = True  # action-type embedding
    duration_surface_features: bool = True
    position_features: bool = True


class LossConfig(_Strict):
    objective: Literal["dense-all-action", "all-action", "sasrec", "next-action"] = "dense-all-action"
    negatives: Literal["mixed", "in-batch", "random", "full"] = "mixed"  # full: softmax over the whole catalogue
    n_random: int = 1024
    logq: bool = True
    mask_own_positives: bool = True  # False: only the query's own label is masked; other positives stay negatives
    sketch_width: int = 1 << 18
    sketch_depth: int = 4


class OptimConfig(_Strict):
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    max_epochs: int = 40
    grad_clip: float = 1.0
    patience: int = 3  # epochs without validation improvement before stopping


class EvalConfig(_Strict):
    protocol: Literal["auto", "future-window", "leave-one-out"] = "auto"  # auto: by the dataset's clock
    val_fraction: float = 0.1  # future-window: held-out validation users
    test_fraction: float = 0.1  # future-window: held-out test users (never touched by training)
    label_days: float = 14.0
    max_val_users: int = 2000
    k: int = 10


class TrainConfig(_Strict):
    preset: str = "small"
    seed: int = 0
    data: DataConfig = DataConfig()
    model: ModelSection = ModelSection()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    eval: EvalConfig = EvalConfig()
    device: str = "auto"  # auto: cuda when available (bf16 autocast), else cpu (fp32)
    checkpoint_every: int = 200  # steps; a checkpoint is also written at every epoch end
    # Batches are prepared (examples cut, features padded) by this many worker processes, ahead of the GPU.
    # -1 = auto: none on CPU (the cores are busy training), min(8, cores - 2) on GPU. Results do not depend on it.
    loader_workers: int = -1
    # torch.compile the sequence encoder and the sampled-softmax loss (its fused form; negatives=full keeps its
    # own fused cross-entropy). Worth it on GPU; slow to start on CPU.
    compile: bool = False
    # reduce-overhead: the compiled encoder also runs as CUDA graphs (one launch instead of hundreds per step);
    # max-autotune(-no-cudagraphs): also times Triton matmul templates, which can fuse bias/GELU into the matmul
    # (minutes of compilation on first use)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"


PRESETS: dict[str, dict] = {
    # Sized for the ML-1M subset on 2 CPU cores (about 15 minutes to early stop).
    "small": {},
    # The default configuration for the leave-one-out protocol, chosen on validation NDCG@10 (Amazon Beauty; see
    # docs/results/README.md). The target is literally the next item, so the SASRec objective (the next item at
    # every position) on whole training sequences; the user's other items stay negatives (history is not
    # excluded at evaluation); mixed negatives + logQ (`negatives: full`, the exact softmax, learned no better per
    # epoch at twice the time). SASRec's model shape: items scored with the input item-ID table itself (no item
    # tower), dropout 0.5 on the input embedding and in every block; width 128.
    "loo": {"eval": {"protocol": "leave-one-out"},
            "loss": {"objective": "sasrec", "negatives": "mixed", "mask_own_positives": False},
            "data": {"max_len": 50, "sequences_per_user": 1, "cutoff": "last"},
            "model": {"dropout": 0.5, "input_dropout": 0.5, "item_features": "id", "item_tower": "none",
                      "width": 128, "dim": 128, "id_dim": 128},
            "optim": {"batch_size": 256, "max_epochs": 20, "patience": 3}},
    # The paper's shape: M=256, 6 layers, H=768, 8 heads, D=256.
    "paper": {"data": {"max_len": 256, "positions": 32}, "model": {"width": 768, "layers": 6, "heads": 8, "dim": 256},
              "optim": {"batch_size": 128, "lr": 5e-4, "warmup_steps": 1000}, "loss": {"n_random": 8192}},
}


def merge_dicts(base: dict, over: dict) -> dict:
    """Nested dict update: `over` wins, sub-dicts merge."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(preset: str = "small", config_file: Path | None = None, overrides: dict | None = None) -> TrainConfig:
    if preset not in PRESETS:
        raise PinnerformerError(f"unknown preset '{preset}': expected one of {', '.join(PRESETS)}")
    raw = merge_dicts({"preset": preset}, PRESETS[preset])
    if config_file is not None:
        try:
            raw = merge_dicts(raw, json.loads(Path(config_file).read_text()))
        except FileNotFoundError:
            raise PinnerformerError(f"{config_file}: config file not found") from None
        except json.JSONDecodeError as e:
            raise PinnerformerError(f"{config_file}, line {e.lineno}: not valid JSON ({e.msg})") from None
    raw = merge_dicts(raw, overrides or {})
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        where = f"{config_file}: " if config_file else ""
        raise PinnerformerError(f"{where}invalid training config: {problems}") from None
