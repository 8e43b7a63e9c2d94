"""Entity encoders: one entity's id plus attribute columns -> tower inputs; both entities
and the history together as :class:`FeatureEncoders`, saved in the bundle as JSON."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from twotower.encoding.columns import HashedTextEncoder, MultiHotEncoder, NumericEncoder
from twotower.encoding.vocabulary import PAD_INDEX, Vocabulary, as_str_or_none
from twotower.errors import BundleError, MissingColumnError

ENCODERS_FORMAT = 1
ITEM_INPUTS = ("item_id", "item_cat", "item_bag", "item_num")
USER_INPUTS = ("user_id", "user_cat", "user_bag", "user_num", "history")


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
        if not isinstance(id_values, pd.Series):
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
    if isinstance(id_values, pd.Series) and isinstance(id_values.dtype, pd.CategoricalDtype):
        id_values = id_values.cat.remove_unused_categories().cat.categories
    seen = set(as_str_or_none(id_values).dropna())
    return table[as_str_or_none(table[id_column]).isin(seen).to_numpy()]


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
