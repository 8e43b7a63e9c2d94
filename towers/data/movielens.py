"""Readers for the MovieLens folder formats (100K, 1M, latest / latest-small).

Ids stay strings; genres become a ``|``-joined multi-hot column; user demographics
are kept where the format has them. Interactions keep their ``rating`` column, so a
run can apply a rating threshold.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from towers.data.schema import (
    ITEM_ID,
    RATING,
    TIMESTAMP,
    USER_ID,
    RawData,
    check_known_items,
    validate_entities,
    validate_interactions,
)
from twotower.encoding import FeatureColumns
from twotower.errors import MissingFileError

_YEAR = re.compile(r"\((\d{4})\)\s*$")


def _file(folder: str | Path, name: str) -> Path:
    path = Path(folder) / name
    if not path.is_file():
        raise MissingFileError(f"{path}: no such file (is data.path a MovieLens folder?)")
    return path


def _year_from_title(titles: pd.Series) -> pd.Series:
    return pd.to_numeric(titles.str.strip().str.extract(_YEAR)[0], errors="coerce")


def _finish(
    events: pd.DataFrame,
    items: pd.DataFrame,
    users: pd.DataFrame | None,
    sources: tuple[Path, Path, Path | None],
    item_features: FeatureColumns,
    user_features: FeatureColumns,
    name: str,
) -> RawData:
    events = validate_interactions(events, str(sources[0]))
    items = validate_entities(items, ITEM_ID, str(sources[1]), "item")
    events = check_known_items(events, items, "error", str(sources[0]))
    if users is not None and sources[2] is not None:
        users = validate_entities(users, USER_ID, str(sources[2]), "user")
    return RawData(events, items, users, item_features, user_features, name)


def read_movielens_100k(path: str | Path) -> RawData:
    """MovieLens 100K (``u.data``, ``u.item``, ``u.user``, ``u.genre``)."""
    data_file, item_file, user_file = (_file(path, n) for n in ("u.data", "u.item", "u.user"))
    genres = pd.read_csv(_file(path, "u.genre"), sep="|", header=None, names=["name", "index"])
    genre_names = genres.dropna()["name"].tolist()
    events = pd.read_csv(
        data_file,
        sep="\t",
        header=None,
        names=[USER_ID, ITEM_ID, RATING, TIMESTAMP],
        dtype={USER_ID: str, ITEM_ID: str},
    )
    item_cols = [ITEM_ID, "title", "release_date", "video_release_date", "url", *genre_names]
    raw_items = pd.read_csv(
        item_file, sep="|", header=None, names=item_cols, encoding="latin-1", dtype={ITEM_ID: str}
    )
    flags = raw_items[genre_names].to_numpy(dtype=bool)
    names = np.asarray(genre_names, dtype=object)
    items = pd.DataFrame(
        {
            ITEM_ID: raw_items[ITEM_ID],
            "title": raw_items["title"].fillna(""),
            "year": pd.to_datetime(
                raw_items["release_date"], format="%d-%b-%Y", errors="coerce"
            ).dt.year,
            "genres": ["|".join(names[row]) for row in flags],
        }
    )
    users = pd.read_csv(
        user_file,
        sep="|",
        header=None,
        names=[USER_ID, "age", "gender", "occupation", "zip"],
        dtype={USER_ID: str, "zip": str},
    )
    return _finish(
        events,
        items,
        users,
        (data_file, item_file, user_file),
        FeatureColumns(multi_hot=["genres"], numeric=["year"], text=["title"]),
        FeatureColumns(categorical=["gender", "occupation"], numeric=["age"]),
        "movielens_100k",
    )


def read_movielens_1m(path: str | Path) -> RawData:
    """MovieLens 1M (``ratings.dat``, ``movies.dat``, ``users.dat``, ``::``-separated)."""
    data_file, item_file, user_file = (
        _file(path, n) for n in ("ratings.dat", "movies.dat", "users.dat")
    )

    def read_dat(file: Path, names: list[str]) -> pd.DataFrame:
        lines = file.read_text(encoding="latin-1").splitlines()
        rows = [line.split("::") for line in lines if line.strip()]
        return pd.DataFrame(rows, columns=names)

    events = read_dat(data_file, [USER_ID, ITEM_ID, RATING, TIMESTAMP])
    events[RATING] = pd.to_numeric(events[RATING])
    events[TIMESTAMP] = pd.to_numeric(events[TIMESTAMP])
    items = read_dat(item_file, [ITEM_ID, "title", "genres"])
    items["year"] = _year_from_title(items["title"])
    users = read_dat(user_file, [USER_ID, "gender", "age", "occupation", "zip"])
    return _finish(
        events,
        items,
        users,
        (data_file, item_file, user_file),
        FeatureColumns(multi_hot=["genres"], numeric=["year"], text=["title"]),
        FeatureColumns(categorical=["gender", "age", "occupation"]),
        "movielens_1m",
    )


def read_movielens_latest(path: str | Path, max_tags_per_item: int = 20) -> RawData:
    """MovieLens latest / latest-small (``ratings.csv``, ``movies.csv``, optional ``tags.csv``).

    Tags become a ``tags`` multi-hot column (lower-cased, most frequent first); it is not
    a default feature because tags are written by the same users whose events are held out.
    """
    data_file, item_file = _file(path, "ratings.csv"), _file(path, "movies.csv")
    events = pd.read_csv(data_file, dtype={"userId": str, "movieId": str}).rename(
        columns={"userId": USER_ID, "movieId": ITEM_ID}
    )
    items = pd.read_csv(item_file, dtype={"movieId": str}).rename(columns={"movieId": ITEM_ID})
    items["genres"] = items["genres"].replace("(no genres listed)", "")
    items["year"] = _year_from_title(items["title"])
    tags_file = Path(path) / "tags.csv"
    if tags_file.is_file():
        tags = pd.read_csv(tags_file, dtype={"movieId": str}).rename(columns={"movieId": ITEM_ID})
        tags["tag"] = tags["tag"].astype(str).str.lower().str.replace("|", " ", regex=False)
        counts = tags.groupby([ITEM_ID, "tag"]).size().rename("n").reset_index()
        counts = counts.sort_values([ITEM_ID, "n", "tag"], ascending=[True, False, True])
        top = counts.groupby(ITEM_ID).head(max_tags_per_item)
        joined = top.groupby(ITEM_ID)["tag"].agg("|".join)
        items["tags"] = items[ITEM_ID].map(joined).fillna("")
    return _finish(
        events,
        items,
        None,
        (data_file, item_file, None),
        FeatureColumns(multi_hot=["genres"], numeric=["year"], text=["title"]),
        FeatureColumns(),
        "movielens_latest",
    )
