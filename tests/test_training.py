"""Training end to end on planted structure, exact resume, and the errors a user can run into."""

import json
import time

import numpy as np
import pytest

from pinnerformer.data import Dataset
from pinnerformer.errors import PinnerformerError
from pinnerformer.io import load_checkpoint
from pinnerformer.data.synthetic import planted_interest_log
from conftest import TINY
from pinnerformer.training.config import load_config
from pinnerformer.training.retrieval import RetrievalTask, retrieval_loop

def config(**over):
    return load_config("small", overrides=json.loads(json.dumps({**TINY, **over})))


def test_trained_model_beats_popularity_by_a_wide_margin(planted, tmp_path):
    ds = Dataset.open(planted)
    summary = retrieval_loop(ds, config(), tmp_path / "run", log=lambda s: None).fit(progress=False)
    # each user's future lies in one group of 20 items out of 200: popularity cannot know which group
    assert summary.metric == "recall@10" and summary.popularity < 0.12
    assert summary.best > 0.25 and summary.best > 4 * summary.popularity
    assert (tmp_path / "run" / "checkpoints" / "best.pt").exists()
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["dataset"]["fingerprint"] == ds.manifest.fingerprint and cfg["protocol"] == "future-window"
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["kind"] == "baseline" and any(l["kind"] == "validation" for l in lines)
    assert list((tmp_path / "run" / "tensorboard").iterdir())


@pytest.mark.parametrize("objective,negatives,logq", [("sasrec", "in-batch", True), ("all-action", "random", False),
                                                       ("next-action", "mixed", True)])
def test_every_objective_and_pool_trains(planted, tmp_path, objective, negatives, logq):
    cfg = config(loss={"objective": objective, "negatives": negatives, "logq": logq, "n_random": 64},
                 optim={**TINY["optim"], "max_epochs": 2}, data={**TINY["data"], "sequences_per_user": 2})
    summary = retrieval_loop(Dataset.open(planted), cfg, tmp_path / "run", log=lambda s: None).fit(progress=False)
    losses = [l["loss"] for l in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
              if l["kind"] == "step"]
    assert all(np.isfinite(losses)) and np.mean(losses[-5:]) < np.mean(losses[:5])
    assert summary.steps == len(losses)


class Crash(Exception):
    pass


def crash_after(step: int):
    """An on_step callback that makes the run die (an exception: nothing after it runs) once `step` is done."""
    def on_step(g: int) -> None:
        if g + 1 >= step:
            raise Crash(f"crashed after step {g}")
    return on_step


def test_resume_equals_uninterrupted_bit_for_bit(planted, tmp_path):
    ds = Dataset.open(planted)
    cfg = config(optim={**TINY["optim"], "max_epochs": 2}, data={**TINY["data"], "sequences_per_user": 2})
    retrieval_loop(ds, cfg, tmp_path / "a", log=lambda s: None).fit(progress=False)
    # crashed 3 steps after the checkpoint at step 5 (mid-epoch), then resumed, then crashed again after the
    # epoch boundary (13 steps) and a checkpoint at step 15, then resumed to the end
    with pytest.raises(Crash):
        retrieval_loop(ds, cfg, tmp_path / "b", log=lambda s: None).fit(on_step=crash_after(8), progress=False)
    crash = crash_after(19)

    def slow_then_crash(g: int) -> None:  # a slow segment: the summary must still count it after the resume
        time.sleep(0.6)
        crash(g)

    with pytest.raises(Crash):
        retrieval_loop(ds, cfg, tmp_path / "b", log=lambda s: None).fit(resume=True, on_step=slow_then_crash,
                                                                         progress=False)
    before = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")["train_s"]
    summary = retrieval_loop(ds, cfg, tmp_path / "b", log=lambda s: None).fit(resume=True, progress=False)
    a = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    b = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert len(a) == 1 + 26 + 2 and a == b  # every loss, lr, τ and validation number identical
    # the summary's training time counts the segments before the resume too (the checkpoint at step 15 carries
    # them: it is written before step 15's own on_step, so after the slow steps 6..14: ≥ 9 × 0.6 s), not only the
    # last, fast segment
    assert before >= 5.4 and summary.wall_s >= before


