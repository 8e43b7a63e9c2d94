"""In-batch softmax: logQ correction and accidental-hit masking change the logits as intended."""

from __future__ import annotations

import math

import torch

from towers.model.loss import MASKED_LOGIT, in_batch_logits, in_batch_softmax_loss


def vectors() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    users = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    items = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    return users, items


def test_logq_subtracts_log_sampling_probability() -> None:
    users, items = vectors()
    log_q = torch.log(torch.tensor([0.5, 0.25, 0.125, 0.125]))
    plain = in_batch_logits(users, items, 0.1)
    corrected = in_batch_logits(users, items, 0.1, item_log_q=log_q)
    torch.testing.assert_close(corrected, plain - log_q.unsqueeze(0))
    # A popular column (large q) is pushed down relative to a rare one.
    assert corrected[0, 0] - plain[0, 0] < corrected[0, 3] - plain[0, 3]


def test_accidental_hits_are_masked_but_the_positive_is_kept() -> None:
    users, items = vectors()
    ids = torch.tensor([7, 3, 7, 5])
    logits = in_batch_logits(users, items, 0.1, item_ids=ids)
    assert logits[0, 2] == MASKED_LOGIT and logits[2, 0] == MASKED_LOGIT
    assert logits[0, 0] != MASKED_LOGIT and logits[2, 2] != MASKED_LOGIT
    assert (logits[1] != MASKED_LOGIT).all()


def test_loss_is_cross_entropy_of_the_diagonal_and_weights_count() -> None:
    users, items = vectors()
    logits = users @ items.T / 0.5
    expected = -torch.log_softmax(logits, dim=1).diagonal()
    assert math.isclose(
        in_batch_softmax_loss(users, items, 0.5).item(), expected.mean().item(), rel_tol=1e-6
    )
    weights = torch.tensor([1.0, 0.0, 0.0, 0.0])
    weighted = in_batch_softmax_loss(users, items, 0.5, weights=weights)
    assert math.isclose(weighted.item(), expected[0].item(), rel_tol=1e-6)
