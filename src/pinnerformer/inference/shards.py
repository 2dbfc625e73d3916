"""The daily job's unit of work, a shard of users, and the engines that run shards: one function embeds a shard
(`run_shard`), and every engine calls it — locally in this process, or in a pool of Ray actors.

A shard's users are a fixed slice of the job's sorted pending users, the same in every engine and attempt; its
vectors go to `parts/part-NNNNN.parquet` by rename, so a part is either complete or absent, and a restarted job
skips the parts already there. Engines never see the job object: `ShardWork` says everything they need.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pinnerformer.config import StrictModel
from pinnerformer.data.dataset import Dataset
from pinnerformer.errors import PinnerformerError
from pinnerformer.io import atomic_path
from pinnerformer.models.embedding import embed_users
from pinnerformer.models.pinnerformer import members_of
from pinnerformer.progress import progress_bar
from pinnerformer.runs.run_dir import RunDir


class ShardWork(StrictModel):
    """Everything an engine needs to embed the shards of one job (plain values: it travels to Ray actors)."""

    run_dir: str
    dataset_dir: str
    checkpoint: str
    staging: str  # the job's staging directory: pending.npy in it, parts/ to fill
    end_ts: int  # inputs are the actions before this time
    shard_users: int
    batch_size: int
    device: str = "cpu"
    compile: bool = False


def shard_of(pending: np.ndarray, k: int, shard_users: int) -> np.ndarray:
    """The users of shard k: a fixed slice of the sorted pending users."""
    return pending[k * shard_users:(k + 1) * shard_users]


def n_shards(pending: np.ndarray, shard_users: int) -> int:
    return -(-len(pending) // shard_users)


def shard_path(staging: Path, k: int) -> Path:
    return Path(staging) / "parts" / f"part-{k:05d}.parquet"


def user_ranges_as_of(ds: Dataset, users: np.ndarray, end_ts: int) -> tuple[np.ndarray, np.ndarray]:
    """[start, end) event ranges of `users` holding their actions with ts < end_ts."""
    tl = ds.timelines
    starts = np.asarray(tl.offsets[:-1])[users].astype(np.int64)
    stops = np.asarray(tl.offsets[1:])[users].astype(np.int64)
    ends = np.array([s + int(np.searchsorted(tl.ts[s:e], end_ts, side="left")) for s, e in zip(starts, stops)],
                    dtype=np.int64)
    return starts, ends


def load_model(work: ShardWork, ds: Dataset):
    model = RunDir(work.run_dir).load_model(ds, work.checkpoint).to(torch.device(work.device))
    if work.compile:  # fixed [batch_size, M] shapes: one compiled graph serves every batch
        for member in members_of(model):
            member.user_state = torch.compile(member.user_state, dynamic=False)
    return model


def run_shard(model, ds: Dataset, work: ShardWork, k: int, pending: np.ndarray) -> int:
    """Embed shard k and publish its part file by rename. Returns the number of users embedded."""
    users = shard_of(pending, k, work.shard_users)
    starts, ends = user_ranges_as_of(ds, users, work.end_ts)
    vecs = embed_users(model, ds.timelines, starts, ends, next(model.parameters()).device, work.batch_size,
                       fixed_shape=True).cpu().numpy()
    table = pa.table({"user": pa.array(users, type=pa.int32()),
                      "vector": pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), vecs.shape[1])})
    with atomic_path(shard_path(Path(work.staging), k)) as tmp:
        pq.write_table(table, tmp)
    return len(users)


def _users_in(todo: list[int], pending: np.ndarray, shard_users: int) -> int:
    return sum(len(shard_of(pending, k, shard_users)) for k in todo)


class LocalEngine:
    """Shards one after another in this process (CPU or GPU)."""

    def check(self, work: ShardWork) -> None:
        pass

    def run(self, work: ShardWork, todo: list[int], pending: np.ndarray, progress: bool = True) -> None:
        ds = Dataset.open(work.dataset_dir)
        model = load_model(work, ds)
        bar = progress_bar(total=_users_in(todo, pending, work.shard_users), unit="user", desc="embed",
                           disable=not progress)
        for k in todo:
            bar.update(run_shard(model, ds, work, k, pending))
        bar.close()


class ShardEmbedder:
    """Ray Data callable class: built once per actor (loads dataset + model), then called per shard."""

    def __init__(self, work: dict, threads: int):
        torch.set_num_threads(threads)
        self.work = ShardWork.model_validate(work)
        self.ds = Dataset.open(self.work.dataset_dir)
        self.model = load_model(self.work, self.ds)
        self.pending = np.load(Path(self.work.staging) / "pending.npy")

    def __call__(self, batch: dict) -> dict:
        done = [run_shard(self.model, self.ds, self.work, int(k), self.pending) for k in batch["shard"]]
        return {"shard": np.asarray(batch["shard"]), "users": np.array(done, dtype=np.int64)}


class RayEngine:
    """The same shards on Ray Data: `map_batches` over a pool of actors that each hold the model once and run
    `run_shard`. Each actor writes its part files into the job's staging directory (a shared file system on a real
    cluster) and returns only counts, so no embedding travels through the object store and the driver's restart
    logic is the local engine's. By default a local Ray cluster is started on loopback; `address` joins an existing
    one. Ray is an optional extra: `pip install "pinnerformer[ray]"`."""

    def __init__(self, address: str | None = None, actors: int = 2, cpus_per_actor: float = 0.5):
        self.address, self.actors, self.cpus_per_actor = address, actors, cpus_per_actor

    def check(self, work: ShardWork) -> None:
        if work.device != "cpu":
            raise PinnerformerError("the ray engine runs CPU actors; use --engine local for --device cuda")
        if work.compile:
            raise PinnerformerError("--compile is for the local engine; the ray engine runs the eager model")

    def run(self, work: ShardWork, todo: list[int], pending: np.ndarray, progress: bool = True) -> None:
        # Keep a local cluster on loopback (no firewall prompts, nothing exposed), and quiet.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        try:
            import ray
            import ray.data
        except ImportError:
            raise PinnerformerError('the ray engine needs Ray: pip install "pinnerformer[ray]" '
                                    "(or use --engine local)") from None
        started = False
        if not ray.is_initialized():
            if self.address:
                try:
                    ray.init(address=self.address, log_to_driver=False)
                except (ConnectionError, RuntimeError) as e:
                    raise PinnerformerError(
                        f"could not join the Ray cluster at {self.address}: {str(e).splitlines()[0]} (is it running? "
                        "a cluster started with `ray start` uses token authentication: set RAY_AUTH_MODE=token, with "
                        "the token in ~/.ray/auth_token or RAY_AUTH_TOKEN; see scripts/ray_cluster.sh)") from None
            else:
                ray.init(num_cpus=max(1, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
                         _node_ip_address="127.0.0.1")
            started = True
        try:
            ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts users, with rate and ETA
            threads = max(1, round(self.cpus_per_actor))  # torch threads per actor: its CPU share, at least one
            shards = ray.data.from_items([{"shard": k} for k in todo], override_num_blocks=len(todo))
            out = shards.map_batches(
                ShardEmbedder, batch_size=1, num_cpus=self.cpus_per_actor,
                compute=ray.data.ActorPoolStrategy(size=max(1, min(self.actors, len(todo)))),
                fn_constructor_kwargs=dict(work=work.model_dump(), threads=threads))
            bar = progress_bar(total=_users_in(todo, pending, work.shard_users), unit="user", desc="embed (ray)",
                               disable=not progress)
            for row in out.iter_rows():
                bar.update(int(row["users"]))
            bar.close()
        finally:
            if started:
                ray.shutdown()
