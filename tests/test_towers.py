"""Towers: pooling modes, padding, OOV slots, shapes, unit vectors, learned temperature."""

from __future__ import annotations

import pytest
import torch

from towers.model.module import TwoTowerModule
from towers.model.spec import LossConfig, TowerConfig
from towers.model.towers import HistoryPooling, TowerSpec, TwoTowerModel
from twotower.encoding import OOV_INDEX, PAD_INDEX

SPEC = TowerSpec.from_dict(
    {
        "items": {
            "prefix": "item",
            "id_size": 12,
            "use_id": True,
            "categorical_sizes": [4],
            "bag_sizes": [6, 20],
            "bag_widths": [3, 2],
            "n_numeric": 2,
        },
        "users": {
            "prefix": "user",
            "id_size": 7,
            "use_id": True,
            "categorical_sizes": [3],
            "bag_sizes": [],
            "bag_widths": [],
            "n_numeric": 1,
        },
        "history_length": 5,
    }
)


def item_inputs(n: int) -> dict[str, torch.Tensor]:
    return {
        "item_id": torch.randint(0, 12, (n,)),
        "item_cat": torch.randint(0, 4, (n, 1)),
        "item_bag": torch.cat([torch.randint(0, 6, (n, 3)), torch.randint(0, 20, (n, 2))], dim=1),
        "item_num": torch.randn(n, 2),
    }


def user_inputs(n: int) -> dict[str, torch.Tensor]:
    history = torch.randint(2, 12, (n, 5))
    history[0] = PAD_INDEX  # an empty history
    return {
        "user_id": torch.full((n,), OOV_INDEX),
        "user_cat": torch.randint(0, 3, (n, 1)),
        "user_num": torch.randn(n, 1),
        "history": history,
    }


@pytest.mark.parametrize("pooling", ["mean", "recency", "attention", "recency+mean"])
@pytest.mark.parametrize("norm", ["none", "layer", "batch"])
def test_towers_give_unit_vectors(pooling: str, norm: str) -> None:
    model = TwoTowerModel(
        SPEC,
        TowerConfig(
            embedding_dim=16,
            hidden=[32, 16],
            output_dim=8,
            dropout=0.1,
            norm=norm,
            history_pooling=pooling,
        ),
    ).eval()
    items, users = model.item_tower(item_inputs(9)), model.user_tower(user_inputs(9))
    assert items.shape == (9, 8) and users.shape == (9, 8)
    torch.testing.assert_close(items.norm(dim=1), torch.ones(9))
    torch.testing.assert_close(users.norm(dim=1), torch.ones(9))


@pytest.mark.parametrize("mode", ["mean", "recency", "attention", "recency+mean"])
def test_pooling_ignores_padding(mode: str) -> None:
    pooling = HistoryPooling(mode, length=4, dim=3)
    with torch.no_grad():
        if pooling.position_logits is not None:
            pooling.position_logits.copy_(torch.tensor([0.0, 1.0, 2.0, 3.0]))
    embedded = torch.randn(2, 4, 3)
    tokens = torch.tensor([[PAD_INDEX, PAD_INDEX, 5, 6], [PAD_INDEX] * 4])
    pooled = pooling(embedded, tokens)
    changed = embedded.clone()
    changed[0, :2] = 100.0  # values under padding must not matter
    torch.testing.assert_close(pooling(changed, tokens), pooled)
    torch.testing.assert_close(pooled[1], torch.zeros(pooling.out_dim))


def test_recency_pooling_weights_recent_items_more() -> None:
    pooling = HistoryPooling("recency", length=3, dim=2)
    with torch.no_grad():
        pooling.position_logits.copy_(torch.tensor([0.0, 0.0, 5.0]))
    embedded = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    pooled = pooling(embedded, torch.tensor([[2, 3, 4]]))
    assert pooled[0, 1] > 0.95


def test_recency_plus_mean_pooling_puts_both_views_side_by_side() -> None:
    both = HistoryPooling("recency+mean", length=3, dim=2)
    with torch.no_grad():
        both.position_logits.copy_(torch.tensor([0.0, 0.0, 5.0]))
    embedded = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    tokens = torch.tensor([[PAD_INDEX, 3, 4]])
    pooled = both(embedded, tokens)
    assert both.out_dim == 4 and pooled.shape == (1, 4)
    assert pooled[0, 1] > 0.95  # the recency view: the last item
    torch.testing.assert_close(pooled[0, 2:], torch.tensor([0.5, 0.5]))  # the plain mean


