"""Export guarantees (recall floor, embeddings, latest link, CLI) and serving under threads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from retrieval import RequestError, Retriever
from towers.export.bundle import ExportSettings, export_bundle
from towers.export.onnx_export import ExportError
from towers.pipeline import TrainResult
from twotower.bundle.layout import HISTORY_COLUMN, ITEM_EMBEDDINGS, USER_EMBEDDINGS, USERS

from .conftest import ROOT


def test_export_fails_below_the_recall_floor_and_leaves_nothing(
    trained: TrainResult, tmp_path: Path
) -> None:
    settings = ExportSettings(index="IVF16,Flat", search_params={"nprobe": 1}, recall_floor=0.99)
    with pytest.raises(ExportError, match=r"IVF16,Flat.*recall@100 0\.\d+ < floor 0\.99"):
        export_bundle(trained.module, trained.data, tmp_path / "bundle", settings=settings)
    assert list(tmp_path.iterdir()) == []


def test_auto_index_and_tuned_knobs_reach_the_floor(trained: TrainResult, tmp_path: Path) -> None:
    bundle = export_bundle(
        trained.module, trained.data, tmp_path / "b", settings=ExportSettings(index="IVF8,Flat")
    )
    index = Retriever.load(bundle).manifest.index
    assert index.recall_k == 100 and index.ann_recall >= 0.95 and "nprobe" in index.search_params
    auto = export_bundle(
        trained.module, trained.data, tmp_path / "auto", settings=ExportSettings(index="auto")
    )
    assert Retriever.load(auto).manifest.index.factory == "Flat"  # a small catalogue


def test_embeddings_parquet_for_batch_jobs(trained: TrainResult, tmp_path: Path) -> None:
    settings = ExportSettings(user_embeddings=True, latest=str(tmp_path / "latest"))
    bundle = export_bundle(trained.module, trained.data, tmp_path / "b", settings=settings)
    items = pd.read_parquet(bundle / ITEM_EMBEDDINGS)
    users = pd.read_parquet(bundle / USER_EMBEDDINGS)
    assert list(items["item_id"]) == list(trained.data.catalogue["item_id"])
    vectors = np.stack(items["embedding"].to_numpy())
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert (
        len(users) >= trained.data.test.n_users
        and len(users["embedding"].iloc[0]) == vectors.shape[1]
    )
    retriever = Retriever.load(tmp_path / "latest")
    assert (tmp_path / "latest").resolve() == bundle.resolve()
    # a stored user vector is what the serving runtime computes for that user
    user = users["user_id"].iloc[0]
    np.testing.assert_allclose(
        retriever.embed_users([user])[0], users["embedding"].iloc[0], atol=1e-5
    )


def test_latest_link_moves_to_the_newest_bundle(trained: TrainResult, tmp_path: Path) -> None:
    latest = tmp_path / "latest"
    first = export_bundle(
        trained.module, trained.data, tmp_path / "one", settings=ExportSettings(latest=str(latest))
    )
    second = export_bundle(
        trained.module, trained.data, tmp_path / "two", settings=ExportSettings(latest=str(latest))
    )
    assert latest.resolve() == second.resolve() != first.resolve()
    assert os.readlink(latest) == "two"  # the name, so a re-export of "two" moves it too


def test_re_export_switches_a_versioned_link_and_the_bundle_never_disappears(
    trained: TrainResult, tmp_path: Path
) -> None:
    """Re-exports over one name: each is a new NAME@VERSION directory and the name a link
    switched in one rename, so a reader polling the name always finds a whole bundle."""
    target = tmp_path / "bundle"
    export_bundle(trained.module, trained.data, target)
    seen: list[str] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                seen.append(json.loads((target / "manifest.json").read_text())["created_at"])
            except (OSError, ValueError) as exc:
                seen.append(f"missing: {exc!r}")

    reader = threading.Thread(target=poll)
    reader.start()
    try:
        for _ in range(3):
            export_bundle(trained.module, trained.data, target)
    finally:
        stop.set()
        reader.join()
    assert seen and not [s for s in seen if s.startswith("missing")]
    assert target.is_symlink() and "@" in os.readlink(target)
    versions = sorted(p.name for p in tmp_path.glob("bundle@*"))
    assert len(versions) == 3 and os.readlink(target) == versions[-1]  # the newest three
    Retriever.load(target)
    (tmp_path / "pinned").symlink_to(versions[0])  # a link keeps its version from pruning
    for _ in range(3):
        export_bundle(trained.module, trained.data, target)
    assert (tmp_path / "pinned").resolve().is_dir() and len(list(tmp_path.glob("bundle@*"))) == 4

    legacy = tmp_path / "legacy"  # a bundle written as a plain directory, before versions
    shutil.copytree(target.resolve(), legacy)
    export_bundle(trained.module, trained.data, legacy)
    assert legacy.is_symlink() and (tmp_path / "legacy@legacy" / "manifest.json").is_file()


def test_cuda_without_a_gpu_says_what_to_install(trained: TrainResult) -> None:
    import faiss
    import onnxruntime as ort

    if (
        getattr(faiss, "get_num_gpus", lambda: 0)() > 0
        or "CUDAExecutionProvider" in ort.get_available_providers()
    ):
        pytest.skip("this machine has GPU support")
    with pytest.raises(RequestError, match=r"faiss-gpu.*onnxruntime-gpu"):
        Retriever.load(trained.bundle, device="cuda")


def test_concurrent_queries_equal_sequential_ones(trained: TrainResult) -> None:
    retriever = Retriever.load(trained.bundle)
    users = list(trained.data.test.user_ids[:60])
    expected = [
        list(retriever.recommend(user_id=u, k=10, filter={"tags": "t1"} if i % 3 == 0 else None)[0])
        for i, u in enumerate(users)
    ]

    def query(i: int) -> list[str]:
        return list(
            retriever.recommend(
                user_id=users[i], k=10, filter={"tags": "t1"} if i % 3 == 0 else None
            )[0]
        )

    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(query, list(range(len(users))) * 5))
    assert got == expected * 5


def test_adding_items_while_querying_never_shows_half_an_item(trained: TrainResult) -> None:
    retriever = Retriever.load(trained.bundle)
    original = set(retriever.item_ids)
    added: set[str] = set()
    stop = threading.Event()
    problems: list[str] = []

    def writer() -> None:
        for batch in range(20):
            ids = [f"cold-{batch}-{j}" for j in range(5)]
            retriever.add_items(
                pd.DataFrame({"item_id": ids, "category": "c-cold", "tags": "t1", "quality": 0.0})
            )
            added.update(ids)
        stop.set()

    def reader() -> None:
        while not stop.is_set():
            ids, scores = retriever.recommend(
                history=["i1", "i2"], k=20, filter={"category": {"c-cold", "c1"}}
            )
            if not np.isfinite(scores).all() or any(i is None for i in ids):
                problems.append(f"bad result {ids} {scores}")
            unknown = set(ids) - original - {i for i in ids if str(i).startswith("cold-")}
            if unknown:
                problems.append(f"unknown ids {unknown}")

    threads = [threading.Thread(target=reader) for _ in range(4)] + [
        threading.Thread(target=writer)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not problems, problems[:3]
    assert set(retriever.item_ids) == original | added


def test_export_script_from_a_checkpoint(trained: TrainResult, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    from omegaconf import OmegaConf

    from .conftest import TINY_OVERRIDES, compose_config

    OmegaConf.save(
        compose_config([*TINY_OVERRIDES, f"paths.output_dir={run_dir}"]),
        run_dir / ".hydra" / "config.yaml",
    )
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "export.py"),
            str(run_dir),
            "--ckpt",
            str(trained.best_checkpoint),
            "--out",
            str(tmp_path / "exported"),
            "export.index=HNSW16",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    exported = Retriever.load(tmp_path / "exported")
    assert exported.manifest.index.factory == "HNSW16"
    missing = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "export.py"), str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 1 and "config.yaml: no such file" in missing.stderr


def test_thread_capped_retriever_answers_the_same(trained: TrainResult) -> None:
    user = trained.data.test.user_ids[0]
    capped = Retriever.load(trained.bundle, threads=1)
    assert list(capped.recommend(user_id=user, k=10)[0]) == list(
        Retriever.load(trained.bundle).recommend(user_id=user, k=10)[0]
    )


def test_stored_user_inputs_equal_encoding_them_anew(trained: TrainResult) -> None:
    """The per-user encodings precomputed at load match encoding raw rows per request."""
    retriever = Retriever.load(trained.bundle)
    users = [str(u) for u in trained.data.test.user_ids[:6]]
    items = [str(i) for i in trained.data.catalogue["item_id"].iloc[:3]]
    given = [items[: 1 + r % 3] for r in range(len(users))]
    assert trained.data.users is not None
    rows = trained.data.users.set_index("user_id").loc[users].reset_index(drop=True)
    features = [{k: v for k, v in row.items() if pd.notna(v)} for row in rows.to_dict("records")]
    assert all(features)
    fast = retriever.embed_users(users, given)
    anew = retriever.embed_users(users, given, features)
    np.testing.assert_allclose(fast, anew, atol=1e-6)
    bundle_users = pd.read_parquet(trained.bundle / USERS).set_index("user_id")
    stored = [[str(i) for i in bundle_users.loc[u, HISTORY_COLUMN]] for u in users]
    expected = retriever.encoders.encode_histories(
        [past + more for past, more in zip(stored, given, strict=True)]
    )
    positions = retriever.users.positions(users)
    inputs = retriever.users.tower_inputs(users, positions, given, [None] * len(users))
    np.testing.assert_array_equal(inputs["history"], expected)


def test_large_tower_weights_live_beside_the_graph_and_serve_the_same(
    trained: TrainResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tower weight over the threshold is written to ``<tower>.onnx.data`` (ONNX external
    data, mapped by onnxruntime): checksummed in the manifest, served with the answers of
    the single-file towers, carried by ``Retriever.save`` and read back by a warm start; a
    changed weights file is refused at load."""
    from towers.export import onnx_export
    from towers.model.warm_start import load_previous
    from twotower.bundle import layout
    from twotower.errors import BundleError

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 16 * 1024)
    bundle = export_bundle(trained.module, trained.data, tmp_path / "external")
    listed = json.loads((bundle / "manifest.json").read_text())["files"]
    for tower in (layout.USER_TOWER, layout.ITEM_TOWER):
        weights = bundle / (tower + layout.WEIGHTS_SUFFIX)
        assert weights.name in listed and weights.name in layout.OPTIONAL_FILES
        assert weights.stat().st_size > 16 * 1024
        # the graph file is now small: the weights live beside it
        assert (bundle / tower).stat().st_size < (trained.bundle / tower).stat().st_size / 4
        assert not (trained.bundle / weights.name).exists()

    single, external = Retriever.load(trained.bundle), Retriever.load(bundle)
    users = list(trained.data.test.user_ids[:25])
    for user in users:
        ids, scores = single.recommend(user_id=user, k=10)
        got_ids, got_scores = external.recommend(user_id=user, k=10)
        assert list(got_ids) == list(ids)
        np.testing.assert_allclose(got_scores, scores, rtol=0, atol=1e-6)
    items = trained.data.catalogue.head(50)
    np.testing.assert_allclose(external.embed_items(items), single.embed_items(items), atol=1e-6)

    saved = Retriever.load(external.save(tmp_path / "saved"))
    assert list(saved.recommend(user_id=users[0], k=10)[0]) == list(
        single.recommend(user_id=users[0], k=10)[0]
    )

    before, after = load_previous(trained.bundle), load_previous(bundle)
    assert before.state.keys() <= after.state.keys()
    for key, value in before.state.items():
        torch.testing.assert_close(after.state[key], value, rtol=0, atol=0, msg=key)

    weights = bundle / (layout.USER_TOWER + layout.WEIGHTS_SUFFIX)
    with weights.open("r+b") as handle:
        handle.seek(100)
        handle.write(b"\x01\x02\x03\x04")
    with pytest.raises(BundleError, match=r"user_tower\.onnx\.data: checksum mismatch"):
        Retriever.load(bundle)