def test_training_errors(planted, tmp_path, cli):
    r = cli("train", "-d", planted, "-o", tmp_path / "r", "--preset", "huge")
    assert r.exit_code == 2 and "unknown preset 'huge'" in r.stderr
    r = cli("train", "-d", planted, "-o", tmp_path / "r", "--objective", "sasrecc")
    assert r.exit_code == 2 and "unknown objective 'sasrecc'" in r.stderr
    (tmp_path / "bad.json").write_text('{"optim": {"lr": 0.1, "momentum": 0.9}}')
    r = cli("train", "-d", planted, "-o", tmp_path / "r", "--config", tmp_path / "bad.json")
    assert r.exit_code == 2 and "optim.momentum: Extra inputs are not permitted" in r.stderr
    (tmp_path / "big.json").write_text('{"optim": {"batch_size": 100000}}')
    r = cli("train", "-d", planted, "-o", tmp_path / "r", "--config", tmp_path / "big.json")
    assert r.exit_code == 2 and "fewer than one batch" in r.stderr
    (tmp_path / "tied.json").write_text('{"model": {"item_tower": "none", "id_dim": 32, "dim": 64}}')
    r = cli("train", "-d", planted, "-o", tmp_path / "r", "--config", tmp_path / "tied.json")
    assert r.exit_code == 2 and "model.item_tower=none" in r.stderr and "must equal model.dim (64)" in r.stderr
    # a dataset without positive actions
    (tmp_path / "neg.csv").write_text("user,item,timestamp,action\n1,2,1700000000,hide\n1,3,1700000100,skip\n")
    assert cli("data", "prepare", "-f", "events", "-i", tmp_path / "neg.csv", "-o", tmp_path / "negds",
               "--action-col", "action", "--positive", "hide").exit_code == 0
    m = json.loads((tmp_path / "negds" / "manifest.json").read_text())
    for a in m["actions"]:
        a["positive"] = False
    (tmp_path / "negds" / "manifest.json").write_text(json.dumps(m))
    r = cli("train", "-d", tmp_path / "negds", "-o", tmp_path / "r")
    assert r.exit_code == 2 and "no positive action types" in r.stderr


def test_resume_refuses_other_dataset_or_shape(planted, tmp_path, cli):
    (tmp_path / "tiny.json").write_text(json.dumps({**TINY, "optim": {**TINY["optim"], "max_epochs": 1}}))
    args = ["train", "-d", planted, "-o", tmp_path / "run", "--config", tmp_path / "tiny.json", "--no-progress"]
    r = cli(*args)
    assert r.exit_code == 0, r.output
    r = cli(*args)
    assert r.exit_code == 2 and "already holds a training run" in r.stderr
    wider = json.loads((tmp_path / "tiny.json").read_text())
    wider["model"]["width"] = 64
    (tmp_path / "wide.json").write_text(json.dumps(wider))
    r = cli("train", "-d", planted, "-o", tmp_path / "run", "--config", tmp_path / "wide.json", "--resume")
    assert r.exit_code == 2 and "these options would change it: model.width 32 -> 64" in r.stderr
    other = tmp_path / "other.csv"
    planted_interest_log(n_users=120, seed=5).write_csv(other)
    assert cli("data", "prepare", "-f", "events", "-i", other, "-o", tmp_path / "ods", "--action-col", "action",
               "--positive", "click").exit_code == 0
    r = cli("train", "-d", tmp_path / "ods", "-o", tmp_path / "run", "--config", tmp_path / "tiny.json", "--resume")
    assert r.exit_code == 2 and "trained on a different dataset" in r.stderr
    # a run written before a config key existed (here model.residual_dtype) resumes: the key takes its default
    desc = json.loads((tmp_path / "run" / "config.json").read_text())
    del desc["config"]["model"]["residual_dtype"]
    (tmp_path / "run" / "config.json").write_text(json.dumps(desc))
    r = cli("train", "-d", planted, "-o", tmp_path / "run", "--config", tmp_path / "tiny.json", "--resume",
            "--no-progress")
    assert r.exit_code == 0, r.stderr
    # a config this version cannot read is a clear error, not a traceback
    desc["config"]["model"]["retired_key"] = 1
    (tmp_path / "run" / "config.json").write_text(json.dumps(desc))
    r = cli("train", "-d", planted, "-o", tmp_path / "run", "--config", tmp_path / "tiny.json", "--resume")
    assert r.exit_code == 2 and "not a run description this version can read" in r.stderr and "retired_key" in r.stderr


def test_order_only_dataset_trains_with_leave_one_out(tmp_path, cli):
    rng = np.random.default_rng(0)
    # 80 users; each walks through one of 4 item "chains" in order: the next item is predictable
    lines = []
    for u in range(80):
        chain = u % 4
        start = int(rng.integers(0, 10))
        lines.append(" ".join([str(u)] + [str(chain * 20 + (start + k) % 20) for k in range(12)]))
    (tmp_path / "seq.txt").write_text("\n".join(lines) + "\n")
    assert cli("data", "prepare", "-f", "sequences", "-i", tmp_path / "seq.txt", "-o", tmp_path / "ds").exit_code == 0
    ds = Dataset.open(tmp_path / "ds")
    logs = []
    cfg = config(loss={"objective": "sasrec", "n_random": 32}, optim={**TINY["optim"], "batch_size": 16})
    loop = retrieval_loop(ds, cfg, tmp_path / "run", log=logs.append)
    summary = loop.fit(progress=False)
    assert loop.task.protocol == "leave-one-out" and not loop.task.model.time_features
    assert any("order-only clock: no time features" in l and "counted in actions" in l for l in logs)
    assert len(loop.task.val_task) == 80  # every user's second-to-last item
    assert summary.metric == "ndcg@10" and summary.best > 2 * summary.popularity
    r = cli("train", "-d", tmp_path / "ds", "-o", tmp_path / "r2", "--protocol", "future-window")
    assert r.exit_code == 2 and "needs real timestamps" in r.stderr


