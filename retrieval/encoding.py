"""Feature encoding, written once: raw table values -> integer / float model inputs.

The encoders are fitted on training data by ``towers``, saved in the bundle as plain
JSON, and applied by this same numpy/pandas code at training time and at serving
time, so the two can never disagree. Nothing here imports torch.

Index conventions for every vocabulary (ids, categories, multi-hot tokens):
``0`` is padding, ``1`` is the out-of-vocabulary slot, known values start at ``2``.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from retrieval.errors import BundleError, MissingColumnError

PAD_INDEX = 0
OOV_INDEX = 1
FIRST_KNOWN_INDEX = 2
NUMERIC_CLIP = 5.0
ENCODERS_FORMAT = 1

ITEM_INPUTS = ("item_id", "item_cat", "item_bag", "item_num")
USER_INPUTS = ("user_id", "user_cat", "user_bag", "user_num", "history")


def _as_str_or_none(values: Iterable[Any]) -> pd.Series:
    """Raw ids/categories as strings, with missing values kept as ``None``."""
    series = pd.Series(list(values) if not isinstance(values, pd.Series) else values)
    missing = series.isna().to_numpy()
    as_str = series.astype(str).astype(object)
    as_str[missing] = None
    return as_str


SMALL_INPUT = 256


def _small_key(value: Any) -> str | None:
    """The lookup key of one raw value (None for missing), as ``_as_str_or_none`` would."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return value if isinstance(value, str) else str(value)


@dataclass
class Vocabulary:
    """Maps raw values (kept as strings) to indices; unknown values go to ``OOV_INDEX``."""

    values: list[str]
    _index: pd.Index = field(init=False, repr=False, compare=False)
    _lookup: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._index = pd.Index(self.values, dtype=object)
        self._index.get_indexer(["warm-up"])  # build pandas' hash table now, once
        self._lookup = {value: i + FIRST_KNOWN_INDEX for i, value in enumerate(self.values)}

    @classmethod
    def fit(cls, values: Iterable[Any], min_count: int = 1) -> Vocabulary:
        """Keep values seen at least ``min_count`` times, most frequent first (ties by value)."""
        series = _as_str_or_none(values).dropna()
        counts = series.value_counts()
        counts = counts[counts >= min_count]
        frame = pd.DataFrame({"value": counts.index.astype(str), "count": counts.to_numpy()})
        frame = frame.sort_values(["count", "value"], ascending=[False, True], kind="mergesort")
        return cls(values=frame["value"].tolist())

    @property
    def size(self) -> int:
        """Number of embedding rows needed: padding + OOV + known values."""
        return len(self.values) + FIRST_KNOWN_INDEX

    def encode(self, values: Iterable[Any]) -> np.ndarray:
        """Indices (int64) of ``values``; missing or unknown values map to ``OOV_INDEX``."""
        if isinstance(values, (list, tuple)) and len(values) <= SMALL_INPUT:
            # Serving asks for a handful of values at a time: a dict beats pandas there.
            return np.fromiter(
                (self._lookup.get(_small_key(v), OOV_INDEX) for v in values), np.int64, len(values)
            )
        as_str = _as_str_or_none(values)
        positions = self._index.get_indexer(as_str.fillna("\x00missing").to_numpy())
        return np.where(positions >= 0, positions + FIRST_KNOWN_INDEX, OOV_INDEX).astype(np.int64)

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


@dataclass
class MultiHotEncoder:
    """A bag of tokens per row (genres, tags), padded to ``max_tokens`` with ``PAD_INDEX``."""

    vocabulary: Vocabulary
    max_tokens: int
    separator: str = "|"

    @classmethod
    def fit(
        cls, column: pd.Series, min_count: int = 1, max_tokens: int = 16, separator: str = "|"
    ) -> MultiHotEncoder:
        """Fit the token vocabulary; the bag width is the longest row, capped at ``max_tokens``."""
        tokens = column.map(lambda cell: split_tokens(cell, separator))
        longest = int(tokens.map(len).max()) if len(tokens) else 1
        flat = [t for row in tokens for t in row]
        return cls(Vocabulary.fit(flat, min_count), max(1, min(max_tokens, longest)), separator)

    def encode(self, column: pd.Series) -> np.ndarray:
        """(n, max_tokens) int64 token indices, left-aligned, padded with ``PAD_INDEX``."""
        tokens = pd.Series(column.map(lambda cell: split_tokens(cell, self.separator)).to_numpy())
        out = np.full((len(tokens), self.max_tokens), PAD_INDEX, dtype=np.int64)
        exploded = tokens.explode().dropna()
        if exploded.empty:
            return out
        rows = exploded.index.to_numpy()
        position = exploded.groupby(level=0).cumcount().to_numpy()
        keep = position < self.max_tokens
        out[rows[keep], position[keep]] = self.vocabulary.encode(exploded.to_numpy()[keep])
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "vocabulary": self.vocabulary.to_dict(),
            "max_tokens": self.max_tokens,
            "separator": self.separator,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MultiHotEncoder:
        return cls(
            Vocabulary.from_dict(data["vocabulary"]), int(data["max_tokens"]), data["separator"]
        )


