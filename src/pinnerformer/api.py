"""The Python API: `import pinnerformer as pf`. Every step of the command line as a function that returns a typed
object instead of printing; the command line (`pinnerformer ...`) is a thin layer over these.

    ds = pf.builtin_dataset("work/ml")                       # or pf.prepare_dataset(path, "work/x", format="taobao")
    summary = pf.train(ds, "work/run", preset="small", config={"optim": {"max_epochs": 2}})
    report = pf.evaluate("work/run", ds)                     # EvaluationReport: report.model["recall@10"].mean
    snap = pf.embed_day("work/run", ds, "2018-09-24", "work/snapshots")
    index = pf.build_index("work/run", ds, "work/index")
    top = pf.recommend(index, snap, user="1", k=10)           # polars DataFrame: rank, item, score, title
    rd = pf.prepare_requests(ds, "work/rank", split="0.7,0.15,0.15")
    pf.train_ranker(rd, "work/ranker", model="none")
    pf.evaluate_rankers({"ranker": "work/ranker"}).models["ranker"]["hit@3/save"].value
    pf.score("work/ranker", user="1", time="2018-09-24T12:00:00", items=["1", "2"])

Configs are given as the pydantic objects (`TrainConfig`, `RankTrainConfig`) or as dicts of overrides over a preset
(checked: an unknown key is an error naming it). Errors are `PinnerformerError` with a message saying what was
expected. Logging goes to `log` (default: nothing); progress bars are off unless `progress=True`.
"""

from __future__ import annotations

import datetime as dt
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Mapping

import polars as pl

from pinnerformer.config import merge_dicts, validate
from pinnerformer.data.clock import day_start_ts, parse_day
from pinnerformer.data.dataset import Dataset
from pinnerformer.data.requests import RankData, RankManifest, RequestOptions, default_heads, parse_heads
from pinnerformer.errors import PinnerformerError
from pinnerformer.evaluation.evaluate import EvaluateOptions
from pinnerformer.evaluation.report import EvaluationReport
from pinnerformer.inference.snapshot import Snapshot, SnapshotManifest
from pinnerformer.ranking.evaluate import RankingReport
from pinnerformer.retrieval.index import ItemIndex
from pinnerformer.retrieval.retrieve import BatchTopK
from pinnerformer.training.config import TrainConfig
from pinnerformer.training.ranking import RankTrainConfig
from pinnerformer.training.run_files import TrainSummary

Log = Callable[[str], Any]
PathLike = str | Path

__all__ = [
    "Dataset", "RankData", "ItemIndex", "Snapshot", "TrainConfig", "RankTrainConfig", "TrainSummary",
    "EvaluationReport", "RankingReport", "SnapshotManifest", "RankManifest", "BatchTopK", "PinnerformerError",
    "open_dataset", "builtin_dataset", "prepare_dataset", "train", "evaluate", "embed_day", "build_index",
    "open_index", "recommend", "recommend_all", "similar_items", "prepare_requests", "open_requests", "train_ranker",
    "evaluate_rankers", "score", "create_app",
]


def _quiet(_: str) -> None:
    return None


def _day(value: str | dt.date, name: str) -> dt.date:
    return value if isinstance(value, dt.date) else parse_day(value, name)


def _dataset(ds: Dataset | PathLike) -> Dataset:
    return ds if isinstance(ds, Dataset) else Dataset.open(ds)


# ---- data ------------------------------------------------------------------------------------------------------
def open_dataset(path: PathLike) -> Dataset:
    """A prepared dataset directory (`prepare_dataset`, `pinnerformer data prepare`)."""
    return Dataset.open(path)


def prepare_dataset(input: PathLike, output: PathLike, format: str = "events", *, skip_invalid: bool = False,
                    min_time: str | dt.date = "1990-01-01", max_time: str | dt.date | None = None,
                    overwrite: bool = False, log: Log = _quiet, **format_options: Any) -> Dataset:
    """A source event log (`format`: movielens | movielens-latest | sequences | otto | events | taobao | mind) turned
    into a dataset directory at `output`. `format_options` are the format's own (e.g. `positive=["buy"]`,
    `columns={"user": "uid"}` for events); `skip_invalid` counts and skips malformed rows instead of stopping."""
    from pinnerformer.data.formats import read_source
    from pinnerformer.data.prepare import prepare

    lo = day_start_ts(_day(min_time, "min_time"))
    hi = day_start_ts(_day(max_time, "max_time")) if max_time else None
    raw = read_source(format, Path(input), format_options, skip_invalid=skip_invalid)
    prepare(raw, Path(output), format, skip_invalid=skip_invalid, min_time=lo, max_time=hi, overwrite=overwrite,
            log=log)
    return Dataset.open(output)


