"""The MovieLens readers on the real files (skipped when the datasets are absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

from towers.data.movielens import read_movielens_1m, read_movielens_100k, read_movielens_latest
from towers.data.schema import ITEM_ID, USER_ID
from twotower.encoding import split_tokens
from twotower.errors import MissingFileError

from .conftest import dataset_dir

pytestmark = pytest.mark.dataset


def test_movielens_100k_counts_and_features() -> None:
    data = read_movielens_100k(dataset_dir("ml-100k"))
    assert len(data.interactions) == 100_000
    assert data.interactions[USER_ID].nunique() == 943
    assert len(data.items) == 1682
    genres = {g for cell in data.items["genres"] for g in split_tokens(cell, "|")}
    assert len(genres) == 19
    assert data.users is not None and len(data.users) == 943
    assert {"age", "gender", "occupation"} <= set(data.users.columns)
    assert data.interactions[ITEM_ID].map(type).eq(str).all()


def test_movielens_latest_small_counts() -> None:
    data = read_movielens_latest(dataset_dir("ml-latest-small"))
    assert len(data.interactions) == 100_836
    assert data.interactions[USER_ID].nunique() == 610
    assert len(data.items) == 9742
    assert "tags" in data.items.columns
    assert data.items["year"].notna().mean() > 0.99


def test_movielens_1m_format_on_a_small_copy(tmp_path: Path) -> None:
    (tmp_path / "ratings.dat").write_text(
        "1::10::5::978300760\n1::20::3::978302109\n2::10::4::978301968\n"
    )
    (tmp_path / "movies.dat").write_text(
        "10::Toy Story (1995)::Animation|Children's|Comedy\n20::Jumanji (1995)::Adventure\n",
        encoding="latin-1",
    )
    (tmp_path / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n")
    data = read_movielens_1m(tmp_path)
    assert len(data.interactions) == 3
    assert data.items.set_index(ITEM_ID).loc["10", "genres"] == "Animation|Children's|Comedy"
    assert data.items.set_index(ITEM_ID).loc["20", "year"] == 1995
    assert data.users is not None and list(data.users[USER_ID]) == ["1", "2"]


def test_missing_movielens_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match=r"u\.data"):
        read_movielens_100k(tmp_path)
