"""Warm starts (``init_from``): embedding rows carried over by id, new ids fresh, a warm
run end to end, and clear errors for a missing or incompatible previous model."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from towers.data.eval_sets import encode_users
from towers.data.prepare import PreparedData
from towers.data.schema import ITEM_ID, TIMESTAMP, RawData
from towers.data.split import recent_window
from towers.model.module import TwoTowerModule, embed
from towers.model.warm_start import (
    ENCODERS_KEY,
    PreviousModel,
    ShrinkPerturb,
    WarmStartError,
    remap_state,
    resolve_source,
    warm_start,
)
from towers.pipeline import TrainResult, apply_init_from, build_module, prepare, train
from twotower.encoding import FIRST_KNOWN_INDEX

from .conftest import ROOT, TINY_OVERRIDES, compose_config

FAST = [*TINY_OVERRIDES, "logger=none", "trainer.max_epochs=2"]
ITEM_IDS = "model.item_tower.item_embedding.weight"
USER_IDS = "model.user_tower.user_embedding.weight"
CATEGORIES = "model.item_tower.attributes.categorical.0.weight"
TAGS = "model.item_tower.attributes.bags.0.weight"


def earlier(raw: RawData, share: float, new_items: int = 5) -> RawData:
    """The first ``share`` of ``raw``'s time, before a few items joined the catalogue
    (they, their categories and tags are then new in the later data; the catalogue's
    numeric statistics move with them)."""
    times = raw.interactions[TIMESTAMP]
    cut = times.min() + share * (times.max() - times.min())
    added = set(raw.items[ITEM_ID].iloc[:new_items])
    keep = (times <= cut) & ~raw.interactions[ITEM_ID].isin(added)
    return dataclasses.replace(
        raw,
        interactions=raw.interactions.loc[keep],
        items=raw.items.loc[~raw.items[ITEM_ID].isin(added)],
    )


def module_for(
    raw: RawData, seed: int = 0, overrides: tuple[str, ...] = ()
) -> tuple[TwoTowerModule, PreparedData]:
    cfg = compose_config([*FAST, f"seed={seed}", *overrides])
    data = prepare(cfg, raw=raw)
    torch.manual_seed(seed)
    return build_module(cfg, data, 0), data


def previous_of(module: TwoTowerModule, data: PreparedData, path: Path) -> PreviousModel:
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    return PreviousModel(path, state, data.encoders, dataclasses.asdict(module.towers))


@pytest.fixture
def old_and_new(tiny_data: RawData):
    """A model on the earlier data (random weights, as good as trained for the remap) and
    a fresh model built for all of the data, with different seeds."""
    old = module_for(earlier(tiny_data, 0.6), seed=1)
    new = module_for(tiny_data, seed=2)
    return old, new


def rows(table: torch.Tensor, vocabulary, values: list[str]) -> torch.Tensor:
    return table[torch.from_numpy(vocabulary.encode(values))]


def test_rows_of_known_ids_carry_over_by_id_and_new_ids_keep_fresh_rows(old_and_new) -> None:
    (old, old_data), (new, new_data) = old_and_new
    fresh = {k: v.detach().clone() for k, v in new.state_dict().items()}
    remap = remap_state(new, new_data.encoders, previous_of(old, old_data, Path("old.ckpt")))
    assert not remap.problems
    state, before = remap.state, old.state_dict()
    for key, vocab in [
        (ITEM_IDS, lambda e: e.items.ids),
        (USER_IDS, lambda e: e.users.ids),
        (CATEGORIES, lambda e: e.items.categorical["category"]),
        (TAGS, lambda e: e.items.multi_hot["tags"].vocabulary),
    ]:
        old_vocab, new_vocab = vocab(old_data.encoders), vocab(new_data.encoders)
        shared = [v for v in new_vocab.values if v in set(old_vocab.values)]
        added = [v for v in new_vocab.values if v not in set(old_vocab.values)]
        assert shared, key
        # the same values, read by id: exactly the old rows
        torch.testing.assert_close(
            rows(state[key], new_vocab, shared),
            rows(before[key], old_vocab, shared),
            rtol=0,
            atol=0,
        )
        # padding and out-of-vocabulary rows are carried too
        torch.testing.assert_close(state[key][:FIRST_KNOWN_INDEX], before[key][:FIRST_KNOWN_INDEX])
        # values new to this run keep their fresh initialisation
        torch.testing.assert_close(
            rows(state[key], new_vocab, added), rows(fresh[key], new_vocab, added), rtol=0, atol=0
        )
        if key == ITEM_IDS:
            assert added, "the later data has new items"
            moved = [v for v in shared if new_vocab.encode([v])[0] != old_vocab.encode([v])[0]]
            assert moved, "rows are matched by id, not by row number"
            carried, size = remap.carried[key]
            assert (carried, size) == (len(shared), len(new_vocab.values))
    # the history's item table is the item tower's (shared), remapped once
    assert state["model.user_tower.history_embedding.item_embedding.weight"] is state[ITEM_IDS]
    # dense layers are copied; data-derived buffers stay the new data's
    torch.testing.assert_close(
        state["model.item_tower.mlp.0.weight"], before["model.item_tower.mlp.0.weight"]
    )
    torch.testing.assert_close(state["item_log_p"], fresh["item_log_p"])


def test_shrink_and_perturb_mixes_carried_weights_with_the_fresh_ones(old_and_new) -> None:
    (old, old_data), (new, new_data) = old_and_new
    fresh = {k: v.detach().clone() for k, v in new.state_dict().items()}
    previous = previous_of(old, old_data, Path("old.ckpt"))
    copied = remap_state(new, new_data.encoders, previous).state
    blend = ShrinkPerturb(shrink=0.5, perturb=0.1)
    mixed = remap_state(new, new_data.encoders, previous, blend).state
    for key in (ITEM_IDS, USER_IDS, CATEGORIES, TAGS, "model.item_tower.mlp.0.weight"):
        blended = 0.5 * copied[key] + 0.1 * fresh[key]
        if copied[key].ndim == 2 and key != "model.item_tower.mlp.0.weight":
            # rows the copy left fresh are values new to this run: not blended
            new_rows = (copied[key] == fresh[key]).all(dim=1, keepdim=True)
            blended = torch.where(new_rows, fresh[key], blended)
        torch.testing.assert_close(mixed[key], blended)
    # ids new to this run keep their fresh rows, not 0.6 x them
    vocabulary = new_data.encoders.items.ids
    added = [v for v in vocabulary.values if v not in set(old_data.encoders.items.ids.values)]
    torch.testing.assert_close(
        rows(mixed[ITEM_IDS], vocabulary, added), rows(fresh[ITEM_IDS], vocabulary, added)
    )
    assert not torch.equal(mixed[ITEM_IDS], copied[ITEM_IDS])
    torch.testing.assert_close(mixed["item_log_p"], fresh["item_log_p"])  # data, untouched


def test_shrink_and_perturb_copies_buffers_such_as_batch_norm_statistics(tiny_data) -> None:
    old, old_data = module_for(earlier(tiny_data, 0.6), seed=1, overrides=("model.norm=batch",))
    new, new_data = module_for(tiny_data, seed=2, overrides=("model.norm=batch",))
    with torch.no_grad():  # statistics as training would leave them, unlike a fresh model's
        for buffer_name, buffer in old.named_buffers():
            if buffer_name.endswith(("running_mean", "running_var")):
                buffer.add_(0.5)
            elif buffer_name.endswith("num_batches_tracked"):
                buffer.fill_(7)
    previous = previous_of(old, old_data, Path("old.ckpt"))
    blend = ShrinkPerturb(shrink=0.5, perturb=0.1)
    remap = remap_state(new, new_data.encoders, previous, blend)
    assert not remap.problems
    statistics = [k for k in remap.state if k.endswith(("running_mean", "running_var"))]
    counters = [k for k in remap.state if k.endswith("num_batches_tracked")]
    assert statistics and counters
    for key in [*statistics, *counters]:
        assert torch.equal(remap.state[key], previous.state[key]), key
        assert remap.state[key].dtype == new.state_dict()[key].dtype, key
    weights = [k for k in remap.state if k.endswith("mlp.1.weight")]  # the norm's scale
    assert weights
    for key in weights:
        fresh = new.state_dict()[key]
        torch.testing.assert_close(remap.state[key], 0.5 * previous.state[key] + 0.1 * fresh)


@pytest.mark.parametrize(
    ("shrink", "perturb", "message"),
    [(0.0, 0.0, "init_shrink must be in"), (1.5, 0.0, "init_shrink"), (1.0, -0.1, "init_perturb")],
)
def test_shrink_and_perturb_out_of_range_is_an_error(
    shrink: float, perturb: float, message: str
) -> None:
    with pytest.raises(WarmStartError, match=message):
        ShrinkPerturb(shrink, perturb)


def test_shrink_and_perturb_without_init_from_is_an_error_before_any_work(
    tmp_path: Path,
) -> None:
    out = tmp_path / "run"
    with pytest.raises(WarmStartError, match="set init_from too"):
        train(compose_config([*FAST, "init_shrink=0.5", f"paths.output_dir={out}"]))
    assert not out.exists()


def test_a_shrink_that_is_not_a_number_names_the_setting(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(WarmStartError, match="init_perturb must be a number, got 'lots'"):
        train(compose_config([*FAST, "init_perturb=lots", f"paths.output_dir={out}"]))
    assert not out.exists()


@pytest.mark.parametrize("overrides", [(), ("model.history_attributes=true",)])
def test_a_warm_started_model_scores_known_items_and_users_as_before(
    tiny_data: RawData, overrides: tuple[str, ...]
) -> None:
    """Ids, categories, tags and the re-normalised numeric layer together: before any
    training, every item and user both runs know gets the vector the old model gave it
    (also when history items carry the item tower's attribute embeddings)."""
    old, old_data = module_for(earlier(tiny_data, 0.6), 1, overrides)
    new, new_data = module_for(tiny_data, 2, overrides)
    remap = remap_state(new, new_data.encoders, previous_of(old, old_data, Path("old.ckpt")))
    new.load_state_dict(remap.state)
    assert new_data.encoders.items.numeric["quality"] != old_data.encoders.items.numeric["quality"]
    catalogue = new_data.catalogue
    known = old_data.encoders.items.ids.contains(catalogue[ITEM_ID])
    assert 0 < known.sum() < len(catalogue)
    before = embed(old.model.item_tower, old_data.encoders.item_inputs(catalogue))
    after = embed(new.model.item_tower, new_data.encoders.item_inputs(catalogue))
    np.testing.assert_allclose(after[known], before[known], atol=1e-5)
    assert not np.allclose(after[~known], before[~known], atol=1e-3)

    users = np.asarray(old_data.encoders.users.ids.values[:20], dtype=object)
    history_ids = [list(catalogue[ITEM_ID][known][i : i + 5]) for i in range(len(users))]

    def user_vectors(module: TwoTowerModule, data: PreparedData) -> np.ndarray:
        histories = data.encoders.encode_histories(history_ids)
        return embed(
            module.model.user_tower, encode_users(data.encoders, data.users, users, histories)
        )

    np.testing.assert_allclose(user_vectors(new, new_data), user_vectors(old, old_data), atol=1e-5)


def test_recent_window_keeps_the_last_days(tiny_data: RawData) -> None:
    events = tiny_data.interactions
    kept = recent_window(events, 10)
    newest = events[TIMESTAMP].max()
    assert (kept[TIMESTAMP] >= newest - 10 * 86400).all()
    assert len(kept) == int((events[TIMESTAMP] >= newest - 10 * 86400).sum()) < len(events)
    with pytest.raises(ValueError, match="window_days"):
        recent_window(events, 0)


@pytest.fixture(scope="module")
def previous_run(tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    out = tmp_path_factory.mktemp("previous")
    result = train(compose_config([*FAST, f"paths.output_dir={out}"]))
    assert result is not None
    return result


def test_a_run_directory_a_checkpoint_and_a_bundle_give_the_same_start(
    previous_run: TrainResult, tmp_path: Path
) -> None:
    assert previous_run.best_checkpoint is not None
    checkpoint = torch.load(previous_run.best_checkpoint, weights_only=False)
    assert ENCODERS_KEY in checkpoint
    assert resolve_source(previous_run.output_dir) == previous_run.best_checkpoint
    cfg = compose_config([*FAST, "train.window_days=60"])
    data = prepare(cfg)
    states = []
    for source in (previous_run.output_dir, previous_run.best_checkpoint, previous_run.bundle):
        torch.manual_seed(0)
        module = build_module(cfg, data, 0)
        warm_start(module, data.encoders, source)
        states.append(module.state_dict())
    for state in states[1:]:
        for key, value in states[0].items():
            torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)


def test_training_with_init_from_runs_end_to_end_and_exports_a_bundle(
    previous_run: TrainResult, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="towers")
    result = train(
        compose_config(
            [
                *FAST,
                f"init_from={previous_run.output_dir}",
                "train.window_days=60",
                "train.refit=true",
                f"paths.output_dir={tmp_path}",
            ]
        )
    )
    assert result is not None
    assert (Path(result.bundle) / "manifest.json").is_file()
    assert np.isfinite(result.metrics["test/ndcg@20"])
    # both the selection run and the refit started from the previous model
    assert sum("warm start from" in r.getMessage() for r in caplog.records) == 2
    newest = result.data.split.train[TIMESTAMP].max()
    assert result.data.split.train[TIMESTAMP].min() >= newest - 60 * 86400 - 1
    refit = torch.load(tmp_path / "checkpoints" / "refit" / "last.ckpt", weights_only=False)
    assert ENCODERS_KEY in refit  # this run can be warm-started from in turn
    assert resolve_source(tmp_path) == tmp_path / "checkpoints" / "refit" / "last.ckpt"


def test_the_run_config_shrinks_and_perturbs_the_warm_start(previous_run: TrainResult) -> None:
    source = f"init_from={previous_run.output_dir}"
    cfg = compose_config([*FAST, source])
    data = prepare(cfg)
    copied, shrunk = build_module(cfg, data, 0), build_module(cfg, data, 0)
    apply_init_from(cfg, copied, data)
    apply_init_from(compose_config([*FAST, source, "init_shrink=0.5"]), shrunk, data)
    for key in ("model.item_tower.mlp.0.weight", ITEM_IDS):
        torch.testing.assert_close(shrunk.state_dict()[key], 0.5 * copied.state_dict()[key])


def test_an_ensemble_member_starts_from_the_same_member(
    previous_run: TrainResult, tmp_path: Path
) -> None:
    members = tmp_path / "ensemble" / "members"
    for index in range(2):
        (members / str(index)).mkdir(parents=True)
        (members / str(index) / "checkpoints").symlink_to(previous_run.output_dir / "checkpoints")
    assert resolve_source(members.parent, member=1) == members / "1" / "checkpoints" / (
        previous_run.best_checkpoint.name  # type: ignore[union-attr]
    )
    with pytest.raises(WarmStartError, match=r"an ensemble run \(2 members.*model.ensemble=2"):
        resolve_source(members.parent)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.embedding_dim=32"], r"model.embedding_dim: 64 in init_from, 32 here"),
        (["model.hidden=[64,32]"], r"model.hidden: \[128\] in init_from, \[64, 32\] here"),
        (["model.history_pooling=mean"], r"model.history_pooling: recency in init_from, mean"),
        (["features.use_user_id=false"], r"features.use_user_id: True in init_from, False here"),
    ],
)
def test_an_incompatible_model_config_is_an_error_naming_path_and_mismatch(
    previous_run: TrainResult, tmp_path: Path, overrides: list[str], message: str
) -> None:
    cfg = compose_config(
        [*FAST, *overrides, f"init_from={previous_run.output_dir}", f"paths.output_dir={tmp_path}"]
    )
    with pytest.raises(WarmStartError, match=message) as error:
        train(cfg)
    assert str(previous_run.output_dir) in str(error.value)
    assert not (tmp_path / "bundle").exists()


