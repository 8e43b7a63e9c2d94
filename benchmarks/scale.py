"""The scale ladder: the main job's stages at 1M, 10M and 100M synthetic events.

Each rung runs in a child process (so its peak RSS is its own) that goes through the
stages of ``twotower train`` one by one on data written by
:func:`towers.data.synthetic_shards.write_synthetic_shards`:

- ``generate``: write the Parquet shards (O(events) sampler);
- ``read``: load and validate the three tables (``data=csv`` on the shard directory);
- ``split``: ``prepare_interactions`` + the EVALUATION.md split;
- ``encoders``: fit the feature encoders on the fit events;
- ``samples``: the training samples (user inputs, items, histories);
- ``eval_sets``: the validation and test sources (per-user row ranges; a piece of users
  is built when it is evaluated);
- ``train``: ``train_steps`` optimiser steps through Lightning (an epoch is extrapolated);
- ``evaluate``: full-ranking test metrics for up to ``eval_users`` users (extrapolated);
- ``export``: the bundle with ``index=auto`` (ONNX towers, FAISS index, recall check).

With ``path="prepared"`` the rung runs as two jobs, each in its own process: ``prepare``
(``generate`` to ``samples``, then ``write``: the prepared directory, as ``twotower
prepare`` writes it, with no evaluation sets and no copy of train) and ``train``
(``load``: that directory with its samples left in their shards, as
``data.prepared=DIR data.stream=true`` loads it; then ``train``, ``evaluate`` and
``export``, the samples streamed).

A sampler thread in the child records each stage's peak RSS. The parent watches the
child's RSS and stops it above ``rss_limit_gb``: that stage is where one machine stops.
Every finished stage is appended to a JSON-lines file at once, so a killed rung keeps
the stages it finished.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PAGE = os.sysconf("SC_PAGE_SIZE")
GB = 1024**3


@dataclass(frozen=True)
class Rung:
    """One size of the ladder."""

    events: int
    users: int
    items: int


LADDER = (
    Rung(1_000_000, 50_000, 10_000),
    Rung(10_000_000, 500_000, 100_000),
    Rung(100_000_000, 5_000_000, 1_000_000),
)


@dataclass
class ScaleSettings:
    """What ``twotower bench scale`` runs (see the module doc)."""

    rungs: tuple[Rung, ...] = LADDER
    train_steps: int = 100
    batch_size: int = 1024
    eval_users: int = 20_000
    rss_limit_gb: float = 20.0
    users_per_shard: int = 250_000
    seed: int = 0
    work_dir: str = "/tmp/twotower-scale"
    overrides: tuple[str, ...] = ()  # Hydra overrides of the main job's config (model.*)
    # "memory": the main job in one process, as `twotower train` runs it; "prepared": two
    # jobs, each in its own process, as `twotower prepare` then `twotower train
    # data.prepared=DIR data.stream=true` run them
    path: str = "memory"
    job: str = "all"  # what one child runs: all, prepare or train (set by run_path)
    jobs: tuple[str, ...] = ("prepare", "train")  # path "prepared": train alone reuses the
    # directory an earlier prepare job wrote


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of a process (default: this one), from /proc."""
    with open(f"/proc/{pid or 'self'}/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRss:
    """A thread sampling this process's RSS; :meth:`stage` gives a block's peak."""

    def __init__(self, interval: float = 0.05) -> None:
        self.peak = rss_bytes()
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="peak-rss")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, rss_bytes())

    @contextmanager
    def stage(self, record: dict[str, Any]) -> Iterator[None]:
        """Time the block and record its ``seconds`` and ``peak_rss_gb`` into ``record``."""
        self.peak = rss_bytes()
        start = time.perf_counter()
        yield
        record["seconds"] = round(time.perf_counter() - start, 2)
        record["peak_rss_gb"] = round(max(self.peak, rss_bytes()) / GB, 3)

    def close(self) -> None:
        self._stop.set()


def model_config(batch_size: int, seed: int, extra: tuple[str, ...] = ()) -> Any:
    """The default main job's config (its model and features), batch size set, with
    the Hydra overrides ``extra``."""
    from hydra import compose, initialize_config_dir

    from twotower.config import config_dir

    overrides = [f"train.batch_size={batch_size}", f"seed={seed}", "logger=none", *extra]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


