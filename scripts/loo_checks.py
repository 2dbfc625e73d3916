"""After-the-fact checks on Beauty's leave-one-out split quoted in docs/results/README.md (fifth round). None of them
chose anything: selection is by validation only.

    python scripts/loo_checks.py targets                 how cold validation and test targets are (training counts)
    python scripts/loo_checks.py combine RUN RUN [...]   test NDCG@10 (history removed) of runs combined after the
                                                         fact: the sum of their scores (vectors / τ concatenated)
    python scripts/loo_checks.py transitions RUN         validation NDCG@10 of RUN's scores blended with a
                                                         first-order transition model (item -> next item counts)
    python scripts/loo_checks.py coldness RUN [...]      validation and test NDCG@10 (history removed) of each run
                                                         by how often the target occurs in training (sixth round)
    python scripts/loo_checks.py members RUN              validation and test NDCG@10 (history removed) of each of
                                                         an ensemble's members alone, and of the ensemble (seventh)
    python scripts/loo_checks.py knn [JSON ...]          validation NDCG@10 (history removed) of the item-to-item
                                                         neighbours alone (models/item_knn.py), for each setting
                                                         given as a JSON object of ItemKNNConfig fields (eighth
                                                         round; none: the defaults)
    python scripts/loo_checks.py blend RUN               validation and test NDCG@10 (history removed) of RUN's
                                                         network blended with the neighbours at every λ of the
                                                         grid, and of each part alone (eighth round; the test
                                                         column is read after the fact, selection is validation's)
    python scripts/loo_checks.py window                  the share of the training actions that the newest M of
                                                         each timeline holds, for M = 50 and 200, and the M that
                                                         `data.max_len_cap: 200` fits (tenth round)
    python scripts/loo_checks.py ease RUN                validation NDCG@10 (history removed) of EASE (Steck, "Embarrassingly
                                                         shallow autoencoders", WWW 2019) alone, and as a third part
                                                         of RUN's blend with the neighbours, RUN's λ kept
                                                         (fourteenth round: a teacher of another family)
    python scripts/loo_checks.py repeats                 validation and test NDCG@10 with the history in the
                                                         ranking of "the user's own items, newest first" (each
                                                         occurrence weighs decay^age) beside the neighbours alone
                                                         (eighteenth round, Taobao: --dataset $WORK/taobao-loo)
Options: --dataset (default /tmp/pinnerformer-beauty, prepared by scripts/scout_loo.sh).
"""

from __future__ import annotations

import argparse

import numpy as np
import scipy.sparse as sp
import torch

from pinnerformer.data.dataset import Dataset
from pinnerformer.evaluation.protocols import REPORTED
from pinnerformer.evaluation.scorer import Scorer, score_task
from pinnerformer.evaluation.tasks import leave_one_out_task
from pinnerformer.models.embedding import embed_items, embed_users
from pinnerformer.models.pinnerformer import members_of
from pinnerformer.runs.run_dir import RunDir
from pinnerformer.training.config import load_config
from pinnerformer.training.retrieval import fitted_max_len, training_length_quantile

CPU = torch.device("cpu")


def training_counts(ds: Dataset) -> np.ndarray:
    """How often each item occurs in the users' training parts (all but the last two items)."""
    tl = ds.timelines
    parts = [tl.item[tl.offsets[u]:tl.offsets[u + 1] - 2] for u in range(tl.n_users)]
    return np.bincount(np.concatenate(parts), minlength=ds.manifest.n_items)


def targets(ds: Dataset) -> None:
    counts = training_counts(ds)
    for split in ("validation", "test"):
        c = counts[np.array([lab[0] for lab in leave_one_out_task(ds, split).labels])]
        print(f"{split}: median training count {np.median(c):g}, {np.mean(c < 5):.1%} of targets seen < 5 times")


def scaled_vectors(run: str, ds: Dataset, task) -> tuple[torch.Tensor, torch.Tensor]:
    """A run's user vectors / τ and item vectors: their inner product is the run's score."""
    model = RunDir(run).load_model(ds)
    users = embed_users(model, ds.timelines, task.starts, task.ends, CPU) / model.temperature.detach()
    return users, embed_items(model, CPU)