@pytest.mark.parametrize("mask_own", [False, True])
def test_full_softmax_training_loss_is_cross_entropy_of_the_model(planted, tmp_path, mask_own):
    """The trainer's loss with negatives="full" equals torch's cross-entropy over every item's score."""
    import torch

    cfg = config(loss={"objective": "sasrec", "negatives": "full", "mask_own_positives": mask_own})
    tr = RetrievalTask(Dataset.open(planted), cfg)
    tr.model.eval()  # no dropout: both computations see the same function
    users = tr.sampler.eligible[:8]
    got = tr.loss(tr.batch_for(users, np.random.default_rng(3)), 0, torch.device("cpu")).loss
    batch = tr.sampler.sample(users, np.random.default_rng(3))  # the same examples
    from pinnerformer.features.sequence_batch import build_sequence_batch, to_torch

    with torch.no_grad():
        out = tr.model.encode_sequence(to_torch(build_sequence_batch(tr.ds.timelines, batch.starts, batch.ends,
                                                                     tr.model.time_features)))
        q = out[torch.from_numpy(batch.q_example), torch.from_numpy(batch.q_position)]
        logits = q @ tr.model.item_embedding(torch.arange(tr.model.spec.n_items)).T / tr.model.temperature
    target = torch.from_numpy(batch.q_item)
    if mask_own:  # the example's other positives are not negatives
        for j, (e, t) in enumerate(zip(batch.q_example, batch.q_item)):
            others = [i for ex, i in zip(batch.label_example, batch.label_item) if ex == e and i != t]
            logits[j, others] = -torch.inf
    per_query = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    want = torch.stack([per_query[torch.from_numpy(batch.q_example) == e].mean()
                        for e in np.unique(batch.q_example)]).mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_loo_preset_is_the_leave_one_out_default_and_is_recorded(planted, tmp_path, cli):
    cfg = load_config("loo")
    assert (cfg.eval.protocol, cfg.loss.objective, cfg.data.cutoff) == ("leave-one-out", "sasrec", "last")
    assert cfg.loss.mask_own_positives and cfg.eval.exclude_history  # selected on the protocol it is reported under
    assert (cfg.model.head, cfg.model.ffn_mult, cfg.optim.batch_actions, cfg.optim.weight_decay) == ("norm", 1, 1536, 1.0)
    assert (cfg.model.item_interests, cfg.model.id_dropout, cfg.model.target_id_dropout, cfg.optim.ema_decay,
            cfg.model.members) == ("auto", 0.3, 0.3, 0.995, 1)
    ens = load_config("loo-ensemble")  # the same, three times
    assert ens.model.members == 3 and ens.model_dump(exclude={"preset", "model"}) == cfg.model_dump(exclude={"preset", "model"})
    assert ens.model.model_copy(update={"members": 1}) == cfg.model
    assert load_config("small").loss.negatives == "mixed"  # the other presets keep their defaults
    # on a dataset with real timestamps the preset alone switches to leave-one-out, and config.json says so
    tiny = {k: v for k, v in TINY.items() if k not in ("loss", "eval")}
    (tmp_path / "tiny.json").write_text(json.dumps({**tiny, "optim": {**TINY["optim"], "max_epochs": 1}}))
    r = cli("train", "-d", planted, "-o", tmp_path / "run", "--preset", "loo", "--config", tmp_path / "tiny.json",
            "--no-progress")
    assert r.exit_code == 0, r.output
    desc = json.loads((tmp_path / "run" / "config.json").read_text())
    assert desc["protocol"] == "leave-one-out" and desc["metric"] == "ndcg@10"
    c = desc["config"]
    assert c["preset"] == "loo" and c["loss"]["objective"] == "sasrec" and c["data"]["cutoff"] == "last"
    assert c["model"]["dropout"] == load_config("loo").model.dropout
    assert "default configuration for this protocol" not in r.stderr
    # leave-one-out with another preset works, with a note that names the default
    r = cli("train", "-d", planted, "-o", tmp_path / "run2", "--protocol", "leave-one-out", "--config",
            tmp_path / "tiny.json", "--no-progress")
    assert r.exit_code == 0 and "the default configuration for this protocol is --preset loo" in " ".join(r.stderr.split())


def test_loader_workers_prepare_exactly_the_same_batches(planted, tmp_path):
    # batches are a function of (seed, epoch, step) alone: worker processes, and a start mid-epoch, change nothing
    tr = retrieval_loop(Dataset.open(planted), config(), tmp_path / "run", log=lambda s: None)
    steps = tr.task.steps_per_epoch
    tr.workers = 0
    inline = list(tr.loader(3, 0))
    tr.workers = 2
    pooled = list(tr.loader(3, 2))
    assert len(inline) == steps and len(pooled) == steps - 2
    for a, b in zip(inline[2:], pooled):
        for f in ("starts", "ends", "q_example", "q_position", "q_item", "label_example", "label_item"):
            assert np.array_equal(getattr(a.examples, f), getattr(b.examples, f)), f
        assert a.seq.keys() == b.seq.keys()
        assert all(np.array_equal(a.seq[k].numpy(), b.seq[k].numpy(), equal_nan=True) for k in a.seq)  # NaN: no duration


