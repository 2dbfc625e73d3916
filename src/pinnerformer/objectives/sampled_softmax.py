"""Sampled softmax with logQ correction, its negative pool, and the count-min sketch behind Q.

For a query u with positive p and negatives n (the PinnerFormer paper's loss):

    L(u) = -log( e^{s(u,p) - log Q(p)} / (e^{s(u,p) - log Q(p)} + Σ_n e^{s(u,n) - log Q(n)}) )

where s = cosine / τ and Q(x) is the expected number of copies of item x in the negative pool:
    in-batch  (other queries' positives, N_b of them)   Q(x) = N_b · f(x), f = label frequency (count-min sketch)
    random    (R uniform draws from the catalogue)      Q(x) = R / |I|
    mixed     (the union)                               Q(x) = N_b · f(x) + R / |I|
    full      (the whole catalogue, once each)          Q(x) = 1: logQ is a constant and drops out, so this is
                                                        the full softmax (cross-entropy over every item)
Negatives that are one of the query's own user's positives are masked out (this also removes "accidental
hits": a random negative equal to the positive). With `mask_own_positives=False` only the query's own label
is masked (`label_mask`): the user's other positives stay negatives, as in plain cross-entropy. Each user
(example) weighs equally: query losses are averaged within an example, then over examples (or, with
`weighting: query`, every query weighs equally).

`SampledSoftmaxLoss` is the loss of a training batch: its host half (`host_inputs`: the sketch, the negative pool,
its log Q, de-duplicated item ids) runs on the host, from host arrays, so that the GPU never has to be waited for;
the caller moves the result to the device in one go. Its device half (`__call__`) takes the queries' embeddings and
the item tower. Building the pool is a separate function (`build_negative_pool`) so that a distributed trainer can
all-gather pools across workers before the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from pinnerformer.config import StrictModel
from pinnerformer.objectives.examples import ExampleBatch, Objective

Negatives = Literal["mixed", "in-batch", "random", "full"]
NEGATIVES = list(Negatives.__args__)
MERSENNE = (1 << 31) - 1


class LossConfig(StrictModel):
    """The training objective and its loss: the `loss` section of a training config."""

    objective: Objective = "dense-all-action"
    negatives: Negatives = "mixed"  # full: softmax over the whole catalogue
    n_random: int = Field(1024, ge=1)
    logq: bool = True
    mask_own_positives: bool = True  # False: only the query's own label is masked; other positives stay negatives
    # example: each user (example) weighs equally, its queries averaged first; query: every query weighs equally
    # (SASRec's mean over all positions: a user with 40 positions counts 40 times one with 1)
    weighting: Literal["example", "query"] = "example"
    # > 0: add this times the twin-view contrastive loss (objectives/contrastive.py): each example's newest query
    # encoded a second time with other dropout must find its twin among the batch's (one more encoder pass)
    contrastive_weight: float = Field(0.0, ge=0)
    contrastive_temperature: float = Field(0.1, gt=0)
    # > 0 (ensembles, model.members > 1): add this times each member's KL divergence from the ensemble's
    # distribution over its candidates (objectives/mutual_distillation.py): the members teach each other. Keeps the
    # eager loss under compile (the term reads its [Q, 1 + N] logits, one copy per member)
    distill_weight: float = Field(0.0, ge=0)
    # > 0: add this times the KL divergence from a frozen teacher's next-item distribution over the whole catalogue
    # (objectives/teacher_distillation.py); `teacher`: the trained leave-one-out run on the same dataset to learn
    # from (one network or an ensemble; with its item-kNN blend when that run has one). The student stays one network
    teacher: str | None = None
    teacher_weight: float = Field(0.0, ge=0)
    # λ of the teacher's item-kNN blend: None, the λ that run chose on validation (none without a blend); 0, its
    # network alone; any other value needs a run with a blend (its neighbours' settings)
    teacher_blend: float | None = Field(None, ge=0, lt=1)
    # Hinton's distillation temperature T: both distributions softened (the teacher's p_T^(1/T), the student's
    # logits / T) and the term scaled by T² (its gradient keeps its size); 1: the distributions as they are
    teacher_temperature: float = Field(1.0, gt=0)
    sketch_width: int = Field(1 << 18, ge=1)
    sketch_depth: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _teacher_named(self) -> "LossConfig":
        if self.teacher_weight and not self.teacher:
            raise ValueError(f"loss.teacher_weight {self.teacher_weight} needs loss.teacher: the trained run to "
                             "learn from")
        return self


class CountMinSketch:
    """Approximate item counts in fixed memory: depth rows of width counters, estimate = min over rows.

    Over-estimates only, by at most e·total/width with probability 1 - e^-depth (Cormode & Muthukrishnan).
    Defaults: width 2^18, depth 4 (8 MiB) — collisions are negligible for catalogues up to ~10^5 items.
    """

    def __init__(self, width: int = 1 << 18, depth: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.width, self.depth = width, depth
        self.a = torch.randint(1, MERSENNE, (depth, 1), generator=g, dtype=torch.int64)
        self.b = torch.randint(0, MERSENNE, (depth, 1), generator=g, dtype=torch.int64)
        self.table = torch.zeros(depth, width, dtype=torch.int64)
        self.total = 0

    def _cells(self, items: torch.Tensor) -> torch.Tensor:
        x = items.reshape(1, -1).to(torch.int64) % MERSENNE
        return ((self.a * x + self.b) % MERSENNE) % self.width  # [depth, n]

    def update(self, items: torch.Tensor) -> None:
        cells = self._cells(items.cpu())
        for d in range(self.depth):
            self.table[d].index_add_(0, cells[d], torch.ones_like(cells[d]))
        self.total += items.numel()

    def count(self, items: torch.Tensor) -> torch.Tensor:
        cells = self._cells(items.cpu())
        return torch.gather(self.table, 1, cells).min(0).values.reshape(items.shape)

    def frequency(self, items: torch.Tensor) -> torch.Tensor:
        return self.count(items).double() / max(self.total, 1)

    def state_dict(self) -> dict:
        return {"table": self.table.clone(), "total": self.total, "a": self.a, "b": self.b}

    def load_state_dict(self, s: dict) -> None:
        self.table, self.total, self.a, self.b = s["table"].clone(), int(s["total"]), s["a"], s["b"]
        self.depth, self.width = self.table.shape


@dataclass
class NegativePool:
    items: torch.Tensor  # [N] item ids
    log_q: torch.Tensor  # [N] log expected count in the pool (0 when logQ correction is off)


def log_q_of(items: torch.Tensor, kind: str, n_in_batch: int, n_random: int, n_items: int,
             sketch: CountMinSketch) -> torch.Tensor:
    """log Q(x) for the pool `kind` (see module docstring)."""
    if kind == "full":  # every item exactly once: Q = 1
        return torch.zeros(items.shape, device=items.device)
    q = torch.zeros(items.shape, dtype=torch.float64)
    if kind in ("in-batch", "mixed"):
        q += n_in_batch * sketch.frequency(items).clamp(min=1.0 / max(sketch.total, 1))
    if kind in ("random", "mixed"):
        q += n_random / n_items
    return q.log().float().to(items.device)


def build_negative_pool(label_items: torch.Tensor, kind: str, n_random: int, n_items: int, sketch: CountMinSketch,
                        use_logq: bool, generator: torch.Generator) -> NegativePool:
    """Negatives for one batch: the batch's positives (in-batch), uniform random items, both, or every item."""
    if kind not in NEGATIVES:
        raise ValueError(f"unknown negatives {kind!r}; expected one of {', '.join(NEGATIVES)}")
    if kind == "full":
        items = torch.arange(n_items, device=label_items.device)
        return NegativePool(items, torch.zeros(items.shape, device=items.device))
    parts = []
    if kind in ("in-batch", "mixed"):
        parts.append(label_items)
    if kind in ("random", "mixed"):
        parts.append(torch.randint(0, n_items, (n_random,), generator=generator).to(label_items.device))
    items = torch.cat(parts)
    n_ib = label_items.numel() if kind != "random" else 0
    log_q = (log_q_of(items, kind, n_ib, n_random if kind != "in-batch" else 0, n_items, sketch) if use_logq
             else torch.zeros(items.shape, device=items.device))
    return NegativePool(items, log_q)


