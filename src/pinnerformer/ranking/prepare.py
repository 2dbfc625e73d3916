"""`pinnerformer rank prepare`: a prepared dataset -> ranking data (requests, candidates, labels per head, the
realtime sequences' bounds, the PinnerFormer vectors of the day before, the time split), written atomically.

The PinnerFormer model behind the feature is trained on the training period only (`eval.until` = the end of the
training period): its weights never see a validation or test event. A run given with --pinnerformer is checked
for that, and refused otherwise. Each request's user vector is the one the daily job would have published the
evening before: the user's actions before the request's UTC day, through the same `embed_users`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import torch

from pinnerformer.data import requests as rq
from pinnerformer.data.clock import utc_day
from pinnerformer.data.dataset import Dataset
from pinnerformer.data.schema import DatasetRef
from pinnerformer.errors import PinnerformerError
from pinnerformer.io import atomic_dir, exclusive, read_json_record, write_json_atomic
from pinnerformer.models.embedding import embed_items, embed_users
from pinnerformer.ops.quantize import file_sha256, int8_table
from pinnerformer.runs import RunDir

if TYPE_CHECKING:
    from pinnerformer.training.run_files import TrainSummary


def _day(t: int) -> str:
    return utc_day(int(t)).isoformat()


def check_feature_run(run: RunDir, ds: Dataset, limit: int) -> None:
    """The PinnerFormer run may only have seen events before `limit` (the end of the feature period, or of the
    ranker's training period when there is none), and this dataset's users and items."""
    run.check_dataset(ds)
    until = run.config.eval.until
    if until is None:
        raise PinnerformerError(
            f"{run.path} was trained on every event of its dataset (up to {_day(ds.manifest.time_max)}), beyond the "
            f"period a feature model may see, which ends on {_day(limit)}: its weights have seen the ranker's "
            "training, validation and test requests (leakage). Leave --pinnerformer out to train one on that period, "
            f"or train with eval.until <= {limit}")
    if until > limit:
        raise PinnerformerError(
            f"{run.path} was trained on events up to {dt.datetime.fromtimestamp(until, dt.timezone.utc):%Y-%m-%d %H:%M}"
            f" UTC (eval.until {until}), after the period a feature model may see ends ({_day(limit)} 00:00 UTC, "
            f"{limit}): its weights have seen the ranker's requests (leakage)")


def train_feature_run(ds: Dataset, out: Path, until: int, max_steps: int, seed: int, log=print,
                      progress: bool = True) -> RunDir:
    from pinnerformer.training.config import load_config
    from pinnerformer.training.retrieval import retrieval_loop

    cfg = load_config("small", overrides={"eval": {"until": until, "test_fraction": 0.0, "val_fraction": 0.1},
                                          "seed": seed, "device": "cpu" if not torch.cuda.is_available() else "auto"})
    log(f"PinnerFormer for the feature: trained on events before {_day(until)} only, at most {max_steps} steps "
        f"-> {out}")
    retrieval_loop(ds, cfg, out, log=log).fit(max_steps=max_steps, progress=progress)
    return RunDir(out)


def interest_vectors(interests: list[list[str]], dim: int = 32) -> np.ndarray:
    """One fixed random unit vector per interest (seeded by a hash of its name: the same on every machine), an item
    the normalised mean of its interests' (zero without any): items of one category share a vector."""
    table: dict[str, np.ndarray] = {}
    out = np.zeros((len(interests), dim), np.float32)
    for i, names in enumerate(interests):
        for name in names or []:
            if name not in table:
                seed = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big")
                v = np.random.default_rng(seed).normal(size=dim)
                table[name] = (v / np.linalg.norm(v)).astype(np.float32)
            out[i] += table[name]
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return np.where(norm > 0, out / np.maximum(norm, 1e-12), 0).astype(np.float32)


def pinnerformer_weakness(summary: TrainSummary | None) -> str | None:
    """Why the feature PinnerFormer's item vectors may be worth nothing: its validation result is missing or 0, or not
    above the most-popular baseline's on the same users (a model that learned nothing gives vectors that are noise;
    on the Taobao sample its validation recall@10 was 0.0000); None when it learned something."""
    if summary is None:
        return "its run has no training summary (no validation result)"
    what = f"its validation {summary.metric}"
    if summary.best is None:
        return f"{what} was never defined (no validation gave a number)"
    if summary.best <= 0:
        return f"{what} is {summary.best:.4f}"
    if summary.popularity is not None and summary.best <= summary.popularity:
        return f"{what} {summary.best:.4f} is not above the popularity baseline's {summary.popularity:.4f}"
    return None


def frozen_item_vectors(ds: Dataset, kind: str, pf_items: np.ndarray, pf_weakness: str | None = None,
                        log=print) -> tuple[np.ndarray, dict[str, object]]:
    """The frozen vectors of sequence items and candidates (Pinterest: PinSage): the dataset's content vectors, the
    feature PinnerFormer's item vectors, or category vectors from the items' interests; `auto`: content if the
    dataset has it, else PinnerFormer's, unless that model learned nothing (`pf_weakness`, from
    `pinnerformer_weakness`) and the items have interests. Returns the vectors and the manifest's record of them:
    source, dim, requested, and why where PinnerFormer's were passed over or kept despite a warning."""
    content = ds.content_vectors()
    interests = ds.items["interests"].to_list()
    record: dict[str, object] = {"requested": kind}
    if kind == "auto":
        kind = "content" if content is not None else "pinnerformer"
    if kind == "pinnerformer" and pf_weakness is not None:
        warning = f"the feature PinnerFormer learned too little for its item vectors to mean much: {pf_weakness}"
        if record["requested"] == "auto" and any(interests):
            kind, record["why"] = "interests", f"{warning}: --item-vectors auto fell back to interests"
            log(f"warning: {record['why']} (one fixed vector per category; content vectors, from `pinnerformer "
                "items embed-text`, would be better)")
        else:
            record["warning"] = warning + ("" if record["requested"] == "pinnerformer" else
                                           " (and no item has an interest to fall back to)")
            log(f"warning: {record['warning']}: its item vectors are used (--item-vectors {record['requested']}); "
                "content vectors (`pinnerformer items embed-text`) or a longer --pf-max-steps may serve better")
    if kind == "content":
        if content is None:
            raise PinnerformerError(f"--item-vectors content: {ds.path} has no content vectors (run `pinnerformer "
                                    "items embed-text` on it first, or use pinnerformer | interests)")
        vectors = content
    elif kind == "interests":
        if not any(interests):
            raise PinnerformerError(f"--item-vectors interests: no item of {ds.path} has an interest (category)")
        vectors = interest_vectors(interests)
    else:
        vectors = pf_items
    return vectors, {"source": kind, "dim": int(vectors.shape[1]), **record}


def table_fingerprint(requests: pl.DataFrame, candidates: pl.DataFrame) -> str:
    h = hashlib.sha256()
    for df in (requests, candidates):
        for name in df.columns:
            col = df[name]
            h.update(name.encode())
            h.update(col.cast(pl.String).fill_null("\0").str.join("\x1f").item().encode() if col.dtype == pl.String
                     else np.ascontiguousarray(col.to_numpy()).tobytes())
    return h.hexdigest()[:16]


def check_output(output: Path, overwrite: bool) -> None:
    """What may be at OUTPUT: nothing, or (with --overwrite) ranking data or an empty directory; never a file, nor a
    directory of anything else (a dataset, a run, someone's files), which --overwrite would delete."""
    if not output.exists():
        return
    if not output.is_dir():
        raise PinnerformerError(f"{output} is a file, not a ranking data directory: refusing to replace it (give a "
                                "new directory as --output)")
    if not overwrite:
        raise PinnerformerError(f"{output} already exists (use --overwrite to replace it)")
    manifest = output / rq.RANK_MANIFEST
    if any(output.iterdir()) and (not manifest.is_file() or read_json_record(
            manifest, "ranking data manifest").get("kind") != "ranking-data"):
        raise PinnerformerError(f"{output} is not ranking data (no ranking {rq.RANK_MANIFEST} written by `pinnerformer "
                                "rank prepare` in it): refusing to replace it with --overwrite (give a new directory "
                                "as --output, or remove it yourself)")


def prepare_ranking(dataset_dir: Path, output: Path, opts: rq.RequestOptions, pinnerformer: Path | None = None,
                    pf_max_steps: int = 600, overwrite: bool = False, log=print, progress: bool = True
                    ) -> rq.RankManifest:
    ds = Dataset.open(dataset_dir)
    check_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(output.parent, f"the folder of ranking data {output}", log=log):
        check_output(output, overwrite)  # again, under the lock: another prepare may have just written it
        return _prepare_locked(ds, output, opts, pinnerformer, pf_max_steps, log, progress)


def _prepare_locked(ds: Dataset, output: Path, opts: rq.RequestOptions, pinnerformer: Path | None,
                    pf_max_steps: int, log, progress: bool = True) -> rq.RankManifest:
    with atomic_dir(output) as tmp:
        tables = rq.build_requests(ds, opts, log=log)
        req, cand = tables.requests, tables.candidates
        rq.check_periods(rq.split_counts(req, cand, opts.heads), opts.heads, ds.path)
        log(f"{req.height:,} requests, {cand.height:,} candidates ({opts.request} requests); "
            + (f"feature period (the PinnerFormer's) before {_day(tables.feature_end)}, "
               if tables.feature_end is not None else "")
            + f"train before {_day(tables.train_end)}, validation before {_day(tables.val_end)}, test after "
            f"(--split {opts.split_text})")
        if pinnerformer is not None:
            run = RunDir(pinnerformer)
            check_feature_run(run, ds, tables.pf_until)
            run_ref = str(Path(pinnerformer).resolve())
        else:
            run = train_feature_run(ds, tmp / rq.PF_RUN, tables.pf_until, pf_max_steps, opts.seed, log=log,
                                    progress=progress)
            run_ref = rq.PF_RUN
        model = run.load_model(ds)
        device = torch.device("cpu")
        # the snapshot of the day before: every action before the request's UTC day, once per (user, day)
        users, snap_end = req["user"].to_numpy(), req["snapshot_end"].to_numpy()
        key = np.stack([users.astype(np.int64), snap_end], 1)
        uniq, inverse = np.unique(key, axis=0, return_inverse=True)
        starts = np.asarray(ds.timelines.offsets[:-1])[uniq[:, 0]]
        has = uniq[:, 1] > starts
        log(f"PinnerFormer vectors for {len(uniq):,} (user, day) pairs")
        vec = embed_users(model, ds.timelines, starts[has], uniq[has, 1], device).numpy()
        per_pair = np.zeros((len(uniq), vec.shape[1] if len(vec) else model.out_dim), np.float32)
        per_pair[has] = vec
        user_vectors = per_pair[inverse.reshape(-1)]
        req = req.with_columns(pl.Series("has_vector", has[inverse.reshape(-1)]))
        pf_items = embed_items(model, device).numpy().astype(np.float32)
        summary = run.summary()
        item_vectors, vectors_record = frozen_item_vectors(ds, opts.item_vectors, pf_items,
                                                           pinnerformer_weakness(summary), log=log)
        np.save(tmp / rq.USER_VECTORS, user_vectors)
        np.save(tmp / rq.PF_ITEMS, pf_items)
        np.save(tmp / rq.ITEM_VECTORS, item_vectors.astype(np.float32))
        table = int8_table(item_vectors, opts.int8_dim, seed=0)
        np.save(tmp / rq.ITEM_INT8, table.q)
        int8_info = rq.Int8TableInfo(shape=table.q.shape, source_dim=int(item_vectors.shape[1]), projection_seed=0,
                                     scale=table.scale, zero=table.zero, lo=table.lo, hi=table.hi,
                                     sha256=file_sha256(tmp / rq.ITEM_INT8))
        req.write_parquet(tmp / rq.REQUESTS)
        cand.write_parquet(tmp / rq.CANDIDATES)
        counts = rq.split_counts(req, cand, opts.heads)
        notes = [f"item vectors: {vectors_record[k]}" for k in ("why", "warning") if k in vectors_record]
        if counts["test"].requests and counts["test"].without_vector:
            notes.append(f"{counts['test'].without_vector} test requests have no PinnerFormer vector (the user had "
                         "no action before the request's day): the feature is 0 and flagged")
        manifest = rq.RankManifest(
            dataset=DatasetRef(path=str(ds.path.resolve()), fingerprint=ds.manifest.fingerprint),
            dataset_format=ds.manifest.format, options=opts, train_end=tables.train_end, val_end=tables.val_end,
            feature_end=tables.feature_end,
            splits=counts, skipped=tables.skipped,
            pinnerformer={"run": run_ref, "checkpoint_sha256": run.checkpoint_sha256(), "trained_until":
                          run.config.eval.until, "dim": int(pf_items.shape[1]),
                          "validation": None if summary is None else {
                              "metric": summary.metric, "best": summary.best, "popularity": summary.popularity}},
            item_vectors=vectors_record, thinned_periods=rq.THINNED, int8_table=int8_info,
            fingerprint=table_fingerprint(req, cand), created_at=dt.datetime.now(dt.timezone.utc).isoformat(),
            notes=notes)
        write_json_atomic(tmp / rq.RANK_MANIFEST, manifest)
    for name, c in counts.items():
        log(f"  {name:<10} {c.requests:>7,} requests {c.candidates:>8,} candidates  {c.first_day} .. {c.last_day}  "
            + "  ".join(f"{h}: {n:,} req" for h, n in c.requests_with.items())
            + f"  (no PinnerFormer vector: {c.without_vector})")
    for reason, n in tables.skipped.items():
        log(f"  skipped: {n:,} {reason.replace('_', ' ')}"
            + (" (feature and training periods only)" if reason.startswith("candidates_beyond") else ""))
    return manifest
