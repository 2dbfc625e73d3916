"""Run under torchrun by tests/test_distributed.py: one training step of the retrieval task as one rank of a
distributed run; every rank saves its loss, parameters and sketch to OUT/rank<r>.pt."""

import json
import sys
from pathlib import Path

import torch

from pinnerformer.data.dataset import Dataset
from pinnerformer.distributed.context import from_environment
from pinnerformer.training.config import load_config
from pinnerformer.training.retrieval import RetrievalTask
from pinnerformer.training.loop import TrainingLoop


def make_task(kind: str, data: Path, config: dict):
    """The retrieval task on a dataset, or the ranking task on ranking data."""
    if kind == "ranking":
        from pinnerformer.data.requests import RankData
        from pinnerformer.training.ranking import RankingTask, load_rank_config

        cfg = load_rank_config("default", overrides=config)
        return RankingTask(RankData(data), cfg), cfg
    cfg = load_config("small", overrides=config)
    return RetrievalTask(Dataset.open(data), cfg), cfg


def main() -> None:
    kind, data, config, out = sys.argv[1], Path(sys.argv[2]), json.loads(Path(sys.argv[3]).read_text()), Path(
        sys.argv[4])
    ctx = from_environment("cpu")
    task, cfg = make_task(kind, data, config)
    loop = TrainingLoop(task, cfg, out / "run", log=lambda s: None, dist=ctx)
    step = loop.train_step(task.host_batch(0, 0), 0, 0)
    torch.save({"loss": step.read()[0], "counts": step.counts, "params": task.model.state_dict(),
                "task": task.state_dict()}, out / f"rank{ctx.rank}.pt")
    ctx.close()


if __name__ == "__main__":
    main()