def own_positive_rows(pool_items: torch.Tensor, label_example: torch.Tensor, label_item: torch.Tensor,
                      n_examples: int, n_items: int) -> torch.Tensor:
    """[B, N] True where pool item n is one of example b's positives: the rows `own_positive_mask` gathers from.

    A membership test of (example, item) keys by binary search in the sorted label keys: unlike torch.isin, it
    never makes the host wait for the GPU."""
    if label_example.numel() == 0:
        return torch.zeros(n_examples, len(pool_items), dtype=torch.bool, device=pool_items.device)
    keys = torch.sort(label_example * n_items + label_item).values
    ex_keys = torch.arange(n_examples, device=pool_items.device).unsqueeze(1) * n_items + pool_items.unsqueeze(0)
    at = torch.searchsorted(keys, ex_keys).clamp_(max=len(keys) - 1)
    return keys[at] == ex_keys


def own_positive_mask(q_example: torch.Tensor, pool_items: torch.Tensor, label_example: torch.Tensor,
                      label_item: torch.Tensor, n_examples: int, n_items: int) -> torch.Tensor:
    """[Q, N] True where pool item n is one of the positives of query q's example (to be masked)."""
    return own_positive_rows(pool_items, label_example, label_item, n_examples, n_items)[q_example]


def own_positive_catalogue_mask(q_example: torch.Tensor, label_example: torch.Tensor, label_item: torch.Tensor,
                                n_examples: int, n_items: int) -> torch.Tensor:
    """[Q, I] True where catalogue item i is one of the positives of query q's example: `own_positive_mask` with the
    whole catalogue as the pool, made by scattering the labels (no sort)."""
    dev = q_example.device
    per_example = torch.zeros(n_examples, n_items, dtype=torch.bool, device=dev)
    per_example.index_put_((label_example, label_item), torch.ones(len(label_item), dtype=torch.bool, device=dev))
    return per_example[q_example]


