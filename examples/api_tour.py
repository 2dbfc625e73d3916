"""A tour of the Python API on the built-in MovieLens data: prepare, train PinnerFormer, evaluate, embed a day,
index and recommend; then ranking requests, a ranker, its report and one scored request.

    python examples/api_tour.py WORKDIR          # a few minutes on a laptop CPU; the steps are kept short

Raise STEPS / RANK_STEPS for real models (the command line's defaults train to early stopping)."""

import datetime as dt
import sys
from pathlib import Path

import pinnerformer as pf

STEPS, RANK_STEPS = 40, 30  # short on purpose: a tour, not a result

work = Path(sys.argv[1] if len(sys.argv) > 1 else "api-tour")
ds = pf.builtin_dataset(work / "ml", overwrite=True)
print(f"{ds.manifest.n_users} users, {ds.manifest.n_items} items, {ds.manifest.n_events} events")

summary = pf.train(ds, work / "run", preset="small", config={"optim": {"max_epochs": 1}}, max_steps=STEPS)
print("trained:", summary.stopped_by, summary.metric, summary.best)

report = pf.evaluate(work / "run", ds)
print(f"recall@10: model {report.model['recall@10'].mean:.4f}, "
      f"most popular {report.results['most-popular']['recall@10'].mean:.4f}")

last_day = dt.datetime.fromtimestamp(ds.manifest.time_max, dt.timezone.utc).date().isoformat()
snapshot = pf.embed_day(work / "run", ds, last_day, work / "snapshots")
index = pf.build_index(work / "run", ds, work / "index", kind="flat")
user = snapshot.table["user_id"][0].as_py()
print(pf.recommend(index, snapshot, user=user, k=5))
everyone = pf.recommend_all(index, snapshot, work / "top10.parquet", k=10)  # every user of the day, one file
print(f"top-10 of {everyone.users} users: {everyone.rows} rows in {Path(everyone.output).name}")

rd = pf.prepare_requests(ds, work / "rank", pf_max_steps=STEPS)
pf.train_ranker(rd, work / "ranker", model="none", config={"optim": {"max_epochs": 1}}, max_steps=RANK_STEPS)
pf.train_ranker(rd, work / "trees", model="gbdt")
ranking = pf.evaluate_rankers({"ranker": work / "ranker", "trees": work / "trees"}, reference="trees")
head = rd.heads[0].name
for name in ("random", "popularity", "ranker", "trees"):
    m = ranking.models[name][f"hit@3/{head}"]
    print(f"{name:>10}  HIT@3/{head} {m.mean:.3f} [{m.ci95[0]:.3f}, {m.ci95[1]:.3f}]")

q = rd.requests_in("test")[0]
rows, _ = rd.candidate_rows([q])
item_ids, user_ids = ds.items["item_id"], ds.users["user_id"]
print(pf.score(work / "ranker", user=user_ids[int(rd.request_user[q])], time=int(rd.request_t[q]),
               items=[item_ids[int(i)] for i in rd.cand_item[rows]]))