def test_fit_with_loader_workers_logs_every_step_in_order(planted, tmp_path):
    ds = Dataset.open(planted)
    cfg0 = config(optim={**TINY["optim"], "max_epochs": 1})
    cfg2 = config(optim={**TINY["optim"], "max_epochs": 1}, loader_workers=2)
    retrieval_loop(ds, cfg0, tmp_path / "w0", log=lambda s: None).fit(progress=False)
    retrieval_loop(ds, cfg2, tmp_path / "w2", log=lambda s: None).fit(progress=False)
    w0, w2 = ([json.loads(l) for l in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in ("w0", "w2"))
    steps0, steps2 = ([l for l in w if l["kind"] == "step"] for w in (w0, w2))
    assert [l["step"] for l in steps2] == list(range(len(steps0))) and len(steps0) > 5
    np.testing.assert_allclose([l["loss"] for l in steps2], [l["loss"] for l in steps0], rtol=1e-5)
    assert steps2 == steps0  # the same batches, so the same run, bit for bit


@pytest.mark.parametrize("mask_own", [True, False])
def test_compiled_training_follows_the_eager_run(planted, tmp_path, mask_own):
    """compile=True trains with the compiled encoder and the fused loss (`sampled_softmax_loss_fused`): on the same
    batches its losses follow the eager run's to float32 rounding, step after step. (Without dropout: compiled
    kernels draw their dropout masks from another random stream.)"""
    ds = Dataset.open(planted)
    over = dict(optim={**TINY["optim"], "max_epochs": 1}, loss={**TINY["loss"], "mask_own_positives": mask_own},
                model={**TINY["model"], "dropout": 0.0})
    eager = retrieval_loop(ds, config(**over), tmp_path / "eager", log=lambda s: None)
    comp = retrieval_loop(ds, config(**over, compile=True), tmp_path / "comp", log=lambda s: None)
    assert eager.task.objective.fused is None and comp.task.objective.fused is not None
    eager.fit(progress=False, max_steps=12)
    comp.fit(progress=False, max_steps=12)
    steps = [[l for l in map(json.loads, (tmp_path / r / "metrics.jsonl").read_text().splitlines())
              if l["kind"] == "step"] for r in ("eager", "comp")]
    assert len(steps[0]) == len(steps[1]) == 12
    np.testing.assert_allclose([l["loss"] for l in steps[1]], [l["loss"] for l in steps[0]], rtol=2e-4)
    np.testing.assert_allclose([l["tau"] for l in steps[1]], [l["tau"] for l in steps[0]], rtol=2e-4)


def test_steps_without_queries_are_counted_and_reported(planted, tmp_path):
    """A label window so short that no sampled position has a positive in it: every batch has no query. The loss
    is 0 (not NaN), each step's record says queries 0, and the summary and the log count them."""
    lines: list[str] = []
    cfg = config(data={**TINY["data"], "window_days": 1e-9})
    summary = retrieval_loop(Dataset.open(planted), cfg, tmp_path / "run", log=lines.append).fit(progress=False,
                                                                                                 max_steps=3)
    steps = [l for l in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if l["kind"] == "step"]
    assert [(l["queries"], l["loss"]) for l in steps] == [(0, 0.0)] * 3
    assert summary.empty_steps == 3
    assert any("3 step(s) had no training queries (queries = 0): loss 0" in x for x in lines)


def test_prefetched_keeps_order_and_loses_nothing():
    from pinnerformer.models.embedding import prefetched

    for threads in (0, 1, 3):
        assert list(prefetched(lambda x: x * x, range(23), threads)) == [x * x for x in range(23)]
        assert list(prefetched(lambda x: x, [], threads)) == []


RUN_IN_A_NEW_PROCESS = """
import sys
from pathlib import Path
import torch
from pinnerformer.data import Dataset
from pinnerformer.errors import PinnerformerError
from pinnerformer.io import load_checkpoint
from pinnerformer.training.config import load_config
from pinnerformer.training.retrieval import retrieval_loop
torch.set_num_threads(2)  # several CPU threads: where summation order could vary from run to run
ds, run, mode = Dataset.open(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
cfg = load_config("small", overrides={"device": "cpu", "optim": {"max_epochs": 1}, "checkpoint_every": 10})
retrieval_loop(ds, cfg, run, log=lambda s: None).fit(progress=False, max_steps=25, resume=mode == "resume")
"""


def test_a_run_killed_and_resumed_in_a_new_process_repeats_bit_for_bit(tmp_path, cli):
    # separate processes, as a real kill and restart are: nothing may depend on thread scheduling or addresses
    import signal
    import subprocess
    import sys
    import time

    planted_interest_log(n_users=400, n_items=2000, n_groups=20, events_per_user=100, gap_s=600).write_csv(
        tmp_path / "log.csv")
    r = cli("data", "prepare", "-f", "events", "-i", tmp_path / "log.csv", "-o", tmp_path / "ds", "--action-col",
            "action", "--positive", "click")
    assert r.exit_code == 0, r.output

    def command(name: str, mode: str) -> list[str]:
        return [sys.executable, "-c", RUN_IN_A_NEW_PROCESS, str(tmp_path / "ds"), str(tmp_path / name), mode]

    def run(name: str, mode: str) -> None:
        p = subprocess.run(command(name, mode), capture_output=True, text=True)
        assert p.returncode == 0, p.stderr

    run("whole", "whole")
    run("other", "whole")
    # SIGKILL once 13 steps are logged: after the checkpoint at step 10, before the epoch ends (19 steps)
    p = subprocess.Popen(command("resumed", "whole"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "resumed" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if log.exists() and log.read_text().count('"kind": "step"') >= 13:
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    assert p.wait() == -signal.SIGKILL and not (tmp_path / "resumed" / "summary.json").exists()
    assert (tmp_path / "resumed" / "checkpoints" / "last.pt").exists()
    run("resumed", "resume")
    whole, other, resumed = ((tmp_path / n / "metrics.jsonl").read_text() for n in ("whole", "other", "resumed"))
    assert whole.count('"kind": "step"') == 19  # 19 steps in the epoch (before max_steps), then validation
    assert other == whole and resumed == whole


def test_resume_keeps_the_runs_own_config_and_split_and_says_what_it_continues(planted, tmp_path, cli):
    """Found by a fault probe: --resume with another --seed rewrote the split (training users became test users);
    --resume rebuilt the config from the preset (max_epochs 1 -> 40) and trained on; --resume --max-steps on a
    finished run trained nothing and reported a false reason."""
    (tmp_path / "tiny.json").write_text(json.dumps({**TINY, "optim": {**TINY["optim"], "max_epochs": 1}}))
    run = tmp_path / "run"
    assert cli("train", "-d", planted, "-o", run, "--config", tmp_path / "tiny.json", "--no-progress").exit_code == 0
    split, metrics = (run / "split.parquet").read_bytes(), (run / "metrics.jsonl").read_text()
    r = cli("train", "-d", planted, "-o", run, "--resume", "--seed", "1")
    assert r.exit_code == 2 and "these options would change it: seed 0 -> 1" in r.stderr
    r = cli("train", "-d", planted, "-o", run, "--resume", "--preset", "loo")
    assert r.exit_code == 2 and "it was made with --preset small, not loo" in r.stderr
    r = cli("train", "-d", planted, "-o", run, "--resume", "--no-progress")  # no config given: the run's own
    assert r.exit_code == 0 and "the run already trained 1 epoch(s), optim.max_epochs is 1" in " ".join(r.stderr.split())
    assert (run / "split.parquet").read_bytes() == split and (run / "metrics.jsonl").read_text() == metrics
    r = cli("train", "-d", planted, "-o", run, "--resume", "--max-epochs", "2", "--no-progress")
    assert r.exit_code == 0 and "resuming with optim.max_epochs 1 -> 2" in r.stderr
    assert json.loads((run / "config.json").read_text())["config"]["optim"]["max_epochs"] == 2
    assert (run / "split.parquet").read_bytes() == split
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines if x["kind"] == "validation"] == [0, 1]
    # an early-stopped run: a larger step budget does not make it train, and the reason stays the true one
    (tmp_path / "stop.json").write_text(json.dumps({**TINY, "optim": {**TINY["optim"], "patience": 1,
                                                                         "max_epochs": 30, "lr": 1e-9}}))
    es = tmp_path / "es"
    r = cli("train", "-d", planted, "-o", es, "--config", tmp_path / "stop.json", "--no-progress")
    summary = json.loads((es / "summary.json").read_text())
    assert r.exit_code == 0 and summary["stopped_by"] == "early stop"
    r = cli("train", "-d", planted, "-o", es, "--resume", "--max-steps", "100000", "--no-progress")
    assert r.exit_code == 0 and "the run already ended (early stop" in r.stderr
    assert json.loads((es / "summary.json").read_text()) == summary
    # a larger patience goes on from the stop, to the epochs a run started with that patience validates
    (tmp_path / "wait.json").write_text(json.dumps({**TINY, "optim": {**TINY["optim"], "patience": 3,
                                                                         "max_epochs": 30, "lr": 1e-9}}))
    r = cli("train", "-d", planted, "-o", es, "--resume", "--config", tmp_path / "wait.json", "--no-progress")
    assert r.exit_code == 0 and "resuming with optim.patience 1 -> 3" in r.stderr, r.stderr
    assert "optim.patience is now 3: going on" in " ".join(r.stderr.split())
    fresh = tmp_path / "fresh"
    assert cli("train", "-d", planted, "-o", fresh, "--config", tmp_path / "wait.json", "--no-progress").exit_code == 0

    def validations(run_dir):
        return [(x["epoch"], x["ndcg@10"]) for x in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                if x["kind"] == "validation"]

    assert len(validations(es)) > summary["best_epoch"] + 2 and validations(es) == validations(fresh)
    assert json.loads((es / "summary.json").read_text())["stopped_by"] == "early stop"


def test_length_buckets_keep_every_unit_and_group_similar_lengths():
    """`length_bucketed`: the same units as the epoch's order (a permutation of it), each batch cut from one window
    of lengths sorted, the batch order seeded by (seed, epoch): reproducible, different across epochs."""
    from pinnerformer.training.task import epoch_order, length_bucketed

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 51, 1000)
    order = epoch_order(0, 3, np.arange(1000), 1)
    got = length_bucketed(order, lengths, 32, 4, 0, 3)
    assert sorted(got.tolist()) == sorted(order.tolist())
    assert np.array_equal(got, length_bucketed(order, lengths, 32, 4, 0, 3))
    assert not np.array_equal(got, length_bucketed(order, lengths, 32, 4, 0, 4))
    full = got[:len(got) // 32 * 32].reshape(-1, 32)
    spread = lengths[full].max(1) - lengths[full].min(1)
    plain = lengths[order[:len(full) * 32].reshape(-1, 32)]
    assert spread.mean() < (plain.max(1) - plain.min(1)).mean() / 3  # batches of similar lengths
    # padding work: the sum over batches of the longest sequence times the batch size
    assert lengths[full].max(1).sum() < 0.75 * plain.max(1).sum()
    # each batch holds the units of one window only (window = 4 batches of the sorted order)
    for batch in full:
        pos = np.flatnonzero(np.isin(order, batch))
        assert pos.max() // (32 * 4) == pos.min() // (32 * 4)


def test_validation_with_history_removed_is_evaluate_exclude_history_on_validation(planted, tmp_path, cli):
    """eval.exclude_history: the model is selected on the protocol its number is reported under; the logged best
    validation number equals `evaluate --split validation --exclude-history` of the selected checkpoint."""
    tiny = {k: v for k, v in TINY.items() if k not in ("loss", "eval")}
    (tmp_path / "c.json").write_text(json.dumps({**tiny, "optim": {**TINY["optim"], "max_epochs": 2},
                                                 "eval": {"exclude_history": True}}))
    r = cli("train", "-d", planted, "-o", tmp_path / "run", "--preset", "loo", "--config", tmp_path / "c.json",
            "--no-progress")
    assert r.exit_code == 0, r.output
    best = json.loads((tmp_path / "run" / "summary.json").read_text())["best"]
    for flags, same in ((["--exclude-history"], True), ([], False)):
        r = cli("evaluate", "--run", tmp_path / "run", "-d", planted, "--split", "validation", "--no-item-knn", *flags)
        assert r.exit_code == 0, r.output
        stem = "leave-one-out-validation" + ("-history-excluded" if flags else "")
        ev = json.loads((tmp_path / "run" / "eval" / f"{stem}.json").read_text())
        got = ev["results"]["pinnerformer"]["ndcg@10"]["mean"]
        assert (got == pytest.approx(best, rel=1e-6)) is same, (flags, got, best)
    (tmp_path / "fw.json").write_text(json.dumps({**tiny, "eval": {"exclude_history": True}}))
    r = cli("train", "-d", planted, "-o", tmp_path / "run2", "--config", tmp_path / "fw.json", "--no-progress")
    assert r.exit_code == 2 and "eval.exclude_history" in r.stderr and "leave-one-out" in r.stderr


def test_action_budget_batches_cover_every_unit_once_with_balanced_work():
    """optim.batch_actions: the epoch's units cut into exactly `steps` non-empty batches of about equal total
    length, every unit once, the order seeded; a dataset of long histories gets more steps than its user count
    alone would give."""
    from pinnerformer.training.task import action_budget_batches, action_budget_steps, epoch_order

    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 51, 500)
    order = epoch_order(0, 0, np.arange(500), 1)
    steps = action_budget_steps(int(lengths.sum()), 400)
    assert steps == int(lengths.sum()) // 400
    batches = action_budget_batches(order, lengths, steps, 0, 0)
    assert len(batches) == steps and all(len(b) for b in batches)
    assert sorted(np.concatenate(batches).tolist()) == list(range(500))
    work = np.array([lengths[b].sum() for b in batches])
    assert work.max() - work.min() <= 2 * 50  # each batch within one sequence of total/steps either side
    again = action_budget_batches(order, lengths, steps, 0, 0)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))


