"""Write a bundle directory atomically (temp dir, then rename), with a checksummed manifest."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pandas as pd

from retrieval.index import auto_factory
from towers.data.eval_sets import catalogue_rows
from towers.data.ids import id_codes
from towers.data.prepare import PreparedData
from towers.data.schema import ITEM_ID, USER_ID
from towers.export.index import IndexReport, build_index, tune_and_check
from towers.export.onnx_export import export_tower
from towers.export.user_state import write_user_state
from towers.model.module import TwoTowerModule, embed
from twotower.bundle import Counts, IndexInfo, Manifest, layout, write_bundle
from twotower.bundle.embeddings import write_embeddings
from twotower.bundle.remote import publish_bundle
from twotower.bundle.store import switch_link
from twotower.encoding.vocabulary import code_counts
from twotower.storage import is_url

log = logging.getLogger(__name__)
PARITY_ROWS = 256
VERSIONED_PACKAGES = (
    "twotower",
    "torch",
    "pytorch-lightning",
    "faiss-cpu",
    "onnxruntime",
    "numpy",
    "pandas",
)


@dataclass
class ExportSettings:
    """The ``export`` config group."""

    index: str = "Flat"
    search_params: dict[str, Any] | None = None
    recall_floor: float = 0.95
    recall_k: int = 100
    recall_queries: int = 1000
    user_embeddings: bool = False
    latest: str | None = None


def package_versions() -> dict[str, str]:
    versions = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _sample(inputs: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    return {name: np.ascontiguousarray(values[:rows]) for name, values in inputs.items()}


def training_counts(catalogue: pd.DataFrame, train_items: pd.Series) -> np.ndarray:
    """Training events per catalogue row, counted per distinct id (a code per event, not
    a catalogue row per event: 80M train events at the scale ladder's top rung)."""
    codes, ids = id_codes(train_items)
    per_id = code_counts(codes, len(ids))
    counts = np.zeros(len(catalogue), dtype=np.int64)
    present = per_id > 0
    np.add.at(counts, catalogue_rows(catalogue, ids[present]), per_id[present])
    return counts


def write_bundle_files(
    module: TwoTowerModule, data: PreparedData, directory: Path, settings: ExportSettings
) -> Manifest:
    """Write every bundle file but the manifest into ``directory``; return the manifest."""
    model = module.model.cpu().eval()
    encoders = data.encoders
    item_vectors = embed(model.item_tower, data.catalogue_inputs)
    first_users = data.test_source.materialise(0, max(settings.recall_queries, PARITY_ROWS))
    query_inputs = {k: v[: settings.recall_queries] for k, v in first_users.user_inputs.items()}
    queries = embed(model.user_tower, query_inputs)
    factory = auto_factory(*item_vectors.shape) if settings.index == "auto" else settings.index
    index = build_index(item_vectors, factory)
    report: IndexReport = tune_and_check(
        index,
        factory,
        item_vectors,
        queries,
        settings.recall_k,
        settings.recall_floor,
        settings.search_params,
    )
    faiss.write_index(index, str(directory / layout.INDEX))
    write_embeddings(
        directory / layout.ITEM_EMBEDDINGS,
        ITEM_ID,
        data.catalogue[ITEM_ID].to_numpy(),
        item_vectors,
    )
    parity = {
        "user_tower": export_tower(
            model.user_tower,
            encoders.user_input_names,
            _sample(first_users.user_inputs, PARITY_ROWS),
            directory / layout.USER_TOWER,
        ),
        "item_tower": export_tower(
            model.item_tower,
            encoders.item_input_names,
            _sample(data.catalogue_inputs, PARITY_ROWS),
            directory / layout.ITEM_TOWER,
        ),
    }
    items = data.catalogue.copy()
    items[layout.COUNT_COLUMN] = training_counts(data.catalogue, data.split.train[ITEM_ID])
    items[layout.REMOVED_COLUMN] = False
    items.to_parquet(directory / layout.ITEMS, index=False)
    n_users = write_user_state(data, str(directory / layout.USERS))
    if settings.user_embeddings:
        users = pd.read_parquet(directory / layout.USERS)
        user_ids = users[USER_ID].to_numpy(dtype=object)
        histories = encoders.encode_histories(list(users[layout.HISTORY_COLUMN]))
        inputs = encoders.user_inputs(list(user_ids), histories, users)
        write_embeddings(
            directory / layout.USER_EMBEDDINGS, USER_ID, user_ids, embed(model.user_tower, inputs)
        )
    encoders.save(directory / layout.ENCODERS)
    return Manifest(
        embedding_dim=int(item_vectors.shape[1]),
        index=IndexInfo(
            factory=report.factory,
            ntotal=int(index.ntotal),
            search_params=report.knobs,
            recall_k=report.recall_k,
            ann_recall=report.recall,
            recall_queries=report.n_queries,
        ),
        counts=Counts(
            items=len(items),
            users=n_users,
            known_items=len(encoders.items.ids.values),
            known_users=len(encoders.users.ids.values),
            train_interactions=len(data.split.train),
        ),
        inputs={"user": encoders.user_input_names, "item": encoders.item_input_names},
        packages=package_versions(),
        onnx_parity_max_abs_diff=parity,
    )


def point_latest(link: Path, bundle: Path) -> None:
    """Switch the ``latest`` symlink to ``bundle`` atomically (new link, then rename). The
    link is relative, so the two can move together (a copied or mounted outputs folder)."""
    link.parent.mkdir(parents=True, exist_ok=True)
    switch_link(link, Path(os.path.abspath(bundle)))


def export_bundle(
    module: TwoTowerModule,
    data: PreparedData,
    target: str | Path,
    *,
    settings: ExportSettings | None = None,
    config: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
) -> Path | str:
    """Write the bundle to ``target`` atomically: nothing is left half-written on failure,
    and an existing bundle there is replaced only once the new one is complete. A URL
    ``target`` (``s3://...``) is written locally, then published there (manifest last);
    the result is then the URL, and ``settings.latest`` (a local link) is not touched."""
    settings = settings or ExportSettings()

    def write_files(staging: Path) -> Manifest:
        manifest = write_bundle_files(module, data, staging, settings)
        return manifest.replace(
            metrics=dict(metrics or {}), config=dict(config or {}), export=asdict(settings)
        )

    if is_url(str(target)):
        staging = Path(tempfile.mkdtemp(prefix="twotower-export-"))
        try:
            return publish_bundle(write_bundle(staging / "bundle", write_files), str(target))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    target = write_bundle(target, write_files)
    if settings.latest:
        point_latest(Path(settings.latest), target)
        log.info("%s -> %s", settings.latest, target)
    return target