def combine(ds: Dataset, runs: list[str]) -> None:
    task = leave_one_out_task(ds, "test")
    pairs = [scaled_vectors(r, ds, task) for r in runs]
    for r, (u, v) in zip(runs, pairs):
        res, _ = score_task(task, Scorer(r, u, v), 10, REPORTED["leave-one-out"], history=ds.timelines)
        print(f"{r}: test ndcg@10 {res['ndcg@10'].mean:.4f}")
    u, v = torch.cat([p[0] for p in pairs], 1), torch.cat([p[1] for p in pairs], 1)
    res, _ = score_task(task, Scorer("combined", u, v), 10, REPORTED["leave-one-out"], history=ds.timelines)
    print(f"combined: test ndcg@10 {res['ndcg@10'].mean:.4f}")


def transitions(ds: Dataset, run: str, weights=(0.0, 0.5, 1.0, 2.0, 4.0, 8.0)) -> None:
    """Validation NDCG@10 (history removed, ties pessimistic) of z(model score) + w · P(next = j | newest item)."""
    tl, n = ds.timelines, ds.manifest.n_items
    src, dst = [], []
    for u in range(tl.n_users):
        it = tl.item[tl.offsets[u]:tl.offsets[u + 1] - 2]
        src.append(it[:-1])
        dst.append(it[1:])
    counts = sp.csr_matrix((np.ones(sum(map(len, src)), np.float32), (np.concatenate(src), np.concatenate(dst))),
                           shape=(n, n))
    P = sp.diags(1 / np.maximum(1, np.asarray(counts.sum(1)).ravel())) @ counts
    task = leave_one_out_task(ds, "validation")
    users, items = scaled_vectors(run, ds, task)
    gains = {w: [] for w in weights}
    for a in range(0, len(task.users), 2000):
        rows = np.arange(a, min(a + 2000, len(task.users)))
        s = (users[rows] @ items.T).numpy()
        z = (s - s.mean(1, keepdims=True)) / s.std(1, keepdims=True)
        trans = P[tl.item[task.ends[rows] - 1]].toarray()
        for w in weights:
            blended = z + w * trans
            for j, r in enumerate(rows):
                row = blended[j]
                label = task.labels[r][0]
                t = row[label]
                row[tl.item[task.starts[r]:task.ends[r]]] = -np.inf
                rank = int((row >= t).sum()) - 1  # pessimistic: ties rank above the label
                gains[w].append(1 / np.log2(rank + 2) if rank < 10 else 0.0)
    for w, g in gains.items():
        print(f"weight {w:g}: validation ndcg@10 {np.mean(g):.4f}")


COLD_BUCKETS = ((0, 5), (5, 15), (15, 10**9))  # training occurrences of the target: < 5, 5-14, 15 and more


def coldness(ds: Dataset, runs: list[str]) -> None:
    """NDCG@10 (history removed, ties pessimistic) per bucket of the target's training count, both splits."""
    counts = training_counts(ds)
    for split in ("validation", "test"):
        task = leave_one_out_task(ds, split)
        c = counts[np.array([lab[0] for lab in task.labels])]
        shares = ", ".join(f"{lo}-{min(hi, 10**4) - 1}: {np.mean((c >= lo) & (c < hi)):.0%}" for lo, hi in COLD_BUCKETS)
        print(f"{split} (targets by training count: {shares})")
        for r in runs:
            model = RunDir(r).load_model(ds)
            users = embed_users(model, ds.timelines, task.starts, task.ends, CPU)
            res, ranked = score_task(task, Scorer(r, users, embed_items(model, CPU)), 10, REPORTED["leave-one-out"],
                                     history=ds.timelines, intervals=False)
            rank = np.array([row[0] for row in ranked.ranks])  # one label per row
            ndcg = np.where(rank < 10, 1 / np.log2(rank + 2), 0.0)
            assert abs(ndcg.mean() - res["ndcg@10"].mean) < 1e-9, "the buckets must add up to the scorer's number"
            cells = "  ".join(f"{ndcg[(c >= lo) & (c < hi)].mean():.4f}" for lo, hi in COLD_BUCKETS)
            print(f"  {r}: all {ndcg.mean():.4f}  by bucket {cells}")


def members(ds: Dataset, run: str) -> None:
    """Each member of an ensemble run scored alone (its own cosine ranking), then the ensemble as it is scored."""
    model = RunDir(run).load_model(ds)
    for split in ("validation", "test"):
        task = leave_one_out_task(ds, split)
        cells = []
        for name, m in [(f"member {k}", m) for k, m in enumerate(members_of(model))] + [("ensemble", model)]:
            users = embed_users(m, ds.timelines, task.starts, task.ends, CPU)
            res, _ = score_task(task, Scorer(name, users, embed_items(m, CPU)), 10, REPORTED["leave-one-out"],
                                history=ds.timelines, intervals=False)
            cells.append(f"{name} {res['ndcg@10'].mean:.4f}")
        print(f"{split}: " + ", ".join(cells))