def test_batch_actions_sets_the_steps_and_is_refused_where_it_cannot_work(planted, tmp_path):
    ds = Dataset.open(planted)
    task = RetrievalTask(ds, config(loss={"objective": "sasrec"}, data={**TINY["data"], "sequences_per_user": 1},
                                    optim={**TINY["optim"], "batch_actions": 64}))
    total = int(task.lengths[task.sampler.eligible].sum())
    assert task.steps_per_epoch == total // 64 and any("batches of about 64 input actions" in n for n in task.notes)
    seen = np.concatenate([task.host_batch(0, s).examples.users for s in range(task.steps_per_epoch)])
    assert sorted(seen.tolist()) == sorted(task.sampler.eligible.tolist())  # every training user once per epoch
    with pytest.raises(PinnerformerError, match="batch_actions 8 is below data.max_len 16"):
        RetrievalTask(ds, config(optim={**TINY["optim"], "batch_actions": 8}))


def attribute_sequences(tmp_path, cli, groups=20, per_group=40, users=600, length=8):
    """A `sequences` dataset whose users each read items of one group, and whose only attribute is the group: an
    item appears ~6 times, too rarely for its ID embedding to learn the group, but its attribute says it."""
    rng = np.random.default_rng(0)
    lines = []
    for u in range(users):
        g = rng.integers(groups)
        lines.append(" ".join([str(u)] + [str(1 + g * per_group + int(i))
                                          for i in rng.choice(per_group, length, replace=False)]))
    (tmp_path / "s.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "attrs.json").write_text(json.dumps({str(1 + i): [f"g{i // per_group}"]
                                                     for i in range(groups * per_group)}))
    r = cli("data", "prepare", "-f", "sequences", "-i", tmp_path / "s.txt", "-o", tmp_path / "ds",
            "--item-attributes", tmp_path / "attrs.json")
    assert r.exit_code == 0, r.output
    return Dataset.open(tmp_path / "ds")


