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

    from pinnerformer.inference.daily_embed import DailyJob
    from pinnerformer.inference.snapshot import Snapshot
    from pinnerformer.retrieval.index import ItemIndex, build_item_index
    from pinnerformer.retrieval.retrieve import SeenItems, top_k_for_user

    last_day = dt.datetime.fromtimestamp(ds.manifest.time_max, dt.timezone.utc).date()
    snapshots = workdir / "snapshots"
    log(f"[4/5] daily user embeddings as of {last_day} -> {snapshots}/{last_day}")
    DailyJob(run_dir, ds, last_day, snapshots).run(log=log)
    log(f"[5/5] item index (FAISS HNSW) -> {workdir / 'index'}; top-{k} for {n_users} users")
    build_item_index(run_dir, ds, workdir / "index", "hnsw", log=log)
    snap, index = Snapshot.open(snapshots / last_day.isoformat()), ItemIndex.open(workdir / "index")
    ids = snap.table.column("user_id").to_pylist()
    seen = SeenItems(snap, ds.path)  # recommendations leave out what the user already rated
    for uid in ids[:: max(1, len(ids) // n_users)][:n_users]:
        top = top_k_for_user(index, snap, uid, k, seen)
        (show or (lambda t, f: log(f"{t}\n{f}")))(f"top {k} for user {uid} (as of {last_day})", top)


def keep_previous(workdir: Path, log=print) -> None:
    """Move an earlier quickstart's run, snapshots and index (and whatever was added to them) to
    WORKDIR/previous/<time>/: the new run needs their names, and nothing of the old one is deleted."""
    import datetime as dt
    import os

    old = [workdir / name for name in ("run", "snapshots", "index") if (workdir / name).exists()]
    if not old:
        return
    dest = workdir / "previous" / dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    dest.mkdir(parents=True)
    for p in old:
        os.replace(p, dest / p.name)
    log(f"an earlier quickstart's {', '.join(p.name for p in old)} moved to {dest}")


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
        from pinnerformer.training.config import load_config
        from pinnerformer.training.retrieval import retrieval_loop

        run_dir = workdir / "run"
        keep_previous(workdir, log)  # the quickstart starts a fresh run; an earlier one is kept, never deleted
        log(f"[3/5] training PinnerFormer (preset small, dense all-action, mixed negatives + logQ) -> {run_dir}")
        cfg = load_config("small", overrides={"optim": {"max_epochs": max_epochs}})
        retrieval_loop(ds, cfg, run_dir, log=log).fit()
        serve_demo(ds, run_dir, workdir, log=log, show=show_table)
    log(f"quickstart done in {time.perf_counter() - t0:.0f}s; outputs in {workdir}")
    return ds