def label_mask(q_item: torch.Tensor, pool_items: torch.Tensor) -> torch.Tensor:
    """[Q, N] True where pool item n is query q's own label (an accidental hit): the minimal mask."""
    return pool_items.unsqueeze(0) == q_item.unsqueeze(1)


def mean_over_examples(per_query: torch.Tensor, q_example: torch.Tensor, n_examples: int,
                       examples_with_queries: int | None = None) -> torch.Tensor:
    """Each user weighs equally: the mean over examples (that have queries) of the mean of their queries' losses.
    Written without boolean indexing, which would make the host wait for the GPU in the middle of every step.
    examples_with_queries: the denominator when per_query holds only some of a batch's examples (a rank's share
    of a distributed batch: the ranks' results then add up to the whole batch's loss)."""
    count = torch.zeros(n_examples, device=per_query.device, dtype=per_query.dtype).index_add_(
        0, q_example, torch.ones_like(per_query))
    total = torch.zeros_like(count).index_add_(0, q_example, per_query)
    has = count > 0
    per_example = torch.where(has, total / count.clamp(min=1), torch.zeros_like(total))
    if examples_with_queries is not None:
        return per_example.sum() / max(examples_with_queries, 1)
    return per_example.sum() / has.sum().clamp(min=1)  # no queries at all: 0 (the trainer reports such steps)


def reduce_queries(per_query: torch.Tensor, q_example: torch.Tensor, n_examples: int, weighting: str = "example",
                   denominator: int | None = None) -> torch.Tensor:
    """The batch's loss from its queries' losses: `mean_over_examples` (weighting="example"), or the mean over
    queries ("query"). denominator: examples with queries (example) or queries (query) of the whole batch, when
    per_query holds one rank's share of a distributed batch."""
    if weighting == "example":
        return mean_over_examples(per_query, q_example, n_examples, denominator)
    return per_query.sum() / max(denominator if denominator is not None else per_query.numel(), 1)


