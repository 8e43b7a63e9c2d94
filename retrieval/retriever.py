"""Load a bundle and answer "top-k items for these users" with onnxruntime and FAISS.

No torch here: the towers run as ONNX, the item vectors sit in a FAISS index, and the
feature encoders are the same numpy/pandas code used in training.

Thread safety: every query reads one immutable :class:`CatalogueState` snapshot;
``add_items`` / ``remove_items`` build a new snapshot under a writer lock and swap it
in with one assignment, so a query sees the catalogue wholly before or wholly after a
change, never half of one.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import onnxruntime as ort
import pandas as pd

from retrieval import bundle as layout
from retrieval.embeddings import read_embeddings, write_embeddings
from retrieval.encoding import PAD_INDEX, FeatureEncoders
from retrieval.errors import BundleError, DuplicateIdError, MissingColumnError, RequestError
from retrieval.filters import Filter, filter_key, filter_mask
from retrieval.index import search, search_parameters

log = logging.getLogger(__name__)

USER_ID = "user_id"
ITEM_ID = "item_id"
DEVICES = ("cpu", "cuda")
EXACT_SUBSET_MAX = 4096
MASK_CACHE_SIZE = 64
MAX_K = 10_000


@dataclass(frozen=True)
class CatalogueState:
    """One consistent view of the catalogue: index, ids, vectors, attributes, flags."""

    index: faiss.Index
    item_ids: np.ndarray
    rows: pd.Index
    vectors: np.ndarray
    items: pd.DataFrame
    popularity: np.ndarray
    removed: np.ndarray
    version: int
    lookup: dict[str, int]

    @property
    def size(self) -> int:
        return len(self.item_ids)

    def rows_of(self, item_ids: Sequence[Any]) -> np.ndarray:
        """Row of each id in the index (-1 when unknown)."""
        if len(item_ids) <= 256:
            return np.fromiter(
                (self.lookup.get(str(i), -1) for i in item_ids), np.int64, len(item_ids)
            )
        return self.rows.get_indexer([str(i) for i in item_ids]).astype(np.int64)


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 < k <= MAX_K:
        raise RequestError(f"k must be a positive integer of at most {MAX_K}, got {k!r}")
    return int(k)


def _check_boost(boost: Any) -> float:
    if isinstance(boost, bool) or not isinstance(boost, (int, float, np.number)):
        raise RequestError(f"new_item_boost must be a number, got {boost!r}")
    if not np.isfinite(boost):
        raise RequestError(f"new_item_boost must be finite, got {boost!r}")
    return float(boost)


def merge_top_k(
    first: tuple[np.ndarray, np.ndarray], second: tuple[np.ndarray, np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of two (rows, scores) top lists per user (rows disjoint, padded with
    -1 / NaN), by score; ties keep ``first``'s entry first. Same padding out."""
    rows = np.concatenate([first[0], second[0]], axis=1)
    scores = np.concatenate([first[1], second[1]], axis=1)
    order = np.argsort(-np.nan_to_num(scores, nan=-np.inf), axis=1, kind="stable")[:, :k]
    return np.take_along_axis(rows, order, axis=1), np.take_along_axis(scores, order, axis=1)


