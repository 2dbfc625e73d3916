"""A listwise loss beside the ranker's pointwise BCE: each head's softmax over one request's candidates (ListNet's
top-one probability, Cao et al., ICML 2007), against the request's labels spread evenly over its positives.

For request r and head h with candidates i ∈ r, labels y_i ∈ {0, 1} and logits s_i:

    L_{r,h} = - Σ_{i ∈ r} (y_i / Σ_{j ∈ r} y_j) · log softmax_{i ∈ r}(s)

averaged over the (request, head) pairs that have at least one positive and one negative candidate (the others have
nothing to order). The pointwise loss learns how likely an engagement is across all rows; this one spends the
gradient only on the order within a request, which is what HIT@k scores. The rows of a request must sit in the
same batch: with `loss.listwise` > 0 the trainer batches whole requests.
"""

from __future__ import annotations

import torch


def request_softmax(logits: torch.Tensor, labels: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """logits, labels [N, H]; group [N] the row's request in the batch (0 .. G-1) -> the mean L_{r,h}."""
    s, y = logits.float(), labels.float()
    G, H = int(group.max()) + 1 if len(group) else 0, s.shape[1]
    idx = group.unsqueeze(1).expand(-1, H)
    top = torch.full((G, H), float("-inf"), device=s.device).scatter_reduce(0, idx, s, "amax")
    shifted = s - top[group]  # log-sum-exp per request, stable
    denom = torch.zeros(G, H, device=s.device).index_add_(0, group, shifted.exp())
    log_p = shifted - denom.log()[group]
    positives = torch.zeros(G, H, device=s.device).index_add_(0, group, y)
    sizes = torch.zeros(G, H, device=s.device).index_add_(0, group, torch.ones_like(y))
    valid = (positives > 0) & (positives < sizes)
    per_pair = -torch.zeros(G, H, device=s.device).index_add_(0, group, y / positives.clamp(min=1)[group] * log_p)
    if not bool(valid.any()):
        return s.sum() * 0.0  # nothing to order in this batch: no gradient, still a graph
    return per_pair[valid].mean()
