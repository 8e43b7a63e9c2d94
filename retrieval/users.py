"""User encoding: ids, recent history and attributes -> user vectors through the ONNX
user tower.

The bundle's known users (``users.parquet``) are encoded once at load, so a request
with only a known id costs numpy indexing; recent items are appended to the stored
history and given attributes are encoded over the stored ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnxruntime as ort
import pandas as pd

from twotower.bundle import layout
from twotower.encoding import PAD_INDEX, FeatureEncoders

UserFeatures = Mapping[str, Any]


class UserEncoder:
    """Known users' stored state plus the user tower; answers ``encode`` for any mix of
    known ids, unknown ids, recent histories and attributes."""

    def __init__(
        self,
        encoders: FeatureEncoders,
        users: pd.DataFrame,
        session: ort.InferenceSession,
        item_rows: pd.Index | None = None,
    ) -> None:
        """``item_rows``: the catalogue's item ids in row order at load, so each known
        user's seen items are looked up once, here, as sorted catalogue rows."""
        self.encoders = encoders
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]
        users = users.reset_index(drop=True)
        self.position = {str(u): i for i, u in enumerate(users[layout.USER_ID])}
        self.seen_items = users[layout.SEEN_COLUMN].to_numpy()
        attributes = users.drop(columns=[layout.HISTORY_COLUMN, layout.SEEN_COLUMN])
        # one extra all-missing row, taken for users the bundle does not know
        self.attributes = pd.concat(
            [attributes, attributes.iloc[:0].reindex([0])], ignore_index=True
        )
        self.missing_row = len(attributes)
        known_ids: list[Any] = [*self.position, None]
        self.stored_inputs = encoders.users.transform(known_ids, self.attributes)
        self.stored_histories = encoders.encode_histories(
            [[str(i) for i in h] for h in users[layout.HISTORY_COLUMN]] + [[]]
        )
        self.id_input = f"{encoders.users.prefix}_id"
        self.seen_offsets, self.seen_flat = self._seen_rows(item_rows)

    def _seen_rows(self, item_rows: pd.Index | None) -> tuple[np.ndarray, np.ndarray]:
        """CSR of each known user's seen items as sorted, unique catalogue rows."""
        lengths = np.fromiter((len(s) for s in self.seen_items), np.int64, len(self.seen_items))
        if item_rows is None or not lengths.sum():
            return np.zeros(len(lengths) + 2, np.int64), np.zeros(0, np.int64)
        flat = np.concatenate([np.asarray(s, dtype=object) for s in self.seen_items if len(s)])
        rows = item_rows.get_indexer(pd.Index(flat).astype(str))
        owner = np.repeat(np.arange(len(lengths)), lengths)
        keep = rows >= 0
        owner, rows = owner[keep], rows[keep]
        order = np.lexsort((rows, owner))
        owner, rows = owner[order], rows[order]
        first = np.ones(len(rows), bool)
        first[1:] = (owner[1:] != owner[:-1]) | (rows[1:] != rows[:-1])
        owner, rows = owner[first], rows[first].astype(np.int64)
        counts = np.bincount(owner, minlength=len(lengths) + 1)  # + the all-missing row
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return offsets, rows

    def seen_rows(self, position: int) -> np.ndarray:
        """Sorted catalogue rows (as at load) of the seen items of the user at ``position``
        (none for the all-missing row of unknown users)."""
        return self.seen_flat[self.seen_offsets[position] : self.seen_offsets[position + 1]]

    def __len__(self) -> int:
        return len(self.position)

    def known(self, user_id: Any) -> bool:
        """Whether the bundle holds this user's history and attributes."""
        return user_id is not None and str(user_id) in self.position

    def positions(self, user_ids: Sequence[Any]) -> np.ndarray:
        """Row of each user in the bundle's user table; the all-missing row if unknown."""
        missing, lookup = self.missing_row, self.position
        return np.fromiter(
            (missing if u is None else lookup.get(str(u), missing) for u in user_ids),
            np.int64,
            len(user_ids),
        )

    def seen(self, position: int) -> list[str]:
        """Items the bundle records for the user at ``position`` (none for unknown users)."""
        if position == self.missing_row:
            return []
        return [str(i) for i in self.seen_items[position]]

    def tower_inputs(
        self,
        user_ids: Sequence[Any],
        positions: np.ndarray,
        histories: Sequence[Sequence[Any] | None],
        user_features: Sequence[UserFeatures | None],
    ) -> dict[str, np.ndarray]:
        """Tower inputs per user: the stored encoding, with the given recent items appended
        to the stored history and any given attributes encoded over the stored ones."""
        inputs = {name: values[positions] for name, values in self.stored_inputs.items()}
        unknown = np.flatnonzero(positions == self.missing_row)
        if len(unknown) and self.id_input in inputs:  # an id in the vocabulary, not the table
            inputs[self.id_input][unknown] = self.encoders.users.ids.encode(
                [str(user_ids[r]) if user_ids[r] is not None else None for r in unknown]
            )
        history = self.stored_histories[positions]
        length = history.shape[1]
        for row, given in enumerate(histories):
            if given and length:
                codes = self.encoders.items.ids.encode([str(i) for i in given])
                past = history[row][history[row] != PAD_INDEX]
                recent = np.concatenate([past, codes])[-length:]
                history[row] = PAD_INDEX
                history[row, length - len(recent) :] = recent
        inputs["history"] = history
        custom = [r for r, features in enumerate(user_features) if features]
        if custom:
            # object columns: a given value of any JSON type fits (a bool in a string column)
            attributes = (
                self.attributes.iloc[positions[custom]].reset_index(drop=True).astype(object)
            )
            for row, r in enumerate(custom):
                for name, value in (user_features[r] or {}).items():
                    if name not in attributes.columns:
                        attributes[name] = None
                    attributes.at[row, name] = value
            encoded = self.encoders.users.transform(
                [str(user_ids[r]) if user_ids[r] is not None else None for r in custom], attributes
            )
            for name, values in encoded.items():
                inputs[name][custom] = values
        return inputs

    def stored_row(self, position: int) -> dict[str, np.ndarray]:
        """Tower inputs of one known user from the stored state alone (views, no copies)."""
        inputs = {
            name: values[position : position + 1] for name, values in self.stored_inputs.items()
        }
        inputs["history"] = self.stored_histories[position : position + 1]
        return inputs

    def run(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """(n, d) float32 user vectors from tower inputs."""
        return self.session.run(None, {name: inputs[name] for name in self.input_names})[0]

    def encode(
        self,
        user_ids: Sequence[Any],
        histories: Sequence[Sequence[Any] | None],
        user_features: Sequence[UserFeatures | None],
        positions: np.ndarray | None = None,
    ) -> np.ndarray:
        """(n, d) user vectors; arguments have one entry per user."""
        if positions is None:
            positions = self.positions(user_ids)
        return self.run(self.tower_inputs(user_ids, positions, histories, user_features))
