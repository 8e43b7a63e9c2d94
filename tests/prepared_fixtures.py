"""Tables and checks shared by the tests of the two prepare jobs (``twotower prepare``
in ``test_prepare.py``, ``twotower spark prepare`` in ``test_spark.py``): both must write
exactly what the single-machine path holds in memory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from towers.data.prepare import FeatureSettings, PreparedData, prepare_data
from towers.data.readers import load_tables
from towers.data.schema import ITEM_ID, TIMESTAMP, USER_ID, WEIGHT
from towers.data.split import make_split, prepare_interactions
from towers.data.synthetic import generate_synthetic


@dataclass
class Tables:
    interactions: Path
    items: Path | None
    users: Path | None


def synthetic_tables(root: Path) -> Tables:
    """The built-in synthetic data as Parquet, with what exercises every rule: weights and
    ratings, repeated (user, item) pairs (later, and at the same time: file order decides),
    two items at one time (history ties) and a free-text item column."""
    raw = generate_synthetic(n_users=300, n_items=200, seed=1)
    rng = np.random.default_rng(0)
    events = raw.interactions.copy()
    events[WEIGHT] = rng.uniform(0.5, 2.0, len(events)).round(3)
    events["rating"] = rng.integers(1, 6, len(events))
    later = events.sample(200, random_state=0).assign(timestamp=lambda t: t[TIMESTAMP] + 5)
    same_time = events.sample(50, random_state=1).assign(weight=9.0)
    other_item = events.sample(40, random_state=2).assign(
        item_id=lambda t: [f"i{i}" for i in rng.integers(0, 200, len(t))]
    )
    events = pd.concat([events, later, same_time, other_item], ignore_index=True)
    items = raw.items.assign(
        title=[f"the {c} film number {i}" for i, c in enumerate(raw.items["category"])]
    )
    root.mkdir(parents=True, exist_ok=True)
    paths = Tables(root / "events.parquet", root / "items.parquet", root / "users.parquet")
    events.to_parquet(paths.interactions, index=False)
    items.to_parquet(paths.items, index=False)
    raw.users.to_parquet(paths.users, index=False)
    return paths


def csv_tables(root: Path) -> Tables:
    """Interactions only, as CSV with integer user and item ids (item ids then order ties as
    integers; the catalogue is the items in order of first appearance)."""
    raw = generate_synthetic(n_users=300, n_items=200, seed=2)
    events = raw.interactions.assign(
        user_id=raw.interactions[USER_ID].str[1:].astype(int),
        item_id=raw.interactions[ITEM_ID].str[1:].astype(int),
        rating=np.random.default_rng(1).integers(1, 6, len(raw.interactions)),
    )
    root.mkdir(parents=True, exist_ok=True)
    path = root / "events.csv"
    events.to_csv(path, index=False)
    return Tables(path, None, None)


VARIANTS: dict[str, dict[str, Any]] = {
    # Parquet, item and user tables with every attribute kind, the temporal split
    "temporal": {
        "tables": synthetic_tables,
        "split": {},
        "features": {"text_min_count": 2, "history_length": 8},
        "fit_on": "fit",
        "min_rating": None,
    },
    # CSV interactions only, a rating threshold, the cold-item split, the refit on train
    "cold": {
        "tables": csv_tables,
        "split": {"cold_items": True, "seed": 7},
        "features": {"id_min_count": 25, "history_length": 5},
        "fit_on": "train",
        "min_rating": 2.0,
    },
}


def single_machine(tables: Tables, variant: dict[str, Any]) -> PreparedData:
    raw = load_tables(tables.interactions, tables.items, tables.users)
    events = prepare_interactions(raw.interactions, variant["min_rating"])
    split = make_split(events, **variant["split"])
    return prepare_data(raw, split, FeatureSettings(**variant["features"]), variant["fit_on"])


def variant_settings(tables: Tables, variant: dict[str, Any], out: Path) -> Any:
    """The prepare job's settings for ``tables`` prepared as ``variant`` into ``out``, in
    several shards."""
    from twotower.spark.settings import PrepareSettings

    return PrepareSettings(
        interactions=str(tables.interactions),
        items=None if tables.items is None else str(tables.items),
        users=None if tables.users is None else str(tables.users),
        output=str(out),
        min_rating=variant["min_rating"],
        fit_on=variant["fit_on"],
        features=FeatureSettings(**variant["features"]),
        samples_per_shard=2000,  # several shards
        **variant["split"],
    )


def assert_same_encoders(ours: dict[str, Any], theirs: dict[str, Any], path: str = "") -> None:
    """Equal, but the numeric columns' mean and std within floating-point summation order."""
    assert ours.keys() == theirs.keys(), path
    for key, value in theirs.items():
        where = f"{path}.{key}"
        if isinstance(value, dict):
            assert_same_encoders(ours[key], value, where)
        elif isinstance(value, float):
            assert ours[key] == pytest.approx(value, rel=1e-12, abs=1e-15), where
        else:
            assert ours[key] == value, where


