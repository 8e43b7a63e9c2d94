"""In-batch sampled softmax with logQ correction and accidental-hit masking.

Each user in a batch of B (user, item) pairs scores all B items; the other users'
items are its negatives. Because popular items are over-represented as negatives,
``logits - log(q_j)`` (Yi et al., RecSys 2019) corrects for the sampling frequency
``q_j``. When item ``j`` equals the row's own positive elsewhere in the batch, that
logit is masked rather than treated as a negative.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

MASKED_LOGIT = -1e9


def in_batch_logits(
    user_vectors: Tensor,
    item_vectors: Tensor,
    temperature: float | Tensor,
    item_ids: Tensor | None = None,
    item_log_q: Tensor | None = None,
) -> Tensor:
    """(B, B) logits: ``u_i . v_j / temperature - log q_j``, accidental hits masked.

    ``item_ids`` (B,) identifies each column's item: column ``j`` of row ``i`` is masked
    when ``item_ids[j] == item_ids[i]`` and ``j != i``. ``item_log_q`` (B,) is each
    column's log sampling probability.
    """
    logits = user_vectors @ item_vectors.T / temperature
    if item_log_q is not None:
        logits = logits - item_log_q.unsqueeze(0)
    if item_ids is not None:
        same = item_ids.unsqueeze(0) == item_ids.unsqueeze(1)
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, MASKED_LOGIT)
    return logits


def in_batch_softmax_loss(
    user_vectors: Tensor,
    item_vectors: Tensor,
    temperature: float | Tensor,
    item_ids: Tensor | None = None,
    item_log_q: Tensor | None = None,
    weights: Tensor | None = None,
) -> Tensor:
    """Cross-entropy of each row's own item (the diagonal) against the in-batch logits."""
    logits = in_batch_logits(user_vectors, item_vectors, temperature, item_ids, item_log_q)
    labels = torch.arange(logits.shape[0], device=logits.device)
    losses = F.cross_entropy(logits, labels, reduction="none")
    if weights is None:
        return losses.mean()
    return (losses * weights).sum() / weights.sum().clamp(min=1e-12)