_WORD = re.compile(r"[^\W_]+", re.UNICODE)


@dataclass
class HashedTextEncoder:
    """Words of a free-text column (e.g. a title), lower-cased and hashed into ``buckets``.

    A stable hash (crc32) sends a word to one of ``buckets`` embedding rows, so new items'
    titles still encode. With ``known_words`` (fitted with ``min_count`` > 1) only those
    words are kept: a word too rare in training (one item's own title, or a new item's)
    adds nothing instead of an untrained or id-like embedding. The bag is the first
    ``max_tokens`` kept words, padded with ``PAD_INDEX``.
    """

    buckets: int = 1 << 14
    max_tokens: int = 8
    known_words: frozenset[str] | None = None

    @classmethod
    def fit(
        cls, column: pd.Series, min_count: int = 1, buckets: int = 1 << 14, max_tokens: int = 8
    ) -> HashedTextEncoder:
        """Keep every word (``min_count`` 1) or the words in at least ``min_count`` rows."""
        if min_count <= 1:
            return cls(buckets, max_tokens)
        words = [word for text in pd.Series(column) for word in set(words_of(text))]
        return cls(buckets, max_tokens, frozenset(Vocabulary.fit(words, min_count).values))

    @property
    def size(self) -> int:
        return self.buckets + FIRST_KNOWN_INDEX

    def encode(self, column: pd.Series) -> np.ndarray:
        out = np.full((len(column), self.max_tokens), PAD_INDEX, dtype=np.int64)
        for row, text in enumerate(pd.Series(column).tolist()):
            words = words_of(text)
            if self.known_words is not None:
                words = [w for w in words if w in self.known_words]
            for position, word in enumerate(words[: self.max_tokens]):
                bucket = zlib.crc32(word.encode("utf-8")) % self.buckets
                out[row, position] = bucket + FIRST_KNOWN_INDEX
        return out

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"buckets": self.buckets, "max_tokens": self.max_tokens}
        if self.known_words is not None:
            data["known_words"] = sorted(self.known_words)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HashedTextEncoder:
        known = data.get("known_words")
        return cls(
            int(data["buckets"]),
            int(data["max_tokens"]),
            None if known is None else frozenset(str(w) for w in known),
        )


def words_of(text: Any) -> list[str]:
    """Lower-cased words of a text cell (none for a missing or non-string cell)."""
    return _WORD.findall(text.lower()) if isinstance(text, str) else []


@dataclass
class NumericEncoder:
    """z-score with train mean/std; missing values become 0 (the mean); clipped to ±5."""

    mean: float
    std: float

    @classmethod
    def fit(cls, column: pd.Series) -> NumericEncoder:
        values = pd.to_numeric(column, errors="coerce").astype(float)
        mean = float(values.mean()) if values.notna().any() else 0.0
        std = float(values.std(ddof=0)) if values.notna().sum() > 1 else 0.0
        return cls(mean=mean, std=std if std > 1e-12 else 1.0)

    def encode(self, column: pd.Series) -> np.ndarray:
        values = pd.to_numeric(pd.Series(column), errors="coerce").to_numpy(dtype=np.float64)
        scaled = np.nan_to_num((values - self.mean) / self.std, nan=0.0)
        return np.clip(scaled, -NUMERIC_CLIP, NUMERIC_CLIP).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NumericEncoder:
        return cls(mean=float(data["mean"]), std=float(data["std"]))