def knn(ds: Dataset, settings: list[str]) -> None:
    import json

    from pinnerformer.evaluation.blend import fit_knn
    from pinnerformer.models.item_knn import ItemKNNConfig

    task = leave_one_out_task(ds, "validation")
    for text in settings or ["{}"]:
        cfg = ItemKNNConfig(**json.loads(text))
        neighbours = fit_knn(ds, cfg)
        res, _ = score_task(task, Scorer("knn", None, None, rows_fn=lambda rows: neighbours.scores(
            ds.timelines, task.starts[rows], task.ends[rows])), 10, REPORTED["leave-one-out"], history=ds.timelines,
            intervals=False)
        print(f"{text}: validation ndcg@10 {res['ndcg@10'].mean:.4f}, hr@10 {res['hr@10'].mean:.4f}")


def blend(ds: Dataset, run: str) -> None:
    from pinnerformer.evaluation.blend import Blend, BlendConfig, fit_knn

    rd = RunDir(run)
    model, cfg = rd.load_model(ds), BlendConfig()
    neighbours = fit_knn(ds, cfg.knn)
    for split in ("validation", "test"):
        task = leave_one_out_task(ds, split)
        parts = Blend(model, ds, task, neighbours)
        cells = []
        for name, scorer in [("network", parts.network()), ("knn", parts.neighbours())] + [
                (f"λ {w:g}", parts.scorer("blend", w)) for w in cfg.weights]:
            res, _ = score_task(task, scorer, 10, REPORTED["leave-one-out"], history=ds.timelines, intervals=False)
            cells.append(f"{name} {res['ndcg@10'].mean:.4f}")
        print(f"{split}: " + ", ".join(cells), flush=True)


def ease(ds: Dataset, run: str, lambdas=(30.0, 100.0, 400.0), mixes=((0.1, 0.1), (0.2, 0.1), (0.2, 0.2), (0.3, 0.1))
         ) -> None:
    """EASE's item-item weights B = I - P / diag(P), P = (XᵀX + λI)⁻¹ (zero diagonal), X the users' training items
    (binary); a user's scores x_u B. Blended as a third distribution: (1 - a - b) p_network + a knn + b ease, each
    part normalised per user (EASE's negative scores clipped at 0). Dense [I, I]: catalogues up to a few 10⁴ items."""
    from pinnerformer.data.timelines import TimelineView
    from pinnerformer.evaluation.blend import Blend, fit_knn
    from pinnerformer.models.item_knn import positive_events
    from pinnerformer.runs.evaluate import blend_choice

    n, tl = ds.manifest.n_items, ds.timelines
    task = leave_one_out_task(ds, "validation")

    def items_of(view: TimelineView) -> sp.csr_matrix:
        """[rows, items] 1 where the row's view holds a positive action on the item."""
        u, i = positive_events(view, ds.manifest.positive_codes)
        return sp.csr_matrix((np.ones(len(u), np.float32), (u, i)), shape=(len(view.start), n)).sign()

    def inputs(rows: slice) -> sp.csr_matrix:
        return items_of(TimelineView(tl, np.asarray(task.starts[rows], np.int64), np.asarray(task.ends[rows], np.int64)))

    def ndcg(rows_fn) -> float:
        res, _ = score_task(task, Scorer("s", None, None, rows_fn=rows_fn), 10, REPORTED["leave-one-out"],
                            history=tl, intervals=False)
        return res["ndcg@10"].mean

    x = items_of(tl.drop_last(2))  # the training parts
    gram = (x.T @ x).toarray().astype(np.float64)
    best, weights = -1.0, None
    for lam in lambdas:
        g = gram.copy()
        g[np.diag_indices(n)] += lam
        p = np.linalg.inv(g)
        b = (-p / np.diag(p)[None, :]).astype(np.float32)
        b[np.diag_indices(n)] = 0.0
        del g, p
        got = ndcg(lambda rows, b=b: torch.from_numpy(np.asarray(inputs(rows) @ b, np.float32)))
        print(f"EASE λ {lam:g} alone: validation ndcg@10 {got:.4f}", flush=True)
        if got > best:
            best, weights = got, b
    rd = RunDir(run)
    model, cfg = rd.load_model(ds), rd.config.blend
    parts = Blend(model, ds, task, fit_knn(ds, cfg.knn))
    # the λ chosen with the history removed (as scored here); kept in the run folder when it belongs to this checkpoint
    lam_run = blend_choice(rd, ds, model, "best", cfg, exclude_history=True).weight

    def normalised(v: torch.Tensor) -> torch.Tensor:
        v = v.double().clamp(min=0)
        return v / v.sum(1, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)

    def mixture(a: float, c: float):
        def rows_fn(rows: slice) -> torch.Tensor:
            p = torch.softmax((parts.users[rows] @ parts.items.T / parts.tau).double(), 1)
            e = normalised(torch.from_numpy(np.asarray(inputs(rows) @ weights, np.float32)))
            return torch.log((1 - a - c) * p + a * normalised(parts.knn_scores(rows)) + c * e)
        return rows_fn

    run_blend, _ = score_task(task, parts.scorer("blend", lam_run), 10, REPORTED["leave-one-out"], history=tl,
                              intervals=False)
    print(f"the run's blend (neighbours {lam_run:g}, no EASE): validation ndcg@10 {run_blend['ndcg@10'].mean:.4f}")
    for a, c in mixes:
        print(f"neighbours {a:g}, EASE {c:g}: validation ndcg@10 {ndcg(mixture(a, c)):.4f}", flush=True)


