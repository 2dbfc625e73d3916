"""Does a network carry signal the trees lack? A trained network ranker and the trees (`rank train --model gbdt`) on
the same ranking data, blended per head in logit space, w · logit(network) + (1 − w) · logit(trees), with w chosen
on the validation requests' HIT@3 (grid 0, 0.1, …, 1; ties to the smaller w, i.e. toward the trees), then scored
once on test with paired-bootstrap lifts over the trees alone — by `rank evaluate`'s own scoring and metrics.

If the two models made different errors, a blend would rise above both; if it does not, the network and the trees
read the same signal, and no reweighting of the two can put the network ahead. Figures quoted in
docs/results/ranking-features-ml1m/README.md (seventh step).

    python scripts/ranking_blend.py RANK_DIR NETWORK_RUN GBDT_RUN
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from pinnerformer.data.requests import RankData
from pinnerformer.evaluation import ranking_metrics as rm
from pinnerformer.evaluation.ranking import PerRequest
from pinnerformer.ranking.evaluate import evaluate_ranking

GRID = np.round(np.linspace(0, 1, 11), 2)


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p.astype(np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def blended(net: np.ndarray, trees: np.ndarray, w: np.ndarray) -> np.ndarray:
    """[rows, heads] probabilities of the per-head blend (w: [heads])."""
    return (1 / (1 + np.exp(-(w * logit(net) + (1 - w) * logit(trees))))).astype(np.float32)


def main() -> None:
    if len(sys.argv) != 4:
        sys.exit(__doc__.rsplit("\n\n", 1)[-1].strip())
    rd = RankData(Path(sys.argv[1]))
    runs = {"network": Path(sys.argv[2]), "trees": Path(sys.argv[3])}
    scored = {split: evaluate_ranking(rd, runs, split=split, baselines=[], n_boot=10, log=lambda *a: None)[1]
              for split in ("validation", "test")}
    heads = [h.name for h in rd.heads]
    hit = [rm.metric_key(rm.HIT, h, 3) for h in heads]
    # per head, the validation HIT@3 of every w (each head's ranking reads its own column only)
    val_reqs = rd.requests_in("validation")
    val = scored["validation"]
    curve = np.array([[PerRequest(blended(val["network"].scores, val["trees"].scores, np.full(len(heads), w)), rd,
                                  val_reqs).means()[k] for k in hit] for w in GRID])  # [grid, heads]
    w = GRID[np.argmax(curve >= curve.max(0) - 1e-12, axis=0)]  # first w at the maximum: ties to the trees
    test_reqs = rd.requests_in("test")
    test = scored["test"]
    draws = rm.bootstrap_draws(len(test_reqs), 1000, 0)
    rows = {"network alone (w = 1)": test["network"],
            "blend, w chosen on validation": PerRequest(blended(test["network"].scores, test["trees"].scores, w), rd,
                                                        test_reqs)}
    print(f"{rd.path}: {len(val_reqs):,} validation and {len(test_reqs):,} test requests; data fingerprint "
          f"{rd.manifest.fingerprint}")
    print("\nvalidation HIT@3 per w (rows) and head (columns):\n")
    print("| w | " + " | ".join(heads) + " |\n" + "|---" * (len(heads) + 1) + "|")
    for g, vals in zip(GRID, curve):
        print(f"| {g:.1f} | " + " | ".join(f"{v:.4f}" for v in vals) + " |")
    print("\nchosen w per head: " + ", ".join(f"{h} {x:.1f}" for h, x in zip(heads, w)))
    print("\ntest HIT@3, lift over the trees alone (paired bootstrap 95%, 1,000 draws over requests):\n")
    print("| model | " + " | ".join(heads) + " |\n" + "|---" * (len(heads) + 1) + "|")
    means = test["trees"].means()
    print("| trees alone (w = 0) | " + " | ".join(f"{means[k]:.4f}" for k in hit) + " |")
    for name, p in rows.items():
        lifts, m = p.lifts(test["trees"], draws), p.means()
        print(f"| {name} | " + " | ".join(f"{m[k]:.4f} ({100 * lifts[k].lift:+.1f}% [{100 * lifts[k].ci95[0]:+.1f}, "
                                            f"{100 * lifts[k].ci95[1]:+.1f}])" for k in hit) + " |")


if __name__ == "__main__":
    main()