def builtin_dataset(output: PathLike, *, overwrite: bool = False, log: Log = _quiet) -> Dataset:
    """The built-in MovieLens latest-small (shipped with the package) prepared into `output`."""
    from pinnerformer.quickstart import prepare_builtin

    prepare_builtin(Path(output), overwrite=overwrite, log=log)
    return Dataset.open(output)


# ---- PinnerFormer ----------------------------------------------------------------------------------------------
def _train_config(preset: str, config: TrainConfig | Mapping | None) -> TrainConfig:
    from pinnerformer.training.config import load_config

    if isinstance(config, TrainConfig):
        return config
    return load_config(preset, None, dict(config or {}))


def train(dataset: Dataset | PathLike, output: PathLike, preset: str = "small",
          config: TrainConfig | Mapping | None = None, *, resume: bool = False, max_steps: int | None = None,
          progress: bool = False, log: Log = _quiet) -> TrainSummary:
    """Train a PinnerFormer run into `output` (early stopping on validation users); `config`: a `TrainConfig`, or
    overrides over the preset (small | loo | loo-ensemble | paper). Under torchrun each process that calls it is one
    rank of the same run (docs/distributed.md)."""
    from pinnerformer.training.retrieval import retrieval_loop

    cfg = _train_config(preset, config)
    ds = _dataset(dataset)
    from pinnerformer.runs.evaluate import teacher_for

    teacher = teacher_for(cfg, ds, log=log)  # the frozen run to distil from (loss.teacher), if any
    with _process_group(cfg.device) as (dist, on_step):
        return retrieval_loop(ds, cfg, Path(output), log=log, dist=dist, teacher=teacher).fit(
            resume=resume, max_steps=max_steps, progress=progress, on_step=on_step)


@contextmanager
def _process_group(device: str):
    """torchrun's process group when this process is one of several (else None), and the fault-injection tests'
    step hook; the group is closed however training ends."""
    from pinnerformer.distributed.context import from_environment
    from pinnerformer.distributed.launch import fault_hook

    dist = from_environment(device)
    try:
        yield dist, fault_hook(dist)
    finally:
        if dist is not None:
            dist.close()


def evaluate(run: PathLike, dataset: Dataset | PathLike, *, item_knn: bool | None = None,
             blend_from: PathLike | None = None, log: Log = _quiet, progress: bool = False,
             **options: Any) -> EvaluationReport:
    """A run scored on held-out users beside the baselines (written to RUN/eval/ too; `log` says where).
    `options`: those of `EvaluateOptions` (protocol, split, cutoffs, k, exclude_history, ...); `item_knn`:
    leave-one-out blended with item-to-item neighbours, λ chosen on validation under the protocol scored (default:
    the run's setting);
    `blend_from` (a refit): the run it repeats, whose λ, chosen on its validation, the refit is blended with."""
    from pinnerformer.runs import RunDir
    from pinnerformer.runs.evaluate import evaluate_run

    rd = RunDir(Path(run))
    blend = None if item_knn is None else rd.config.blend.model_copy(update={"item_knn": item_knn})
    report, js, md = evaluate_run(rd, _dataset(dataset), validate(EvaluateOptions, options, "evaluate"), log=log,
                                  blend=blend, progress=progress,
                                  blend_from=None if blend_from is None else RunDir(Path(blend_from)))
    log(f"wrote {js} and {md} ({report.wall_s} s)")
    return report


def embed_day(run: PathLike, dataset: Dataset | PathLike, as_of: str | dt.date, output: PathLike, *, engine: str = "local",
              force: bool = False, ray_address: str | None = None, ray_actors: int = 2,
              ray_cpus_per_actor: float = 0.5, progress: bool = False, log: Log = _quiet, **job: Any) -> Snapshot:
    """The daily job: every user's vector as of the end of day `as_of` (YYYY-MM-DD, UTC), incremental over the
    previous snapshot under `output`; returns the verified snapshot. `engine`: local | ray (a pool of
    `ray_actors` actors, on a local Ray or the cluster at `ray_address`). `job`: DailyJob's options (dtype,
    shard_users, batch_size, device, checkpoint, compile)."""
    from pinnerformer.inference.daily_embed import DailyJob

    day = _day(as_of, "as_of")
    if job.get("shard_users", 1) < 1 or job.get("batch_size", 1) < 1:
        raise PinnerformerError("shard_users and batch_size must be at least 1")
    DailyJob(Path(run), _dataset(dataset), day, Path(output), **job).run(
        engine=engine, force=force, ray_address=ray_address, ray_actors=ray_actors,
        ray_cpus_per_actor=ray_cpus_per_actor, log=log, progress=progress)
    snap = Snapshot.open(Path(output) / day.isoformat())
    snap.verify()
    return snap


