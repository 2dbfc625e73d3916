"""`pinnerformer index` and `pinnerformer retrieve`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from pinnerformer.cli.common import app, console, log, run_guarded
from pinnerformer.errors import PinnerformerError


def parse_params(text: Optional[str]) -> dict:
    """'M=32,ef_search=64' -> {'M': 32, 'ef_search': 64}."""
    out = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise PinnerformerError(f"--params: {part!r} is not KEY=VALUE")
        try:
            out[key.strip()] = int(value)
        except ValueError:
            raise PinnerformerError(f"--params: {key.strip()} must be an integer, got {value!r}") from None
    return out


@app.command("index")
def index(
    run: Path = typer.Option(..., "--run", "-r", help="A training run directory."),
    dataset: Path = typer.Option(..., "--dataset", "-d", help="The dataset the run was trained on."),
    output: Path = typer.Option(..., "--output", "-o", help="Index directory to write."),
    kind: str = typer.Option("hnsw", help="hnsw | flat | ivf"),
    params: Optional[str] = typer.Option(None, help="hnsw: M,ef_construction,ef_search; ivf: nlist,nprobe "
                                         "(e.g. 'M=32,ef_search=128')."),
    checkpoint: str = typer.Option("best", help="best | last"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing index at --output."),
):
    """Item embeddings from the item tower into a FAISS index, with its id map and manifest."""

    def body():
        from pinnerformer.api import build_index

        build_index(run, dataset, output, kind, parse_params(params), checkpoint=checkpoint, overwrite=overwrite,
                    log=log)

    run_guarded(body)


@app.command("retrieve")
def retrieve(
    index: Path = typer.Option(..., "--index", help="An item index directory (`pinnerformer index`)."),
    snapshot: Optional[Path] = typer.Option(None, "--snapshot", help="A snapshot day directory (`pinnerformer embed`)."),
    user: Optional[str] = typer.Option(None, "--user", help="One user id: print their top-k."),
    item: Optional[str] = typer.Option(None, "--item", help="One item id: print the k most similar items."),
    users_file: Optional[Path] = typer.Option(None, "--users-file", help="Batch: a text file of user ids, one per "
                                              "line (default with --output: every user in the snapshot)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Batch: Parquet file of (user, rank, item)."),
    k: int = typer.Option(10, "-k", "--k", help="How many items."),
    include_seen: bool = typer.Option(False, "--include-seen", help="Keep items the user already acted on (default: "
                                      "left out, from the snapshot's dataset)."),
    dataset: Optional[Path] = typer.Option(None, "--dataset", "-d", help="The dataset to read users' seen items "
                                           "from (default: the snapshot's)."),
):
    """Top-k items for a user (or similar items for an item) from the index; a batch form writes Parquet."""

    def body():
        from pinnerformer.api import recommend, recommend_all, similar_items
        from pinnerformer.inference.snapshot import Snapshot
        from pinnerformer.retrieval.index import ItemIndex

        if k < 1:
            raise PinnerformerError(f"-k must be at least 1, got {k}")
        if sum(x is not None for x in (user, item, output)) != 1:
            raise PinnerformerError("give exactly one of --user ID, --item ID or --output FILE (batch)")
        idx = ItemIndex.open(index)
        if k > idx.index.ntotal:
            log(f"note: the index holds {idx.index.ntotal:,} items: at most that many per query, not {k:,}")
        if item is not None:
            frame, title = similar_items(idx, item, k), f"items similar to item {item}"
        else:
            if snapshot is None:
                raise PinnerformerError("--snapshot is required for user retrieval")
            snap = Snapshot.open(snapshot)
            if output is not None:
                ids = None
                if users_file is not None:
                    if not users_file.exists():
                        raise PinnerformerError(f"{users_file}: users file not found")
                    ids = [line.strip() for line in users_file.read_text().splitlines() if line.strip()]
                info = recommend_all(idx, snap, output, k, users=ids, include_seen=include_seen, dataset=dataset)
                log(f"wrote {info.output}: top-{k} for {info.users:,} users ({info.rows:,} rows)"
                    + (f"; {info.users_short_of_k:,} user(s) have fewer than {k} unseen items in the index"
                       if info.users_short_of_k else ""))
                return
            frame = recommend(idx, snap, user, k, include_seen=include_seen, dataset=dataset)
            title = f"top {k} for user {user} (as of {snap.manifest.as_of}" + (", seen items included)" if
                                                                                include_seen else ", seen items left out)")
        table = Table(title=title)
        for col in frame.columns:
            table.add_column(col, overflow="fold")
        for row in frame.iter_rows():
            table.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row])
        console.print(table)

    run_guarded(body)
