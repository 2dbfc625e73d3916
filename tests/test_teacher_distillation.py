"""Distillation from a frozen teacher into one network (objectives/teacher_distillation.py): the KL term by hand, the
teacher's distribution (its network and its neighbours' votes of each query's own prefix, by hand), the term in the
retrieval loss (linear in its weight, exactly zero when the student is the teacher), the runs it refuses as
teachers, and a distilled run end to end from the command line."""

import json
import math
import shutil

import numpy as np
import pytest
import torch

from conftest import run_cli
from pinnerformer.data import Dataset
from pinnerformer.errors import PinnerformerError
from pinnerformer.models.pinnerformer import members_of
from pinnerformer.objectives.teacher_distillation import distillation_kl, own_positive_full_mask
from pinnerformer.runs.evaluate import load_teacher, teacher_for
from pinnerformer.training.config import load_config
from pinnerformer.training.retrieval import RetrievalTask

INF = float("inf")
SMALL = {"data": {"max_len": 16}, "model": {"width": 16, "dim": 16, "id_dim": 16, "layers": 1},
         "optim": {"max_epochs": 1, "batch_actions": 256}, "checkpoint_every": 50}


def test_distillation_kl_by_hand_with_masked_items():
    p = torch.tensor([[0.5, 0.25, 0.0, 0.25], [0.1, 0.2, 0.3, 0.4], [0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    z = torch.tensor([[1.0, 0.0, 5.0, -1.0], [0.3, 0.1, 2.0, 1.0], [0.0, 2.0, 1.0, 0.0]], dtype=torch.float64,
                     requires_grad=True)
    mask = torch.tensor([[False, False, True, False], [False] * 4, [True, False, False, False]])
    q_example = torch.tensor([0, 0, 1])

    def kl(prow, zrow, mrow):
        kept = [x for x, m in zip(zrow, mrow) if not m]
        total = sum(math.exp(x) for x in kept)
        return sum(a * math.log(a / (math.exp(x) / total)) for a, x, m in zip(prow, zrow, mrow) if a > 0 and not m)

    per = [kl(p[i].tolist(), z[i].tolist(), mask[i].tolist()) for i in range(3)]
    got = distillation_kl(z, p, mask, q_example, 2)
    assert abs(got.item() - ((per[0] + per[1]) / 2 + per[2]) / 2) < 1e-6  # each example weighs the same
    assert abs(distillation_kl(z, p, mask, q_example, 2, "query").item() - sum(per) / 3) < 1e-6
    got.backward()
    assert z.grad[0, 2] == 0 and z.grad[2, 0] == 0  # a masked item takes no gradient, however large its logit
    # a student whose distribution is the teacher's: zero
    match = torch.log(p.clamp(min=1e-300)).masked_fill(p == 0, -30.0)
    assert abs(distillation_kl(match, p, torch.zeros_like(mask), q_example, 2).item()) < 1e-6
    # Hinton's temperature: T² · KL(p^(1/T) / Z ‖ softmax(z / T)), the teacher's zeros kept at zero
    T = 2.0

    def soft_kl(prow, zrow, mrow):
        z = sum(a ** (1 / T) for a in prow if a > 0)
        return T * T * kl([a ** (1 / T) / z if a > 0 else 0.0 for a in prow], [x / T for x in zrow], mrow)

    per = [soft_kl(p[i].tolist(), z[i].tolist(), mask[i].tolist()) for i in range(3)]
    hot = distillation_kl(z, p, mask, q_example, 2, "query", temperature=T)
    assert abs(hot.item() - sum(per) / 3) < 1e-6 and abs(hot.item() - distillation_kl(z, p, mask, q_example, 2,
                                                                                       "query").item()) > 1e-3
    deep = torch.log(p.clamp(min=1e-300)).masked_fill(p == 0, -80.0)  # its logits / T match the softened teacher
    assert abs(distillation_kl(deep, p, torch.zeros_like(mask), q_example, 2, temperature=T).item()) < 1e-6


def test_the_full_mask_keeps_the_target_and_drops_the_examples_other_positives():
    mask = own_positive_full_mask(torch.tensor([0, 0, 1]), torch.tensor([2, 3, 2]), torch.tensor([0, 0, 1, 1]),
                                  torch.tensor([2, 3, 2, 4]), 2, 6)
    want = torch.zeros(3, 6, dtype=torch.bool)
    want[0, 3] = want[1, 2] = want[2, 4] = True
    assert torch.equal(mask, want)


@pytest.fixture(scope="module")
def rings(tmp_path_factory):
    """Leave-one-out sequences of cyclic item chains (two noise items, then five steps round a ring of six items)
    and a teacher trained one epoch on them, with its item-kNN blend (λ chosen from a grid that forces the
    neighbours in)."""
    d = tmp_path_factory.mktemp("teacher")
    rng = np.random.default_rng(0)
    lines = []
    for u in range(300):
        ring, start = int(rng.integers(0, 30)) * 6 + 1, int(rng.integers(0, 6))
        lines.append(" ".join(map(str, [u + 1, *rng.integers(1, 181, 2),
                                        *[ring + (start + i) % 6 for i in range(5)]])))
    (d / "s.txt").write_text("\n".join(lines) + "\n")
    assert run_cli("data", "prepare", "-f", "sequences", "-i", d / "s.txt", "-o", d / "ds").exit_code == 0
    (d / "teacher.json").write_text(json.dumps({**SMALL, "blend": {"item_knn": True, "weights": [0.5]}}))
    r = run_cli("train", "-d", d / "ds", "-o", d / "teacher", "--preset", "loo", "--config", d / "teacher.json",
                "--no-progress")
    assert r.exit_code == 0, r.output
    return d


def student(d, weight: float, **model):
    over = {**SMALL, "model": {**SMALL["model"], **model},
            "loss": {"teacher": str(d / "teacher"), "teacher_weight": weight}}
    return load_config("loo", overrides=over)


def test_the_teachers_distribution_is_its_network_mixed_with_the_neighbours_of_each_prefix(rings):
    ds = Dataset.open(rings / "ds")
    teacher = load_teacher(rings / "teacher", ds, log=lambda s: None)
    assert teacher.blend_weight == 0.5 and teacher.knn is not None
    # loss.teacher_blend: another λ, or 0 for the teacher's network alone
    alone = load_teacher(rings / "teacher", ds, log=lambda s: None, blend=0.0)
    assert alone.blend_weight == 0.0 and alone.knn is None
    assert load_teacher(rings / "teacher", ds, log=lambda s: None, blend=0.3).blend_weight == 0.3
    task = RetrievalTask(ds, student(rings, 1.0), teacher)
    batch = task.host_batch(0, 0)
    ex = batch.examples
    t = {k: torch.as_tensor(v) for k, v in task.objective.host_inputs(ex, torch.Generator().manual_seed(0)).items()}
    seq = {k: torch.as_tensor(v) for k, v in batch.seq.items()}
    p, mask = task._teacher_targets(ex, t, seq, len(ex.starts))
    assert p.shape == (len(ex.q_item), ds.manifest.n_items)
    torch.testing.assert_close(p.sum(1), torch.ones(len(p)))
    assert (p[mask] == 0).all() and mask.any()
    # by hand: the teacher network's softmax over the unmasked items, and the neighbours' votes of the items up to
    # and including the query's position (the newest voting most), normalised
    model = members_of(teacher.model)[0]
    with torch.no_grad():
        out = model.encode_sequence(seq)
        every = model.item_embedding(torch.arange(ds.manifest.n_items))
    sim = teacher.knn.similarity.toarray()
    items = np.asarray(ds.timelines.item)
    cfg = teacher.knn.cfg
    for i in range(0, len(ex.q_item), max(1, len(ex.q_item) // 25)):
        e, pos = int(ex.q_example[i]), int(ex.q_position[i])
        z = (out[e, pos] @ every.T / model.temperature).masked_fill(mask[i], -INF)
        net = torch.softmax(z.double(), 0)
        prefix = items[ex.starts[e]:ex.starts[e] + pos + 1][::-1][:cfg.last]  # newest first
        votes = sum(cfg.recency ** k * sim[h] for k, h in enumerate(prefix))
        votes = torch.as_tensor(votes, dtype=torch.float64).masked_fill(mask[i], 0.0)
        knn = votes / votes.sum() if votes.sum() > 0 else net
        torch.testing.assert_close(p[i].double(), 0.5 * net + 0.5 * knn, atol=1e-5, rtol=1e-4)


def test_the_loss_adds_the_weighted_term_and_a_student_equal_to_its_teacher_adds_nothing(rings):
    ds = Dataset.open(rings / "ds")
    teacher = load_teacher(rings / "teacher", ds, log=lambda s: None)
    teacher.blend_weight, teacher.knn = 0.0, None  # the network alone: a copy of it is the teacher exactly
    still = {"dropout": 0.0, "input_dropout": 0.0, "id_dropout": 0.0, "target_id_dropout": 0.0}
    plain = RetrievalTask(ds, load_config("loo", overrides={**SMALL, "model": {**SMALL["model"], **still}}))
    half, whole = (RetrievalTask(ds, student(rings, w, **still), teacher) for w in (0.5, 1.0))
    for task in (half, whole):
        task.model.load_state_dict(plain.model.state_dict())
    batch, cpu = plain.host_batch(0, 0), torch.device("cpu")
    base, with_half, with_whole = (task.loss(batch, 0, cpu).loss for task in (plain, half, whole))
    assert with_half > base + 1e-4  # an untrained student is far from the teacher
    torch.testing.assert_close(with_whole - base, 2 * (with_half - base), atol=1e-5, rtol=1e-4)
    assert set(whole.step_scalars()) == {"tau", "teacher_kl"} and whole.step_scalars()["teacher_kl"] > 1e-4
    with_whole.backward()
    assert whole.model.blocks[0].qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.model.parameters())  # the teacher is frozen
    # the student is the teacher's own network: the term is zero and the loss is the plain one
    state = teacher.model.state_dict()
    for task in (plain, whole):
        task.model.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(whole.loss(batch, 0, cpu).loss, plain.loss(batch, 0, cpu).loss)
        assert abs(whole.step_scalars()["teacher_kl"].item()) < 1e-5


def test_runs_that_cannot_teach_are_refused(rings, trained, planted, tmp_path):
    ds = Dataset.open(rings / "ds")
    with pytest.raises(PinnerformerError, match="loss.teacher: .*not a training run"):
        load_teacher(tmp_path, ds)
    with pytest.raises(PinnerformerError, match="a teacher must be a leave-one-out run"):
        load_teacher(trained, Dataset.open(planted))
    shutil.copytree(rings / "teacher", tmp_path / "interrupted")  # a run killed before its end has no summary
    (tmp_path / "interrupted" / "summary.json").unlink()
    with pytest.raises(PinnerformerError, match="has not finished training .*resume it to the end"):
        load_teacher(tmp_path / "interrupted", ds)
    with pytest.raises(PinnerformerError, match="a teacher must have seen exactly the student's data"):
        load_teacher(rings / "teacher", Dataset.open(planted))
    with pytest.raises(PinnerformerError, match="windows of at most 16 actions .*shorter than the student's 32"):
        teacher_for(load_config("loo", overrides={**SMALL, "data": {"max_len": 32}, "loss": {
            "teacher": str(rings / "teacher"), "teacher_weight": 1.0}}), ds)
    with pytest.raises(PinnerformerError, match="no teacher was loaded"):
        RetrievalTask(ds, student(rings, 1.0))
    with pytest.raises(PinnerformerError, match="needs loss.teacher: the trained run"):
        load_config("loo", overrides={"loss": {"teacher_weight": 1.0}})


def test_a_distilled_run_from_the_command_line(rings, tmp_path):
    d = rings
    (tmp_path / "s.json").write_text(json.dumps({**SMALL, "loss": {"teacher": str(d / "teacher"),
                                                                  "teacher_weight": 1.0}}))
    r = run_cli("train", "-d", d / "ds", "-o", tmp_path / "run", "--preset", "loo", "--config", tmp_path / "s.json",
                "--no-progress")
    assert r.exit_code == 0, r.output
    described = json.loads((tmp_path / "run" / "config.json").read_text())
    assert any("distilled from" in n and "λ 0.5" in n for n in described["notes"])
    steps = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(s["teacher_kl"] > 0 for s in steps if s["kind"] == "step")
    (tmp_path / "bad.json").write_text(json.dumps({"loss": {"teacher": str(tmp_path / "nothing"),
                                                            "teacher_weight": 1.0}}))
    r = run_cli("train", "-d", d / "ds", "-o", tmp_path / "run2", "--preset", "loo", "--config",
                tmp_path / "bad.json", "--no-progress")
    assert r.exit_code != 0 and "nothing does not exist" in r.output and "Traceback" not in r.output


def test_an_experiment_distils_from_its_configs_teacher(rings, tmp_path):
    (tmp_path / "s.json").write_text(json.dumps({**SMALL, "loss": {"teacher": str(rings / "teacher"),
                                                                  "teacher_weight": 1.0}}))
    r = run_cli("experiment", "-d", rings / "ds", "--grid", "default", "--preset", "loo", "--config",
                tmp_path / "s.json", "-o", tmp_path / "exp", "--no-progress")
    assert r.exit_code == 0, r.output
    described = json.loads((tmp_path / "exp" / "runs" / "pinnerformer" / "config.json").read_text())
    assert any("distilled from" in n for n in described["notes"])