def build_index(run: PathLike, dataset: Dataset | PathLike, output: PathLike, kind: str = "hnsw",
                params: Mapping[str, int] | None = None, *, checkpoint: str = "best", overwrite: bool = False,
                log: Log = _quiet) -> ItemIndex:
    """The run's item vectors in a FAISS index (hnsw | flat | ivf; `params` e.g. {"M": 32, "ef_search": 128}) at
    `output`."""
    from pinnerformer.retrieval.index import build_item_index

    build_item_index(Path(run), _dataset(dataset), Path(output), kind, dict(params or {}), checkpoint, log=log,
                     overwrite=overwrite)
    return ItemIndex.open(output)


def open_index(path: PathLike) -> ItemIndex:
    return ItemIndex.open(path)


def _index_and_snapshot(index: ItemIndex | PathLike, snapshot: Snapshot | PathLike, k: int
                        ) -> tuple[ItemIndex, Snapshot]:
    if k < 1:
        raise PinnerformerError(f"k must be at least 1, got {k}")
    idx = index if isinstance(index, ItemIndex) else ItemIndex.open(index)
    snap = snapshot if isinstance(snapshot, Snapshot) else Snapshot.open(snapshot)
    snap.verify()  # never serve vectors that are not the ones the job wrote
    return idx, snap


def recommend(index: ItemIndex | PathLike, snapshot: Snapshot | PathLike, user: str | int, k: int = 10, *,
              include_seen: bool = False, dataset: PathLike | None = None) -> pl.DataFrame:
    """A user's top-k items from the index with their snapshot vector: rank, item_id, score, title. The items they
    acted on before the snapshot's cut-off are left out unless `include_seen` (read from the snapshot's dataset, or
    `dataset`, one grown from it)."""
    from pinnerformer.retrieval.retrieve import SeenItems, top_k_for_user

    idx, snap = _index_and_snapshot(index, snapshot, k)
    seen = None if include_seen else SeenItems(snap, None if dataset is None else Path(dataset))
    return top_k_for_user(idx, snap, str(user), k, seen)


def recommend_all(index: ItemIndex | PathLike, snapshot: Snapshot | PathLike, output: PathLike, k: int = 10, *,
                  users: list[str | int] | None = None, include_seen: bool = False,
                  dataset: PathLike | None = None) -> BatchTopK:
    """Top-k for many users (default: every user in the snapshot) into one Parquet file at `output`, one row per
    (user_id, rank); an unknown user id is an error naming it, never dropped."""
    from pinnerformer.retrieval.retrieve import SeenItems, top_k_batch

    idx, snap = _index_and_snapshot(index, snapshot, k)
    seen = None if include_seen else SeenItems(snap, None if dataset is None else Path(dataset))
    return top_k_batch(idx, snap, None if users is None else [str(u) for u in users], k, Path(output), seen=seen)


def similar_items(index: ItemIndex | PathLike, item: str | int, k: int = 10) -> pl.DataFrame:
    from pinnerformer.retrieval.retrieve import similar_items as similar

    return similar(index if isinstance(index, ItemIndex) else ItemIndex.open(index), str(item), k)


# ---- ranking ---------------------------------------------------------------------------------------------------
def prepare_requests(dataset: Dataset | PathLike, output: PathLike, *, request: str | None = None,
                     heads: str | None = None, split: str = "0.7,0.15,0.15", pinnerformer: PathLike | None = None,
                     pf_max_steps: int = 600, overwrite: bool = False, progress: bool = False, log: Log = _quiet,
                     **options: Any) -> RankData:
    """Ranking requests rebuilt from the dataset's events (day | session | logged), with labels per head, the time
    split (fractions, or 'LAST_TRAIN_DAY,LAST_VALIDATION_DAY') and the feature PinnerFormer. `options`: the rest of
    `RequestOptions` (min_candidates, max_candidates, feature_share, item_vectors, seed, ...)."""
    from pinnerformer.data.request_split import parse_split
    from pinnerformer.data.requests import check_requestable
    from pinnerformer.ranking.prepare import prepare_ranking

    ds = _dataset(dataset)
    kind = request or ("logged" if ds.manifest.format == "mind" else "day")
    check_requestable(ds, kind)
    names = ds.manifest.action_names()
    head_list = parse_heads(heads, names) if heads else default_heads(ds.manifest.format, names)
    opts = validate(RequestOptions, {"request": kind, "heads": head_list, **parse_split(split), **options},
                    "prepare_requests")
    prepare_ranking(Path(ds.path), Path(output), opts, None if pinnerformer is None else Path(pinnerformer),
                    pf_max_steps, overwrite, log=log, progress=progress)
    return RankData(output)


