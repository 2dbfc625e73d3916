"""The run directory: the one hand-off from training to everything after it (evaluate, embed, index, simulate).

Training writes it (`training.run_files` has the layout); this is how it is read: the run's description and config,
its user split, its checkpoints and their hashes, and the trained model rebuilt for a dataset. Later stages never
reach into the trainer.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import numpy as np
import polars as pl

from pinnerformer.data.dataset import Dataset
from pinnerformer.config import merge_dicts, validate
from pinnerformer.errors import PinnerformerError
from pinnerformer.io import file_sha256, load_checkpoint, read_json_record
from pinnerformer.models.pinnerformer import InputSpec, PinnerFormer, pinnerformer_for
from pinnerformer.training import run_files as rf
from pinnerformer.training.config import TrainConfig
from pinnerformer.training.retrieval import fitted_max_len


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise PinnerformerError(f"{self.path} does not exist (is it a training run directory?)")
        if not (self.path / rf.CONFIG).exists():
            raise PinnerformerError(f"{self.path}: not a training run (no {rf.CONFIG})")
        self._sha: dict[str, str] = {}

    @cached_property
    def description(self) -> rf.RunDescription:
        path = self.path / rf.CONFIG
        raw = read_json_record(path, "run description")
        try:
            return rf.RunDescription.model_validate(raw)
        except ValueError as e:  # a description this version cannot read
            raise PinnerformerError(f"{path}: not a run description this version can read: {e}") from None

    @property
    def config(self) -> TrainConfig:
        return self.description.config

    @property
    def protocol(self) -> str:
        return self.description.protocol

    # what a resumed run may change: how long it trains (the epoch budget, and the patience of early stopping, which
    # decides when to stop but not what a step does), and where (results do not depend on the loader workers); and
    # the blend, which is applied after training
    RESUME_MAY_CHANGE = {"optim.max_epochs", "optim.patience", "device", "loader_workers", "compile", "compile_mode"}
    RESUME_MAY_CHANGE_SECTIONS = ("blend.",)

    def resume_config(self, overrides: dict, log=print, ds: Dataset | None = None) -> TrainConfig:
        """The run's own configuration for `--resume`, with the options given on the command line applied only
        where the run allows it (RESUME_MAY_CHANGE); any other difference is refused, naming it: a resumed run keeps
        its config, hence its split and its batches. ds: the run's dataset, to fit data.max_len as training did
        (`fitted_max_len`) before comparing, so that the config file a run was made with resumes it."""
        stored = self.config.model_dump()
        wanted_cfg = validate(TrainConfig, merge_dicts(stored, overrides), f"--resume {self.path}")
        wanted = (wanted_cfg if ds is None else fitted_max_len(wanted_cfg, ds)).model_dump()

        changed = config_diffs(stored, wanted)
        refused = [f"{k} {old!r} -> {new!r}" for k, old, new in changed
                   if k not in self.RESUME_MAY_CHANGE and not k.startswith(self.RESUME_MAY_CHANGE_SECTIONS)]
        if refused:
            raise PinnerformerError(f"--resume continues {self.path} with its own configuration; these options would "
                                    f"change it: {'; '.join(refused)} (start a new run directory instead)")
        for k, old, new in changed:
            log(f"resuming with {k} {old!r} -> {new!r}")
        return TrainConfig.model_validate(wanted)

    def summary(self) -> rf.TrainSummary | None:
        """The training summary, or None while the run has not ended."""
        path = self.path / rf.SUMMARY
        return rf.TrainSummary.model_validate(read_json_record(path, "training summary")) if path.exists() else None

    def validation_curve(self, metric: str) -> list[float]:
        """The validation metric at the end of each epoch, epoch 0 first, as metrics.jsonl has it; empty for a run
        that validated nothing (a refit)."""
        by_epoch: dict[int, float] = {}
        path = self.path / rf.METRICS
        for n, line in enumerate(path.read_text().splitlines() if path.exists() else [], 1):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise PinnerformerError(f"{path}, line {n}: not a JSON record ({e.msg})") from None
            if rec.get("kind") == "validation":
                if metric not in rec:
                    raise PinnerformerError(f"{path}, line {n}: the validation record has no '{metric}' "
                                            f"(it has {', '.join(k for k in rec if k not in ('kind', 'epoch', 'step'))})")
                by_epoch[int(rec["epoch"])] = float(rec[metric])  # a resumed run's log is the checkpoint's: no repeats
        if sorted(by_epoch) != list(range(len(by_epoch))):
            raise PinnerformerError(f"{path}: validation records for epochs {sorted(by_epoch)}, expected 0, 1, 2, …")
        return [by_epoch[e] for e in range(len(by_epoch))]

    def check_dataset(self, ds: Dataset) -> None:
        """The run's model applies to the dataset it was trained on and to any dataset grown from it by appends
        (whose user and item indexes are the same); to nothing else."""
        fp = self.description.dataset.fingerprint
        if not ds.manifest.descends_from(fp):
            raise PinnerformerError(f"{self.path} was trained on a different dataset: its fingerprint is {fp}, "
                                    f"{ds.path} has {ds.manifest.fingerprint} and does not descend from it")

    def trained_inputs(self) -> InputSpec:
        """What the training dataset fixed about the model (vocabulary sizes, M, content width, clock)."""
        m = self.description.model
        return InputSpec(n_items=m["n_items"], n_actions=m["n_actions"], n_surfaces=m["n_surfaces"],
                         max_len=m["max_len"], content_dim=m.get("content_dim", 0),
                         has_clock=m.get("has_clock", m.get("time_features", True)),
                         interests=tuple(m.get("interests", ())))

    def unseen(self, ds: Dataset) -> dict[str, int]:
        """Users and items of `ds` that the training dataset did not have (appended since)."""
        fp, lineage = self.description.dataset.fingerprint, ds.manifest.lineage
        after = next((i for i, r in enumerate(lineage) if r.parent_fingerprint == fp), len(lineage))
        return {"users": sum(r.new_users for r in lineage[after:]), "items": sum(r.new_items for r in lineage[after:])}

    def checkpoint_path(self, name: str = "best") -> Path:
        path = self.path / rf.CHECKPOINTS / f"{name}.pt"
        if not path.exists():
            raise rf.missing_checkpoint(self.path, name)
        return path

    def checkpoint_sha256(self, name: str = "best") -> str:
        """The checkpoint file's SHA-256: what snapshots and indexes record as "the model" that made them."""
        if name not in self._sha:
            self._sha[name] = file_sha256(self.checkpoint_path(name))
        return self._sha[name]

    def load_model(self, ds: Dataset, checkpoint: str = "best") -> PinnerFormer:
        """The trained model (in eval mode, on the CPU) for `ds`: the training dataset or a descendant of it, whose
        new items and surfaces the model reads as it was built to (`PinnerFormer.grow`)."""
        self.check_dataset(ds)
        path = self.checkpoint_path(checkpoint)
        model = pinnerformer_for(ds, self.config.model, 0, self.trained_inputs())
        model.load_state_dict(load_checkpoint(path)["model"])
        model.grow(ds.manifest.n_items, len(ds.manifest.surfaces))
        return model.eval()

    def held_out_users(self, split: str = "test") -> np.ndarray:
        """Dataset indices of the run's held-out users (future-window runs record their user split)."""
        path = self.path / rf.SPLIT
        if not path.exists():
            raise PinnerformerError(f"{self.path} has no user split (trained with leave-one-out?): future-window "
                                    "evaluation needs users held out from training")
        return np.flatnonzero((pl.read_parquet(path)["split"] == split).to_numpy())


def config_diffs(a: dict, b: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """Where two dumped configurations differ: (dotted key, a's value, b's value), leaves only."""
    out = []
    for k in a:
        if isinstance(a[k], dict):
            out += config_diffs(a[k], b[k], f"{prefix}{k}.")
        elif a[k] != b[k]:
            out.append((f"{prefix}{k}", a[k], b[k]))
    return out
