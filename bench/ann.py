"""ANN retrieval benchmark: FAISS HNSW and IVF against exact search on 1M item vectors.

Data (seeded): unit vectors of dimension d shaped like real embeddings — a mixture of C clusters on the sphere
(centre uniform on the sphere, member = normalise(centre + noise), noise per coordinate sigma/sqrt(d) so every
member sits at cosine ~1/sqrt(1+sigma^2) from its centre), queries drawn fresh from the same mixture. Uniform
random unit vectors are reported too, for reference: with no structure every point is nearly equidistant
from every other, the pathological case for every ANN method.

For each index: build time, then per search setting the recall@k against exact inner-product search and the
queries per second of batched search with T threads (the whole query set in one call).

    python bench/ann.py                                # 1M x 256, clustered + uniform, 2 threads
    python bench/ann.py --n 100000 --data clustered    # quicker
Writes a JSON (and a PNG of recall vs QPS) to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from pinnerformer.progress import progress_bar


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(n: int, d: int, clusters: int, sigma: float, rng: np.random.Generator, centres=None, chunk=100_000):
    centres = unit(rng.standard_normal((clusters, d)).astype(np.float32)) if centres is None else centres
    out = np.empty((n, d), dtype=np.float32)
    for i in range(0, n, chunk):
        m = min(chunk, n - i)
        c = rng.integers(0, clusters, m)
        out[i:i + m] = unit(centres[c] + rng.standard_normal((m, d)).astype(np.float32) * (sigma / np.sqrt(d)))
    return out, centres


def uniform(n: int, d: int, rng: np.random.Generator, chunk=100_000) -> np.ndarray:
    out = np.empty((n, d), dtype=np.float32)
    for i in range(0, n, chunk):
        m = min(chunk, n - i)
        out[i:i + m] = unit(rng.standard_normal((m, d)).astype(np.float32))
    return out


def timed_search(index, q: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    index.search(q[:100], k)  # warm caches
    t = time.perf_counter()
    _, ids = index.search(q, k)
    return ids, len(q) / (time.perf_counter() - t)


def run_one(name: str, x: np.ndarray, q: np.ndarray, k: int, args, log) -> list[dict]:
    import faiss

    from pinnerformer.retrieval.index import build_faiss_index, recall_vs_exact

    results = []
    t = time.perf_counter()
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    exact, qps = timed_search(flat, q, k)
    results.append({"data": name, "index": "flat (exact)", "params": {}, "build_s": round(time.perf_counter() - t, 2),
                    "recall": 1.0, "qps": round(qps, 1)})
    log(f"{name}: exact search {qps:,.0f} QPS")
    del flat

    # HNSW: the library's own builder, as `pinnerformer index` uses it
    t = time.perf_counter()
    bar = progress_bar(total=len(x), unit="vec", desc=f"{name}: HNSW build")
    hnsw, _ = build_faiss_index(x, "hnsw", {"M": args.hnsw_m, "ef_construction": args.ef_construction},
                                on_added=bar.update)
    bar.close()
    build = time.perf_counter() - t
    for ef in args.ef_search:
        hnsw.hnsw.efSearch = ef
        ids, qps = timed_search(hnsw, q, k)
        r = recall_vs_exact(ids, exact)
        results.append({"data": name, "index": "hnsw", "params": {"M": args.hnsw_m, "ef_construction": args.ef_construction,
                                                                  "ef_search": ef},
                        "build_s": round(build, 1), "recall": round(r, 4), "qps": round(qps, 1)})
        log(f"{name}: HNSW M={args.hnsw_m} efC={args.ef_construction} efSearch={ef}: recall@{k} {r:.4f}, "
            f"{qps:,.0f} QPS (build {build:.0f}s)")
    del hnsw

    # IVF-Flat: k-means on 64 vectors per cell (FAISS's own guidance is 39-256)
    t = time.perf_counter()
    nlist = args.nlist or int(4 * np.sqrt(len(x)))
    ivf, _ = build_faiss_index(x, "ivf", {"nlist": nlist}, seed=0, train_size=64 * nlist)
    build = time.perf_counter() - t
    for nprobe in args.nprobe:
        ivf.nprobe = nprobe
        ids, qps = timed_search(ivf, q, k)
        r = recall_vs_exact(ids, exact)
        results.append({"data": name, "index": "ivf", "params": {"nlist": nlist, "nprobe": nprobe},
                        "build_s": round(build, 1), "recall": round(r, 4), "qps": round(qps, 1)})
        log(f"{name}: IVF nlist={nlist} nprobe={nprobe}: recall@{k} {r:.4f}, {qps:,.0f} QPS (build {build:.0f}s)")
    return results


def plot(results: list[dict], path: Path, k: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datas = sorted({r["data"] for r in results})
    fig, axes = plt.subplots(1, len(datas), figsize=(6 * len(datas), 4.5), squeeze=False)
    for ax, name in zip(axes[0], datas):
        for kind, marker in (("hnsw", "o"), ("ivf", "s")):
            pts = [r for r in results if r["data"] == name and r["index"] == kind]
            ax.plot([p["recall"] for p in pts], [p["qps"] for p in pts], marker=marker, label=kind)
        ex = [r for r in results if r["data"] == name and r["index"].startswith("flat")][0]
        ax.axhline(ex["qps"], color="gray", ls=":", label="exact")
        ax.axvline(0.95, color="red", ls="--", lw=0.8)
        ax.axhline(2000, color="red", ls="--", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel(f"recall@{k} vs exact")
        ax.set_ylabel("queries / s")
        ax.set_title(name)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--sigma", type=float, default=1.0, help="cluster spread (see the module docstring)")
    ap.add_argument("--queries", type=int, default=5000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", default="clustered,uniform")
    ap.add_argument("--hnsw-m", type=int, default=32)
    ap.add_argument("--ef-construction", type=int, default=80)
    ap.add_argument("--ef-search", default="16,32,64,128,256")
    ap.add_argument("--nlist", type=int, default=None)
    ap.add_argument("--nprobe", default="8,16,32,64,128")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench/results/ann"))
    args = ap.parse_args()
    args.ef_search = [int(v) for v in args.ef_search.split(",")]
    args.nprobe = [int(v) for v in args.nprobe.split(",")]
    import faiss

    faiss.omp_set_num_threads(args.threads)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    results = []
    for name in args.data.split(","):
        rng = np.random.default_rng(args.seed)
        if name == "clustered":
            x, centres = clustered(args.n, args.dim, args.clusters, args.sigma, rng)
            q, _ = clustered(args.queries, args.dim, args.clusters, args.sigma, rng, centres)
        elif name == "uniform":
            x, q = uniform(args.n, args.dim, rng), uniform(args.queries, args.dim, rng)
        else:
            raise SystemExit(f"--data: unknown kind {name!r} (clustered, uniform)")
        log(f"{name}: {args.n:,} x {args.dim} items, {args.queries:,} queries")
        results += run_one(name, x, q, args.k, args, log)
    out = {"command": " ".join(sys.argv), "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
           "threads": args.threads, "faiss": faiss.__version__, "n": args.n, "dim": args.dim, "clusters": args.clusters,
           "sigma": args.sigma, "queries": args.queries, "k": args.k, "date": time.strftime("%Y-%m-%d"),
           "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ann.json").write_text(json.dumps(out, indent=2) + "\n")
    plot(results, args.out / "ann.png", args.k)
    log(f"wrote {args.out / 'ann.json'} and {args.out / 'ann.png'}")


if __name__ == "__main__":
    main()