class Retriever:
    """A loaded bundle. Build it with :meth:`Retriever.load`.

    ``recommend`` follows implicit's shape: ``(ids, scores)`` as 1-D arrays, best first;
    ``recommend_batch`` returns 2-D arrays, one row per user.
    """

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        encoders: FeatureEncoders,
        state: CatalogueState,
        users: pd.DataFrame,
        user_session: ort.InferenceSession,
        item_session: ort.InferenceSession,
        device: str = "cpu",
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.encoders = encoders
        self.device = device
        self._state = state
        users = users.reset_index(drop=True)
        self._user_position = {str(u): i for i, u in enumerate(users[USER_ID])}
        self._user_seen = users[layout.SEEN_COLUMN].to_numpy()
        attributes = users.drop(columns=[layout.HISTORY_COLUMN, layout.SEEN_COLUMN])
        # one extra all-missing row, taken for users the bundle does not know
        self._user_attributes = pd.concat(
            [attributes, attributes.iloc[:0].reindex([0])], ignore_index=True
        )
        # Tower inputs of every known user (and the all-missing row) encoded once, so a
        # request without custom attributes costs numpy indexing, not pandas encoding.
        self._missing_row = len(attributes)
        known_ids: list[Any] = [*self._user_position, None]
        self._stored_inputs = encoders.users.transform(known_ids, self._user_attributes)
        self._stored_histories = encoders.encode_histories(
            [[str(i) for i in h] for h in users[layout.HISTORY_COLUMN]] + [[]]
        )
        self._user_session = user_session
        self._item_session = item_session
        self._user_inputs = [i.name for i in user_session.get_inputs()]
        self._item_inputs = [i.name for i in item_session.get_inputs()]
        self._default_knobs: dict[str, Any] = dict(manifest["index"].get("search_params") or {})
        bags = list(encoders.items.multi_hot.values())
        self._separator = bags[0].separator if bags else "|"
        self._write_lock = threading.Lock()
        self._mask_lock = threading.Lock()
        self._masks: OrderedDict[tuple, np.ndarray] = OrderedDict()
        # Build pandas' lazy lookup table now, not concurrently on a first request.
        state.rows.get_indexer(["warm-up"])

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", threads: int | None = None) -> Retriever:
        """Load and verify a bundle: format version, checksums, dimensions and counts.

        ``device="cuda"`` puts the index on the GPU when faiss has GPU support and runs the
        towers with onnxruntime's CUDA provider when present; it raises when neither is.
        ``threads`` caps the threads of onnxruntime and FAISS (1 suits one process per core:
        several server workers on a small machine otherwise oversubscribe it).
        """
        if device not in DEVICES:
            raise RequestError(f"device must be one of {DEVICES}, got {device!r}")
        bundle = Path(path).resolve()
        manifest = layout.read_manifest(bundle)
        layout.verify_files(bundle, manifest)
        encoders = FeatureEncoders.load(bundle / layout.ENCODERS)
        providers = cls._providers(device)
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            faiss.omp_set_num_threads(threads)
        try:
            index = faiss.read_index(str(bundle / layout.INDEX))
            items = pd.read_parquet(bundle / layout.ITEMS)
            users = pd.read_parquet(bundle / layout.USERS)
            vector_ids, vectors = read_embeddings(bundle / layout.ITEM_EMBEDDINGS)
            user_session = ort.InferenceSession(
                str(bundle / layout.USER_TOWER), options, providers=providers
            )
            item_session = ort.InferenceSession(
                str(bundle / layout.ITEM_TOWER), options, providers=providers
            )
        except Exception as exc:  # faiss / arrow / onnxruntime raise their own types
            raise BundleError(f"{bundle}: cannot load bundle files: {exc}") from exc
        cls._check_consistency(
            bundle,
            manifest,
            encoders,
            index,
            items,
            vector_ids,
            vectors,
            user_session,
            item_session,
        )
        search_parameters(index, manifest["index"].get("search_params") or {})
        if device == "cuda" and getattr(faiss, "get_num_gpus", lambda: 0)() > 0:
            index = faiss.index_cpu_to_all_gpus(index)
        ids = items[ITEM_ID].astype(str).to_numpy(dtype=object)
        removed = (
            items[layout.REMOVED_COLUMN].to_numpy(dtype=bool)
            if layout.REMOVED_COLUMN in items
            else np.zeros(len(items), bool)
        )
        state = CatalogueState(
            index=index,
            item_ids=ids,
            rows=pd.Index(ids),
            vectors=vectors,
            items=items,
            popularity=items[layout.COUNT_COLUMN].to_numpy(dtype=np.float32),
            removed=removed,
            version=0,
            lookup={item: row for row, item in enumerate(ids)},
        )
        return cls(bundle, manifest, encoders, state, users, user_session, item_session, device)

    @staticmethod
    def _providers(device: str) -> list[str]:
        if device == "cpu":
            return ["CPUExecutionProvider"]
        faiss_gpu = getattr(faiss, "get_num_gpus", lambda: 0)() > 0
        ort_gpu = "CUDAExecutionProvider" in ort.get_available_providers()
        if not faiss_gpu and not ort_gpu:
            raise RequestError(
                "device='cuda' but neither faiss nor onnxruntime can use a GPU here: install "
                "faiss-gpu (or faiss-gpu-cu12) and/or onnxruntime-gpu, on a machine with CUDA"
            )
        if not faiss_gpu:
            log.warning("device='cuda': faiss has no GPU support here; the index stays on the CPU")
        if not ort_gpu:
            log.warning(
                "device='cuda': onnxruntime has no CUDA provider; the towers run on the CPU"
            )
            return ["CPUExecutionProvider"]
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    @staticmethod
    def _check_consistency(
        bundle: Path,
        manifest: dict[str, Any],
        encoders: FeatureEncoders,
        index: faiss.Index,
        items: pd.DataFrame,
        vector_ids: np.ndarray,
        vectors: np.ndarray,
        user_session: ort.InferenceSession,
        item_session: ort.InferenceSession,
    ) -> None:
        dim = int(manifest["embedding_dim"])
        if index.d != dim:
            raise BundleError(f"{bundle / layout.INDEX}: index dim {index.d}, manifest says {dim}")
        counts = {
            layout.INDEX: index.ntotal,
            layout.ITEMS: len(items),
            layout.ITEM_EMBEDDINGS: len(vectors),
        }
        if len(set(counts.values())) != 1 or manifest["counts"]["items"] != len(items):
            raise BundleError(
                f"{bundle}: item counts disagree: {counts}, manifest {manifest['counts']['items']}"
            )
        if vectors.shape[1] != dim:
            raise BundleError(
                f"{bundle / layout.ITEM_EMBEDDINGS}: vector dim {vectors.shape[1]}, "
                f"manifest says {dim}"
            )
        if not np.array_equal(vector_ids, items[ITEM_ID].astype(str).to_numpy(dtype=object)):
            raise BundleError(
                f"{bundle}: {layout.ITEM_EMBEDDINGS} and {layout.ITEMS} list different items"
            )
        for name, session, expected in (
            (layout.USER_TOWER, user_session, encoders.user_input_names),
            (layout.ITEM_TOWER, item_session, encoders.item_input_names),
        ):
            actual = [i.name for i in session.get_inputs()]
            if actual != expected:
                raise BundleError(
                    f"{bundle / name}: inputs {actual} do not match the encoders' {expected}"
                )
            width = session.get_outputs()[0].shape[-1]
            if isinstance(width, int) and width != dim:
                raise BundleError(f"{bundle / name}: output dim {width}, manifest says {dim}")

    # --------------------------------------------------------------- properties
    @property
    def item_ids(self) -> np.ndarray:
        """The catalogue's raw item ids in index order (removed items included)."""
        return self._state.item_ids

    @property
    def item_counts(self) -> np.ndarray:
        """Training events of each item, in ``item_ids`` order (0: a new item, one that
        ``new_item_boost`` lifts; items added with :meth:`add_items` count 0)."""
        return self._state.popularity.copy()

    @property
    def dim(self) -> int:
        return int(self.manifest["embedding_dim"])

    @property
    def search_params(self) -> dict[str, Any]:
        """The bundle's default search knobs (``nprobe``, ``efSearch``, ``k_factor``)."""
        return dict(self._default_knobs)

    def known_user(self, user_id: Any) -> bool:
        return user_id is not None and str(user_id) in self._user_position

    # ---------------------------------------------------------------- encoding
    def _positions(self, user_ids: Sequence[Any]) -> np.ndarray:
        """Row of each user in the bundle's user table; the all-missing row if unknown."""
        missing, lookup = self._missing_row, self._user_position
        return np.fromiter(
            (missing if u is None else lookup.get(str(u), missing) for u in user_ids),
            np.int64,
            len(user_ids),
        )

    def _seen(self, position: int) -> list[str]:
        """Items the bundle records for the user at ``position`` (none for unknown users)."""
        if position == self._missing_row:
            return []
        return [str(i) for i in self._user_seen[position]]

    def _user_tower_inputs(
        self,
        user_ids: Sequence[Any],
        positions: np.ndarray,
        histories: Sequence[Sequence[Any] | None],
        user_features: Sequence[Mapping[str, Any] | None],
    ) -> dict[str, np.ndarray]:
        """Tower inputs per user: the stored encoding, with the given recent items appended
        to the stored history and any given attributes encoded over the stored ones."""
        inputs = {name: values[positions] for name, values in self._stored_inputs.items()}
        unknown = np.flatnonzero(positions == self._missing_row)
        id_input = f"{self.encoders.users.prefix}_id"
        if len(unknown) and id_input in inputs:  # an id in the vocabulary but not the table
            inputs[id_input][unknown] = self.encoders.users.ids.encode(
                [str(user_ids[r]) if user_ids[r] is not None else None for r in unknown]
            )
        history = self._stored_histories[positions]
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
            attributes = self._user_attributes.iloc[positions[custom]].reset_index(drop=True)
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

    def _encode_users(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self._user_session.run(None, {name: inputs[name] for name in self._user_inputs})[0]

    @staticmethod
    def _batch_args(
        user_ids: Sequence[Any] | None,
        histories: Sequence[Sequence[Any] | None] | None,
        user_features: Sequence[Mapping[str, Any] | None] | None,
    ) -> tuple[list[Any], list[Any], list[Any]]:
        given = {
            n: v
            for n, v in (
                ("user_ids", user_ids),
                ("histories", histories),
                ("user_features", user_features),
            )
            if v is not None
        }
        if not given:
            raise RequestError("give user_ids, histories and/or user_features (one entry per user)")
        lengths = {n: len(v) for n, v in given.items()}
        if len(set(lengths.values())) != 1:
            raise RequestError(f"one entry per user in each argument, got lengths {lengths}")
        n = next(iter(lengths.values()))
        for name, value in given.items():
            if isinstance(value, (str, bytes)):
                raise RequestError(
                    f"{name} must be a sequence with one entry per user, not a string"
                )
        return (
            list(user_ids) if user_ids is not None else [None] * n,
            list(histories) if histories is not None else [None] * n,
            list(user_features) if user_features is not None else [None] * n,
        )

    def embed_users(
        self,
        user_ids: Sequence[Any] | None = None,
        histories: Sequence[Sequence[Any] | None] | None = None,
        user_features: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> np.ndarray:
        """(n, d) user vectors from stored state (known ids), recent items and attributes."""
        ids, hists, feats = self._batch_args(user_ids, histories, user_features)
        return self._encode_users(self._user_tower_inputs(ids, self._positions(ids), hists, feats))

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
    def _allowed(self, state: CatalogueState, filter: Filter | None) -> np.ndarray:
        """~removed & filter, with filter masks cached per catalogue version."""
        key = filter_key(filter)
        if key is None:
            return ~state.removed
        cache_key = (state.version, key)
        with self._mask_lock:
            mask = self._masks.get(cache_key)
            if mask is not None:
                self._masks.move_to_end(cache_key)
        if mask is None:
            mask = filter_mask(state.items, filter, self._separator)
            with self._mask_lock:
                self._masks[cache_key] = mask
                while len(self._masks) > MASK_CACHE_SIZE:
                    self._masks.popitem(last=False)
        return mask & ~state.removed

    def _banned_rows(self, state: CatalogueState, ids: Sequence[Any]) -> np.ndarray:
        if not ids:
            return np.zeros(0, dtype=np.int64)
        rows = state.rows_of(ids)
        return np.unique(rows[rows >= 0])

    def recommend(
        self,
        user_id: Any = None,
        history: Sequence[Any] | None = None,
        user_features: Mapping[str, Any] | None = None,
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
        ids, scores = self.recommend_batch(
            [user_id],
            [history],
            [user_features],
            k=k,
            exclude_seen=exclude_seen,
            exclude=exclude,
            filter=filter,
            search_params=search_params,
            new_item_boost=new_item_boost,
        )
        found = ~pd.isna(scores[0])
        return ids[0][found], scores[0][found]

    def recommend_batch(
        self,
        user_ids: Sequence[Any] | None = None,
        histories: Sequence[Sequence[Any] | None] | None = None,
        user_features: Sequence[Mapping[str, Any] | None] | None = None,
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
        k = _check_k(k)
        boost = _check_boost(new_item_boost)
        state = self._state
        ids, hists, feats = self._batch_args(user_ids, histories, user_features)
        knobs = {**self._default_knobs, **dict(search_params or {})}
        search_parameters(state.index, knobs)  # validate before any work
        positions = self._positions(ids)
        common = [str(i) for i in (exclude or [])]
        banned = [
            self._banned_rows(
                state,
                (self._seen(positions[r]) if exclude_seen else [])
                + [str(i) for i in (hists[r] or [])]
                + common,
            )
            for r in range(len(ids))
        ]
        allowed = self._allowed(state, filter)
        cold = [
            not self.known_user(ids[r]) and not hists[r] and not feats[r] for r in range(len(ids))
        ]
        out_rows = np.full((len(ids), k), -1, dtype=np.int64)
        out_scores = np.full((len(ids), k), np.nan, dtype=np.float32)
        warm = [r for r in range(len(ids)) if not cold[r]]
        if warm:
            queries = self._encode_users(
                self._user_tower_inputs(
                    [ids[r] for r in warm],
                    positions[warm],
                    [hists[r] for r in warm],
                    [feats[r] for r in warm],
                )
            )
            warm_banned = [banned[r] for r in warm]
            new = allowed & (state.popularity == 0) if boost else None
            if new is not None and new.any():
                # seen and new items searched apart, the new ones' scores lifted, merged
                seen_top = self._top_k(state, queries, warm_banned, allowed & ~new, k, knobs)
                new_rows, new_scores = self._top_k(state, queries, warm_banned, new, k, knobs)
                rows, scores = merge_top_k(seen_top, (new_rows, new_scores + boost), k)
            else:
                rows, scores = self._top_k(state, queries, warm_banned, allowed, k, knobs)
            out_rows[warm], out_scores[warm] = rows, scores
        for r in (r for r in range(len(ids)) if cold[r]):
            rows, scores = self._popular(state, banned[r], allowed, k)
            out_rows[r, : len(rows)], out_scores[r, : len(rows)] = rows, scores
        out_ids = np.full(out_rows.shape, None, dtype=object)
        valid = out_rows >= 0
        out_ids[valid] = state.item_ids[out_rows[valid]]
        return out_ids, out_scores

    def similar_items(
        self,
        item_id: Any,
        k: int = 10,
        filter: Filter | None = None,
        search_params: Mapping[str, Any] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` items whose vectors are closest to ``item_id``'s (itself excluded).
        An unknown item id gets the most popular items (scored by training counts)."""
        k = _check_k(k)
        state = self._state
        knobs = {**self._default_knobs, **dict(search_params or {})}
        search_parameters(state.index, knobs)
        row = state.rows_of([item_id])[0]
        allowed = self._allowed(state, filter)
        banned = np.array([row], dtype=np.int64) if row >= 0 else np.zeros(0, np.int64)
        if row < 0:
            log.info("similar_items: unknown item %r; returning popular items", item_id)
            rows, scores = self._popular(state, banned, allowed, k)
        else:
            rows_2d, scores_2d = self._top_k(
                state, state.vectors[row : row + 1], [banned], allowed, k, knobs
            )
            keep = rows_2d[0] >= 0
            rows, scores = rows_2d[0][keep], scores_2d[0][keep]
        return state.item_ids[rows], scores

    def _popular(
        self, state: CatalogueState, banned: np.ndarray, allowed: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        ok = allowed.copy()
        ok[banned] = False
        rows = np.flatnonzero(ok)
        order = np.lexsort((rows, -state.popularity[rows]))[:k]
        return rows[order], state.popularity[rows[order]]

    def _top_k(
        self,
        state: CatalogueState,
        queries: np.ndarray,
        banned: list[np.ndarray],
        allowed: np.ndarray,
        k: int,
        knobs: Mapping[str, Any],
    ) -> tuple[np.ndarray, np.ndarray]:
        """(rows, scores) of shape (n, k), padded with -1 / NaN; exclusions and filters hold.

        The index is over-fetched by the number of excluded items and the share of
        items the filter rejects, and re-searched wider for the users still short. A
        filter that leaves at most ``EXACT_SUBSET_MAX`` items is scored exactly over
        those items instead (cheaper than searching for them, and complete).
        """
        n_users, n_items = len(queries), state.size
        out_rows = np.full((n_users, k), -1, dtype=np.int64)
        out_scores = np.full((n_users, k), np.nan, dtype=np.float32)
        n_allowed = int(allowed.sum())
        if n_allowed == 0:
            return out_rows, out_scores
        codes = (
            np.concatenate([r * n_items + b for r, b in enumerate(banned)])
            if banned
            else np.zeros(0, np.int64)
        )
        if n_allowed <= EXACT_SUBSET_MAX and n_allowed < n_items:
            candidates = np.flatnonzero(allowed)
            scores = queries @ state.vectors[candidates].T
            blocked = np.isin(np.arange(n_users)[:, None] * n_items + candidates[None, :], codes)
            scores = np.where(blocked, -np.inf, scores)
            take = min(k, len(candidates))
            part = np.argpartition(-scores, take - 1, axis=1)[:, :take]
            part_scores = np.take_along_axis(scores, part, axis=1)
            order = np.argsort(-part_scores, axis=1, kind="stable")
            rows = candidates[np.take_along_axis(part, order, axis=1)]
            got = np.take_along_axis(part_scores, order, axis=1)
            finite = np.isfinite(got)
            out_rows[:, :take] = np.where(finite, rows, -1)
            out_scores[:, :take] = np.where(finite, got, np.nan)
            return out_rows, out_scores
        # Each user's fetch size depends only on that user (rounded up to a power of two,
        # so users group into few searches): a user gets the same answer alone or in a
        # batch, even from indexes whose results depend on k (HNSW, PQ with re-ranking).
        want = np.ceil((k + np.array([len(b) for b in banned])) * n_items / n_allowed)
        fetch = np.minimum(n_items, 2 ** np.ceil(np.log2(np.maximum(want, 1)))).astype(np.int64)
        pending = np.arange(n_users)
        while len(pending):
            short_rows = []
            for size in np.unique(fetch[pending]):
                group = pending[fetch[pending] == size]
                scores, rows = search(state.index, queries[group], int(size), knobs)
                valid = rows >= 0
                safe = np.where(valid, rows, 0)
                valid &= allowed[safe]
                valid &= ~np.isin(group[:, None] * n_items + safe, codes)
                order = np.argsort(~valid, axis=1, kind="stable")[:, :k]
                picked_valid = np.take_along_axis(valid, order, axis=1)
                width = order.shape[1]
                out_rows[group, :width] = np.where(
                    picked_valid, np.take_along_axis(rows, order, axis=1), -1
                )
                out_scores[group, :width] = np.where(
                    picked_valid, np.take_along_axis(scores, order, axis=1), np.nan
                )
                if size < n_items:
                    short_rows.append(group[picked_valid.sum(axis=1) < k])
            pending = np.concatenate(short_rows) if short_rows else np.zeros(0, np.int64)
            fetch[pending] = np.minimum(n_items, fetch[pending] * 4)
        return out_rows, out_scores

    # ----------------------------------------------------------- catalogue edits
    def add_items(self, table: pd.DataFrame) -> int:
        """Embed new items with the item tower and make them searchable at once (cold start).

        ``table`` has ``item_id`` and any of the bundle's attribute columns. Ids already in
        the catalogue are refused (remove them first). Returns the number of items added.
        """
        if ITEM_ID not in table.columns:
            raise MissingColumnError(
                f"item table has no column '{ITEM_ID}' (columns: {list(table.columns)})"
            )
        table = table.reset_index(drop=True).copy()
        if table.empty:
            return 0
        table[ITEM_ID] = table[ITEM_ID].astype(str)
        duplicated = table[ITEM_ID][table[ITEM_ID].duplicated()].tolist()
        if duplicated:
            raise DuplicateIdError(
                f"add_items: item_id {duplicated[:5]} appear more than once in the table"
            )
        vectors = self.embed_items(table).astype(np.float32)
        with self._write_lock:
            state = self._state
            present = table[ITEM_ID][
                state.rows.get_indexer(table[ITEM_ID].to_numpy()) >= 0
            ].tolist()
            if present:
                raise DuplicateIdError(f"add_items: item_id {present[:5]} already in the catalogue")
            index = faiss.clone_index(self._cpu_index(state.index))
            index.add(vectors)
            new_rows = table.assign(**{layout.COUNT_COLUMN: 0, layout.REMOVED_COLUMN: False})
            items = pd.concat([state.items, new_rows], ignore_index=True)
            ids = np.concatenate([state.item_ids, table[ITEM_ID].to_numpy(dtype=object)])
            self._state = CatalogueState(
                index=self._to_device(index),
                item_ids=ids,
                rows=pd.Index(ids),
                vectors=np.concatenate([state.vectors, vectors]),
                items=items,
                popularity=np.concatenate([state.popularity, np.zeros(len(table), np.float32)]),
                removed=np.concatenate([state.removed, np.zeros(len(table), bool)]),
                version=state.version + 1,
                lookup={
                    **state.lookup,
                    **{item: state.size + j for j, item in enumerate(table[ITEM_ID])},
                },
            )
            self._state.rows.get_indexer(["warm-up"])
        log.info("added %d item(s); catalogue now %d", len(table), len(ids))
        return len(table)

    def remove_items(self, item_ids: Sequence[Any]) -> int:
        """Hide items from every result at once; unknown ids are ignored. Returns how many
        items were newly hidden."""
        with self._write_lock:
            state = self._state
            rows = state.rows_of(list(item_ids))
            rows = rows[rows >= 0]
            removed = state.removed.copy()
            newly = int((~removed[rows]).sum())
            removed[rows] = True
            items = state.items.copy()
            items[layout.REMOVED_COLUMN] = removed
            self._state = replace(state, removed=removed, items=items, version=state.version + 1)
        return newly

    def _cpu_index(self, index: faiss.Index) -> faiss.Index:
        if self.device == "cuda" and hasattr(faiss, "index_gpu_to_cpu"):
            try:
                return faiss.index_gpu_to_cpu(index)
            except Exception:  # already a CPU index
                return index
        return index

    def _to_device(self, index: faiss.Index) -> faiss.Index:
        if self.device == "cuda" and getattr(faiss, "get_num_gpus", lambda: 0)() > 0:
            return faiss.index_cpu_to_all_gpus(index)
        return index

    def save(self, path: str | Path) -> Path:
        """Write the current catalogue (added and removed items included) as a new,
        consistent bundle, atomically; the towers, encoders and users are copied."""
        target = Path(path).resolve()
        if target == self.path:
            raise RequestError(f"save: {target} is the bundle this Retriever was loaded from")
        state = self._state
        with layout.staged_directory(target) as staging:
            for name in (
                layout.USER_TOWER,
                layout.ITEM_TOWER,
                layout.USERS,
                layout.ENCODERS,
                layout.USER_EMBEDDINGS,
            ):
                if (self.path / name).is_file():
                    shutil.copy2(self.path / name, staging / name)
            faiss.write_index(self._cpu_index(state.index), str(staging / layout.INDEX))
            state.items.to_parquet(staging / layout.ITEMS, index=False)
            write_embeddings(
                staging / layout.ITEM_EMBEDDINGS, ITEM_ID, state.item_ids, state.vectors
            )
            manifest = json.loads(json.dumps(self.manifest))
            manifest["created_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            manifest["derived_from"] = str(self.path)
            manifest["counts"]["items"] = state.size
            manifest["counts"]["removed_items"] = int(state.removed.sum())
            manifest["index"]["ntotal"] = int(state.index.ntotal)
            layout.write_manifest(staging, manifest)
        return target