def test_logq_weight_scales_the_popularity_correction() -> None:
    torch.manual_seed(0)
    batch = {
        "user": user_inputs(8),
        "item": item_inputs(8),
        "item_rows": torch.arange(8),
        "weights": torch.ones(8),
    }
    log_p = torch.log(torch.linspace(1.0, 12.0, 12) / 78.0).numpy()

    def loss(**kwargs: object) -> float:
        torch.manual_seed(1)
        module = TwoTowerModule(SPEC.to_dict(), 12, loss=LossConfig(**kwargs))
        module.set_item_log_p(log_p)
        return module.model_step(batch).item()

    assert loss(logq_weight=0.0) == pytest.approx(loss(logq_correction=False))
    assert loss(logq_weight=1.0) == pytest.approx(loss())
    assert len({round(loss(logq_weight=w), 6) for w in (0.0, 1.0, 2.0)}) == 3


def test_history_shares_the_item_id_embedding_by_default() -> None:
    model = TwoTowerModel(SPEC, TowerConfig(embedding_dim=16))
    assert model.user_tower.history_embedding.item_embedding is model.item_tower.item_embedding
    separate = TwoTowerModel(SPEC, TowerConfig(embedding_dim=16, share_item_embedding=False))
    assert (
        separate.user_tower.history_embedding.item_embedding
        is not separate.item_tower.item_embedding
    )


def test_learned_temperature_moves_and_fixed_one_does_not() -> None:
    spec = SPEC.to_dict()
    for learn in (True, False):
        module = TwoTowerModule(spec, 12, loss=LossConfig(temperature=0.2, learn_temperature=learn))
        batch = {
            "user": user_inputs(8),
            "item": item_inputs(8),
            "item_rows": torch.arange(8),
            "weights": torch.ones(8),
        }
        optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.5)
        before = module.temperature.item()
        module.model_step(batch).backward()
        optimizer.step()
        assert (module.temperature.item() != pytest.approx(before)) is learn


def test_gradient_clipping_clips_dense_and_leaves_sparse_gradients() -> None:
    module = TwoTowerModule(SPEC.to_dict(), 12, TowerConfig(sparse_embeddings=True))
    batch = {
        "user": user_inputs(8),
        "item": item_inputs(8),
        "item_rows": torch.arange(8),
        "weights": torch.ones(8),
    }
    (module.model_step(batch) * 1000).backward()
    sparse_before = module.model.item_tower.item_embedding.weight.grad.coalesce().values().clone()
    module.configure_gradient_clipping(torch.optim.SGD(module.parameters(), lr=0.1), 0.5, "norm")
    dense = [p.grad for p in module.parameters() if p.grad is not None and not p.grad.is_sparse]
    assert torch.linalg.vector_norm(torch.stack([g.norm() for g in dense])) <= 0.5 + 1e-5
    sparse_after = module.model.item_tower.item_embedding.weight.grad.coalesce().values()
    torch.testing.assert_close(sparse_after, sparse_before)


def test_scheduler_from_config_is_attached() -> None:
    import functools

    module = TwoTowerModule(
        SPEC.to_dict(),
        n_catalogue_items=12,
        scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
    )
    config = module.configure_optimizers()
    assert isinstance(config["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)
    assert config["lr_scheduler"]["interval"] == "epoch"


def test_item_id_dropout_replaces_ids_with_oov_only_in_training() -> None:
    model = TwoTowerModel(SPEC, TowerConfig(embedding_dim=16, item_id_dropout=1.0))
    inputs = item_inputs(6)
    oov = {**inputs, "item_id": torch.full((6,), OOV_INDEX)}
    model.train()
    torch.testing.assert_close(model.item_tower(inputs), model.item_tower(oov))
    model.eval()
    assert not torch.allclose(model.item_tower(inputs), model.item_tower(oov))


def test_zero_attribute_init_makes_unseen_tokens_add_nothing() -> None:
    model = TwoTowerModel(SPEC, TowerConfig(embedding_dim=16, attribute_init="zeros"))
    attribute_tables = [
        m
        for tower in (model.item_tower, model.user_tower)
        for m in tower.attributes.modules()
        if isinstance(m, torch.nn.Embedding)
    ]
    assert attribute_tables and all(not t.weight.any() for t in attribute_tables)
    assert model.item_tower.item_embedding.weight[2:].abs().sum() > 0  # ids stay random
    inputs = item_inputs(4)
    other_bag = {**inputs, "item_bag": torch.randint(0, 6, inputs["item_bag"].shape) % 6}
    torch.testing.assert_close(model.item_tower(inputs), model.item_tower(other_bag))
    with pytest.raises(ValueError, match="attribute_init"):
        TwoTowerModel(SPEC, TowerConfig(embedding_dim=16, attribute_init="uniform"))
