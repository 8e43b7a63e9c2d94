"""In-batch softmax: logQ correction and accidental-hit masking change the logits as intended."""

from __future__ import annotations

import math

import torch

from towers.model.loss import (
    MASKED_LOGIT,
    candidate_log_q,
    in_batch_logits,
    in_batch_softmax_loss,
)


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


def test_mixed_negatives_are_extra_columns_masked_when_they_hit() -> None:
    users, items = vectors()
    extra = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    candidates = torch.cat([items, extra])
    ids = torch.tensor([10, 11, 12, 13, 11, 99, 98])  # column 4 repeats row 1's positive
    logits = in_batch_logits(users, candidates, 0.1, item_ids=ids)
    assert logits.shape == (4, 7)
    assert logits[1, 4] == MASKED_LOGIT
    assert (logits[[0, 2, 3], 4] != MASKED_LOGIT).all()
    torch.testing.assert_close(logits[0, 5:], users[0] @ extra[1:].T / 0.1)


def test_candidate_log_q_counts_batch_and_uniform_draws() -> None:
    log_p = torch.log(torch.tensor([0.5, 0.25, 0.25, 0.125]))
    log_q = candidate_log_q(log_p, n_negatives=2, negative_pool_size=100)
    torch.testing.assert_close(log_q[:4], log_p + math.log(4))
    torch.testing.assert_close(log_q[4:], torch.full((2,), math.log(2 / 100)))
    torch.testing.assert_close(candidate_log_q(log_p, 0, 100), log_p + math.log(4))


def test_gathered_loss_gives_the_single_process_gradient() -> None:
    """What DDP does (each process: global-batch loss through its own slice, x world size,
    gradients averaged) equals one process with the whole batch."""
    torch.manual_seed(1)
    users = torch.randn(6, 8, requires_grad=True)
    items = torch.randn(6, 8, requires_grad=True)
    ids = torch.tensor([0, 1, 2, 3, 1, 5])
    in_batch_softmax_loss(users, items, 0.2, item_ids=ids).backward()
    full_user_grad, full_item_grad = users.grad.clone(), items.grad.clone()
    users.grad, items.grad = None, None
    world = 2
    for rank in range(world):
        local = slice(rank * 3, rank * 3 + 3)
        parts_u = [users[i * 3 : i * 3 + 3].detach() for i in range(world)]
        parts_v = [items[i * 3 : i * 3 + 3].detach() for i in range(world)]
        parts_u[rank], parts_v[rank] = users[local], items[local]
        loss = world * in_batch_softmax_loss(
            torch.cat(parts_u), torch.cat(parts_v), 0.2, item_ids=ids
        )
        (loss / world).backward()  # DDP averages the processes' gradients
    torch.testing.assert_close(users.grad, full_user_grad)
    torch.testing.assert_close(items.grad, full_item_grad)