def assert_prepared_equals(
    out: Path, manifest: dict[str, Any], data: PreparedData, name: str
) -> None:
    """The prepared directory ``out`` (with its ``manifest``) holds exactly ``data``, the
    single-machine path's preparation of variant ``name``: the split row by row, the
    encoders, the catalogue and the training samples array by array."""
    from twotower.spark import shards

    # the split: every part, row by row, in order
    split = pd.read_parquet(out / shards.SPLIT).sort_values(shards.EVENT)
    assert split[shards.EVENT].tolist() == list(range(len(split)))
    for part in ("fit", "validation", "test"):
        ours = split.loc[split[shards.PART] == part].reset_index(drop=True)
        theirs = getattr(data.split, part).reset_index(drop=True)
        for column in (USER_ID, ITEM_ID, TIMESTAMP, WEIGHT):
            if column in theirs.columns:
                np.testing.assert_array_equal(
                    ours[column].to_numpy(), theirs[column].to_numpy(), err_msg=f"{part}.{column}"
                )
        assert len(ours) == len(theirs)
    stats = data.split.stats()
    assert {k: manifest["counts"][k] for k in stats} == stats
    assert manifest["cold_items"] == [str(i) for i in data.split.cold_items]

    # the encoders, in the bundle's format
    encoders = shards.read_encoders(out)
    assert_same_encoders(encoders.to_dict(), data.encoders.to_dict())
    assert encoders.items.ids.values == data.encoders.items.ids.values
    assert encoders.users.ids.values == data.encoders.users.ids.values

    # the catalogue
    catalogue = pd.read_parquet(out / shards.CATALOGUE).sort_values(shards.ITEM_ROW)
    assert catalogue[shards.ITEM_ROW].tolist() == list(range(len(data.catalogue)))
    assert catalogue[ITEM_ID].tolist() == data.catalogue[ITEM_ID].tolist()

    # the training samples, array by array
    assert len(list((out / shards.SAMPLES).glob("*.parquet"))) > 1
    samples = shards.read_samples(out)
    per_sample = data.user_inputs_of_samples()
    assert samples.user_inputs.keys() == per_sample.keys()
    for input_name, theirs in per_sample.items():
        ours = samples.user_inputs[input_name]
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, input_name
        if input_name == "user_num":
            np.testing.assert_allclose(ours, theirs, rtol=1e-6, err_msg=input_name)
        else:
            np.testing.assert_array_equal(ours, theirs, err_msg=input_name)
    np.testing.assert_array_equal(samples.item_rows, data.sample_item_rows)
    np.testing.assert_array_equal(samples.weights, data.sample_weights)
    ours_h, theirs_h = samples.histories, data.sample_histories
    np.testing.assert_array_equal(ours_h.item_codes, theirs_h.item_codes)
    np.testing.assert_array_equal(ours_h.starts, theirs_h.starts)
    np.testing.assert_array_equal(ours_h.ends, theirs_h.ends)
    assert ours_h.length == theirs_h.length
    # the materialised windows are the plain leakage-free histories (horizon 1)
    windows = pd.read_parquet(out / shards.SAMPLES, columns=[shards.SAMPLE, shards.HISTORY])
    windows = np.stack(windows.sort_values(shards.SAMPLE)[shards.HISTORY].to_numpy())
    everyone = np.arange(len(samples))
    expected = theirs_h.windows(everyone, 1, np.random.default_rng(0))
    np.testing.assert_array_equal(windows, expected)
    if name == "temporal":  # the variant really exercised ties, weights and every encoder
        assert (theirs_h.ends > theirs_h.starts).any()
        assert (np.diff(theirs_h.ends) == 0).any()
        assert set(data.user_inputs_of_samples()) == {"user_id", "user_cat", "user_num"}
        assert data.encoders.items.text["title"].known_words
        assert data.encoders.items.multi_hot["tags"].vocabulary.values
    else:
        assert len(data.split.cold_items) > 0
        assert (data.user_inputs_of_samples()["user_id"] == 1).any()  # out of vocabulary
        assert (data.sample_histories.item_codes == 1).any()


