"""Do bf16 score operands (what GPU training uses) change what the model learns? A controlled CPU experiment.

On GPU the loss's scores q·e come from a bf16 matmul under autocast: the query and item embeddings are rounded to
bf16 (8 bits of mantissa), products accumulate in fp32, and at 1/τ ≈ 14 a logit is off by up to ~0.03. This
script trains the same configuration twice on the CPU in fp32, identical in every respect (seed, batches,
negatives, dropout) except that the second run rounds q and the item embeddings to bf16 right before the score
products, as the tensor cores see them. It prints both runs' validation metric per epoch and the best epoch's,
beside the popularity baseline, the data fingerprint and the protocol.

    python bench/bf16_logits.py --dataset /tmp/ml1m --results bench/results/bf16-logits-ml1m

Both runs use the trainer's fused loss function eagerly (`sampled_softmax_loss_fused`, the one `compile` uses);
only its inputs differ. Selection is on validation users only, as in `pinnerformer train`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from pinnerformer.data import Dataset
from pinnerformer.objectives.sampled_softmax import sampled_softmax_loss_fused
from pinnerformer.training.config import load_config
from pinnerformer.io import atomic_path, write_json_atomic
from pinnerformer.training.retrieval import retrieval_loop


def bf16_operands(q, pos_e, neg_e, *args, **kw):
    """The fused loss with its score operands rounded to bf16 (gradients pass through the rounding unchanged, as
    through autocast's casts)."""
    r = lambda x: x.to(torch.bfloat16).to(x.dtype)  # noqa: E731
    return sampled_softmax_loss_fused(r(q), r(pos_e), r(neg_e), *args, **kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", type=Path, required=True, help="a prepared dataset directory")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--output", type=Path, help="keep both runs here (default: a temporary folder)")
    ap.add_argument("--results", type=Path, help="write result.json and curves.png (validation per epoch) here")
    args = ap.parse_args()

    ds = Dataset.open(args.dataset)
    cfg = load_config(args.preset, overrides={"device": "cpu"})
    root = args.output or Path(tempfile.mkdtemp())
    res = {"dataset": str(args.dataset), "fingerprint": ds.manifest.fingerprint, "preset": args.preset,
           "seed": cfg.seed, "runs": {}}
    for name, loss in (("fp32 operands", sampled_softmax_loss_fused), ("bf16 operands", bf16_operands)):
        tr = retrieval_loop(ds, cfg, root / name.replace(" ", "-"), log=lambda s: None)
        tr.task.objective.fused = loss
        print(f"training with {name} ...", file=sys.stderr)
        summary = tr.fit(progress=True)
        lines = [json.loads(l) for l in (tr.run_dir / "metrics.jsonl").read_text().splitlines()]
        res["protocol"], res["metric"] = tr.task.protocol, summary.metric
        res["runs"][name] = {"per_epoch": [round(l[summary.metric], 4) for l in lines if l["kind"] == "validation"],
                             "best_epoch": summary.best_epoch, "best": round(summary.best, 4),
                             "popularity": round(summary.popularity, 4), "steps": summary.steps,
                             "final_loss": round([l["loss"] for l in lines if l["kind"] == "step"][-1], 4)}
        print(f"{name}: {res['runs'][name]}", file=sys.stderr)
    print(json.dumps(res, indent=2))
    if args.results:
        args.results.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.results / "result.json", res)
        plot(res, args.results / "curves.png")


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for (name, run), style in zip(res["runs"].items(), ("-o", "--s")):
        ax.plot(range(len(run["per_epoch"])), run["per_epoch"], style, label=name)
    pop = next(iter(res["runs"].values()))["popularity"]
    ax.axhline(pop, color="grey", lw=1, ls=":", label="popularity")
    ax.set_xticks(range(max(len(r["per_epoch"]) for r in res["runs"].values())))
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation {res['metric']}")
    ax.set_title(f"{res['preset']} on {Path(res['dataset']).name} ({res['fingerprint']}), {res['protocol']}, "
                 f"seed {res['seed']}", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)


if __name__ == "__main__":
    main()
