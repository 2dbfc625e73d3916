"""Distributed training on torchrun (2 processes, gloo, CPU): one step on 2 ranks × B/2 equals one process on B (loss,
parameters after the update, sketch), 20 steps give the single process's metrics, and a rank killed in the middle
ends the job with a message, after which --resume continues to the same result."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import TINY

# dropout off: N ranks draw other dropout masks than one process (equal in distribution, not bit for bit)
CONFIG = {**TINY, "model": {**TINY["model"], "dropout": 0.0}, "device": "cpu",
          "optim": {**TINY["optim"], "batch_size": 32, "max_epochs": 2}, "loss": {"n_random": 64, "negatives": "mixed"},
          "checkpoint_every": 5}
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                                   str(Path(__file__).resolve().parents[1])]),
       "OMP_NUM_THREADS": "1"}


def torchrun(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *args],
                          env=env or ENV, capture_output=True, text=True, timeout=timeout)


def test_one_step_on_two_ranks_equals_one_process_on_the_whole_batch(planted, tmp_path):
    from pinnerformer.data.dataset import Dataset
    from pinnerformer.training.config import load_config
    from pinnerformer.training.loop import TrainingLoop
    from pinnerformer.training.retrieval import RetrievalTask

    (tmp_path / "c.json").write_text(json.dumps(CONFIG))
    r = torchrun(str(Path(__file__).with_name("dist_step.py")), "retrieval", str(planted), str(tmp_path / "c.json"),
                 str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{k}.pt", weights_only=False) for k in range(2)]

    cfg = load_config("small", overrides=CONFIG)
    torch.set_num_threads(1)
    task = RetrievalTask(Dataset.open(planted), cfg)
    loop = TrainingLoop(task, cfg, tmp_path / "single", log=lambda s: None)
    step = loop.train_step(task.host_batch(0, 0), 0, 0)
    loss = step.read()[0]
    assert ranks[0]["counts"] == ranks[1]["counts"] == step.counts  # the whole batch's queries, summed
    for rk in ranks:
        assert abs(rk["loss"] - loss) < 1e-5
        for name, p in task.model.state_dict().items():
            torch.testing.assert_close(rk["params"][name], p, atol=1e-5, rtol=1e-5, msg=name)
        assert torch.equal(rk["task"]["sketch"]["table"], task.objective.sketch.state_dict()["table"])
    for name in ranks[0]["params"]:  # the replicas stay identical
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), name


def test_the_ranker_one_step_on_two_ranks_equals_one_process(tmp_path):
    """The ranker under the same wrapper: each rank scores its share of the batch's rows."""
    import numpy as np
    import polars as pl

    from pinnerformer.data.dataset import Dataset, set_content_vectors
    from pinnerformer.data.requests import RankData, RequestOptions, parse_heads
    from pinnerformer.data.synthetic import planted_request_log
    from pinnerformer.ranking.prepare import prepare_ranking
    from pinnerformer.training.loop import TrainingLoop
    from pinnerformer.training.ranking import RankingTask, load_rank_config
    from tests.conftest import run_cli

    planted_request_log(n_users=80, days=8).write_csv(tmp_path / "log.csv")
    assert run_cli("data", "prepare", "-f", "events", "-i", tmp_path / "log.csv", "-o", tmp_path / "ds",
                   "--action-col", "action", "--positive", "click,save").exit_code == 0
    ids = Dataset.open(tmp_path / "ds").items["item_id"].cast(pl.Int64).to_numpy()
    set_content_vectors(tmp_path / "ds", np.eye(8, dtype=np.float32)[ids % 8], "groups")
    ds = Dataset.open(tmp_path / "ds")
    opts = RequestOptions(request="session", heads=parse_heads("save=save", ds.manifest.action_names()))
    prepare_ranking(tmp_path / "ds", tmp_path / "rank", opts, pf_max_steps=3, log=lambda s: None)
    config = {"device": "cpu", "dropout": 0.0, "optim": {"batch_size": 64, "warmup_steps": 2},
              "data": {"epoch_rows": 640, "max_val_requests": 20},
              "model": {"transact": {"seq_len": 8, "dropout": 0.0, "time_window_hours": 0.0}, "mlp": [16],
                        "dropout": 0.0}}
    config.pop("dropout")
    (tmp_path / "c.json").write_text(json.dumps(config))
    r = torchrun(str(Path(__file__).with_name("dist_step.py")), "ranking", str(tmp_path / "rank"),
                 str(tmp_path / "c.json"), str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{k}.pt", weights_only=False) for k in range(2)]
    torch.set_num_threads(1)
    task = RankingTask(RankData(tmp_path / "rank"), load_rank_config("default", overrides=config))
    step = TrainingLoop(task, task.cfg, tmp_path / "single", log=lambda s: None).train_step(task.host_batch(0, 0), 0, 0)
    assert ranks[0]["counts"]["rows"] == step.counts["rows"] == 64
    for rk in ranks:
        assert abs(rk["loss"] - step.read()[0]) < 1e-5
        for name, p in task.model.state_dict().items():
            torch.testing.assert_close(rk["params"][name], p, atol=1e-5, rtol=1e-5, msg=name)


def run_train(planted, out, *extra, nproc=1, env=None):
    cmd = [sys.executable, "-m", "pinnerformer.cli", "train", "--dataset", str(planted), "--output", str(out),
           "--config", str(out.parent / "c.json"), "--max-steps", "20", "--no-progress", "--nproc", str(nproc), *extra]
    return subprocess.run(cmd, env=env or ENV, capture_output=True, text=True, timeout=600)


def records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_twenty_steps_match_one_process_and_a_killed_rank_resumes_to_the_same_result(planted, tmp_path):
    (tmp_path / "c.json").write_text(json.dumps(CONFIG))
    single, double, killed = tmp_path / "single", tmp_path / "double", tmp_path / "killed"
    r = run_train(planted, single)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_train(planted, double, nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    s1, s2 = records(single, "step"), records(double, "step")
    assert [x["step"] for x in s2] == list(range(20)) and [x["queries"] for x in s1] == [x["queries"] for x in s2]
    for a, b in zip(s1, s2):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a["step"], a["loss"], b["loss"])
    v1, v2 = records(single, "validation")[-1], records(double, "validation")[-1]
    for k in ("recall@10", "ndcg@10"):
        key = next(x for x in v1 if x.lower().startswith(k.split("@")[0]) and x.endswith("@10"))
        assert abs(v1[key] - v2[key]) < 1e-4, (key, v1[key], v2[key])

    # rank 1 dies (SIGKILL) after step 12: the job ends, with a message, instead of hanging
    r = run_train(planted, killed, nproc=2, env={**ENV, "PINNERFORMER_FAULT_KILL_RANK": "1:12"})
    assert r.returncode != 0 and "the distributed run (2 processes) failed" in r.stderr, r.stderr[-2000:]
    assert "--resume" in r.stderr
    last = torch.load(killed / "checkpoints" / "last.pt", weights_only=False)
    assert last["state"]["global_step"] == 10  # the last checkpoint before the kill (every 5 steps)
    r = run_train(planted, killed, "--resume", nproc=1)  # resumed on another number of processes
    assert r.returncode == 0, r.stderr[-3000:]
    s3 = records(killed, "step")
    assert [x["step"] for x in s3] == list(range(20))
    for a, b in zip(s2, s3):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a["step"], a["loss"], b["loss"])
