"""How much within-request signal a ranking data directory carries, by the evaluation's own code: the grouped AUC
and HIT@3 of simple scores per split and head — the PinnerFormer score (on training requests too: how much the
feature model remembers them), popularity (on training requests it counts their own labels: no signal there),
and on test "the candidate is among the user's last 100 actions" and "its category is" (counts of such actions).
Figures quoted in docs/results/README.md ("Why, as far as the data shows").

    python scripts/ranking_signal.py RANK_DIR
"""

from __future__ import annotations

import sys

import numpy as np

from pinnerformer.data.requests import RankData
from pinnerformer.evaluation.ranking import PerRequest, baseline_scores
from pinnerformer.features.rank_batch import sequence_arrays


def heuristic_scores(rd: RankData, requests: np.ndarray, seq_len: int = 100) -> dict[str, np.ndarray]:
    ds = rd.dataset()
    interests = [tuple(x) for x in ds.items["interests"].to_list()]
    rows, starts = rd.candidate_rows(requests)
    action, item, _ = sequence_arrays(ds.timelines, rd.request_user[requests], rd.seq_end[requests],
                                      rd.request_t[requests], seq_len)
    owner = np.repeat(np.arange(len(requests)), np.diff(starts))
    cand = rd.cand_item[rows]
    seen = [item[o][action[o] > 0] for o in range(len(requests))]
    same_item = np.array([(seen[o] == c).sum() for o, c in zip(owner, cand)], float)
    same_cat = np.array([sum(interests[int(x)] == interests[int(c)] for x in seen[o]) for o, c in zip(owner, cand)],
                        float)
    H = len(rd.heads)
    return {f"in the last {seq_len} actions": np.repeat(same_item[:, None], H, 1),
            "same category in the last actions": np.repeat(same_cat[:, None], H, 1)}


def main() -> None:
    rd = RankData(sys.argv[1])
    print(f"{rd.path} (fingerprint {rd.manifest.fingerprint}, feature_share {rd.manifest.options.feature_share})")
    for split in ("train", "test"):
        req = rd.requests_in(split)
        scores = {b: baseline_scores(b, rd, req) for b in ("pinnerformer", "popularity")}
        if split == "test":
            scores |= heuristic_scores(rd, req)
        for name, s in scores.items():
            m = PerRequest(s, rd, req).means()
            print(f"{split:5s} {name:36s} " + "  ".join(f"{k} {v:.3f}" for k, v in m.items()
                                                       if k.startswith("gauc") or k.startswith("hit")))


if __name__ == "__main__":
    main()
