"""The GPU code paths: no host-device synchronisation inside a training step (eager and compiled), GPU (bf16)
embeddings that agree with the CPU (fp32) ones, `fit` with loader workers and a compiled encoder, and compiled
training (encoder + fused loss) following the eager run. CI has no GPU, so these skip
there; run them on a machine with one (`pytest tests/test_gpu.py`)."""

import json

import numpy as np
import pytest
import torch

from conftest import TINY
from pinnerformer.data import Dataset
from pinnerformer.training.config import load_config
from pinnerformer.models.embedding import embed_users
from pinnerformer.training.retrieval import retrieval_loop

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI machines have none)")


def config(**over):
    return load_config("small", overrides=json.loads(json.dumps({**TINY, "device": "cuda", **over})))


@pytest.mark.parametrize("negatives,mask_own,compiled", [("mixed", True, False), ("mixed", False, False),
                                                          ("full", True, False), ("mixed", True, True),
                                                          ("mixed", False, True)])
def test_a_training_step_never_waits_for_the_gpu(planted, tmp_path, negatives, mask_own, compiled):
    tr = retrieval_loop(Dataset.open(planted), config(loss={**TINY["loss"], "negatives": negatives,
                                                            "mask_own_positives": mask_own}, compile=compiled),
                        tmp_path, log=lambda s: None)
    users = tr.task.sampler.eligible[:tr.cfg.optim.batch_size]
    preps = [tr.task.batch_for(users, np.random.default_rng(i)) for i in range(4)]
    # warm-up: lazy initialisation (and compilation, with its autotuning) may synchronise; query and pool sizes
    # differ between batches, so the second warm-up step also checks the fused loss is not compiled again per size
    for g in range(2):
        tr.train_step(preps[g], g, 0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for g, prep in enumerate(preps[2:], start=2):
            out = tr.train_step(prep, g, 0)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert np.isfinite(out.read()[0])


def test_gpu_bf16_user_embeddings_agree_with_cpu_fp32(planted, tmp_path):
    ds = Dataset.open(planted)
    tr = retrieval_loop(ds, config(), tmp_path, log=lambda s: None)
    tr.fit(progress=False, max_steps=20)
    tl = ds.timelines
    starts, ends = np.asarray(tl.offsets[:-1]), np.asarray(tl.offsets[1:])
    gpu = embed_users(tr.model, tl, starts, ends, torch.device("cuda"), 64, fixed_shape=True).cpu()
    cpu = embed_users(tr.model.cpu(), tl, starts, ends, torch.device("cpu"), 64, fixed_shape=True)
    cos = (gpu * cpu).sum(-1)  # both L2-normalised
    assert gpu.shape == cpu.shape == (len(starts), tr.model.cfg.dim)
    assert cos.min() > 0.99, cos.min()


def test_fit_on_gpu_with_workers_and_compiled_encoder(planted, tmp_path):
    summary = retrieval_loop(Dataset.open(planted), config(compile=True, loader_workers=2,
                                                           optim={**TINY["optim"], "max_epochs": 2}),
                             tmp_path / "run", log=lambda s: None).fit(progress=False)
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [l for l in lines if l["kind"] == "step"]
    assert [l["step"] for l in steps] == list(range(summary.steps)) and all(np.isfinite([l["loss"] for l in steps]))
    assert np.mean([l["loss"] for l in steps[-5:]]) < np.mean([l["loss"] for l in steps[:5]])
    assert summary.best > summary.popularity


def test_compiled_training_on_gpu_follows_the_eager_run(planted, tmp_path):
    """The compiled encoder and fused loss in bf16 against the eager bf16 path, on the same batches (no dropout:
    compiled kernels draw other dropout masks)."""
    ds = Dataset.open(planted)
    over = dict(optim={**TINY["optim"], "max_epochs": 1}, model={**TINY["model"], "dropout": 0.0})
    for name, comp in (("eager", False), ("comp", True)):
        retrieval_loop(ds, config(**over, compile=comp), tmp_path / name, log=lambda s: None).fit(progress=False,
                                                                                                   max_steps=8)
    losses = [[l["loss"] for l in map(json.loads, (tmp_path / r / "metrics.jsonl").read_text().splitlines())
               if l["kind"] == "step"] for r in ("eager", "comp")]
    assert len(losses[0]) == len(losses[1]) == 8
    np.testing.assert_allclose(losses[1], losses[0], rtol=2e-2)