def test_external_weights_export_a_tower_whose_weights_the_exporter_would_fold(
    tmp_path: Path,
) -> None:
    """A Linear on 3-d input (attention pooling's scorer), a sliced buffer and a tied
    weight: exported with external weights, the graph takes only the tower's inputs and
    matches torch."""
    import onnx

    from towers.export.onnx_export import export_tower, external_data_file

    class Tower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ids = torch.nn.Embedding(500, 8)
            self.norm = torch.nn.LayerNorm(8)
            self.scorer = torch.nn.Linear(8, 1)
            self.out = torch.nn.Linear(8, 8)
            self.register_buffer("position", torch.randn(6))

        def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
            tokens = self.norm(self.ids(inputs["history"]))  # (batch, length, 8)
            logits = self.scorer(tokens).squeeze(-1) + self.position[: tokens.shape[1]]
            pooled = (torch.softmax(logits, -1).unsqueeze(-1) * tokens).sum(1)
            return self.out(pooled) + tokens.mean(1) @ self.ids.weight[:8]  # a tied use

    torch.manual_seed(0)
    history = np.random.default_rng(0).integers(0, 500, (32, 6))
    path = tmp_path / "tower.onnx"
    diff = export_tower(Tower().eval(), ["history"], {"history": history}, path, 1e-5, 1024)
    assert diff < 1e-5 and external_data_file(path).stat().st_size >= 500 * 8 * 4
    graph = onnx.load(str(path), load_external_data=False).graph
    assert [value.name for value in graph.input] == ["history"]