def repeats(ds: Dataset, decays=(0.5, 0.8, 0.95)) -> None:
    from pinnerformer.evaluation.blend import BlendConfig, fit_knn

    tl, n_items = ds.timelines, ds.manifest.n_items
    neighbours = fit_knn(ds, BlendConfig().knn)
    for split in ("validation", "test"):
        task = leave_one_out_task(ds, split)

        def own_items(rows: slice, decay: float) -> torch.Tensor:
            out = np.zeros((rows.stop - rows.start, n_items))
            for r, (s, e) in enumerate(zip(task.starts[rows], task.ends[rows])):
                np.add.at(out[r], np.asarray(tl.item[s:e]), decay ** np.arange(e - s)[::-1])
            return torch.from_numpy(out)

        scorers = [(f"own items, decay {d:g}", Scorer("own", None, None, rows_fn=lambda rows, d=d: own_items(rows, d)))
                   for d in decays] + [("neighbours", Scorer("knn", None, None, rows_fn=lambda rows: neighbours.scores(
                       tl, task.starts[rows], task.ends[rows])))]
        cells = []
        for name, scorer in scorers:
            res, _ = score_task(task, scorer, 10, REPORTED["leave-one-out"], history=None, intervals=False)
            cells.append(f"{name} {res['ndcg@10'].mean:.4f}")
        print(f"{split}, history in: " + ", ".join(cells), flush=True)


def window(ds: Dataset) -> None:
    lengths = np.maximum(ds.timelines.lengths - 2, 0)  # the training parts (all but the last two items)
    for m in (50, 200):
        print(f"M = {m}: {np.minimum(lengths, m).sum() / lengths.sum():.1%} of the training actions")
    loo = load_config("loo")
    print(f"90th percentile of the training lengths: {training_length_quantile(loo, ds)}; "
          f"data.max_len_cap {loo.data.max_len_cap} fits M = {fitted_max_len(loo, ds).data.max_len}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("check", choices=["targets", "combine", "transitions", "coldness", "members", "knn", "blend",
                                     "window", "ease", "repeats"])
    ap.add_argument("runs", nargs="*")
    ap.add_argument("--dataset", default="/tmp/pinnerformer-beauty")
    a = ap.parse_args()
    ds = Dataset.open(a.dataset)
    if a.check == "targets":
        targets(ds)
    elif a.check == "window":
        window(ds)
    elif a.check == "repeats":
        repeats(ds)
    elif a.check == "coldness":
        if not a.runs:
            ap.error("coldness needs one or more run directories")
        coldness(ds, a.runs)
    elif a.check == "members":
        if len(a.runs) != 1:
            ap.error("members needs one ensemble run directory")
        members(ds, a.runs[0])
    elif a.check == "knn":
        knn(ds, a.runs)
    elif a.check == "blend":
        if len(a.runs) != 1:
            ap.error("blend needs one run directory")
        blend(ds, a.runs[0])
    elif a.check == "ease":
        if len(a.runs) != 1:
            ap.error("ease needs one run directory (with its blend.json)")
        ease(ds, a.runs[0])
    elif a.check == "combine":
        if len(a.runs) < 2:
            ap.error("combine needs two or more run directories")
        combine(ds, a.runs)
    else:
        if len(a.runs) != 1:
            ap.error("transitions needs one run directory")
        transitions(ds, a.runs[0])


if __name__ == "__main__":
    main()
