"""The GPU code paths: no host-device synchronisation inside a training step, GPU (bf16) embeddings that agree
with the CPU (fp32) ones, and `fit` with loader workers and a compiled encoder. CI has no GPU, so these skip
there; run them on a machine with one (`pytest tests/test_gpu.py`)."""

import json

import numpy as np
import pytest
import torch

from conftest import TINY
from pinnerformer.data import Dataset
from pinnerformer.training.config import load_config
from pinnerformer.training.trainer import Trainer, embed_users

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI machines have none)")


def config(**over):
    return load_config("small", overrides=json.loads(json.dumps({**TINY, "device": "cuda", **over})))


@pytest.mark.parametrize("negatives,mask_own", [("mixed", True), ("mixed", False), ("full", True)])
def test_a_training_step_never_waits_for_the_gpu(planted, tmp_path, negatives, mask_own):
    tr = Trainer(Dataset.open(planted), config(loss={**TINY["loss"], "negatives": negatives,
                                                     "mask_own_positives": mask_own}), tmp_path, log=lambda s: None)
    users = tr.sampler.eligible[:tr.cfg.optim.batch_size]
    preps = [tr.prepare(users, np.random.default_rng(i)) for i in range(3)]
    tr.train_step(preps[0], 0)  # warm-up: lazy initialisation may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for g, prep in enumerate(preps[1:], start=1):
            out = tr.train_step(prep, g)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert np.isfinite(tr.read_step(out)[0])


def test_gpu_bf16_user_embeddings_agree_with_cpu_fp32(planted, tmp_path):
    ds = Dataset.open(planted)
    tr = Trainer(ds, config(), tmp_path, log=lambda s: None)
    tr.fit(progress=False, max_steps=20)
    tl = ds.timelines
    starts, ends = np.asarray(tl.offsets[:-1]), np.asarray(tl.offsets[1:])
    gpu = embed_users(tr.model, ds, starts, ends, torch.device("cuda"), 64, fixed_shape=True).cpu()
    cpu = embed_users(tr.model.cpu(), ds, starts, ends, torch.device("cpu"), 64, fixed_shape=True)
    cos = (gpu * cpu).sum(-1)  # both L2-normalised
    assert gpu.shape == cpu.shape == (len(starts), tr.model_cfg.dim)
    assert cos.min() > 0.99, cos.min()


def test_fit_on_gpu_with_workers_and_compiled_encoder(planted, tmp_path):
    summary = Trainer(Dataset.open(planted), config(compile=True, loader_workers=2,
                                                    optim={**TINY["optim"], "max_epochs": 2}),
                      tmp_path / "run", log=lambda s: None).fit(progress=False)
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [l for l in lines if l["kind"] == "step"]
    assert [l["step"] for l in steps] == list(range(summary["steps"])) and all(np.isfinite([l["loss"] for l in steps]))
    assert np.mean([l["loss"] for l in steps[-5:]]) < np.mean([l["loss"] for l in steps[:5]])
    assert summary["recall@10"] > summary["popularity"]
