"""SparseDenseAdam: one optimiser over sparse embeddings and dense weights."""

from __future__ import annotations

import copy

import torch
from torch import nn

from towers.model.optim import SparseDenseAdam


def model_and_groups() -> tuple[nn.Module, list[dict]]:
    torch.manual_seed(0)
    model = nn.ModuleDict({"emb": nn.Embedding(10, 4, sparse=True), "lin": nn.Linear(4, 1)})
    groups = [
        {"params": list(model["lin"].parameters())},
        {"params": [model["emb"].weight], "sparse": True},
    ]
    return model, groups


def step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    model["lin"](model["emb"](torch.tensor([1, 3]))).sum().backward()
    optimizer.step()


def test_updates_sparse_rows_and_dense_weights_only_where_touched() -> None:
    model, groups = model_and_groups()
    optimizer = SparseDenseAdam(groups, lr=0.1)
    before = model["emb"].weight.detach().clone()
    lin_before = model["lin"].weight.detach().clone()
    step(model, optimizer)
    changed = (model["emb"].weight.detach() != before).any(dim=1)
    assert changed.tolist() == [i in (1, 3) for i in range(10)]
    assert not torch.equal(model["lin"].weight.detach(), lin_before)


def test_state_dict_round_trip_continues_identically() -> None:
    model, groups = model_and_groups()
    optimizer = SparseDenseAdam(groups, lr=0.1)
    step(model, optimizer)
    twin, twin_groups = model_and_groups()
    twin.load_state_dict(model.state_dict())
    twin_optimizer = SparseDenseAdam(twin_groups, lr=0.1)
    twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    torch.optim.lr_scheduler.StepLR(twin_optimizer, step_size=1, gamma=1.0).step()
    step(model, optimizer)
    step(twin, twin_optimizer)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_scheduler_lr_reaches_both_inner_optimisers() -> None:
    _, groups = model_and_groups()
    optimizer = SparseDenseAdam(groups, lr=0.1)
    torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5).step()
    assert [g["lr"] for inner in optimizer.inner for g in inner.param_groups] == [0.05, 0.05]


def test_groups_stay_shared_after_loading_a_state() -> None:
    model, groups = model_and_groups()
    optimizer = SparseDenseAdam(groups, lr=0.1)
    step(model, optimizer)
    optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    optimizer.param_groups[1]["lr"] = 0.01
    assert optimizer.inner[1].param_groups[0]["lr"] == 0.01


def test_rowwise_adagrad_keeps_one_accumulator_per_row_and_moves_touched_rows_only() -> None:
    from towers.model.optim import RowwiseAdagrad

    model, groups = model_and_groups()
    optimizer = SparseDenseAdam(groups, lr=0.1, sparse_rule="rowwise_adagrad", sparse_lr=0.5)
    assert isinstance(optimizer.inner[1], RowwiseAdagrad)
    before = model["emb"].weight.detach().clone()
    optimizer.zero_grad()
    model["lin"](model["emb"](torch.tensor([1, 3, 3]))).sum().backward()
    grad = model["emb"].weight.grad.coalesce().to_dense()
    optimizer.step()
    after = model["emb"].weight.detach()
    changed = (after != before).any(dim=1)
    assert changed.tolist() == [i in (1, 3) for i in range(10)]
    state = optimizer.inner[1].state[model["emb"].weight]["sum"]
    assert state.shape == (10,)  # one float per row, not two per weight
    expected_sum = grad.pow(2).mean(dim=1)
    torch.testing.assert_close(state, expected_sum)
    for row in (1, 3):  # -lr * g / (sqrt(s) + eps)
        step = -0.5 * grad[row] / (expected_sum[row].sqrt() + 1e-8)
        torch.testing.assert_close(after[row], before[row] + step)


def test_rowwise_adagrad_round_trips_its_state_and_refuses_a_bad_rule() -> None:
    model, groups = model_and_groups()
    optimizer = SparseDenseAdam(groups, lr=0.1, sparse_rule="rowwise_adagrad")
    step(model, optimizer)
    twin, twin_groups = model_and_groups()
    twin.load_state_dict(model.state_dict())
    twin_optimizer = SparseDenseAdam(twin_groups, lr=0.1, sparse_rule="rowwise_adagrad")
    twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    step(model, optimizer)
    step(twin, twin_optimizer)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    import pytest

    with pytest.raises(ValueError, match="sparse_rule"):
        SparseDenseAdam(model_and_groups()[1], sparse_rule="sgd")


