"""A ranking run directory, read: its description, its config, and the trained ranker for its ranking data."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from pinnerformer.data.requests import RankData
from pinnerformer.errors import PinnerformerError
from pinnerformer.io import load_checkpoint, read_json_record
from pinnerformer.models.gbdt import GbdtRanker
from pinnerformer.models.ranker import Ranker
from pinnerformer.training import run_files as rf
from pinnerformer.training.ranking import RankTrainConfig, ranker_for


class RankRun:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / rf.CONFIG).exists():
            raise PinnerformerError(f"{self.path}: not a training run (no {rf.CONFIG})")

    @cached_property
    def description(self) -> rf.RankRunDescription:
        path = self.path / rf.CONFIG
        raw = read_json_record(path, "run description")
        if raw.get("task") != "ranking":
            raise PinnerformerError(f"{self.path} is a {raw.get('task', 'retrieval')} run, not a ranking run "
                                    "(train one with `pinnerformer rank train`)")
        try:
            return rf.RankRunDescription.model_validate(raw)
        except ValueError as e:
            raise PinnerformerError(f"{path}: not a run description this version can read: {e}") from None

    @cached_property
    def config(self) -> RankTrainConfig:
        raw = dict(self.description.config)
        if "features" not in raw.get("model", {}):  # a run from before the point-in-time features read none
            raw["model"] = {**raw.get("model", {}), "features": False}
        if "cross_rank" not in raw.get("model", {}):  # a run from before low-rank cross layers: full rank
            raw["model"] = {**raw.get("model", {}), "cross_rank": 0}
        return RankTrainConfig.model_validate(raw)

    def data(self) -> RankData:
        """The ranking data the run was trained on (the same fingerprint, or a clear error)."""
        ref = self.description.dataset
        rd = RankData(ref.path)
        if rd.manifest.fingerprint != ref.fingerprint:
            raise PinnerformerError(f"{self.path} was trained on ranking data {ref.path} with fingerprint "
                                    f"{ref.fingerprint}; it now has {rd.manifest.fingerprint}")
        return rd

    def summary(self) -> rf.TrainSummary | None:
        p = self.path / rf.SUMMARY
        return rf.TrainSummary.model_validate(read_json_record(p, "training summary")) if p.exists() else None

    def load_model(self, rd: RankData, checkpoint: str = "best") -> Ranker | GbdtRanker:
        if rd.manifest.fingerprint != self.description.dataset.fingerprint:
            raise PinnerformerError(f"{self.path} was trained on other ranking data (fingerprint "
                                    f"{self.description.dataset.fingerprint}, {rd.path} has "
                                    f"{rd.manifest.fingerprint})")
        if self.config.learner == "gbdt":
            if not (self.path / GbdtRanker.FOLDER).is_dir():
                raise PinnerformerError(f"{self.path}: a gradient-boosted run without its {GbdtRanker.FOLDER}/ folder "
                                        "(damaged: train it again)")
            return GbdtRanker.load(self.path, rd.manifest.head_names, self.config.features)
        path = self.path / rf.CHECKPOINTS / f"{checkpoint}.pt"
        if not path.exists():
            raise rf.missing_checkpoint(self.path, checkpoint)
        m = self.description.model
        model = ranker_for(rd, self.config.model, m["n_actions"], m["n_surfaces"], tuple(m.get("positive_actions", ())),
                           self.config.features)
        if list(model.inputs.feature_names) != list(m.get("feature_names", [])):
            raise PinnerformerError(f"{self.path} was trained on other point-in-time features than this version "
                                    "computes (their names differ): train it again")
        model.load_state_dict(load_checkpoint(path)["model"])
        return model.eval()