def test_item_interests_recover_planted_groups_that_ids_alone_cannot_yet(tmp_path, cli):
    ds = attribute_sequences(tmp_path, cli)
    best = {}
    for mode in ["off", "on"]:
        cfg = load_config("loo", overrides={
            "model": {"width": 32, "dim": 32, "id_dim": 32, "layers": 1, "item_interests": mode},
            "optim": {"batch_size": 32, "batch_actions": None, "max_epochs": 2, "warmup_steps": 10, "lr": 3e-3},
            "data": {"max_len": 16}, "loss": {"n_random": 64}})
        best[mode] = retrieval_loop(ds, cfg, tmp_path / mode, log=lambda s: None).fit(progress=False).best
    # the target is one of the ~33 unread items of the user's group: ndcg@10 ~0.14 is the most anyone can get
    assert best["on"] > 0.11 and best["off"] < 0.03, best
    desc = json.loads((tmp_path / "on" / "config.json").read_text())
    assert desc["model"]["interests"] == [f"g{i}" for i in sorted(range(20), key=str)]
    assert any("20 learned interest embeddings, 797 of 797 items have interests" in n for n in desc["notes"])


def test_item_interests_round_trip_and_errors(tmp_path, cli):
    import torch

    from pinnerformer.models.pinnerformer import PinnerFormerConfig, interest_table, pinnerformer_for
    from pinnerformer.runs.run_dir import RunDir

    ds = attribute_sequences(tmp_path, cli, users=100)
    cfg = load_config("loo", overrides={"model": {"width": 16, "dim": 16, "id_dim": 16, "layers": 1,
                                                  "item_interests": "auto"}, "optim": {"max_epochs": 1}})
    loop = retrieval_loop(ds, cfg, tmp_path / "run", log=lambda s: None)
    loop.fit(progress=False)
    loaded = RunDir(tmp_path / "run").load_model(ds)
    assert loaded.spec.interests == loop.model.spec.interests and len(loaded.spec.interests) == 20
    assert torch.equal(loaded.items.interests, loop.model.items.interests)
    # the table: each item's interests as vocabulary indexes; those the vocabulary lacks are counted, not read
    table, unknown = interest_table(ds, loaded.spec.interests[1:])
    dropped = sum(x == [loaded.spec.interests[0]] for x in ds.items["interests"].to_list())
    assert unknown == dropped > 0 and int((table == 19).all(1).sum()) == dropped
    assert table.shape == (ds.manifest.n_items, 1) and int((table < 19).sum()) == ds.manifest.n_items - dropped
    # `on` where the items have no interests is an error naming the dataset; `auto` quietly uses none
    (tmp_path / "plain.txt").write_text("1 5 6 7\n2 7 5 6\n")
    assert cli("data", "prepare", "-f", "sequences", "-i", tmp_path / "plain.txt", "-o", tmp_path / "plain").exit_code == 0
    plain = Dataset.open(tmp_path / "plain")
    with pytest.raises(PinnerformerError, match="needs item interests, but the items of .*plain have none"):
        pinnerformer_for(plain, PinnerFormerConfig(item_interests="on"), 8)
    assert pinnerformer_for(plain, PinnerFormerConfig(item_interests="auto"), 8).spec.interests == ()
    with pytest.raises(PinnerformerError, match="item_features=content has none"):
        pinnerformer_for(ds, PinnerFormerConfig(item_interests="on", item_features="content"), 8)


