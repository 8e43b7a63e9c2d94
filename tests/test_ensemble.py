"""model.ensemble: tower pairs trained as separate runs and served side by side."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from retrieval import Retriever
from towers.evaluation.ranking import evaluate_vectors
from towers.model.module import TwoTowerModule, embed
from towers.model.spec import TowerConfig
from towers.model.towers import ConcatTowers, TwoTowerModel
from towers.pipeline import member_config, train

from .conftest import TINY_OVERRIDES, compose_config
from .test_towers import SPEC, item_inputs, user_inputs


def test_ensemble_towers_give_unit_vectors_whose_dot_is_the_mean_member_score() -> None:
    model = TwoTowerModel(SPEC, TowerConfig(embedding_dim=16, ensemble=3)).eval()
    assert isinstance(model.item_tower, ConcatTowers) and len(model.item_tower.members) == 3
    for item_member, user_member in zip(
        model.item_tower.members, model.user_tower.members, strict=True
    ):
        assert user_member.history_embedding.item_embedding is item_member.item_embedding
    tables = {id(m.item_embedding) for m in model.item_tower.members}
    assert len(tables) == 3
    items, users = item_inputs(6), user_inputs(6)
    with torch.no_grad():
        item_vectors, user_vectors = model.item_tower(items), model.user_tower(users)
        member_scores = [
            (u(users) * i(items)).sum(-1)
            for u, i in zip(model.user_tower.members, model.item_tower.members, strict=True)
        ]
    torch.testing.assert_close(item_vectors.norm(dim=1), torch.ones(6))
    torch.testing.assert_close(
        (user_vectors * item_vectors).sum(-1), torch.stack(member_scores).mean(0)
    )
    with pytest.raises(ValueError, match="ensemble"):
        TwoTowerModel(SPEC, TowerConfig(embedding_dim=16, ensemble=0))


def test_an_ensemble_module_is_assembled_not_trained_as_one() -> None:
    module = TwoTowerModule(
        SPEC.to_dict(), n_catalogue_items=12, towers=TowerConfig(embedding_dim=16, ensemble=2)
    )
    with pytest.raises(ValueError, match="member by member"):
        module.on_train_start()


def test_members_differ_in_seed_only_and_share_the_split(tmp_path: Path) -> None:
    cfg = compose_config(["seed=7", "model.ensemble=3"])
    members = [member_config(cfg, index, tmp_path) for index in range(3)]
    assert [m.seed for m in members] == [7, 8, 9]
    assert {m.split.seed for m in members} == {7}
    assert {m.model.ensemble for m in members} == {1}
    assert members[2].paths.output_dir == str(tmp_path / "members" / "2")


def test_ensemble_run_assembles_the_members_best_models_and_serves_them(tmp_path: Path) -> None:
    cfg = compose_config(
        [*TINY_OVERRIDES, "logger=none", "model.ensemble=2", f"paths.output_dir={tmp_path}"]
    )
    result = train(cfg)
    assert result is not None
    data = result.data
    user_parts, item_parts = [], []
    for index in range(2):
        best = sorted((tmp_path / "members" / str(index) / "checkpoints").glob("epoch*.ckpt"))
        member = TwoTowerModule.load_from_checkpoint(best[-1], weights_only=False).eval()
        user_parts.append(embed(member.model.user_tower, data.validation.user_inputs))
        item_parts.append(embed(member.model.item_tower, data.catalogue_inputs))
    by_hand = evaluate_vectors(
        np.hstack(user_parts) / np.sqrt(2),
        np.hstack(item_parts) / np.sqrt(2),
        data.validation,
        [20],
    )
    assert result.metrics["val/recall@20"] == pytest.approx(by_hand["recall@20"], abs=1e-6)
    retriever = Retriever.load(result.bundle)
    ids, _ = retriever.recommend(user_id=str(data.test.user_ids[0]), k=5)
    assert len(ids) == 5
    assert retriever.dim == 2 * cfg.model.output_dim
