"""model.history_attributes: history items carry their attributes, not only their id."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from towers.model.module import TwoTowerModule
from towers.model.spec import TowerConfig
from towers.model.towers import TwoTowerModel
from towers.pipeline import train
from twotower.encoding import OOV_INDEX, PAD_INDEX

from .conftest import TINY_OVERRIDES, compose_config, served_test_metrics
from .test_towers import SPEC, item_inputs, user_inputs

CATALOGUE_CODES = np.array([5, 2, OOV_INDEX, 11])  # row r's id code; row 2 is unknown


def model_with_attributes(enabled: bool = True) -> tuple[TwoTowerModel, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = TwoTowerModel(SPEC, TowerConfig(embedding_dim=16, history_attributes=enabled)).eval()
    catalogue = item_inputs(len(CATALOGUE_CODES))
    model.set_item_attributes(CATALOGUE_CODES, {k: v.numpy() for k, v in catalogue.items()})
    return model, catalogue


def test_history_item_is_its_id_plus_its_attributes_shared_with_the_item_tower() -> None:
    model, catalogue = model_with_attributes()
    history_embedder = model.user_tower.history_embedding
    assert history_embedder.attributes is model.item_tower.attributes
    row = 0
    code = int(CATALOGUE_CODES[row])
    one_item = {k: v[row : row + 1] for k, v in catalogue.items() if k != "item_id"}
    with torch.no_grad():
        expected = model.item_tower.item_embedding.weight[code] + sum(
            part[0] for part in model.item_tower.attributes(one_item)
        )
        got = history_embedder(torch.tensor([[code]]))[0, 0]
    torch.testing.assert_close(got, expected)


def test_padding_and_unknown_codes_carry_no_attributes() -> None:
    model, _ = model_with_attributes()
    history_embedder = model.user_tower.history_embedding
    for code in (PAD_INDEX, OOV_INDEX, 3):  # 3: a code no catalogue row has
        assert not history_embedder.code_bag[code].any()
        assert not history_embedder.code_cat[code].any()
        assert not history_embedder.code_num[code].any()
        assert history_embedder.code_known[code] == 0
    with torch.no_grad():
        pad = history_embedder(torch.tensor([[PAD_INDEX]]))
    torch.testing.assert_close(pad, torch.zeros_like(pad))


def test_changing_an_items_attributes_moves_users_who_watched_it_only_when_enabled() -> None:
    for enabled in (True, False):
        model, catalogue = model_with_attributes(enabled)
        users = user_inputs(4)
        users["history"][1:] = torch.tensor([PAD_INDEX, PAD_INDEX, PAD_INDEX, 2, 5])
        with torch.no_grad():
            before = model.user_tower(users)
            catalogue["item_cat"] = (catalogue["item_cat"] + 1) % 4
            catalogue["item_num"] = catalogue["item_num"] + 3.0
            model.set_item_attributes(CATALOGUE_CODES, {k: v.numpy() for k, v in catalogue.items()})
            after = model.user_tower(users)
        assert (not torch.allclose(before[1:], after[1:])) is enabled
        torch.testing.assert_close(before[0], after[0])  # the empty history


@pytest.fixture(scope="module")
def attribute_run(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("history_attributes")
    cfg = compose_config(
        [*TINY_OVERRIDES, "logger=none", "model.history_attributes=true", f"paths.output_dir={out}"]
    )
    result = train(cfg)
    assert result is not None
    return result


def test_the_lookup_travels_in_checkpoints(attribute_run) -> None:
    last = attribute_run.output_dir / "checkpoints" / "last.ckpt"
    module = TwoTowerModule.load_from_checkpoint(last, weights_only=False)
    lookup = module.model.user_tower.history_embedding.code_bag
    assert lookup.any()
    data = attribute_run.data
    codes = data.encoders.items.ids.encode(data.catalogue["item_id"])
    known = np.flatnonzero(codes >= 2)
    np.testing.assert_array_equal(
        lookup[codes[known]].numpy(), data.catalogue_inputs["item_bag"][known]
    )


def test_the_served_user_tower_looks_attributes_up_as_training_did(attribute_run) -> None:
    served = served_test_metrics(attribute_run)
    assert served["recall@20"] == pytest.approx(attribute_run.metrics["test/recall@20"], abs=1e-3)
    assert served["ndcg@20"] == pytest.approx(attribute_run.metrics["test/ndcg@20"], abs=1e-3)


def test_checkpoints_from_before_the_history_embedder_still_load() -> None:
    module = TwoTowerModule(SPEC.to_dict(), 12, TowerConfig(embedding_dim=16))
    state = module.state_dict()
    legacy = {
        key.replace("user_tower.history_embedding.item_embedding.", "user_tower.item_embedding."): v
        for key, v in state.items()
    }
    assert legacy.keys() != state.keys()
    checkpoint = {"state_dict": legacy}
    module.on_load_checkpoint(checkpoint)
    fresh = TwoTowerModule(SPEC.to_dict(), 12, TowerConfig(embedding_dim=16))
    fresh.load_state_dict(checkpoint["state_dict"])
    for key, value in state.items():
        torch.testing.assert_close(fresh.state_dict()[key], value)