def open_requests(path: PathLike) -> RankData:
    return RankData(path)


def _rank_config(preset: str, model: str | None, config: RankTrainConfig | Mapping | None) -> RankTrainConfig:
    from pinnerformer.training.ranking import load_rank_config

    if isinstance(config, RankTrainConfig):
        if model is not None:
            raise PinnerformerError("train_ranker: give the model inside the RankTrainConfig or as `model`, not both")
        return config
    over: dict = {}
    if model == "gbdt":
        over = {"learner": "gbdt"}
    elif model is not None:
        over = {"model": {"sequence": model}}
    return load_rank_config(preset, None, merge_dicts(over, dict(config or {})))


def train_ranker(data: RankData | PathLike, output: PathLike, model: str | None = None, preset: str = "default",
                 config: RankTrainConfig | Mapping | None = None, *, resume: bool = False,
                 max_steps: int | None = None, progress: bool = False, log: Log = _quiet) -> TrainSummary:
    """Train a ranker on ranking data: `model` transact (default) | transact-v2 | bst | average | none, or gbdt
    (LightGBM on the same features); selected on the validation period. Under torchrun each process that calls it
    is one rank of the same run."""
    from pinnerformer.training.gbdt import train_gbdt
    from pinnerformer.training.ranking import ranking_loop

    rd = data if isinstance(data, RankData) else RankData(data)
    cfg = _rank_config(preset, model, config)
    if cfg.learner == "gbdt":
        if resume or int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise PinnerformerError("gbdt trains in one go on one process: nothing to resume, no torchrun (--resume, "
                                    "--nproc)")
        return train_gbdt(rd, cfg, Path(output), log=log, progress=progress)
    with _process_group(cfg.device) as (dist, on_step):
        return ranking_loop(rd, cfg, Path(output), log=log, dist=dist).fit(resume=resume, max_steps=max_steps,
                                                                           progress=progress, on_step=on_step)


def evaluate_rankers(runs: Mapping[str, PathLike], split: str = "test", reference: str | None = None, *,
                     k: int = 3, seed: int = 0, write: bool = True, notes: list[str] | None = None,
                     log: Log = _quiet) -> RankingReport:
    """Ranking runs (name -> run directory, all on the same ranking data) and the baselines scored on the requests
    of `split`, with 95% intervals and paired lifts over `reference`; written to the first run's eval/ too."""
    from pinnerformer.ranking.evaluate import evaluate_ranking, write_report
    from pinnerformer.ranking.run import RankRun

    if split not in ("test", "validation"):
        raise PinnerformerError(f"split {split!r}: expected test or validation")
    paths = {name: Path(p) for name, p in runs.items()}
    if not paths:
        raise PinnerformerError("evaluate_rankers: give at least one run")
    if reference is not None and reference not in paths:
        raise PinnerformerError(f"reference {reference!r} is not one of the runs ({', '.join(paths)})")
    first = next(iter(paths.values()))
    report, _ = evaluate_ranking(RankRun(first).data(), paths, split, reference, k=k, seed=seed, interests=True,
                                 log=log)
    report.notes.extend(notes or [])
    if write:
        log(f"report: {write_report(report, first / 'eval', f'ranking-{split}')}")
    return report


def score(run: PathLike, user: str | int, time: str | int, items: list[str | int], *,
          snapshot: PathLike | None = None, surface: str | None = None) -> pl.DataFrame:
    """One request scored by a ranking run: per-head probabilities and the served order (every candidate)."""
    from pinnerformer.ranking.score import score_request

    return score_request(Path(run), str(user), str(time), [str(i) for i in items],
                         None if snapshot is None else Path(snapshot), surface)


# ---- serving ---------------------------------------------------------------------------------------------------
def create_app(workdir: PathLike, store: str | None = None, *, token: str | None = None,
               read_token: str | None = None, log: Log = _quiet, **settings: Any):
    """The FastAPI service over what the quickstart or the daily job wrote in `workdir` (rank-run/, index/,
    snapshots/); `store`: redis://HOST:PORT/DB or an LMDB directory (default WORKDIR/store). Serve it with uvicorn."""
    from pinnerformer.serving.app import ServiceSettings
    from pinnerformer.serving.app import create_app as app_for
    from pinnerformer.serving.server import build_service

    service = build_service(Path(workdir), store, token, validate(ServiceSettings, settings, "create_app"), log=log,
                            read_token=read_token)
    return app_for(service)


