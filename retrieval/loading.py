"""Loading a bundle for serving: verified files, ONNX sessions on the chosen device, the
FAISS index, and the checks that every part agrees with the manifest."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import onnxruntime as ort
import pandas as pd

from retrieval.catalogue import Catalogue
from retrieval.search import FaissCandidates
from twotower.bundle import Manifest, layout, open_bundle
from twotower.bundle.embeddings import read_embeddings
from twotower.bundle.remote import fetch_bundle
from twotower.encoding import FeatureEncoders
from twotower.errors import BundleError, RequestError
from twotower.storage import is_url

log = logging.getLogger(__name__)
DEVICES = ("cpu", "cuda")


@dataclass
class LoadedBundle:
    """The parts of a bundle, loaded and checked."""

    path: Path
    manifest: Manifest
    encoders: FeatureEncoders
    catalogue: Catalogue
    users: pd.DataFrame
    user_session: ort.InferenceSession
    item_session: ort.InferenceSession


def providers(device: str) -> list[str]:
    """onnxruntime providers for ``device``; ``cuda`` warns about what stays on the CPU and
    raises when neither faiss nor onnxruntime can use a GPU."""
    if device not in DEVICES:
        raise RequestError(f"device must be one of {DEVICES}, got {device!r}")
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
        log.warning("device='cuda': onnxruntime has no CUDA provider; the towers run on the CPU")
        return ["CPUExecutionProvider"]
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def load_bundle(path: str | Path, device: str = "cpu", threads: int | None = None) -> LoadedBundle:
    """Load and verify a bundle: format version, checksums, dimensions and counts. A URL
    (``s3://...``) is first fetched into the local cache (:func:`fetch_bundle`)."""
    chosen = providers(device)
    if is_url(str(path)):
        path = fetch_bundle(str(path))
    bundle, manifest = open_bundle(path)
    encoders = FeatureEncoders.load(bundle / layout.ENCODERS)
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
            str(bundle / layout.USER_TOWER), options, providers=chosen
        )
        item_session = ort.InferenceSession(
            str(bundle / layout.ITEM_TOWER), options, providers=chosen
        )
    except Exception as exc:  # faiss / arrow / onnxruntime raise their own types
        raise BundleError(f"{bundle}: cannot load bundle files: {exc}") from exc
    check_items(bundle, manifest, index, items, vector_ids, vectors)
    check_towers(bundle, manifest, encoders, user_session, item_session)
    for column in (layout.ITEM_ID, layout.COUNT_COLUMN):
        if column not in items.columns:
            raise BundleError(f"{bundle / layout.ITEMS}: no column '{column}'")
    for column in (layout.USER_ID, layout.HISTORY_COLUMN, layout.SEEN_COLUMN):
        if column not in users.columns:
            raise BundleError(f"{bundle / layout.USERS}: no column '{column}'")
    candidates = FaissCandidates(index, gpu=device == "cuda")
    try:
        candidates.check_knobs(manifest.index.search_params)
    except RequestError as exc:
        raise BundleError(f"{bundle / layout.MANIFEST}: index.search_params: {exc}") from exc
    return LoadedBundle(
        path=bundle,
        manifest=manifest,
        encoders=encoders,
        catalogue=Catalogue.from_bundle(candidates, items, vectors),
        users=users,
        user_session=user_session,
        item_session=item_session,
    )


def check_items(
    bundle: Path,
    manifest: Manifest,
    index: faiss.Index,
    items: pd.DataFrame,
    vector_ids: np.ndarray,
    vectors: np.ndarray,
) -> None:
    """Index, item table and item vectors agree with each other and with the manifest."""
    dim = manifest.embedding_dim
    if index.d != dim:
        raise BundleError(f"{bundle / layout.INDEX}: index dim {index.d}, manifest says {dim}")
    counts = {
        layout.INDEX: index.ntotal,
        layout.ITEMS: len(items),
        layout.ITEM_EMBEDDINGS: len(vectors),
    }
    if len(set(counts.values())) != 1 or manifest.counts.items != len(items):
        raise BundleError(
            f"{bundle}: item counts disagree: {counts}, manifest {manifest.counts.items}"
        )
    if vectors.shape[1] != dim:
        raise BundleError(
            f"{bundle / layout.ITEM_EMBEDDINGS}: vector dim {vectors.shape[1]}, manifest says {dim}"
        )
    if layout.ITEM_ID not in items.columns:
        raise BundleError(f"{bundle / layout.ITEMS}: no column '{layout.ITEM_ID}'")
    ids = items[layout.ITEM_ID].astype(str)
    if not np.array_equal(vector_ids, ids.to_numpy(dtype=object)):
        raise BundleError(
            f"{bundle}: {layout.ITEM_EMBEDDINGS} and {layout.ITEMS} list different items"
        )
    duplicated = ids[ids.duplicated()].tolist()
    if duplicated:
        raise BundleError(f"{bundle / layout.ITEMS}: item_id {duplicated[:5]} appear twice")


def check_towers(
    bundle: Path,
    manifest: Manifest,
    encoders: FeatureEncoders,
    user_session: ort.InferenceSession,
    item_session: ort.InferenceSession,
) -> None:
    """Both ONNX towers take the encoders' inputs and give vectors of the manifest's dim."""
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
        if isinstance(width, int) and width != manifest.embedding_dim:
            raise BundleError(
                f"{bundle / name}: output dim {width}, manifest says {manifest.embedding_dim}"
            )
