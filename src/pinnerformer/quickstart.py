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


def prepare_builtin(output: Path, overwrite: bool = False, log=print) -> None:
    """The built-in data prepared into a dataset directory at `output`."""
    prepare(read_source("movielens-latest", builtin_data_dir()), output, "movielens-latest", overwrite=overwrite,
            log=log)


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
    log(f"[4/7] daily user embeddings as of {last_day} -> {snapshots}/{last_day}")
    DailyJob(run_dir, ds, last_day, snapshots).run(log=log)
    log(f"[5/7] item index (FAISS HNSW) -> {workdir / 'index'}; top-{k} for {n_users} users")
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

    old = [workdir / name for name in ("run", "snapshots", "index", "rank-data", "rank-run")
           if (workdir / name).exists()]
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


def rank_demo(ds: Dataset, workdir: Path, log=print, max_epochs: int = 4) -> None:
    """The ranker on the same data: day requests (what a user rated in one UTC day), heads save (5★) / like (4–5★)
    / hide (1–2★), a time split, TransAct + the PinnerFormer of the day before (trained on the training period
    only) + DCN v2; HIT@3 on the test period beside the baselines, and one request ranked with per-head scores."""
    import numpy as np
    from rich.console import Console
    from rich.table import Table

    from pinnerformer.data import requests as rq
    from pinnerformer.ranking.evaluate import evaluate_ranking, report_markdown
    from pinnerformer.ranking.prepare import prepare_ranking
    from pinnerformer.ranking.score import score_request
    from pinnerformer.training.ranking import load_rank_config, ranking_loop

    rank_dir, run_dir = workdir / "rank-data", workdir / "rank-run"
    log(f"[6/7] ranking requests (one UTC day of ratings each; heads save/like/hide) -> {rank_dir}")
    opts = rq.RequestOptions(request="day", heads=rq.default_heads(ds.manifest.format, ds.manifest.action_names()))
    prepare_ranking(ds.path, rank_dir, opts, pf_max_steps=300, overwrite=True, log=log)
    log(f"[7/7] training the ranker (TransAct + PinnerFormer + DCN v2, preset fast) -> {run_dir}")
    rd = rq.RankData(rank_dir)
    cfg = load_rank_config("fast", overrides={"optim": {"max_epochs": max_epochs}})
    ranking_loop(rd, cfg, run_dir, log=log).fit()
    report, _ = evaluate_ranking(rd, {"ranker": run_dir}, "test", n_boot=200, log=log)
    keys = [k for k in report.models["ranker"] if k.startswith("hit@")]
    log(report_markdown(report, keys))
    test = rd.requests_in("test")
    sizes = np.diff(rd.cand_start)[test]
    r = int(test[np.flatnonzero((sizes >= 6) & (sizes <= 12))[0]] if ((sizes >= 6) & (sizes <= 12)).any() else test[0])
    items = rd.cand_item[rd.cand_start[r]:rd.cand_start[r + 1]]
    item_ids = [str(ds.items["item_id"][int(i)]) for i in items]
    uid = ds.users["user_id"][int(rd.request_user[r])]
    table = score_request(run_dir, str(uid), str(int(rd.request_t[r])), item_ids)
    truth = {i: ", ".join(h.name for j, h in enumerate(rd.heads) if rd.labels[rd.cand_start[r] + k, j]) or "-"
             for k, i in enumerate(item_ids)}
    out = Table(title=f"user {uid}'s request of {len(items)} movies (test period), ranked; what they did")
    for col in ("title", *[h.name for h in rd.heads], "utility", "did"):
        out.add_column(col, overflow="fold")
    for row in table.iter_rows(named=True):
        out.add_row(str(row["title"] or row["item_id"]), *[f"{row[h.name]:.3f}" for h in rd.heads],
                    f"{row['utility']:+.3f}", truth[row["item_id"]])
    Console().print(out)


def run_quickstart(workdir: Path, text: bool = True, log=print, show=None, train: bool = True,
                   max_epochs: int = 10, rank: bool = True) -> Dataset:
    t0 = time.perf_counter()
    workdir = Path(workdir)
    dataset_dir = workdir / "dataset"
    log(f"[1/7] preparing the built-in {BUILTIN} data -> {dataset_dir}")
    prepare_builtin(dataset_dir, overwrite=True, log=log)
    if text:
        from pinnerformer.features.text import embed_items_text

        log("[2/7] embedding item text (all-MiniLM-L6-v2, offline)")
        embed_items_text(dataset_dir, log=log)
    else:
        log("[2/7] item text embedding skipped (--no-text): models will use learned item-ID embeddings")
    ds = Dataset.open(dataset_dir)
    if show is not None:
        show(ds)
    if train:
        from pinnerformer.training.config import load_config
        from pinnerformer.training.retrieval import retrieval_loop

        run_dir = workdir / "run"
        keep_previous(workdir, log)  # the quickstart starts a fresh run; an earlier one is kept, never deleted
        log(f"[3/7] training PinnerFormer (preset small, dense all-action, mixed negatives + logQ) -> {run_dir}")
        cfg = load_config("small", overrides={"optim": {"max_epochs": max_epochs}})
        retrieval_loop(ds, cfg, run_dir, log=log).fit()
        serve_demo(ds, run_dir, workdir, log=log, show=show_table)
        if rank:
            rank_demo(ds, workdir, log=log, max_epochs=min(4, max_epochs))
    log(f"quickstart done in {time.perf_counter() - t0:.0f}s; outputs in {workdir}")
    return ds
