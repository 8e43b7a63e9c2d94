"""The :class:`Retriever` facade: "top-k items for these users" over a loaded bundle.

No torch here: the towers run as ONNX (:mod:`retrieval.users`), the item vectors sit in
a FAISS index (:mod:`retrieval.search`), the catalogue is an immutable snapshot
(:mod:`retrieval.catalogue`), and the feature encoders are the same numpy/pandas code
used in training. The facade only composes them.

Thread safety: every query reads one :class:`~retrieval.catalogue.Catalogue` snapshot;
``add_items`` / ``remove_items`` build a new snapshot under a writer lock and swap it in
with one assignment.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pandas as pd

from retrieval.catalogue import Catalogue
from retrieval.filters import Filter
from retrieval.loading import LoadedBundle, load_bundle
from retrieval.ranking import Ranker
from retrieval.requests import (
    MAX_K,
    Recommendations,
    batch_args,
    check_boost,
    check_k,
)
from retrieval.search import (
    FaissCandidates,
)
from retrieval.users import UserEncoder, UserFeatures
from twotower.bundle import Manifest, layout, write_bundle
from twotower.bundle.embeddings import write_embeddings
from twotower.bundle.manifest import utc_now
from twotower.encoding import FeatureEncoders
from twotower.errors import DuplicateIdError, MissingColumnError, RequestError

__all__ = ["MAX_K", "Recommendations", "Retriever"]
NOTHING = np.zeros(0, dtype=np.int64)

log = logging.getLogger(__name__)
ITEM_ID = layout.ITEM_ID
USER_ID = layout.USER_ID


class Retriever:
    """A loaded bundle. Build it with :meth:`Retriever.load`.

    ``recommend`` follows implicit's shape: ``(ids, scores)`` as 1-D arrays, best first;
    ``recommend_batch`` returns 2-D arrays, one row per user; ``retrieve`` adds what
    served each user.
    """

    def __init__(self, loaded: LoadedBundle, device: str = "cpu") -> None:
        self.path = loaded.path
        self.manifest: Manifest = loaded.manifest
        self.encoders: FeatureEncoders = loaded.encoders
        self.device = device
        self.users = UserEncoder(
            loaded.encoders,
            loaded.users,
            loaded.user_session,
            pd.Index(loaded.catalogue.item_ids),
        )
        self._item_session = loaded.item_session
        self._item_inputs = [i.name for i in loaded.item_session.get_inputs()]
        self._catalogue = loaded.catalogue
        self._default_knobs: dict[str, Any] = dict(loaded.manifest.index.search_params)
        bags = list(loaded.encoders.items.multi_hot.values())
        separator = bags[0].separator if bags else "|"
        self._write_lock = threading.Lock()
        self._ranker = Ranker(self.users, self._default_knobs, separator)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", threads: int | None = None) -> Retriever:
        """Load and verify a bundle: format version, checksums, dimensions and counts.

        ``device="cuda"`` puts the index on the GPU when faiss has GPU support and runs the
        towers with onnxruntime's CUDA provider when present; it raises when neither is.
        ``threads`` caps the threads of onnxruntime and FAISS (1 suits one process per core:
        several server workers on a small machine otherwise oversubscribe it).
        """
        return cls(load_bundle(path, device, threads), device)

    def __repr__(self) -> str:
        catalogue = self._catalogue
        return (
            f"Retriever(path='{self.path}', items={catalogue.live}, users={len(self.users)}, "
            f"dim={self.dim}, index='{self.manifest.index.factory}', "
            f"search_params={self._default_knobs}, device='{self.device}', "
            f"created_at='{self.manifest.created_at}')"
        )

    # --------------------------------------------------------------- properties
    @property
    def catalogue(self) -> Catalogue:
        """The current catalogue snapshot (immutable)."""
        return self._catalogue

    @property
    def item_ids(self) -> np.ndarray:
        """The catalogue's raw item ids in index order (removed and upserted-over rows
        included: see :attr:`catalogue`)."""
        return self._catalogue.item_ids

    @property
    def item_counts(self) -> np.ndarray:
        """Training events of each item, in ``item_ids`` order (0: a new item, one that
        ``new_item_boost`` lifts; items added with :meth:`add_items` count 0)."""
        return self._catalogue.popularity.copy()

    @property
    def attribute_columns(self) -> list[str]:
        """The item attribute columns of the bundle (what ``add_items`` tables may hold
        besides ``item_id``)."""
        return [
            str(c)
            for c in self._catalogue.items.columns
            if c != ITEM_ID and not str(c).startswith(layout.RESERVED_PREFIX)
        ]

    @property
    def dim(self) -> int:
        return self.manifest.embedding_dim

    @property
    def search_params(self) -> dict[str, Any]:
        """The bundle's default search knobs (``nprobe``, ``efSearch``, ``k_factor``)."""
        return dict(self._default_knobs)

    def known_user(self, user_id: Any) -> bool:
        """Whether the bundle holds this user's history and attributes."""
        return self.users.known(user_id)

    # ---------------------------------------------------------------- encoding
    def embed_users(
        self,
        user_ids: Sequence[Any] | None = None,
        histories: Sequence[Sequence[Any] | None] | None = None,
        user_features: Sequence[UserFeatures | None] | None = None,
    ) -> np.ndarray:
        """(n, d) user vectors from stored state (known ids), recent items and attributes."""
        ids, hists, feats = batch_args(user_ids, histories, user_features)
        return self.users.encode(ids, hists, feats)

    def embed_items(self, table: pd.DataFrame) -> np.ndarray:
        """(n, d) item vectors for an item table (``item_id`` + attribute columns) via the
        item-tower ONNX; attribute columns it lacks count as unknown."""
        if ITEM_ID not in table.columns:
            raise MissingColumnError(
                f"item table has no column '{ITEM_ID}' (columns: {list(table.columns)})"
            )
        inputs = self.encoders.item_inputs(table.reset_index(drop=True))
        return self._item_session.run(None, {name: inputs[name] for name in self._item_inputs})[0]

    # ----------------------------------------------------------------- queries
    def recommend(
        self,
        user_id: Any = None,
        history: Sequence[Any] | None = None,
        user_features: UserFeatures | None = None,
        k: int = 10,
        exclude_seen: bool = True,
        exclude: Sequence[Any] | None = None,
        filter: Filter | None = None,
        search_params: Mapping[str, Any] | None = None,
        new_item_boost: float = 0.0,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` item ids and scores for one user, best first (1-D arrays).

        ``user_id`` brings the user's stored history, attributes and seen items when the
        bundle knows the user; ``history`` adds recent item ids (oldest first);
        ``user_features`` sets attributes. Never returned: items in ``history``, the items
        in ``exclude``, removed items, and (with ``exclude_seen``) the user's seen items.
        ``filter`` keeps items whose attributes match (see :mod:`retrieval.filters`);
        ``search_params`` overrides the bundle's ``nprobe`` / ``efSearch`` / ``k_factor``.
        ``new_item_boost`` is added to the score of every item without a training event
        (cold items of the export, items added with :meth:`add_items`): a freshness lift,
        in the units of the scores (cosine similarity; an ensemble's mean cosine), so 0.02
        moves a new item above seen items that score up to 0.02 more; 0 ranks by the model
        alone. A user known by nothing (unknown id, no history, no attributes) gets the
        most popular items, scored by their training counts (no boost). Fewer than ``k``
        items come back only when fewer pass the exclusions and the filter.
        """
        k = check_k(k)
        boost = check_boost(new_item_boost)
        if isinstance(history, (str, bytes)):
            raise RequestError("history must be a sequence of item ids, not a string")
        return self._ranker.one(
            self._catalogue,
            user_id,
            history,
            user_features,
            k,
            exclude_seen,
            exclude,
            filter,
            search_params,
            boost,
        )

    def recommend_batch(
        self,
        user_ids: Sequence[Any] | None = None,
        histories: Sequence[Sequence[Any] | None] | None = None,
        user_features: Sequence[UserFeatures | None] | None = None,
        k: int = 10,
        exclude_seen: bool = True,
        exclude: Sequence[Any] | None = None,
        filter: Filter | None = None,
        search_params: Mapping[str, Any] | None = None,
        new_item_boost: float = 0.0,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``recommend`` for many users in one vectorised call.

        Arguments are sequences with one entry per user (``None`` entries allowed);
        ``exclude`` applies to every user. Returns ``(ids, scores)`` of shape (n, k):
        object ids and float32 scores, padded with ``None`` / NaN where a user has fewer
        than ``k`` items left.
        """
        found = self.retrieve(
            user_ids,
            histories,
            user_features,
            k=k,
            exclude_seen=exclude_seen,
            exclude=exclude,
            filter=filter,
            search_params=search_params,
            new_item_boost=new_item_boost,
        )
        return found.ids, found.scores

    def retrieve(
        self,
        user_ids: Sequence[Any] | None = None,
        histories: Sequence[Sequence[Any] | None] | None = None,
        user_features: Sequence[UserFeatures | None] | None = None,
        k: int = 10,
        exclude_seen: bool = True,
        exclude: Sequence[Any] | None = None,
        filter: Filter | None = None,
        search_params: Mapping[str, Any] | None = None,
        new_item_boost: float = 0.0,
    ) -> Recommendations:
        """``recommend_batch`` that also says what served each user (see
        :class:`Recommendations`)."""
        k = check_k(k)
        boost = check_boost(new_item_boost)
        ids, hists, feats = batch_args(user_ids, histories, user_features)
        return self._ranker.many(
            self._catalogue,
            ids,
            hists,
            feats,
            k,
            exclude_seen,
            exclude,
            filter,
            search_params,
            boost,
        )

    def similar_items(
        self,
        item_id: Any,
        k: int = 10,
        filter: Filter | None = None,
        search_params: Mapping[str, Any] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` items whose vectors are closest to ``item_id``'s (itself excluded).
        An unknown item id gets the most popular items (scored by training counts)."""
        return self._ranker.similar(self._catalogue, item_id, check_k(k), filter, search_params)

    # ----------------------------------------------------------- catalogue edits
    def add_items(self, table: pd.DataFrame) -> int:
        """Embed items with the item tower and make them searchable at once (cold start).

        ``table`` has ``item_id`` and any of the bundle's attribute columns. An id already
        in the catalogue is replaced (upsert: its new attributes give a new vector), and a
        removed id comes back. Returns the number of rows added.
        """
        if ITEM_ID not in table.columns:
            raise MissingColumnError(
                f"item table has no column '{ITEM_ID}' (columns: {list(table.columns)})"
            )
        table = table.reset_index(drop=True).copy()
        if table.empty:
            return 0
        missing = table[ITEM_ID].isna().to_numpy()
        if missing.any():
            raise MissingColumnError(
                f"add_items: row {int(np.flatnonzero(missing)[0])} has no item_id"
            )
        table[ITEM_ID] = table[ITEM_ID].astype(str)
        duplicated = table[ITEM_ID][table[ITEM_ID].duplicated()].tolist()
        if duplicated:
            raise DuplicateIdError(
                f"add_items: item_id {duplicated[:5]} appear more than once in the table"
            )
        vectors = self.embed_items(table).astype(np.float32)
        with self._write_lock:
            self._catalogue = self._catalogue.with_items(table, vectors)
        log.info("added %d item(s); catalogue now %d", len(table), self._catalogue.live)
        return len(table)

    def remove_items(self, item_ids: Sequence[Any]) -> int:
        """Hide items from every result at once; unknown ids are ignored. Returns how many
        items were newly hidden."""
        with self._write_lock:
            self._catalogue, newly = self._catalogue.without_items(item_ids)
        return newly

    def restore(self, snapshot: Catalogue) -> None:
        """Serve ``snapshot`` (a :attr:`catalogue` taken earlier from this Retriever)
        again, undoing the edits made since (e.g. ones that could not be made durable)."""
        with self._write_lock:
            self._catalogue = snapshot

    def save(self, path: str | Path) -> Path:
        """Write the current catalogue (added, upserted and removed items included) as a
        new, consistent bundle, atomically; the towers, encoders and users are copied."""
        target = Path(path).resolve()
        if target == self.path:
            raise RequestError(f"save: {target} is the bundle this Retriever was loaded from")
        catalogue = self._catalogue
        keep = catalogue.current_rows()
        source = catalogue.index
        assert isinstance(source, FaissCandidates)
        index = faiss.clone_index(source.cpu_index)
        if len(keep) < catalogue.size:  # drop upserted-over rows: same trained index, re-filled
            index.reset()
            index.add(np.ascontiguousarray(catalogue.vectors[keep]))
        items = catalogue.items.iloc[keep].reset_index(drop=True)

        def write_files(staging: Path) -> Manifest:
            for name in (
                layout.USER_TOWER,
                layout.ITEM_TOWER,
                *layout.TOWER_WEIGHTS,
                layout.USERS,
                layout.ENCODERS,
                layout.USER_EMBEDDINGS,
            ):
                if (self.path / name).is_file():
                    shutil.copy2(self.path / name, staging / name)
            faiss.write_index(index, str(staging / layout.INDEX))
            items.to_parquet(staging / layout.ITEMS, index=False)
            write_embeddings(
                staging / layout.ITEM_EMBEDDINGS,
                ITEM_ID,
                catalogue.item_ids[keep],
                catalogue.vectors[keep],
            )
            manifest = self.manifest
            return manifest.replace(
                created_at=utc_now(),
                derived_from=str(self.path),
                counts=replace(
                    manifest.counts,
                    items=len(keep),
                    removed_items=int(catalogue.removed[keep].sum()),
                ),
                index=replace(manifest.index, ntotal=int(index.ntotal)),
            )

        return write_bundle(target, write_files)
