"""Damaged files are refused with a message, never served, never carried over, never a traceback: checkpoints
(empty, cut off, not a checkpoint), snapshots (altered vectors, NaN, damaged Parquet) and indexes."""

import datetime as dt
import shutil

import numpy as np
import pyarrow.parquet as pq

from pinnerformer.data import Dataset
from pinnerformer.inference.daily_embed import DailyJob
from pinnerformer.inference.snapshot import Snapshot, content_hash, embeddings_table
from conftest import PLANTED_DAY as D0


def damaged_copies(run, tmp_path):
    """(name, run dir) with best.pt empty / cut in half / replaced by something else."""
    data = (run / "checkpoints" / "best.pt").read_bytes()
    out = []
    import zipfile

    with zipfile.ZipFile(run / "checkpoints" / "best.pt") as zf:  # the largest tensor's bytes inside the archive
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    flipped = bytearray(data)
    flipped[start + info.file_size // 2] ^= 0xFF  # torch.load reads this without complaint
    for name, content in (("empty", b""), ("truncated", data[: len(data) // 2]), ("text", b"hello\n"),
                          ("bit-flip", bytes(flipped))):
        copy = tmp_path / f"run-{name}"
        shutil.copytree(run, copy)
        (copy / "checkpoints" / "best.pt").write_bytes(content)
        out.append((name, copy))
    return out


def test_a_damaged_checkpoint_is_a_message_not_a_traceback(trained, planted, tmp_path, cli):
    for name, run in damaged_copies(trained, tmp_path):
        for args in (["embed", "-r", run, "-d", planted, "--as-of", D0.isoformat(), "-o", tmp_path / f"s-{name}"],
                     ["evaluate", "-r", run, "-d", planted],
                     ["index", "-r", run, "-d", planted, "-o", tmp_path / f"i-{name}"]):
            r = cli(*args)
            assert r.exit_code == 2 and "is not a readable checkpoint" in r.stderr, (name, args[0], r.output)
            assert "Traceback" not in r.output
        assert not (tmp_path / f"s-{name}" / D0.isoformat()).exists() and not (tmp_path / f"i-{name}").exists()
    (trained / "checkpoints" / "last.pt").rename(tmp_path / "last.pt")
    try:
        (trained / "checkpoints" / "last.pt").write_bytes(b"")
        r = cli("train", "-d", planted, "-o", trained, "--resume", "--no-progress")
        assert r.exit_code == 2 and "is not a readable checkpoint (0 bytes" in r.stderr
    finally:
        (tmp_path / "last.pt").replace(trained / "checkpoints" / "last.pt")


def rewrite(snapshot_dir, vectors, rehash: bool):
    snap = Snapshot.open(snapshot_dir)
    pq.write_table(embeddings_table(snap.users, snap.table.column("user_id").combine_chunks(), vectors),
                   snapshot_dir / "embeddings.parquet")
    if rehash:  # even a manifest that agrees with the altered file does not make NaN servable
        m = snap.manifest.model_copy(update={"content_sha256": content_hash(snap.users, vectors)})
        (snapshot_dir / "manifest.json").write_text(m.model_dump_json())


def test_an_altered_or_nan_snapshot_is_neither_served_nor_carried_over(trained, planted, tmp_path, cli):
    ds = Dataset.open(planted)
    d1 = D0 + dt.timedelta(days=1)
    ref = DailyJob(trained, ds, d1, tmp_path / "ref").run(log=lambda s: None, progress=False)
    assert cli("index", "-r", trained, "-d", planted, "-o", tmp_path / "index", "--kind", "flat").exit_code == 0
    for name, change, rehash in (("flipped", lambda v: v * np.float32(1.0001), False),
                                 ("nan", lambda v: np.where(np.arange(len(v))[:, None] == 3, np.nan, v), True)):
        root = tmp_path / name
        DailyJob(trained, ds, D0, root).run(log=lambda s: None, progress=False)
        snap = Snapshot.open(root / D0.isoformat())
        rewrite(root / D0.isoformat(), change(snap.vectors).astype(np.float32), rehash)
        uid = snap.table.column("user_id")[0].as_py()
        r = cli("retrieve", "--index", tmp_path / "index", "--snapshot", root / D0.isoformat(), "--user", uid)
        assert r.exit_code == 2 and ("content hash" in r.stderr or "NaN" in r.stderr), r.output
        lines = []
        m = DailyJob(trained, ds, d1, root).run(log=lines.append, progress=False)
        assert any("not carried over, full computation" in x for x in lines), lines
        assert m.carried_over == 0 and m.content_sha256 == ref.content_sha256  # the next day is right regardless


def test_a_damaged_parquet_or_index_is_a_message(trained, planted, tmp_path, cli):
    ds = Dataset.open(planted)
    DailyJob(trained, ds, D0, tmp_path / "s").run(log=lambda s: None, progress=False)
    day = tmp_path / "s" / D0.isoformat()
    (day / "embeddings.parquet").write_bytes((day / "embeddings.parquet").read_bytes()[:100])
    assert cli("index", "-r", trained, "-d", planted, "-o", tmp_path / "index").exit_code == 0
    r = cli("retrieve", "--index", tmp_path / "index", "--snapshot", day, "--user", "1")
    assert r.exit_code == 2 and "embeddings.parquet cannot be read" in r.stderr and "Traceback" not in r.output
    raw = bytearray((tmp_path / "index" / "index.faiss").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (tmp_path / "index" / "index.faiss").write_bytes(bytes(raw))
    r = cli("retrieve", "--index", tmp_path / "index", "--item", "1")
    assert r.exit_code == 2 and "does not match its manifest's hash" in r.stderr
    (tmp_path / "index" / "index.faiss").write_bytes(b"")
    r = cli("retrieve", "--index", tmp_path / "index", "--item", "1")
    assert r.exit_code == 2 and "index.faiss" in r.stderr and "Traceback" not in r.output


def test_k_beyond_the_index_gives_real_items_only(trained, planted, tmp_path, cli):
    """HNSW with efSearch below k used to return rows with item -1 and score -3.4e38, reported as success."""
    import polars as pl

    ds = Dataset.open(planted)
    DailyJob(trained, ds, D0, tmp_path / "s").run(log=lambda s: None, progress=False)
    n = ds.manifest.n_items
    for kind in ("hnsw", "ivf", "flat"):
        assert cli("index", "-r", trained, "-d", planted, "-o", tmp_path / kind, "--kind", kind).exit_code == 0
        r = cli("retrieve", "--index", tmp_path / kind, "--snapshot", tmp_path / "s" / D0.isoformat(), "-o",
                tmp_path / f"{kind}.parquet", "-k", str(n + 50), "--include-seen")
        assert r.exit_code == 0 and f"the index holds {n:,} items" in r.stderr, r.output
        top = pl.read_parquet(tmp_path / f"{kind}.parquet")
        assert top["item"].min() >= 0 and top["score"].min() > -2 and top.group_by("user_id").len()["len"].min() == n
        assert top.group_by("user_id").agg(pl.col("item").n_unique())["item"].min() == n, kind
