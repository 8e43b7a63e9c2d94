"""Write a bundle directory atomically (temp dir, then rename), with a checksummed manifest."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pandas as pd

from retrieval import bundle as layout
from towers.data.prepare import PreparedData, catalogue_rows, user_attribute_rows
from towers.data.schema import ITEM_ID, USER_ID
from towers.export.index import build_index
from towers.export.onnx_export import export_tower
from towers.model.module import TwoTowerModule, embed

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


def package_versions() -> dict[str, str]:
    versions = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def user_state(data: PreparedData) -> pd.DataFrame:
    """Each known user's recent history and seen items (all of train), plus attributes."""
    train = data.split.train
    history_length = data.encoders.history_length
    seen = train.groupby(USER_ID, sort=False)[ITEM_ID].agg(list)
    state = pd.DataFrame(
        {
            USER_ID: seen.index.to_numpy(dtype=object),
            layout.HISTORY_COLUMN: [
                items[-history_length:] if history_length else [] for items in seen
            ],
            layout.SEEN_COLUMN: seen.to_list(),
        }
    )
    if data.users is not None:
        extra = data.users.loc[~data.users[USER_ID].isin(set(state[USER_ID]))]
        no_events = pd.DataFrame(
            {
                USER_ID: extra[USER_ID],
                layout.HISTORY_COLUMN: [[]] * len(extra),
                layout.SEEN_COLUMN: [[]] * len(extra),
            }
        )
        state = pd.concat([state, no_events], ignore_index=True)
        attributes = user_attribute_rows(data.users, state[USER_ID].to_numpy(dtype=object))
        assert attributes is not None
        state = pd.concat([state, attributes.drop(columns=[USER_ID])], axis=1)
    return state


def _sample(inputs: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    return {name: np.ascontiguousarray(values[:rows]) for name, values in inputs.items()}


def write_bundle_files(
    module: TwoTowerModule, data: PreparedData, directory: Path, index_factory: str
) -> dict[str, Any]:
    """Write every bundle file but the manifest into ``directory``; return manifest facts."""
    model = module.model.cpu().eval()
    encoders = data.encoders
    item_vectors = embed(model.item_tower, data.catalogue_inputs)
    faiss.write_index(build_index(item_vectors, index_factory), str(directory / layout.INDEX))
    parity = {
        "user_tower": export_tower(
            model.user_tower,
            encoders.user_input_names,
            _sample(data.test.user_inputs, PARITY_ROWS),
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
    counts = np.bincount(
        catalogue_rows(data.catalogue, data.split.train[ITEM_ID]), minlength=len(items)
    )
    items[layout.COUNT_COLUMN] = counts
    items.to_parquet(directory / layout.ITEMS, index=False)
    users = user_state(data)
    users.to_parquet(directory / layout.USERS, index=False)
    encoders.save(directory / layout.ENCODERS)
    return {
        "embedding_dim": int(item_vectors.shape[1]),
        "index": {"factory": index_factory, "ntotal": len(item_vectors)},
        "counts": {
            "items": len(items),
            "users": len(users),
            "known_items": len(encoders.items.ids.values),
            "known_users": len(encoders.users.ids.values),
            "train_interactions": len(data.split.train),
        },
        "inputs": {"user": encoders.user_input_names, "item": encoders.item_input_names},
        "onnx_parity_max_abs_diff": parity,
    }


def export_bundle(
    module: TwoTowerModule,
    data: PreparedData,
    target: str | Path,
    *,
    index_factory: str = "Flat",
    config: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
) -> Path:
    """Write the bundle to ``target`` atomically: nothing is left half-written on failure."""
    target = Path(target).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        facts = write_bundle_files(module, data, staging, index_factory)
        manifest = {
            "format_version": layout.FORMAT_VERSION,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "packages": package_versions(),
            "metric": layout.METRIC,
            **facts,
            "metrics": dict(metrics or {}),
            "config": dict(config or {}),
            "files": {p.name: layout.sha256_of(p) for p in sorted(staging.iterdir())},
        }
        (staging / layout.MANIFEST).write_text(
            json.dumps(manifest, indent=2, default=str), encoding="utf-8"
        )
        if target.exists():
            retired = target.with_name(f".{target.name}-old-{os.getpid()}")
            os.replace(target, retired)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("bundle written to %s", target)
    return target
