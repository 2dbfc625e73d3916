"""The network blended with item-to-item neighbours (evaluation/blend.py): the mixture by hand, λ chosen on
validation (λ = 0 is the network alone, to the last digit), the choice kept per checkpoint, the report's rows, and the
runs it refuses."""

import json

import numpy as np
import pytest
import torch

from conftest import TINY
from pinnerformer.evaluation.blend import BlendConfig, blend_scores


def test_blend_scores_are_the_log_of_the_mixture():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.5, 0.5, 3.0, 0.0]])
    knn = torch.tensor([[0.0, 3.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])  # the second user's items have no neighbours
    got = blend_scores(logits, knn, 0.4)
    p = torch.softmax(logits.double(), 1)
    want0 = torch.log(0.6 * p[0] + 0.4 * torch.tensor([0.0, 0.75, 0.25, 0.0], dtype=torch.float64))
    torch.testing.assert_close(got[0], want0)
    torch.testing.assert_close(got[1], torch.log(0.6 * p[1]))  # no neighbours: the network's ranking
    torch.testing.assert_close(blend_scores(logits, knn, 0.0), torch.log_softmax(logits.double(), 1))
    assert got.dtype == torch.float64
    # a catalogue-sized softmax whose tail underflows float32 still ranks its tail in float64
    wide = torch.linspace(0, -200, 1000).unsqueeze(0)
    assert torch.isfinite(blend_scores(wide, torch.zeros_like(wide), 0.0)).all()


def test_weights_are_checked():
    assert BlendConfig(weights=[0.5, 0.0, 0.5]).weights == [0.0, 0.5]
    for bad in ([], [1.0], [-0.1]):
        with pytest.raises(Exception, match="blend weights"):
            BlendConfig(weights=bad)


@pytest.fixture(scope="module")
def chains_run(tmp_path_factory):
    """A leave-one-out dataset of cyclic item chains (after two noise items, a user walks five steps of a ring of six
    items from a random start) and a barely trained network: the neighbours know the rings, the network has had one
    epoch."""
    from conftest import run_cli

    d = tmp_path_factory.mktemp("blend")
    rng = np.random.default_rng(0)
    lines = []
    for u in range(400):
        ring, start = int(rng.integers(0, 30)) * 6 + 1, int(rng.integers(0, 6))
        walk = [ring + (start + i) % 6 for i in range(5)]
        lines.append(" ".join(map(str, [u + 1, *rng.integers(1, 181, 2), *walk])))
    lines.append("999 7 8 900 901")  # items 900 → 901 only as this user's validation → test pair
    (d / "s.txt").write_text("\n".join(lines) + "\n")
    assert run_cli("data", "prepare", "-f", "sequences", "-i", d / "s.txt", "-o", d / "ds").exit_code == 0
    cfg = {"data": {"max_len": 16}, "model": {"width": 16, "dim": 16, "id_dim": 16, "layers": 1},
           "optim": {"max_epochs": 1, "batch_actions": 256}, "checkpoint_every": 50,
           "blend": {"item_knn": True, "weights": [0.0, 0.5, 0.9]}}
    (d / "cfg.json").write_text(json.dumps(cfg))
    r = run_cli("train", "-d", d / "ds", "-o", d / "run", "--preset", "loo", "--config", d / "cfg.json",
                "--no-progress")
    assert r.exit_code == 0, r.output
    return d


def test_blend_is_chosen_on_validation_and_reported(chains_run, cli):
    d = chains_run
    r = cli("evaluate", "--run", d / "run", "--dataset", d / "ds", "--exclude-history")
    assert r.exit_code == 0, r.output
    assert "choosing the item-kNN blend weight on validation (history removed)" in r.stderr
    choice = json.loads((d / "run" / "blend.json").read_text())
    rep = json.loads((d / "run" / "eval" / "leave-one-out-test-history-excluded.json").read_text())
    assert rep["blend"] == choice and set(choice["validation"]) == {"0", "0.5", "0.9"}
    # the λ grid's bar counts every validation row once per λ (here as many rows as the test's: all 401 users)
    n = 3 * rep["user_windows"]
    assert "choosing λ among 3" in r.stderr and f"{n}/{n}" in r.stderr
    # the neighbours know the chains: λ > 0 wins on validation, and on test the blend is far above the network
    assert choice["weight"] > 0 and choice["validation"][f"{choice['weight']:g}"] > choice["validation"]["0"]
    res = rep["results"]
    assert set(res) == {"pinnerformer", "pinnerformer network alone", "item-kNN (neighbours alone)", "most-popular"}
    assert res["pinnerformer"]["ndcg@10"]["mean"] > res["pinnerformer network alone"]["ndcg@10"]["mean"] + 0.1, rep
    assert "blended with item-to-item neighbours" in r.stdout and f"λ = {choice['weight']:g}" in r.stdout
    # λ = 0 is the network alone: its validation number equals the network's own, scored by the plain scorer
    r = cli("evaluate", "--run", d / "run", "--dataset", d / "ds", "--exclude-history", "--split", "validation")
    assert r.exit_code == 0 and "choosing" not in r.stderr  # the choice is kept for this checkpoint
    val = json.loads((d / "run" / "eval" / "leave-one-out-validation-history-excluded.json").read_text())
    assert val["results"]["pinnerformer network alone"]["ndcg@10"]["mean"] == pytest.approx(choice["validation"]["0"],
                                                                                            abs=1e-6)
    assert val["results"]["pinnerformer"]["ndcg@10"]["mean"] == pytest.approx(
        choice["validation"][f"{choice['weight']:g}"], abs=1e-6)
    # scored with the history in the ranking: λ is chosen again, on validation under that protocol, and kept apart
    r = cli("evaluate", "--run", d / "run", "--dataset", d / "ds")
    assert r.exit_code == 0 and "choosing the item-kNN blend weight on validation (history in)" in r.stderr
    kept = json.loads((d / "run" / "blend-history-in.json").read_text())
    hin = json.loads((d / "run" / "eval" / "leave-one-out-test.json").read_text())
    assert hin["blend"] == kept and kept["history_excluded"] is False and choice["history_excluded"] is True
    assert json.loads((d / "run" / "blend.json").read_text()) == choice  # the selection protocol's λ untouched
    best = max(kept["validation"].values())
    assert kept["weight"] == min(float(w) for w, v in kept["validation"].items() if v == best)
    assert "history in; by λ" in r.stdout
    r = cli("evaluate", "--run", d / "run", "--dataset", d / "ds", "--split", "validation")
    assert r.exit_code == 0 and "choosing" not in r.stderr
    val_in = json.loads((d / "run" / "eval" / "leave-one-out-validation.json").read_text())["results"]
    assert val_in["pinnerformer"]["ndcg@10"]["mean"] == pytest.approx(kept["validation"][f"{kept['weight']:g}"],
                                                                     abs=1e-6)
    assert val_in["pinnerformer network alone"]["ndcg@10"]["mean"] == pytest.approx(kept["validation"]["0"], abs=1e-6)
    # switched off for one evaluation: the network alone is the model
    r = cli("evaluate", "--run", d / "run", "--dataset", d / "ds", "--exclude-history", "--no-item-knn")
    off = json.loads((d / "run" / "eval" / "leave-one-out-test-history-excluded.json").read_text())
    assert r.exit_code == 0 and off["blend"] is None and set(off["results"]) == {"pinnerformer", "most-popular"}
    assert off["results"]["pinnerformer"] == res["pinnerformer network alone"]


def test_blend_choice_belongs_to_its_checkpoint(chains_run, cli):
    d = chains_run
    assert cli("evaluate", "--run", d / "run", "--dataset", d / "ds", "--exclude-history").exit_code == 0
    path = d / "run" / "blend.json"
    stored = json.loads(path.read_text())
    stored["checkpoint"] = "0" * 64  # as if chosen for another checkpoint: chosen again, the same way
    path.write_text(json.dumps(stored))
    r = cli("evaluate", "--run", d / "run", "--dataset", d / "ds", "--exclude-history")
    assert r.exit_code == 0 and "choosing the item-kNN blend weight" in r.stderr
    again = json.loads(path.read_text())
    assert again["checkpoint"] != stored["checkpoint"] and again["validation"] == stored["validation"]
    path.write_text("{not json")  # unreadable: chosen again, never a traceback
    r = cli("evaluate", "--run", d / "run", "--dataset", d / "ds", "--exclude-history")
    assert r.exit_code == 0 and json.loads(path.read_text()) == again
    # a name that can be neither read nor replaced (as a run folder one may read but not write): λ is chosen, used
    # and reported, and the log says it was not kept
    path.unlink()
    path.mkdir()
    (path / "x").write_text("")  # a non-empty folder: a rename onto it fails
    try:
        r = cli("evaluate", "--run", d / "run", "--dataset", d / "ds", "--exclude-history")
        rep = json.loads((d / "run" / "eval" / "leave-one-out-test-history-excluded.json").read_text())
    finally:
        (path / "x").unlink()
        path.rmdir()
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    assert "choosing the item-kNN blend weight" in r.stderr and "could not be kept in" in r.stderr
    assert rep["blend"]["weight"] == again["weight"] and rep["blend"]["validation"] == again["validation"]
    assert not any(p.name.startswith(".blend.json") for p in (d / "run").iterdir())  # no temporary file left behind


def test_a_run_selected_with_the_history_in_keeps_the_other_protocols_choice_apart(chains_run, cli, tmp_path):
    """A run whose checkpoint was selected with the history in the ranking (eval.exclude_history false): its own
    protocol's λ is RUN/blend.json, the history-removed one RUN/blend-history-removed.json."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(chains_run / "run", run, ignore=shutil.ignore_patterns("blend*.json", "eval"))
    desc = json.loads((run / "config.json").read_text())
    desc["config"]["eval"]["exclude_history"] = False  # as if trained so: the checkpoint is the same file
    (run / "config.json").write_text(json.dumps(desc))
    r = cli("evaluate", "--run", run, "--dataset", chains_run / "ds", "--exclude-history")
    assert r.exit_code == 0 and "choosing the item-kNN blend weight on validation (history removed)" in r.stderr
    removed = json.loads((run / "blend-history-removed.json").read_text())
    assert removed["history_excluded"] is True and not (run / "blend.json").exists()
    r = cli("evaluate", "--run", run, "--dataset", chains_run / "ds")
    assert r.exit_code == 0 and "(history in)" in r.stderr
    own = json.loads((run / "blend.json").read_text())
    assert own["history_excluded"] is False and own["validation"] != removed["validation"]
    # each is found again where it was kept: nothing is chosen twice
    for extra in (("--exclude-history",), ()):
        r = cli("evaluate", "--run", run, "--dataset", chains_run / "ds", *extra)
        assert r.exit_code == 0 and "choosing" not in r.stderr


def test_blend_is_refused_for_a_future_window_run(trained, planted, cli):
    r = cli("evaluate", "--run", trained, "--dataset", planted, "--protocol", "leave-one-out", "--item-knn")
    assert r.exit_code == 2 and "leave-one-out protocol only" in r.stderr and "Traceback" not in r.output


def test_resume_may_change_the_blend(chains_run, cli, tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"blend": {"item_knn": False}}))
    r = cli("train", "-d", chains_run / "ds", "-o", chains_run / "run", "--resume", "--preset", "loo",
            "--config", tmp_path / "c.json", "--no-progress")
    assert r.exit_code == 0 and "resuming with blend.item_knn True -> False" in r.stderr, r.output
    (tmp_path / "c.json").write_text(json.dumps({**TINY, "blend": {"item_knn": False}}))
    r = cli("train", "-d", chains_run / "ds", "-o", chains_run / "run", "--resume", "--preset", "loo",
            "--config", tmp_path / "c.json", "--no-progress")
    assert r.exit_code == 2 and "would change it" in r.stderr and "blend" not in r.stderr.split("would change it")[1]


def test_neighbours_never_see_a_validation_or_test_item(chains_run):
    from pinnerformer.data.dataset import Dataset
    from pinnerformer.evaluation.blend import fit_knn
    from pinnerformer.models.item_knn import ItemKNNConfig

    ds = Dataset.open(chains_run / "ds")
    index = dict(zip(ds.items["item_id"].to_list(), ds.items["item"].to_list()))
    sim = fit_knn(ds, ItemKNNConfig()).similarity
    assert sim[index[7], index[8]] > 0  # a training pair of the same user
    # 900 is that user's validation item and 901 the test item: neither is in what the neighbours were fit on
    assert sim[index[900]].nnz == 0 and sim[:, index[900]].nnz == 0 and sim[:, index[901]].nnz == 0


def test_blend_is_chosen_again_when_anything_it_depends_on_changes(chains_run):
    from pinnerformer.data.dataset import Dataset
    from pinnerformer.evaluation.evaluate import EvaluateOptions
    from pinnerformer.runs import RunDir
    from pinnerformer.runs.evaluate import evaluate_run

    ds, run = Dataset.open(chains_run / "ds"), RunDir(chains_run / "run")
    options = EvaluateOptions(split="validation", exclude_history=True)

    def chosen(blend) -> bool:
        lines = []
        evaluate_run(run, ds, options, log=lines.append, blend=blend)
        return any("choosing the item-kNN blend weight" in x for x in lines)

    base = run.config.blend
    chosen(base)
    assert not chosen(base)  # kept
    for other in (base.model_copy(update={"weights": [0.0, 0.3]}),
                  base.model_copy(update={"knn": base.knn.model_copy(update={"recency": 0.9})})):
        assert chosen(other) and not chosen(other)  # chosen again for the new settings, then kept
    assert chosen(base)
