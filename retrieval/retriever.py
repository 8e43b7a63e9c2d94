"""Load a bundle and answer "top-k items for this user" with onnxruntime and FAISS.

No torch here: the user tower runs as ONNX, the item vectors sit in a FAISS index,
and the feature encoders are the same numpy/pandas code used in training.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import onnxruntime as ort
import pandas as pd

from retrieval import bundle as layout
from retrieval.encoding import FeatureEncoders
from retrieval.errors import BundleError, RequestError

log = logging.getLogger(__name__)

USER_ID = "user_id"
ITEM_ID = "item_id"


class Retriever:
    """A loaded bundle. Build it with :meth:`Retriever.load`.

    ``recommend`` follows implicit's shape: it returns ``(ids, scores)`` as 1-D arrays,
    best first.
    """

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        encoders: FeatureEncoders,
        index: faiss.Index,
        items: pd.DataFrame,
        users: pd.DataFrame,
        user_session: ort.InferenceSession,
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.encoders = encoders
        self.index = index
        self._item_ids = items[ITEM_ID].to_numpy(dtype=object)
        self._item_rows = pd.Index(self._item_ids)
        self._popularity = items[layout.COUNT_COLUMN].to_numpy(dtype=np.float32)
        self._popular_order = np.lexsort((np.arange(len(items)), -self._popularity))
        self._users = users.set_index(USER_ID)
        self._user_session = user_session
        self._user_inputs = [i.name for i in user_session.get_inputs()]

    @classmethod
    def load(cls, path: str | Path) -> Retriever:
        """Load and verify a bundle: format version, checksums, dimensions and counts."""
        bundle = Path(path)
        manifest = layout.read_manifest(bundle)
        layout.verify_files(bundle, manifest)
        encoders = FeatureEncoders.load(bundle / layout.ENCODERS)
        try:
            index = faiss.read_index(str(bundle / layout.INDEX))
            items = pd.read_parquet(bundle / layout.ITEMS)
            users = pd.read_parquet(bundle / layout.USERS)
            session = ort.InferenceSession(
                str(bundle / layout.USER_TOWER), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # faiss / arrow / onnxruntime raise their own types
            raise BundleError(f"{bundle}: cannot load bundle files: {exc}") from exc
        dim = int(manifest["embedding_dim"])
        if index.d != dim:
            raise BundleError(f"{bundle / layout.INDEX}: index dim {index.d}, manifest says {dim}")
        if index.ntotal != len(items) or manifest["counts"]["items"] != len(items):
            raise BundleError(
                f"{bundle}: {index.ntotal} vectors in {layout.INDEX} but {len(items)} rows in "
                f"{layout.ITEMS} (manifest: {manifest['counts']['items']})"
            )
        expected_inputs = encoders.user_input_names
        actual_inputs = [i.name for i in session.get_inputs()]
        if actual_inputs != expected_inputs:
            raise BundleError(
                f"{bundle / layout.USER_TOWER}: inputs {actual_inputs} do not match the encoders' "
                f"{expected_inputs}"
            )
        output_dim = session.get_outputs()[0].shape[-1]
        if isinstance(output_dim, int) and output_dim != dim:
            raise BundleError(
                f"{bundle / layout.USER_TOWER}: output dim {output_dim}, manifest says {dim}"
            )
        return cls(bundle, manifest, encoders, index, items, users, session)

    @property
    def item_ids(self) -> np.ndarray:
        """The catalogue's raw item ids in index order."""
        return self._item_ids

    @property
    def dim(self) -> int:
        return int(self.manifest["embedding_dim"])

    def known_user(self, user_id: Any) -> bool:
        return user_id is not None and str(user_id) in self._users.index

    def _user_record(self, user_id: Any) -> tuple[list[str], list[str], pd.DataFrame | None]:
        """Stored (history, seen items, attribute row) of a user; empty for unknown users."""
        if not self.known_user(user_id):
            return [], [], None
        row = self._users.loc[[str(user_id)]]
        history = [str(i) for i in row[layout.HISTORY_COLUMN].iloc[0]]
        seen = [str(i) for i in row[layout.SEEN_COLUMN].iloc[0]]
        attributes = row.drop(columns=[layout.HISTORY_COLUMN, layout.SEEN_COLUMN]).reset_index()
        return history, seen, attributes

    def embed_user(self, user_id: Any = None, history: Sequence[Any] | None = None) -> np.ndarray:
        """The (d,) user vector from the stored state of ``user_id`` plus recent ``history``."""
        stored_history, _, attributes = self._user_record(user_id)
        full_history = stored_history + [str(i) for i in (history or [])]
        inputs = self.encoders.user_inputs(
            [None if user_id is None else str(user_id)],
            self.encoders.encode_histories([full_history]),
            attributes,
        )
        feed = {name: inputs[name] for name in self._user_inputs}
        return self._user_session.run(None, feed)[0][0]

    def recommend(
        self,
        user_id: Any = None,
        history: Sequence[Any] | None = None,
        k: int = 10,
        exclude_seen: bool = True,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` item ids and scores for a user, best first.

        ``user_id`` brings the user's stored history, attributes and seen items (when the
        bundle knows the user); ``history`` adds recent item ids (oldest first). Items in
        ``history`` and, with ``exclude_seen``, the user's seen items are not returned.
        An unknown user is served from ``history`` alone; with no history either, the
        most popular items (by training count, returned as scores) are the fallback.
        Fewer than ``k`` items come back only when the catalogue has fewer left.
        """
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k <= 0:
            raise RequestError(f"k must be a positive integer, got {k!r}")
        history = list(history or [])
        _, seen, _ = self._user_record(user_id)
        excluded = set(seen) if exclude_seen else set()
        excluded.update(str(i) for i in history)
        excluded_rows = self._item_rows.get_indexer(list(excluded))
        excluded_rows = np.unique(excluded_rows[excluded_rows >= 0])
        if not self.known_user(user_id) and not history:
            return self._popular(int(k), excluded_rows)
        query = self.embed_user(user_id, history)[None, :].astype(np.float32)
        return self._search(query, int(k), excluded_rows)

    def _popular(self, k: int, excluded_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        order = self._popular_order[~np.isin(self._popular_order, excluded_rows)][:k]
        return self._item_ids[order], self._popularity[order]

    def _search(
        self, query: np.ndarray, k: int, excluded_rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """FAISS search, over-fetching by the number of excluded items so k survive."""
        fetch = min(self.index.ntotal, k + len(excluded_rows))
        if fetch == 0:
            return np.array([], dtype=object), np.array([], dtype=np.float32)
        scores, rows = self.index.search(query, fetch)
        keep = (rows[0] >= 0) & ~np.isin(rows[0], excluded_rows)
        rows, scores = rows[0][keep][:k], scores[0][keep][:k]
        return self._item_ids[rows], scores.astype(np.float32)
