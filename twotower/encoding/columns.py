"""Column encoders: multi-hot bags (genres, tags), hashed free text, numbers."""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from twotower.encoding.vocabulary import (
    FIRST_KNOWN_INDEX,
    PAD_INDEX,
    Vocabulary,
    split_tokens,
    words_of,
)

NUMERIC_CLIP = 5.0


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