@dataclass
class FeatureColumns:
    """Which attribute columns of a table are encoded, and how."""

    categorical: list[str] = field(default_factory=list)
    multi_hot: list[str] = field(default_factory=list)
    numeric: list[str] = field(default_factory=list)
    text: list[str] = field(default_factory=list)

    @property
    def all(self) -> list[str]:
        return [*self.categorical, *self.multi_hot, *self.numeric, *self.text]


@dataclass
class EntityEncoder:
    """Encodes one kind of entity (items or users): its id plus its attribute columns.

    ``transform`` returns the tower inputs named ``{prefix}_id``, ``{prefix}_cat``
    (n, n_categorical), ``{prefix}_bag`` (n, sum of bag widths) and ``{prefix}_num``
    (n, n_numeric); inputs with no columns are left out.
    """

    prefix: str
    ids: Vocabulary
    use_id: bool
    categorical: dict[str, Vocabulary] = field(default_factory=dict)
    multi_hot: dict[str, MultiHotEncoder] = field(default_factory=dict)
    numeric: dict[str, NumericEncoder] = field(default_factory=dict)
    text: dict[str, HashedTextEncoder] = field(default_factory=dict)

    @classmethod
    def fit(
        cls,
        prefix: str,
        id_values: Iterable[Any],
        table: pd.DataFrame | None,
        columns: FeatureColumns,
        *,
        use_id: bool = True,
        id_min_count: int = 1,
        category_min_count: int = 1,
        max_bag_tokens: int = 16,
        separator: str = "|",
        text_buckets: int = 1 << 14,
        max_text_tokens: int = 8,
        text_min_count: int = 1,
    ) -> EntityEncoder:
        """Fit the id vocabulary on ``id_values`` (training events) and attributes on ``table``.

        Text words are counted over the rows of ``table`` whose id is in ``id_values``
        (entities seen in training), so a held-out item's title never decides which words
        are kept.
        """
        id_values = list(id_values)
        ids = Vocabulary.fit(id_values, id_min_count)
        if table is None:
            table = pd.DataFrame()
        missing = [c for c in columns.all if c not in table.columns]
        if missing:
            raise MissingColumnError(
                f"{prefix} feature column(s) {missing} not in the {prefix} table"
            )
        seen = seen_rows(table, f"{prefix}_id", id_values) if columns.text else table
        return cls(
            prefix=prefix,
            ids=ids,
            use_id=use_id,
            categorical={
                c: Vocabulary.fit(table[c], category_min_count) for c in columns.categorical
            },
            multi_hot={
                c: MultiHotEncoder.fit(table[c], category_min_count, max_bag_tokens, separator)
                for c in columns.multi_hot
            },
            numeric={c: NumericEncoder.fit(table[c]) for c in columns.numeric},
            text={
                c: HashedTextEncoder.fit(seen[c], text_min_count, text_buckets, max_text_tokens)
                for c in columns.text
            },
        )

    @property
    def columns(self) -> FeatureColumns:
        return FeatureColumns(
            list(self.categorical), list(self.multi_hot), list(self.numeric), list(self.text)
        )

    @property
    def bags(self) -> list[MultiHotEncoder | HashedTextEncoder]:
        """The bag-of-token encoders, in the column order of the ``_bag`` input."""
        return [*self.multi_hot.values(), *self.text.values()]

    @property
    def input_names(self) -> list[str]:
        """Tower input names this encoder produces, in canonical order."""
        names = [f"{self.prefix}_id"] if self.use_id else []
        if self.categorical:
            names.append(f"{self.prefix}_cat")
        if self.bags:
            names.append(f"{self.prefix}_bag")
        if self.numeric:
            names.append(f"{self.prefix}_num")
        return names

    def transform(
        self, id_values: Sequence[Any], table: pd.DataFrame | None
    ) -> dict[str, np.ndarray]:
        """Encode rows: ``table`` must be aligned with ``id_values`` (one row each) or be None.

        With ``table=None`` (or a missing column) attributes are treated as unknown: OOV
        for categories, empty bags and the mean for numbers.
        """
        n = len(id_values)
        out: dict[str, np.ndarray] = {}
        if self.use_id:
            out[f"{self.prefix}_id"] = self.ids.encode(id_values)

        def column(name: str) -> pd.Series:
            if table is None or name not in table.columns:
                return pd.Series([None] * n, dtype=object)
            return table[name].reset_index(drop=True)

        if self.categorical:
            out[f"{self.prefix}_cat"] = np.stack(
                [vocab.encode(column(c)) for c, vocab in self.categorical.items()], axis=1
            )
        if self.bags:
            bag_columns = {**self.multi_hot, **self.text}
            out[f"{self.prefix}_bag"] = np.concatenate(
                [enc.encode(column(c)) for c, enc in bag_columns.items()], axis=1
            )
        if self.numeric:
            out[f"{self.prefix}_num"] = np.stack(
                [enc.encode(column(c)) for c, enc in self.numeric.items()], axis=1
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "use_id": self.use_id,
            "ids": self.ids.to_dict(),
            "categorical": {c: v.to_dict() for c, v in self.categorical.items()},
            "multi_hot": {c: v.to_dict() for c, v in self.multi_hot.items()},
            "numeric": {c: v.to_dict() for c, v in self.numeric.items()},
            "text": {c: v.to_dict() for c, v in self.text.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EntityEncoder:
        return cls(
            prefix=data["prefix"],
            ids=Vocabulary.from_dict(data["ids"]),
            use_id=bool(data["use_id"]),
            categorical={c: Vocabulary.from_dict(v) for c, v in data["categorical"].items()},
            multi_hot={c: MultiHotEncoder.from_dict(v) for c, v in data["multi_hot"].items()},
            numeric={c: NumericEncoder.from_dict(v) for c, v in data["numeric"].items()},
            text={c: HashedTextEncoder.from_dict(v) for c, v in data.get("text", {}).items()},
        )


def seen_rows(table: pd.DataFrame, id_column: str, id_values: Sequence[Any]) -> pd.DataFrame:
    """Rows of ``table`` whose ``id_column`` value is among ``id_values`` (all rows if the
    table has no such column)."""
    if id_column not in table.columns:
        return table
    seen = set(_as_str_or_none(id_values).dropna())
    return table[_as_str_or_none(table[id_column]).isin(seen).to_numpy()]


@dataclass
class FeatureEncoders:
    """Everything that turns raw ids and attributes into the two towers' inputs."""

    items: EntityEncoder
    users: EntityEncoder
    history_length: int

    @property
    def item_input_names(self) -> list[str]:
        return self.items.input_names

    @property
    def user_input_names(self) -> list[str]:
        return [*self.users.input_names, "history"]

    def encode_histories(self, histories: Sequence[Sequence[Any]]) -> np.ndarray:
        """(n, history_length) item indices, oldest first, the most recent item last.

        Only the last ``history_length`` items of each sequence are kept; shorter ones
        are left-padded with ``PAD_INDEX``. Unknown items map to ``OOV_INDEX``.
        """
        length = self.history_length
        out = np.full((len(histories), length), PAD_INDEX, dtype=np.int64)
        for row, history in enumerate(histories):
            recent = list(history)[-length:] if length else []
            if recent:
                out[row, length - len(recent) :] = self.items.ids.encode(recent)
        return out

    def item_inputs(self, items: pd.DataFrame, id_column: str = "item_id") -> dict[str, np.ndarray]:
        """Item-tower inputs for the rows of an item table."""
        return self.items.transform(items[id_column].tolist(), items)

    def user_inputs(
        self,
        user_ids: Sequence[Any],
        histories: np.ndarray,
        attributes: pd.DataFrame | None,
    ) -> dict[str, np.ndarray]:
        """User-tower inputs: ids, attribute rows aligned with ``user_ids``, encoded histories."""
        out = self.users.transform(user_ids, attributes)
        out["history"] = np.asarray(histories, dtype=np.int64)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": ENCODERS_FORMAT,
            "items": self.items.to_dict(),
            "users": self.users.to_dict(),
            "history_length": self.history_length,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureEncoders:
        if data.get("format") != ENCODERS_FORMAT:
            raise BundleError(
                f"encoders format {data.get('format')!r} is not the supported {ENCODERS_FORMAT}"
            )
        return cls(
            items=EntityEncoder.from_dict(data["items"]),
            users=EntityEncoder.from_dict(data["users"]),
            history_length=int(data["history_length"]),
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> FeatureEncoders:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise BundleError(f"cannot read feature encoders from {path}: {exc}") from exc
        return cls.from_dict(data)
