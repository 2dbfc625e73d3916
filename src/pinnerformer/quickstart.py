"""The main job on the built-in data. Later stages (train -> evaluate -> embed -> retrieve) join here."""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

from pinnerformer.data.dataset import Dataset
from pinnerformer.data.formats import read_source
from pinnerformer.data.prepare import prepare

BUILTIN = "movielens-latest-small"


def builtin_data_dir() -> Path:
    """The redistributable MovieLens latest-small files shipped inside the package (with their README)."""
    return Path(str(resources.files("pinnerformer.data") / "builtin" / BUILTIN))


def run_quickstart(workdir: Path, text: bool = True, log=print, show=None, train: bool = True,
                   max_epochs: int = 10) -> Dataset:
    t0 = time.perf_counter()
    workdir = Path(workdir)
    dataset_dir = workdir / "dataset"
    log(f"[1/3] preparing the built-in {BUILTIN} data -> {dataset_dir}")
    prepare(read_source("movielens-latest", builtin_data_dir()), dataset_dir, "movielens-latest",
            overwrite=True, log=log)
    if text:
        from pinnerformer.features.text import embed_items_text

        log("[2/3] embedding item text (all-MiniLM-L6-v2, offline)")
        embed_items_text(dataset_dir, log=log)
    else:
        log("[2/3] item text embedding skipped (--no-text): models will use learned item-ID embeddings")
    ds = Dataset.open(dataset_dir)
    if show is not None:
        show(ds)
    if train:
        import shutil

        from pinnerformer.training.config import load_config
        from pinnerformer.training.trainer import Trainer

        run_dir = workdir / "run"
        shutil.rmtree(run_dir, ignore_errors=True)  # the quickstart always starts a fresh run
        log(f"[3/3] training PinnerFormer (preset small, dense all-action, mixed negatives + logQ) -> {run_dir}")
        cfg = load_config("small", overrides={"optim": {"max_epochs": max_epochs}})
        Trainer(ds, cfg, run_dir, log=log).fit()
    log(f"quickstart done in {time.perf_counter() - t0:.0f}s; outputs in {workdir}")
    return ds