class Progress:
    """Stage records of one child: each started and finished stage appended to a JSON-lines
    file at once (a killed child keeps what it finished), each stage's peak RSS sampled."""

    def __init__(self, rung: Rung, path: Path, job: str) -> None:
        self.rung = rung
        self.path = path
        self.job = job
        self.sampler = PeakRss()

    def stage(self, name: str) -> dict[str, Any]:
        """The record of stage ``name``, marked started."""
        record: dict[str, Any] = {"events": self.rung.events, "job": self.job, "stage": name}
        self._append({**record, "status": "started", "started_at": time.time()})
        return record

    def done(self, record: dict[str, Any]) -> None:
        """Mark ``record`` (timed by ``self.sampler.stage``) finished."""
        record["events_per_second"] = round(self.rung.events / max(record["seconds"], 1e-9))
        record["status"] = "done"
        self._append(record)
        log.info("%s", record)

    def _append(self, line: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")


def run_stages(rung: Rung, s: ScaleSettings, progress_file: Path) -> None:
    """The child's work: the stages of ``s.job`` in turn, one JSON line each into
    ``progress_file``. ``all``: the main job in one process; ``prepare``: the data stages,
    then ``write`` (the prepared directory, as ``twotower prepare`` writes it); ``train``:
    ``load`` (that directory, its samples streamed), then training, evaluation, export."""
    progress = Progress(rung, progress_file, s.job)
    cfg = model_config(s.batch_size, s.seed, tuple(s.overrides))
    if s.job == "train":
        data = load_stage(rung, s, progress)
    else:
        raw, data = data_stages(rung, s, progress, cfg)
        if s.job == "prepare":
            del raw
            write_stage(rung, s, progress, data, cfg)
            progress.sampler.close()
            return
        del raw
    model_stages(rung, s, progress, cfg, data)
    progress.sampler.close()


def prepared_dir(rung: Rung, s: ScaleSettings) -> Path:
    """Where the ``prepare`` job writes the rung's prepared directory."""
    return Path(s.work_dir) / f"prepared-{rung.events}"


def data_dir(rung: Rung, s: ScaleSettings) -> Path:
    """Where the rung's synthetic tables are written."""
    return Path(s.work_dir) / f"events-{rung.events}"


def data_stages(rung: Rung, s: ScaleSettings, progress: Progress, cfg: Any) -> tuple[Any, Any]:
    """``generate`` to ``eval_sets``: the raw tables and the prepared data (for the
    prepare job, to ``samples``: the :class:`PreparedParts` that ``write`` writes)."""
    from towers.data.prepare import (
        assemble_prepared,
        build_eval_sources,
        build_training_samples,
        fit_encoders,
    )
    from towers.data.readers import load_tables
    from towers.data.split import make_split, prepare_interactions
    from towers.data.synthetic_shards import (
        INTERACTIONS_DIR,
        ITEMS_FILE,
        USERS_FILE,
        ShardedSyntheticSettings,
        write_synthetic_shards,
    )
    from towers.pipeline import feature_settings, split_settings

    sampler = progress.sampler
    tables = data_dir(rung, s)
    record = progress.stage("generate")
    shutil.rmtree(tables, ignore_errors=True)  # always generated afresh, and timed
    with sampler.stage(record):
        settings = ShardedSyntheticSettings(
            n_users=rung.users,
            n_items=rung.items,
            mean_events_per_user=rung.events / rung.users,
            users_per_shard=s.users_per_shard,
            seed=s.seed,
        )
        write_synthetic_shards(tables, settings)
    record["generated_events"] = json.loads((tables / "synthetic.json").read_text())["events"]
    progress.done(record)

    record = progress.stage("read")
    with sampler.stage(record):
        raw = load_tables(tables / INTERACTIONS_DIR, tables / ITEMS_FILE, tables / USERS_FILE)
    progress.done(record)

    record = progress.stage("split")
    with sampler.stage(record):
        events = prepare_interactions(raw.interactions)
        raw.interactions = events  # the raw rows are no longer needed
        del events
        # the prepare job keeps no copy of train (fit and validation are what it writes)
        split = make_split(raw.interactions, **split_settings(cfg), keep_train=s.job != "prepare")
        raw.interactions = None  # type: ignore[assignment]
    record.update(split.stats())
    progress.done(record)

    record = progress.stage("encoders")
    with sampler.stage(record):
        catalogue = raw.items.reset_index(drop=True)
        encoders = fit_encoders(raw, split.fit, feature_settings(cfg.features))
    progress.done(record)

    record = progress.stage("samples")
    with sampler.stage(record):
        samples = build_training_samples(raw, split.fit, catalogue, encoders)
    record["samples"] = len(samples.item_rows)
    progress.done(record)

    if s.job == "prepare":  # as twotower prepare: a run builds the sets from split/
        from towers.data.prepared_writer import PreparedParts

        return raw, PreparedParts(split, catalogue, encoders, samples)

    record = progress.stage("eval_sets")
    with sampler.stage(record):
        sources = build_eval_sources(raw, split, split.fit, catalogue, encoders)
        data = assemble_prepared(raw, split, catalogue, encoders, samples, sources, "fit")
    progress.done(record)
    return raw, data


def write_stage(rung: Rung, s: ScaleSettings, progress: Progress, data: Any, cfg: Any) -> None:
    """``write``: the prepared directory of ``data``, as ``twotower prepare`` writes it."""
    from towers.data.prepared_writer import write_prepared
    from towers.data.synthetic_shards import INTERACTIONS_DIR, ITEMS_FILE, USERS_FILE
    from towers.pipeline import feature_settings, split_settings
    from twotower.spark.settings import PrepareSettings

    tables = data_dir(rung, s)
    record = progress.stage("write")
    with progress.sampler.stage(record):
        result = write_prepared(
            data,
            PrepareSettings(  # what the data stages read and did: prepared.json says so
                interactions=str(tables / INTERACTIONS_DIR),
                items=str(tables / ITEMS_FILE),
                users=str(tables / USERS_FILE),
                output=str(prepared_dir(rung, s)),
                features=feature_settings(cfg.features),
                overwrite=True,
                **split_settings(cfg),
            ),
        )
    record.update(shards=result.manifest["counts"]["shards"])
    progress.done(record)


def load_stage(rung: Rung, s: ScaleSettings, progress: Progress) -> Any:
    """``load``: the prepared directory with its samples left in their shards, and the
    user table (for the evaluation users' attributes), as ``data.prepared=DIR
    data.stream=true`` loads them."""
    from towers.data.prepared_dir import load_prepared
    from towers.data.readers import load_user_table
    from towers.data.synthetic_shards import USERS_FILE

    record = progress.stage("load")
    with progress.sampler.stage(record):
        users = load_user_table(data_dir(rung, s) / USERS_FILE)
        data = load_prepared(prepared_dir(rung, s), users, "csv", stream=True)
    record["samples"] = data.n_samples
    progress.done(record)
    return data


def model_stages(rung: Rung, s: ScaleSettings, progress: Progress, cfg: Any, data: Any) -> None:
    """``train``, ``evaluate`` and ``export`` of ``data``."""
    import pytorch_lightning as pl

    from towers.evaluation.callback import tower_scorer
    from towers.evaluation.ranking import evaluate_stream
    from towers.export.bundle import ExportSettings, export_bundle
    from towers.model.module import embed
    from towers.pipeline import build_datamodule, build_module

    sampler = progress.sampler
    record = progress.stage("train")
    with sampler.stage(record):
        pl.seed_everything(s.seed)
        datamodule = build_datamodule(cfg, data)
        module = build_module(cfg, data, datamodule.negative_pool_size)
        trainer = pl.Trainer(
            max_steps=s.train_steps,
            max_epochs=1,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
        )
        started = time.perf_counter()
        trainer.fit(module, datamodule=datamodule)
        train_seconds = time.perf_counter() - started
        # as twotower train does (it reloads the best checkpoint into a fresh module),
        # evaluation and export run without the trainer and its optimiser state
        module.trainer = None  # type: ignore[assignment]
        datamodule.trainer = None
        global_step = trainer.global_step
        del trainer
        gc.collect()
    examples = global_step * s.batch_size
    record.update(
        steps=global_step,
        examples_per_second=round(examples / train_seconds),
        epoch_seconds_extrapolated=round(data.n_samples / (examples / train_seconds)),
    )
    progress.done(record)

    record = progress.stage("evaluate")
    with sampler.stage(record):
        module = module.cpu().eval()
        item_vectors = embed(module.model.item_tower, data.catalogue_inputs)
        scorer = tower_scorer(module.model.user_tower, item_vectors)
        source = data.test_source
        metrics = evaluate_stream(
            source, scorer, len(item_vectors), [20], "test/", max_users=s.eval_users
        )
        scored = min(s.eval_users, source.n_users)
    record.update(
        users=scored,
        all_users=source.n_users,
        recall_at_20=round(metrics["test/recall@20"], 4),
        ndcg_at_20=round(metrics["test/ndcg@20"], 4),
        all_users_seconds_extrapolated=round(record["seconds"] * source.n_users / max(scored, 1)),
    )
    progress.done(record)

    record = progress.stage("export")
    with sampler.stage(record):
        bundle = export_bundle(
            module,
            data,
            Path(s.work_dir) / f"bundle-{rung.events}",
            settings=ExportSettings(index="auto", recall_queries=1000),
        )
    manifest = json.loads((bundle / "manifest.json").read_text())
    record.update(index=manifest.get("index", {}).get("factory"))
    progress.done(record)


def run_rung(rung: Rung, s: ScaleSettings, progress: Path) -> list[dict[str, Any]]:
    """Run one rung in a child process, stopping it above the RSS limit; its rows."""
    settings_file = progress.with_suffix(".settings.json")
    settings_file.write_text(json.dumps({**asdict(s), "rungs": [asdict(rung)]}))
    progress.write_text("")
    command = [sys.executable, "-m", "benchmarks.bench_scale", "--child", str(settings_file)]
    root = Path(__file__).resolve().parent.parent
    child = subprocess.Popen(command, cwd=root, start_new_session=True)
    stopped: str | None = None
    stopped_at = None
    peak = 0
    while child.poll() is None:
        try:
            rss = rss_bytes(child.pid)
        except (FileNotFoundError, ProcessLookupError):
            break
        peak = max(peak, rss)
        if rss > s.rss_limit_gb * GB:
            stopped = f"stopped: RSS {rss / GB:.1f} GB over the {s.rss_limit_gb:g} GB limit"
            stopped_at = time.time()
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            break
        time.sleep(0.2)
    lines = [json.loads(line) for line in progress.read_text().splitlines() if line.strip()]
    rows = [line for line in lines if line.get("status") == "done"]
    finished = {row["stage"] for row in rows}
    unfinished = [line for line in lines if line["stage"] not in finished]
    if unfinished:
        reason = stopped or f"failed: exit status {child.returncode}"
        ended = stopped_at or time.time()
        started = unfinished[-1].get("started_at")
        rows.append(
            {
                "events": rung.events,
                "job": s.job,
                "stage": unfinished[-1]["stage"],
                "status": reason,
                # how long the stage ran before it was stopped (or failed)
                "seconds": round(ended - started, 2) if started else None,
                "peak_rss_gb": round(peak / GB, 3),
            }
        )
    return rows


def run_path(rung: Rung, s: ScaleSettings) -> list[dict[str, Any]]:
    """One rung along ``s.path``: one child for ``memory``; for ``prepared`` the prepare
    job's child, then (if it finished) the training job's; their rows."""
    work = Path(s.work_dir)
    if s.path == "memory":
        return run_rung(rung, replace(s, job="all"), work / f"progress-{rung.events}.jsonl")
    if s.path != "prepared":
        raise ValueError(f"path must be memory or prepared, got {s.path!r}")
    unknown = set(s.jobs) - {"prepare", "train"}
    if unknown or not s.jobs:
        raise ValueError(f"jobs must be prepare and/or train, got {list(s.jobs)}")
    rows = []
    for job in ("prepare", "train"):
        if job not in s.jobs:
            continue
        progress = work / f"progress-{rung.events}-{job}.jsonl"
        new = run_rung(rung, replace(s, job=job), progress)
        rows += new
        if not new:  # it died before its first stage: never train on a stale directory
            log.error("the %s job of the %d-event rung wrote no stage", job, rung.events)
            break
        if any(row["status"] != "done" for row in rows):
            break
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per rung: total seconds, peak RSS and the stage it stopped at (if any)."""
    out: dict[str, Any] = {}
    for events in sorted({row["events"] for row in rows}):
        mine = [row for row in rows if row["events"] == events]
        failed = [row for row in mine if row["status"] != "done"]
        out[str(events)] = {
            "seconds": round(sum(row["seconds"] or 0 for row in mine), 1),
            "peak_rss_gb": max(row["peak_rss_gb"] for row in mine),
            "stopped_at": failed[0]["stage"] if failed else None,
            "reason": failed[0]["status"] if failed else None,
            "peak_rss_gb_by_job": {
                job: max(row["peak_rss_gb"] for row in mine if row.get("job", "all") == job)
                for job in dict.fromkeys(row.get("job", "all") for row in mine)
            },
        }
    return out