def full_softmax_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None, q_example: torch.Tensor,
                      n_examples: int, weighting: str = "example") -> torch.Tensor:
    """The same loss when the pool is the whole catalogue (negatives="full"), computed as one fused cross-entropy.

    logits [Q, I] = s(u, every item); target [Q] item ids; mask [Q, I] True = drop (the query's target is never
    dropped), or None. Equal to `sampled_softmax_loss` with the full pool, but without the [Q, I] copies.
    """
    if mask is not None:  # (index_put_ with a device tensor: assigning a Python scalar would wait for the GPU)
        mask = mask.clone().index_put_((torch.arange(len(target), device=mask.device), target),
                                       torch.zeros(len(target), dtype=torch.bool, device=mask.device))
        logits = logits.masked_fill(mask, float("-inf"))
    per_query = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    return reduce_queries(per_query, q_example, n_examples, weighting)


def sampled_softmax_loss(pos_logit: torch.Tensor, neg_logit: torch.Tensor, pos_log_q: torch.Tensor,
                         neg_log_q: torch.Tensor, mask: torch.Tensor, q_example: torch.Tensor,
                         n_examples: int, denominator: int | None = None, weighting: str = "example"
                         ) -> torch.Tensor:
    """Mean over examples of the mean over their queries of the logQ-corrected sampled softmax loss (or, with
    weighting="query", the mean over queries). denominator: see `reduce_queries` (one rank's share).

    pos_logit [Q] = s(u,p); neg_logit [Q,N] = s(u,n); pos_log_q [Q]; neg_log_q [N]; mask [Q,N] True = drop.
    """
    logits = corrected_logits(pos_logit, neg_logit, pos_log_q, neg_log_q, mask)
    return loss_of_logits(logits, q_example, n_examples, denominator, weighting)


def loss_of_logits(logits: torch.Tensor, q_example: torch.Tensor, n_examples: int, denominator: int | None = None,
                   weighting: str = "example") -> torch.Tensor:
    """The sampled softmax loss from its [Q, 1 + N] logits (`corrected_logits`: column 0 the positive)."""
    per_query = torch.logsumexp(logits, dim=1) - logits[:, 0]
    return reduce_queries(per_query, q_example, n_examples, weighting, denominator)


