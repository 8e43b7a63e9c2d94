"""Id columns as integer codes: pandas Categoricals whose categories are the ids as
strings, sorted.

The interactions table can hold hundreds of millions of rows; as Python strings its two
id columns alone take about 120 bytes a row. As a Categorical each is a 4-byte code per
row plus one string per distinct id. The categories are sorted the way Python sorts
strings, so ordering rows by the codes is ordering them by the ids: every sort, split
and tie-break gives exactly what it gives on string ids.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from twotower.errors import InvalidValueError


def is_categorical(column: pd.Series | pd.Index | np.ndarray) -> bool:
    """Whether ``column`` is a pandas Categorical (the id columns of validated events)."""
    return isinstance(getattr(column, "dtype", None), pd.CategoricalDtype)


def as_id_strings(values: pd.Index | np.ndarray) -> np.ndarray:
    """Distinct raw ids as strings (integral floats lose their ``.0``), an object array."""
    array = np.asarray(values)
    if array.dtype.kind == "f" and np.all(np.mod(array, 1) == 0):
        array = array.astype(np.int64)
    return np.asarray([str(v) for v in array.tolist()], dtype=object)


def encode_id_column(column: pd.Series, source: str, name: str) -> pd.Series:
    """An id column as a Categorical of sorted string ids; a missing id is an error.

    The ids are strings, integral floats without ``.0`` (as
    :func:`towers.data.schema.normalise_ids` gives for a float column; here also for a
    Categorical's float categories); raw values that become the same string share one
    code.
    """
    if is_categorical(column):
        codes = np.asarray(column.cat.codes.to_numpy(), dtype=np.int64)
        uniques = column.cat.categories
    else:
        codes, uniques = pd.factorize(column, use_na_sentinel=True)
    missing = codes < 0
    if missing.any():
        row = int(np.flatnonzero(missing)[0])
        raise InvalidValueError(
            f"{source}: column '{name}' has a missing value at row {row} "
            f"({int(missing.sum())} missing in all)"
        )
    categories, inverse = np.unique(as_id_strings(uniques), return_inverse=True)
    small = np.int32 if len(categories) < 2**31 else np.int64
    new_codes = inverse.astype(small)[codes]
    index = pd.Index(categories, dtype=object)
    return pd.Series(pd.Categorical.from_codes(new_codes, categories=index), name=column.name)


def id_codes(column: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes of an id column and the ids they stand for (an object array), the
    codes ordered as the ids sort as strings: a Categorical's own when its categories
    are sorted strings (as :func:`encode_id_column` makes them), else those of
    :func:`encode_id_column`."""
    if not (is_categorical(column) and _sorted_strings(column.cat.categories)):
        column = encode_id_column(pd.Series(column), "ids", str(getattr(column, "name", "id")))
    # the Categorical's own codes, read-only, not a copy (80M train events: 320 MB)
    return column.array.codes, np.asarray(column.cat.categories, dtype=object)


def _sorted_strings(categories: pd.Index) -> bool:
    """Whether ``categories`` are distinct strings in sorted order (what
    :func:`encode_id_column` makes; any other Categorical is encoded again)."""
    return (
        pd.api.types.infer_dtype(categories, skipna=False) in ("string", "empty")
        and categories.is_monotonic_increasing
        and categories.is_unique
    )


def positions_in(index: pd.Index, column: pd.Series | np.ndarray) -> np.ndarray:
    """``index.get_indexer(column)`` (-1 where absent), looking up a Categorical's
    distinct ids once instead of once per row."""
    if is_categorical(column):
        codes = np.asarray(column.cat.codes)  # type: ignore[union-attr]
        found = index.get_indexer(np.asarray(column.cat.categories, dtype=object))  # type: ignore[union-attr]
        return np.where(codes >= 0, found[codes], -1).astype(np.int64)
    return index.get_indexer(np.asarray(column, dtype=object)).astype(np.int64)


def distinct_in_order(column: pd.Series) -> np.ndarray:
    """The distinct ids of ``column`` in order of first appearance, an object array."""
    return np.asarray(pd.unique(column), dtype=object)
