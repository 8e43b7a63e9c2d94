"""Vocabularies: raw values (kept as strings) -> integer indices, and token splitting.

Index conventions for every vocabulary (ids, categories, multi-hot tokens):
``0`` is padding, ``1`` is the out-of-vocabulary slot, known values start at ``2``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

PAD_INDEX = 0
OOV_INDEX = 1
FIRST_KNOWN_INDEX = 2


def _categorical(values: Iterable[Any]) -> pd.Series | None:
    """``values`` when they are a pandas Categorical Series (integer codes plus distinct
    values), so that work is done once per distinct value, not once per row."""
    if isinstance(values, pd.Series) and isinstance(values.dtype, pd.CategoricalDtype):
        return values
    return None


def as_str_or_none(values: Iterable[Any]) -> pd.Series:
    """Raw ids/categories as strings, with missing values kept as ``None``."""
    series = pd.Series(list(values) if not isinstance(values, pd.Series) else values)
    missing = series.isna().to_numpy()
    as_str = series.astype(str).astype(object)
    as_str[missing] = None
    return as_str


SMALL_INPUT = 256
# vocabularies up to this size also keep a dict for the few-value lookups of serving (about
# 1 us a value); larger ones (millions of user ids, where the dict would take ~50 bytes a
# value) look those up in pandas' hash table, which every vocabulary has (~0.1 ms a call)
LOOKUP_DICT_LIMIT = 1_000_000
MISSING_KEY = "\x00missing"  # what a missing value is looked up as: no vocabulary holds it


COUNT_CHUNK = 1 << 23


def code_counts(codes: np.ndarray, minlength: int = 0, chunk: int = COUNT_CHUNK) -> np.ndarray:
    """``np.bincount(codes, minlength=minlength)`` with -1 (missing) not counted, a few
    million codes at a time: bincount casts its input to int64 first, a copy of every
    code at once."""
    top = int(codes.max()) + 1 if len(codes) else 0
    missing = bool(len(codes)) and int(codes.min()) < 0  # else no piece needs filtering
    counts = np.zeros(max(minlength, top), dtype=np.int64)
    for lo in range(0, len(codes), chunk):
        piece = codes[lo : lo + chunk]
        counts += np.bincount(piece[piece >= 0] if missing else piece, minlength=len(counts))
    return counts


def _small_key(value: Any) -> str | None:
    """The lookup key of one raw value (None for missing), as ``as_str_or_none`` would."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return value if isinstance(value, str) else str(value)


@dataclass
class Vocabulary:
    """Maps raw values (kept as strings) to indices; unknown values go to ``OOV_INDEX``."""

    values: list[str]
    _index: pd.Index = field(init=False, repr=False, compare=False)
    _lookup: dict[str, int] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._index = pd.Index(self.values, dtype=object)
        self._index.get_indexer(["warm-up"])  # build pandas' hash table now, once
        self._lookup = None
        if len(self.values) <= LOOKUP_DICT_LIMIT:
            self._lookup = {value: i + FIRST_KNOWN_INDEX for i, value in enumerate(self.values)}

    @classmethod
    def fit(cls, values: Iterable[Any], min_count: int = 1) -> Vocabulary:
        """Keep values seen at least ``min_count`` times, most frequent first (ties by value)."""
        categorical = _categorical(values)
        if categorical is not None:
            codes = categorical.cat.codes.to_numpy()
            distinct = as_str_or_none(categorical.cat.categories).to_numpy()
            counts_by_code = code_counts(codes, len(distinct))
            counts = pd.Series(counts_by_code, index=pd.Index(distinct, dtype=object))
            counts = counts[counts > 0].groupby(level=0, sort=False).sum()
        else:
            counts = as_str_or_none(values).dropna().value_counts()
        counts = counts[counts >= min_count]
        frame = pd.DataFrame({"value": counts.index.astype(str), "count": counts.to_numpy()})
        frame = frame.sort_values(["count", "value"], ascending=[False, True], kind="mergesort")
        return cls(values=frame["value"].tolist())

    @property
    def size(self) -> int:
        """Number of embedding rows needed: padding + OOV + known values."""
        return len(self.values) + FIRST_KNOWN_INDEX

    def encode(self, values: Iterable[Any], dtype: type[np.integer] = np.int64) -> np.ndarray:
        """Indices (int64, or ``dtype``: int32 halves an array of every event) of
        ``values``; missing or unknown values map to ``OOV_INDEX``."""
        if isinstance(values, (list, tuple)) and len(values) <= SMALL_INPUT:
            # Serving asks for a handful of values at a time: a dict beats pandas there.
            if self._lookup is not None:
                lookup = self._lookup
                return np.fromiter(
                    (lookup.get(_small_key(v), OOV_INDEX) for v in values), dtype, len(values)
                )
            keys = [_small_key(v) for v in values]
            keys = np.asarray([MISSING_KEY if k is None else k for k in keys], dtype=object)
            positions = self._index.get_indexer(keys)
            return np.where(positions >= 0, positions + FIRST_KNOWN_INDEX, OOV_INDEX).astype(dtype)
        categorical = _categorical(values)
        if categorical is not None:
            # one index per category, then OOV at the end for the missing code -1
            distinct = np.append(self.encode(categorical.cat.categories), OOV_INDEX).astype(dtype)
            return distinct[categorical.cat.codes.to_numpy()]
        as_str = as_str_or_none(values)
        positions = self._index.get_indexer(as_str.fillna(MISSING_KEY).to_numpy())
        return np.where(positions >= 0, positions + FIRST_KNOWN_INDEX, OOV_INDEX).astype(dtype)

    def contains(self, values: Iterable[Any]) -> np.ndarray:
        """Boolean mask: which ``values`` are known to the vocabulary."""
        return self.encode(values) >= FIRST_KNOWN_INDEX

    def to_dict(self) -> dict[str, Any]:
        return {"values": self.values}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Vocabulary:
        return cls(values=[str(v) for v in data["values"]])


def split_tokens(cell: Any, separator: str) -> list[str]:
    """Tokens of one multi-hot cell: a ``separator``-joined string or a list of values."""
    if cell is None:
        return []
    if isinstance(cell, str):
        return [t.strip() for t in cell.split(separator) if t.strip()]
    if isinstance(cell, (list, tuple, np.ndarray)):
        return [str(t).strip() for t in cell if t is not None and str(t).strip()]
    if isinstance(cell, float) and np.isnan(cell):
        return []
    return [str(cell)]


_WORD = re.compile(r"[^\W_]+", re.UNICODE)


def words_of(text: Any) -> list[str]:
    """Lower-cased words of a text cell (none for a missing or non-string cell)."""
    return _WORD.findall(text.lower()) if isinstance(text, str) else []