def test_weights_of_another_shape_are_an_error_listing_them(
    previous_run: TrainResult, tmp_path: Path
) -> None:
    """Settings the checkpoint does not record (here: the history length behind the
    recency pooling's weights) still surface, as a shape mismatch."""
    cfg = compose_config([*FAST, "features.history_length=7"])
    data = prepare(cfg)
    module = build_module(cfg, data, 0)
    with pytest.raises(
        WarmStartError, match=r"position_logits: shape \(20,\) in init_from, \(7,\)"
    ):
        warm_start(module, data.encoders, previous_run.output_dir)


def test_a_missing_or_unusable_init_from_is_an_error(
    previous_run: TrainResult, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-run"
    with pytest.raises(WarmStartError, match=f"init_from {missing}: no such file or directory"):
        train(compose_config([*FAST, f"init_from={missing}", f"paths.output_dir={tmp_path}"]))
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_text("not a checkpoint")
    empty_run = tmp_path / "empty-run"
    empty_run.mkdir()
    broken_run = tmp_path / "broken-run"
    (broken_run / "checkpoints").mkdir(parents=True)
    (broken_run / "checkpoints" / "last.ckpt").write_text("truncated")
    broken_last = broken_run / "checkpoints" / "last.ckpt"
    old = tmp_path / "old.ckpt"
    checkpoint = torch.load(previous_run.best_checkpoint, weights_only=False)
    del checkpoint[ENCODERS_KEY]
    torch.save(checkpoint, old)
    cfg = compose_config(FAST)
    data = prepare(cfg)
    for source, message in [
        (garbage, "not a readable checkpoint"),
        (empty_run, "no checkpoint found"),
        (broken_run, f"not a readable checkpoint|{broken_last}: not a readable checkpoint"),
        (old, "the checkpoint holds no feature encoders .* warm-start from the bundle"),
    ]:
        with pytest.raises(WarmStartError, match=f"init_from {source}: {message}"):
            warm_start(build_module(cfg, data, 0), data.encoders, source)
    with pytest.raises(WarmStartError, match="exclude each other"):
        train(
            compose_config(
                [
                    *FAST,
                    f"init_from={previous_run.output_dir}",
                    f"ckpt_path={old}",
                    f"paths.output_dir={tmp_path}",
                ]
            )
        )


def test_a_bundle_without_the_weights_is_an_error_saying_so(
    previous_run: TrainResult, tmp_path: Path
) -> None:
    import onnx

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for path in Path(previous_run.bundle).iterdir():
        (bundle / path.name).write_bytes(path.read_bytes())
    graph = onnx.load(str(bundle / "item_tower.onnx"))
    for initializer in graph.graph.initializer:
        initializer.name = initializer.name.replace("tower.", "folded::")
    for node in graph.graph.node:
        node.input[:] = [name.replace("tower.", "folded::") for name in node.input]
    onnx.save(graph, str(bundle / "item_tower.onnx"))
    cfg = compose_config(FAST)
    data = prepare(cfg)
    with pytest.raises(WarmStartError, match=rf"init_from {bundle}: its weights") as error:
        warm_start(build_module(cfg, data, 0), data.encoders, bundle)
    assert "model.item_tower.mlp.0.weight: not in init_from" in str(error.value)
    assert "give the training run's directory or a checkpoint" in str(error.value)


def test_the_cli_exits_non_zero_naming_the_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "gone"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "train.py"),
            f"hydra.run.dir={tmp_path / 'run'}",
            *FAST,
            f"init_from={missing}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode != 0
    assert f"init_from {missing}: no such file or directory" in result.stderr
    assert not (tmp_path / "run" / "bundle").exists()


def test_warm_starts_and_windows_are_off_by_default() -> None:
    cfg = compose_config([])
    assert cfg.init_from is None and cfg.train.window_days is None
    assert (cfg.init_shrink, cfg.init_perturb) == (1.0, 0.0)
