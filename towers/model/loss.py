"""Sampled softmax over in-batch (and optional mixed) negatives.

Row ``i`` of a batch of B (user, item) pairs scores C >= B candidate items: the B
items of the batch (column ``i`` is its positive) followed by any extra negatives
(Yang et al., WWW 2020: items drawn uniformly, "mixed negative sampling").

- **logQ correction** (Yi et al., RecSys 2019): popular items show up as in-batch
  negatives more often, so each column's logit is reduced by ``log q_j``, the log of
  the expected number of times item ``j`` is among the candidates.
- **Accidental hits**: a column holding the row's own positive item (other than the
  diagonal) is masked instead of being pushed down as a negative.
- **Temperature** divides the cosine scores; **weights** weight each row's loss.
"""

from __future__ import annotations

import math

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
    """(B, C) logits ``u_i . v_j / temperature - log q_j`` with accidental hits masked.

    ``item_vectors`` (C, d) holds the B positives first; ``item_ids`` (C,) names each
    column's item; ``item_log_q`` (C,) is each column's log expected sampling count.
    """
    logits = user_vectors @ item_vectors.T / temperature
    if item_log_q is not None:
        logits = logits - item_log_q.unsqueeze(0)
    if item_ids is not None:
        n_rows = user_vectors.shape[0]
        same = item_ids.unsqueeze(0) == item_ids[:n_rows].unsqueeze(1)
        same[:, :n_rows].fill_diagonal_(False)
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
    """Weighted cross-entropy of each row's own item (the diagonal) against all candidates."""
    logits = in_batch_logits(user_vectors, item_vectors, temperature, item_ids, item_log_q)
    labels = torch.arange(logits.shape[0], device=logits.device)
    losses = F.cross_entropy(logits, labels, reduction="none")
    if weights is None:
        return losses.mean()
    return (losses * weights).sum() / weights.sum().clamp(min=1e-12)


def candidate_log_q(batch_log_p: Tensor, n_negatives: int, negative_pool_size: int) -> Tensor:
    """log expected count of each candidate: ``log(B p_j)`` for the B in-batch columns
    (``p_j`` the item's share of training events) and ``log(N / pool)`` for N uniform ones."""
    in_batch = batch_log_p + math.log(batch_log_p.shape[0])
    if not n_negatives:
        return in_batch
    uniform = math.log(n_negatives / max(negative_pool_size, 1))
    return torch.cat([in_batch, in_batch.new_full((n_negatives,), uniform)])
