"""The daily embedding job on Ray Data: the shards of a `DailyJob` as a dataset, `map_batches` over a pool of
actors that each hold the model once and run the very shard function of the local engine.

Each actor writes its part files into the job's staging directory (a shared file system on a real cluster)
and returns only counts, so no embedding travels through the object store and the driver's restart logic is
the local engine's. By default a local Ray cluster is started on loopback; `address` joins an existing one.
Ray is an optional extra: `pip install "pinnerformer[ray]"`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pinnerformer.errors import PinnerformerError
from pinnerformer.progress import progress_bar


class ShardEmbedder:
    """Ray Data callable class: built once per actor (loads dataset + model), then called per shard."""

    def __init__(self, run_dir: str, dataset_dir: str, checkpoint: str, staging: str, end_ts: int,
                 shard_users: int, batch_size: int, threads: int):
        import torch

        from pinnerformer.data.dataset import Dataset
        from pinnerformer.evaluation.evaluate import load_run

        torch.set_num_threads(threads)
        self.ds = Dataset.open(dataset_dir)
        self.model, _ = load_run(Path(run_dir), self.ds, checkpoint)
        self.staging = Path(staging)
        self.pending = np.load(self.staging / "pending.npy")
        self.end_ts, self.shard_users, self.batch_size = end_ts, shard_users, batch_size

    def __call__(self, batch: dict) -> dict:
        from pinnerformer.inference.daily_embed import run_shard, shard_of

        done = []
        for k in batch["shard"]:
            k = int(k)
            users = shard_of(self.pending, k, self.shard_users)
            done.append(run_shard(self.model, self.ds, self.staging, k, users, self.end_ts, self.batch_size))
        return {"shard": np.asarray(batch["shard"]), "users": np.array(done, dtype=np.int64)}


def run_shards_on_ray(job, todo: list[int], pending: np.ndarray, address: str | None = None, actors: int = 2,
                      cpus_per_actor: float = 0.5, progress: bool = True) -> None:
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
        if address:
            try:
                ray.init(address=address, log_to_driver=False)
            except (ConnectionError, RuntimeError) as e:
                raise PinnerformerError(
                    f"could not join the Ray cluster at {address}: {str(e).splitlines()[0]} (is it running? a "
                    "cluster started with `ray start` uses token authentication: set RAY_AUTH_MODE=token, with "
                    "the token in ~/.ray/auth_token or RAY_AUTH_TOKEN; see scripts/ray_cluster.sh)") from None
        else:
            ray.init(num_cpus=max(1, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
                     _node_ip_address="127.0.0.1")
        started = True
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # ours below counts users, with rate and ETA
        threads = max(1, round(cpus_per_actor))  # torch threads per actor: its CPU share, at least one
        shards = ray.data.from_items([{"shard": k} for k in todo], override_num_blocks=len(todo))
        out = shards.map_batches(
            ShardEmbedder, batch_size=1, num_cpus=cpus_per_actor,
            compute=ray.data.ActorPoolStrategy(size=max(1, min(actors, len(todo)))),
            fn_constructor_kwargs=dict(run_dir=str(Path(job.run_dir).resolve()), dataset_dir=str(Path(job.ds.path).resolve()),
                                       checkpoint=job.checkpoint, staging=str(job.staging.resolve()),
                                       end_ts=int(job.end_ts), shard_users=job.shard_users,
                                       batch_size=job.batch_size, threads=threads))
        from pinnerformer.inference.daily_embed import shard_of

        total = sum(len(shard_of(pending, k, job.shard_users)) for k in todo)
        bar = progress_bar(total=total, unit="user", desc="embed (ray)", disable=not progress)
        for row in out.iter_rows():
            bar.update(int(row["users"]))
        bar.close()
    finally:
        if started:
            ray.shutdown()
