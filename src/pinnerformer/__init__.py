"""pinnerformer: learn user representations from sequences of user actions, and rank with them.

    import pinnerformer as pf
    ds = pf.builtin_dataset("work/ml")
    pf.train(ds, "work/run")

The public names are `__all__` (pinnerformer/api.py, docs/api.md); they load on first use, so that the command line
and `import pinnerformer` stay quick.
"""

from pinnerformer.version import __version__

__all__ = [
    "__version__",
    "Dataset", "RankData", "ItemIndex", "Snapshot", "TrainConfig", "RankTrainConfig", "TrainSummary",
    "EvaluationReport", "RankingReport", "SnapshotManifest", "RankManifest", "BatchTopK", "PinnerformerError",
    "open_dataset", "builtin_dataset", "prepare_dataset", "train", "evaluate", "embed_day", "build_index",
    "open_index", "recommend", "recommend_all", "similar_items", "prepare_requests", "open_requests", "train_ranker",
    "evaluate_rankers", "score", "create_app",
]


def __getattr__(name: str):
    if name in __all__:
        from pinnerformer import api

        return getattr(api, name)
    raise AttributeError(f"module 'pinnerformer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