def test_a_run_trains_with_rowwise_adagrad_on_its_id_tables(tmp_path) -> None:
    """``+model.optimizer.sparse_rule=rowwise_adagrad`` reaches the optimiser through the
    config and trains a model that ranks far above chance."""
    from tests.conftest import TINY_OVERRIDES, compose_config
    from towers.model.optim import RowwiseAdagrad
    from towers.pipeline import train

    cfg = compose_config(
        [
            *TINY_OVERRIDES,
            "logger=none",
            "+model.optimizer.sparse_rule=rowwise_adagrad",
            "+model.optimizer.sparse_lr=0.05",
            f"paths.output_dir={tmp_path}",
        ]
    )
    result = train(cfg)
    assert result is not None
    optimizer = result.module.configure_optimizers()
    assert isinstance(optimizer.inner[1], RowwiseAdagrad)
    assert result.metrics["test/recall@20"] > 0.2  # popularity alone: about 0.1 here


def test_auto_keeps_adam_for_small_tables_and_takes_rowwise_adagrad_past_the_limit(
    caplog,
) -> None:
    from towers.model.optim import ROWWISE_LR, RowwiseAdagrad, adam_state_bytes

    _, groups = model_and_groups()
    assert adam_state_bytes([groups[1]]) == 2 * 10 * 4 * 4  # two float32 moments per weight
    small = SparseDenseAdam(groups, lr=0.1)  # auto, the default
    assert small.sparse_rule == "adam"
    assert isinstance(small.inner[1], torch.optim.SparseAdam)

    model, groups = model_and_groups()
    limit = 300 / 1e9  # 300 bytes: under the table's 320, over the dense layer's 40
    with caplog.at_level("INFO", logger="towers.model.optim"):
        large = SparseDenseAdam(groups, lr=0.1, adam_state_limit_gb=limit)
    assert large.sparse_rule == "rowwise_adagrad"
    assert isinstance(large.inner[1], RowwiseAdagrad)
    assert isinstance(large.inner[0], torch.optim.Adam)  # the dense weights keep Adam
    assert large.inner[1].param_groups[0]["lr"] == ROWWISE_LR
    assert "row-wise Adagrad" in caplog.text and "sparse_rule=adam" in caplog.text
    before = model["emb"].weight.detach().clone()
    step(model, large)
    changed = (model["emb"].weight.detach() != before).any(dim=1)
    assert changed.tolist() == [i in (1, 3) for i in range(10)]

    _, groups = model_and_groups()
    kept = SparseDenseAdam(groups, lr=0.1, sparse_rule="adam", adam_state_limit_gb=limit)
    assert kept.sparse_rule == "adam"  # an explicit rule is never overridden
    _, groups = model_and_groups()
    tuned = SparseDenseAdam(groups, lr=0.1, sparse_lr=0.02, adam_state_limit_gb=limit)
    assert tuned.inner[1].param_groups[0]["lr"] == 0.02


def test_a_state_of_the_other_sparse_rule_is_refused_by_name() -> None:
    import pytest

    model, groups = model_and_groups()
    adam = SparseDenseAdam(groups, lr=0.1, sparse_rule="adam")
    step(model, adam)
    state = copy.deepcopy(adam.state_dict())
    assert state["sparse_rule"] == "adam"
    _, groups = model_and_groups()
    rowwise = SparseDenseAdam(groups, lr=0.1, sparse_rule="rowwise_adagrad")
    with pytest.raises(ValueError, match=r"sparse_rule=adam .* rowwise_adagrad"):
        rowwise.load_state_dict(state)
    del state["sparse_rule"]  # a checkpoint from before the rule was recorded: lazy Adam's
    with pytest.raises(ValueError, match=r"\+model.optimizer.sparse_rule=adam"):
        rowwise.load_state_dict(copy.deepcopy(state))
    _, groups = model_and_groups()
    SparseDenseAdam(groups, lr=0.1).load_state_dict(state)  # auto, small tables: Adam's