def prepare_arguments(tables: Tables, prepared: Path, history_length: int) -> list[str]:
    """The options of ``twotower prepare`` / ``twotower spark prepare`` for ``tables``
    into ``prepared``, in several shards."""
    assert tables.items is not None and tables.users is not None
    return [
        "--interactions",
        str(tables.interactions),
        "--items",
        str(tables.items),
        "--users",
        str(tables.users),
        "--output",
        str(prepared),
        "--history-length",
        str(history_length),
        "--samples-per-shard",
        "2000",  # several shards
    ]


def assert_trains_as_the_tables(
    tables: Tables, prepared: Path, overrides: list[str], tmp_path: Path
) -> Any:
    """``data.prepared=prepared`` trains exactly as the tables themselves do (the same
    split, encoders and samples, so the same metrics); streamed (``data.stream=true``),
    comparably. Returns the run from the tables."""
    from towers.pipeline import train

    from .conftest import compose_config

    common = [*overrides, "logger=none", "data=csv", f"data.users={tables.users}"]
    from_tables = train(
        compose_config(
            [
                *common,
                f"data.interactions={tables.interactions}",
                f"data.items={tables.items}",
                f"paths.output_dir={tmp_path / 'from_tables'}",
            ]
        )
    )
    from_prepared = train(
        compose_config(
            [*common, f"data.prepared={prepared}", f"paths.output_dir={tmp_path / 'prepared_run'}"]
        )
    )
    assert from_tables is not None and from_prepared is not None
    assert from_prepared.data.info == {**from_tables.data.info, "prepared": str(prepared)}
    assert from_prepared.data.users is not None  # the evaluation users' attributes
    assert "user_num" in from_prepared.data.test.user_inputs
    metrics = [k for k in from_tables.metrics if k.startswith(("val/", "test/"))]
    assert metrics
    assert {k: from_prepared.metrics[k] for k in metrics} == {
        k: from_tables.metrics[k] for k in metrics
    }

    # the same samples in another order (two groups of shards per epoch: test_shard_stream
    # checks every batch tensor by tensor), so comparable metrics: at this tiny size (about
    # 5k samples, 6 epochs) the order alone moved recall and NDCG@20 by up to 0.045 in
    # two seeds (at 1M events by under 0.001: docs/benchmarks/streaming.md)
    streamed = train(
        compose_config(
            [
                *common,
                f"data.prepared={prepared}",
                "data.stream=true",
                "data.stream_group_shards=2",
                f"paths.output_dir={tmp_path / 'streamed_run'}",
            ]
        )
    )
    assert streamed is not None and streamed.data.sample_stream is not None
    assert streamed.data.n_samples == from_prepared.data.n_samples
    assert len(streamed.data.sample_item_rows) == 0  # nothing but the shards holds them
    for key in ("val/recall@20", "val/ndcg@20", "test/recall@20", "test/ndcg@20"):
        assert streamed.metrics[key] == pytest.approx(from_prepared.metrics[key], abs=0.06), key
    return from_tables
