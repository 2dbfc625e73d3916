"""The main job on the built-in data: prepare -> text vectors -> train -> daily snapshot -> item index -> top-10."""

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


def serve_demo(ds: Dataset, run_dir: Path, workdir: Path, log=print, show=None, n_users: int = 3, k: int = 10) -> None:
    """The production path on the trained run: the daily snapshot as of the data's last day, the item index,
    and the top-k items (with titles) for a few users."""
    import datetime as dt
    import shutil

    from pinnerformer.inference.daily_embed import DailyJob
    from pinnerformer.inference.snapshot import Snapshot
    from pinnerformer.retrieval.index import ItemIndex, build_item_index
    from pinnerformer.retrieval.retrieve import top_k_for_user

    last_day = dt.datetime.fromtimestamp(ds.manifest.time_max, dt.timezone.utc).date()
    snapshots = workdir / "snapshots"
    shutil.rmtree(snapshots, ignore_errors=True)  # a fresh run: its snapshots are of a new checkpoint
    log(f"[4/5] daily user embeddings as of {last_day} -> {snapshots}/{last_day}")
    DailyJob(run_dir, ds, last_day, snapshots).run(log=log)
    log(f"[5/5] item index (FAISS HNSW) -> {workdir / 'index'}; top-{k} for {n_users} users")
    build_item_index(run_dir, ds, workdir / "index", "hnsw", log=log)
    snap, index = Snapshot.open(snapshots / last_day.isoformat()), ItemIndex.open(workdir / "index")
    ids = snap.table.column("user_id").to_pylist()
    for uid in ids[:: max(1, len(ids) // n_users)][:n_users]:
        top = top_k_for_user(index, snap, uid, k)
        (show or (lambda t, f: log(f"{t}\n{f}")))(f"top {k} for user {uid} (as of {last_day})", top)


def show_table(title: str, frame) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("rank", "score", "item_id", "text"):
        table.add_column(col, overflow="fold")
    for row in frame.select("rank", "score", "item_id", *(["text"] if "text" in frame.columns else [])).iter_rows():
        table.add_row(str(row[0]), f"{row[1]:.3f}", str(row[2]), str(row[3]) if len(row) > 3 else "")
    Console().print(table)


def run_quickstart(workdir: Path, text: bool = True, log=print, show=None, train: bool = True,
                   max_epochs: int = 10) -> Dataset:
    t0 = time.perf_counter()
    workdir = Path(workdir)
    dataset_dir = workdir / "dataset"
    log(f"[1/5] preparing the built-in {BUILTIN} data -> {dataset_dir}")
    prepare(read_source("movielens-latest", builtin_data_dir()), dataset_dir, "movielens-latest",
            overwrite=True, log=log)
    if text:
        from pinnerformer.features.text import embed_items_text

        log("[2/5] embedding item text (all-MiniLM-L6-v2, offline)")
        embed_items_text(dataset_dir, log=log)
    else:
        log("[2/5] item text embedding skipped (--no-text): models will use learned item-ID embeddings")
    ds = Dataset.open(dataset_dir)
    if show is not None:
        show(ds)
    if train:
        import shutil

        from pinnerformer.training.config import load_config
        from pinnerformer.training.retrieval import retrieval_loop

        run_dir = workdir / "run"
        shutil.rmtree(run_dir, ignore_errors=True)  # the quickstart always starts a fresh run
        log(f"[3/5] training PinnerFormer (preset small, dense all-action, mixed negatives + logQ) -> {run_dir}")
        cfg = load_config("small", overrides={"optim": {"max_epochs": max_epochs}})
        retrieval_loop(ds, cfg, run_dir, log=log).fit()
        serve_demo(ds, run_dir, workdir, log=log, show=show_table)
    log(f"quickstart done in {time.perf_counter() - t0:.0f}s; outputs in {workdir}")
    return ds
