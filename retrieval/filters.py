"""Attribute filters over the item table: ``{"genres": {"Comedy", "Drama"}, "year": 1995}``.

A filter keeps the items whose column matches any of the given values; for a
multi-hot column (``|``-joined tokens or lists) an item matches when any of its
tokens is among them. Several columns combine with AND.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from twotower.encoding import split_tokens
from twotower.errors import RequestError

Filter = Mapping[str, Any]


def _values(wanted: Any) -> set[str]:
    if isinstance(wanted, (str, bytes)) or not isinstance(wanted, Iterable):
        wanted = [wanted]
    return {str(v) for v in wanted}


def column_mask(column: pd.Series, wanted: Any, separator: str = "|") -> np.ndarray:
    """Rows of ``column`` matching any of ``wanted`` (token-wise for multi-hot cells)."""
    values = _values(wanted)
    sample = column.dropna()
    is_bag = len(sample) and (
        sample.map(lambda v: isinstance(v, (list, tuple, np.ndarray))).any()
        or sample.astype(str).str.contains(separator, regex=False).any()
    )
    if is_bag:
        tokens = column.map(lambda cell: split_tokens(cell, separator))
        return tokens.map(lambda ts: not values.isdisjoint(ts)).to_numpy(dtype=bool)
    return column.astype(str).isin(values).to_numpy(dtype=bool) & column.notna().to_numpy()


def filter_mask(items: pd.DataFrame, filter: Filter, separator: str = "|") -> np.ndarray:
    """Boolean mask over the rows of ``items`` (index order) for a filter."""
    if not isinstance(filter, Mapping):
        raise RequestError(
            f"filter must be a mapping of column -> value(s), got {type(filter).__name__}"
        )
    mask = np.ones(len(items), dtype=bool)
    for name, wanted in filter.items():
        if name not in items.columns or str(name).startswith("_twotower"):
            columns = [c for c in items.columns if not str(c).startswith("_twotower")]
            raise RequestError(f"filter column '{name}' is not an item attribute (have {columns})")
        mask &= column_mask(items[name], wanted, separator)
    return mask


def filter_key(filter: Filter | None) -> tuple | None:
    """A hashable key for caching a filter's mask."""
    if not filter:
        return None
    return tuple(sorted((str(k), tuple(sorted(_values(v)))) for k, v in filter.items()))


class MaskCache:
    """Filter masks cached per (catalogue version, filter), least recently used out."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._masks: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def allowed(
        self,
        version: int,
        items: pd.DataFrame,
        visible: np.ndarray,
        filter: Filter | None,
        separator: str = "|",
    ) -> np.ndarray:
        """Rows that may be returned: ``visible`` ones matching ``filter`` (``visible``
        itself, not a copy, when there is no filter)."""
        key = filter_key(filter)
        if key is None:
            return visible
        cache_key = (version, key)
        with self._lock:
            mask = self._masks.get(cache_key)
            if mask is not None:
                self._masks.move_to_end(cache_key)
        if mask is None:
            mask = filter_mask(items, filter, separator)
            with self._lock:
                self._masks[cache_key] = mask
                while len(self._masks) > self.size:
                    self._masks.popitem(last=False)
        return mask & visible