def test_ema_weights_are_the_moving_average_validated_kept_as_best_and_resumed_exactly(planted, tmp_path):
    import torch

    from pinnerformer.io import load_checkpoint

    ds = Dataset.open(planted)
    cfg = config(optim={**TINY["optim"], "max_epochs": 2, "ema_decay": 0.9},
                 data={**TINY["data"], "sequences_per_user": 2})
    loop = retrieval_loop(ds, cfg, tmp_path / "a", log=lambda s: None)
    seen = []  # the training weights after every step, to average by hand
    loop.fit(progress=False, on_step=lambda g: seen.append([p.detach().clone() for p in loop.model.parameters()]))
    init = retrieval_loop(ds, cfg, tmp_path / "init", log=lambda s: None)  # the same seed: the same initial weights
    avg, at_epoch_end = [p.detach().clone() for p in init.model.parameters()], []
    for g, weights in enumerate(seen):
        keep = min(0.9, (1 + g) / (10 + g))
        avg = [a * keep + w * (1 - keep) for a, w in zip(avg, weights)]
        if (g + 1) % loop.task.steps_per_epoch == 0:
            at_epoch_end.append(avg)
    assert len(seen) == 26 and all(torch.allclose(a, e, atol=1e-6) for a, e in zip(avg, loop.ema))
    # training went on with its own weights; validation scored the average, and best.pt holds it
    last = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")
    assert all(torch.equal(w, p) for w, p in zip(last["model"].values(), seen[-1]))
    best = load_checkpoint(tmp_path / "a" / "checkpoints" / "best.pt")
    kept = at_epoch_end[best["state"]["best_epoch"]]
    assert all(torch.allclose(b, e, atol=1e-6) for b, e in zip(best["model"].values(), kept))
    assert not all(torch.allclose(b, w, atol=1e-3) for b, w in zip(best["model"].values(), seen[-1]))
    # killed mid-epoch and resumed: the same numbers to the last bit, the average included
    with pytest.raises(Crash):
        retrieval_loop(ds, cfg, tmp_path / "b", log=lambda s: None).fit(on_step=crash_after(8), progress=False)
    resumed = retrieval_loop(ds, cfg, tmp_path / "b", log=lambda s: None)
    resumed.fit(resume=True, progress=False)
    assert (tmp_path / "a" / "metrics.jsonl").read_text() == (tmp_path / "b" / "metrics.jsonl").read_text()
    assert all(torch.equal(a, b) for a, b in zip(loop.ema, resumed.ema))