def corrected_logits(pos_logit: torch.Tensor, neg_logit: torch.Tensor, pos_log_q: torch.Tensor,
                     neg_log_q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[Q, 1 + N] the logits the sampled softmax normalises: column 0 the positive's s(u,p) - log Q(p), then the
    pool's s(u,n) - log Q(n), masked entries -inf (shapes as in `sampled_softmax_loss`)."""
    z_pos = pos_logit - pos_log_q
    z_neg = (neg_logit - neg_log_q.unsqueeze(0)).masked_fill(mask, float("-inf"))
    return torch.cat([z_pos.unsqueeze(1), z_neg], dim=1)


def sampled_softmax_loss_fused(q: torch.Tensor, pos_e: torch.Tensor, neg_e: torch.Tensor, tau: torch.Tensor,
                               pos_log_q: torch.Tensor, neg_log_q: torch.Tensor, q_example: torch.Tensor,
                               n_examples: int, own_rows: torch.Tensor | None = None,
                               q_item: torch.Tensor | None = None, pool_items: torch.Tensor | None = None,
                               weighting: str = "example") -> torch.Tensor:
    """`sampled_softmax_loss` from the embeddings, written for torch.compile to fuse (the trainer compiles it when
    `compile` is on; the plain function above is its reference, and tests compare the two).

    q [Q, D] query embeddings, pos_e [Q, D] their positives, neg_e [N, D] the pool, tau the temperature. The mask is
    never an input of size [Q, N]: either own_rows [B, N] (`own_positive_rows`), gathered per query by q_example,
    or, without it, q_item [Q] and pool_items [N] (mask the query's own label). Nothing of size [Q, N] needs to be
    written to memory: the masked, logQ-corrected logits feed two row reductions (max, then Σ exp) and, backward,
    one pass that writes the logits' gradient — instead of a dozen eager passes over [Q, N] float32 copies.
    The log-sum-exp over [z_pos, z_neg] is taken around m = max(z_pos, max z_neg) with z_pos as a separate term
    (no concatenation); m ≥ z_pos is finite, so a query whose negatives are all masked gets loss 0 and zero
    gradients, as in the reference.
    """
    acc = torch.promote_types(q.dtype, torch.float32)  # float32 from bf16 operands; float64 stays float64
    # s(u, p) in fp32 (the eager GPU path takes it from a bf16 bmm: the two differ by bf16 rounding of s(u, p))
    pos_logit = (q.to(acc) * pos_e.to(acc)).sum(-1) / tau
    z_pos = pos_logit - pos_log_q
    z_neg = (q @ neg_e.T).to(acc) / tau - neg_log_q.unsqueeze(0)  # a bf16 matmul under autocast; `acc` from here
    mask = own_rows[q_example] if own_rows is not None else label_mask(q_item, pool_items)
    z_neg = z_neg.masked_fill(mask, float("-inf"))
    neg_max = z_neg.amax(dim=1) if z_neg.shape[1] else torch.full_like(z_pos, float("-inf"))  # (empty pool)
    m = torch.maximum(z_pos, neg_max).detach()  # any constant is exact here; the max keeps exp() ≤ 1
    lse = m + torch.log(torch.exp(z_pos - m) + torch.exp(z_neg - m.unsqueeze(1)).sum(dim=1))
    per_query = lse - z_pos
    return reduce_queries(per_query, q_example, n_examples, weighting)


class SampledSoftmaxLoss:
    """The loss of one batch of examples under `LossConfig`, with the count-min sketch it keeps across batches.

    fused: compute the sampled softmax with `sampled_softmax_loss_fused` compiled by torch.compile (query and pool
    sizes vary per batch, hence dynamic shapes; no CUDA graphs, which would be recorded again for every new size);
    negatives=full keeps its own fused cross-entropy."""

    def __init__(self, cfg: LossConfig, n_items: int, seed: int, fused: bool = False):
        self.cfg, self.n_items = cfg, n_items
        self.sketch = CountMinSketch(cfg.sketch_width, cfg.sketch_depth, seed=seed)
        self.fused = torch.compile(sampled_softmax_loss_fused, dynamic=True) if fused else None

    def host_inputs(self, batch: ExampleBatch, generator: torch.Generator) -> dict[str, np.ndarray | torch.Tensor]:
        """Host arrays for `__call__`: the queries, the masks' inputs, and (sampled pools) the pool, log Q of the
        positives and of the pool, and the de-duplicated item ids (`uniq`, with `inv` mapping back: positives first,
        then the pool). Counts the batch's positives into the sketch first."""
        cfg = self.cfg
        label_items = torch.from_numpy(batch.q_item)
        self.sketch.update(label_items)
        host: dict[str, np.ndarray | torch.Tensor] = {"q_example": batch.q_example, "q_position": batch.q_position,
                                                      "label_items": batch.q_item}
        if cfg.mask_own_positives:
            host.update(label_example=batch.label_example, label_item=batch.label_item)
        if cfg.negatives != "full":
            pool = build_negative_pool(label_items, cfg.negatives, cfg.n_random, self.n_items, self.sketch, cfg.logq,
                                       generator)
            n_ib = len(label_items) if cfg.negatives in ("in-batch", "mixed") else 0
            n_rand = cfg.n_random if cfg.negatives in ("random", "mixed") else 0
            pos_log_q = (log_q_of(label_items, cfg.negatives, n_ib, n_rand, self.n_items, self.sketch) if cfg.logq
                         else torch.zeros(len(label_items)))
            uniq, inv = np.unique(np.concatenate([batch.q_item, pool.items.numpy()]), return_inverse=True)
            host.update(pool_items=pool.items, pool_log_q=pool.log_q, pos_log_q=pos_log_q, uniq=uniq, inv=inv)
        return host

    def __call__(self, q: torch.Tensor, item_embedding: Callable[[torch.Tensor], torch.Tensor], tau: torch.Tensor,
                 t: dict[str, torch.Tensor], n_examples: int, queries: torch.Tensor | None = None,
                 with_logits: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """q [Q, D] the queries' embeddings; item_embedding(ids) -> [n, D] normalised; tau the temperature;
        t = host_inputs(...) on q's device. Scores run under bf16 autocast on GPU, the loss itself in float32.

        with_logits: also return the [Q, 1 + N] logits the loss normalises (`corrected_logits`), for a term on the
        same distribution (objectives/mutual_distillation.py); sampled negatives, eager, one process only.

        queries: on one rank of a distributed step, which of the batch's queries q holds (t describes the whole
        batch, the same on every rank); the loss is then this rank's share of the whole batch's loss (the same
        denominator), so the ranks' losses, and their gradients, add up to those of one process on the batch."""
        cfg, dev, B = self.cfg, q.device, n_examples
        q_example, label_items = t["q_example"], t["label_items"]
        share = None
        if with_logits and (cfg.negatives == "full" or self.fused is not None or queries is not None):
            raise ValueError("the loss's logits are kept for the sampled negatives (random, in-batch, mixed) of the "
                             "eager loss in one process: not negatives=full, not the compiled loss, not distributed")
        if queries is not None:
            if cfg.negatives == "full" or self.fused is not None:
                raise ValueError("a distributed step supports the sampled negatives (random, in-batch, mixed) of the "
                                 "eager loss: not negatives=full, not the compiled loss")
            # the whole batch's denominator: its examples with queries, or its queries
            share = int(torch.unique(q_example).numel()) if cfg.weighting == "example" else len(label_items)
            label_items_all = label_items
            q_example, label_items = q_example[queries], label_items[queries]
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            if cfg.negatives == "full":  # the pool is every item, in id order: embed the catalogue once
                all_e = item_embedding(torch.arange(self.n_items, device=dev))
            else:
                emb = item_embedding(t["uniq"])
                inv = t["inv"]
                n_q = len(label_items) if share is None else len(label_items_all)
                pos_inv = inv[:n_q] if share is None else inv[:n_q][queries]
                pos_e, neg_e = emb.index_select(0, pos_inv), emb.index_select(0, inv[n_q:])
                if self.fused is not None:  # the same loss, fused by torch.compile (see its docstring)
                    own = cfg.mask_own_positives
                    rows = (own_positive_rows(t["pool_items"], t["label_example"], t["label_item"], B, self.n_items)
                            if own else None)
                    return self.fused(q, pos_e, neg_e, tau, t["pos_log_q"], t["pool_log_q"], q_example, B,
                                      own_rows=rows, q_item=None if own else label_items,
                                      pool_items=None if own else t["pool_items"], weighting=cfg.weighting)
                # on GPU both products take bf16 operands with fp32 accumulation, like the rest of the model
                pos_logit = torch.bmm(q.unsqueeze(1), pos_e.unsqueeze(2)).view(-1) / tau
                neg_logit = (q @ neg_e.T) / tau
        if cfg.negatives == "full":  # one fused cross-entropy over the catalogue (the same loss with this pool)
            logits = (q.float() / tau) @ all_e.float().T
            mask = None
            if cfg.mask_own_positives:  # the example's positives (full_softmax_loss keeps each query's target)
                mask = own_positive_catalogue_mask(q_example, t["label_example"], t["label_item"], B, self.n_items)
            return full_softmax_loss(logits, label_items, mask, q_example, B, cfg.weighting)
        if cfg.mask_own_positives:
            mask = own_positive_mask(q_example, t["pool_items"], t["label_example"], t["label_item"], B, self.n_items)
        else:
            mask = label_mask(label_items, t["pool_items"])
        pos_log_q = t["pos_log_q"] if share is None else t["pos_log_q"][queries]
        logits = corrected_logits(pos_logit.float(), neg_logit.float(), pos_log_q, t["pool_log_q"], mask)
        loss = loss_of_logits(logits, q_example, B, share, cfg.weighting)
        return (loss, logits) if with_logits else loss