def test_an_ensemble_trains_each_member_on_its_own_loss_and_scores_with_their_mean(planted, tmp_path, cli):
    import torch

    from pinnerformer.models.pinnerformer import PinnerFormerEnsemble
    from pinnerformer.runs.run_dir import RunDir

    ds = Dataset.open(planted)
    cfg = config(model={**TINY["model"], "members": 2}, optim={**TINY["optim"], "max_epochs": 1})
    task = RetrievalTask(ds, cfg)
    assert isinstance(task.model, PinnerFormerEnsemble) and len(task.model.members) == 2
    a, b = task.model.members
    assert not torch.equal(a.items.id_emb.weight, b.items.id_emb.weight)  # initialised apart
    # the ensemble's loss is the mean of the members' own losses, each as a model alone would compute it
    task.model.eval()
    batch = task.host_batch(0, 0)
    both = task.loss(batch, 0, torch.device("cpu")).loss
    alone = []
    for member in (a, b):
        single = RetrievalTask(ds, config(optim={**TINY["optim"], "max_epochs": 1}))
        single.model.load_state_dict(member.state_dict())
        single.model.eval()
        alone.append(single.loss(batch, 0, torch.device("cpu")).loss)
    torch.testing.assert_close(both, (alone[0] + alone[1]) / 2, rtol=1e-6, atol=1e-6)
    # scored together: concatenated unit vectors / sqrt(2), so an inner product is the members' mean cosine
    items = torch.arange(20)
    with torch.no_grad():
        v = task.model.item_embedding(items)
        assert v.shape == (20, 2 * TINY["model"]["dim"]) and torch.allclose(v.norm(dim=-1), torch.ones(20))
        mean_cos = (a.item_embedding(items) @ a.item_embedding(items).T + b.item_embedding(items) @ b.item_embedding(items).T) / 2
        torch.testing.assert_close(v @ v.T, mean_cos, atol=1e-5, rtol=0)
    # a run of it: saved, loaded, evaluated and indexed like any other
    retrieval_loop(ds, cfg, tmp_path / "run", log=lambda s: None).fit(progress=False, max_steps=6)
    loaded = RunDir(tmp_path / "run").load_model(ds)
    assert isinstance(loaded, PinnerFormerEnsemble) and loaded.out_dim == 2 * TINY["model"]["dim"]
    r = cli("evaluate", "--run", tmp_path / "run", "--dataset", planted)
    assert r.exit_code == 0, r.output
    r = cli("index", "-r", tmp_path / "run", "-d", planted, "-o", tmp_path / "idx", "--kind", "flat")
    assert r.exit_code == 0, r.output
    # the daily job's snapshot holds the ensemble's vectors: the same as embedding the users directly
    from conftest import PLANTED_DAY
    from pinnerformer.inference.daily_embed import DailyJob
    from pinnerformer.inference.snapshot import Snapshot
    from pinnerformer.inference.shards import user_ranges_as_of
    from pinnerformer.models.embedding import embed_users

    DailyJob(tmp_path / "run", ds, PLANTED_DAY, tmp_path / "snaps").run(log=lambda s: None, progress=False)
    snap = Snapshot.open(tmp_path / "snaps" / PLANTED_DAY.isoformat())
    assert snap.vectors.shape[1] == 2 * TINY["model"]["dim"] and len(snap.users) > 0
    users = np.asarray(snap.users)[:5]
    starts, ends = user_ranges_as_of(ds, users, snap.manifest.inputs_before_ts)
    direct = embed_users(loaded, ds.timelines, starts, ends, torch.device("cpu")).numpy()
    np.testing.assert_allclose(snap.vectors[:5], direct, atol=1e-5)
