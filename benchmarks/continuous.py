"""Continuous retraining: warm-start updates against full retrains, replayed over time.

The interactions are cut in time: the first ``start`` share of the events (in time order)
trains the first model, then each step adds the next ``step`` share. At each step two
models are trained on everything up to the cut:

- **warm**: the previous step's warm model (the first model at the first step; always the
  first model with ``warm_from="first"``) updated with ``init_from`` (its weights shrunk
  and perturbed by ``warm_shrink`` and ``warm_perturb``, copied as they are by default):
  with ``warm_validation="none"`` for a fixed ``warm_epochs`` epochs (optionally on the
  last ``window_days`` days only), with no model selection
  (:func:`towers.pipeline.train_for_epochs`); with ``warm_validation="newer"`` the epoch
  count is chosen by early stopping on a validation held out of the events newer than the
  cut of the model it starts from (which has trained on every older one), then the update
  is refitted on all of the data from ``init_from`` for that many epochs;
- **full**: a model trained from scratch as the pipeline does: epoch count chosen by early
  stopping on a validation split of the data up to the cut, then refitted on all of it
  (``train.refit``, as the MovieLens presets do).

Both are scored on the **next** slice, as EVALUATION.md ranks: the users with events in
it, every catalogue item a candidate, each user's earlier items excluded, their history
the events up to the cut; Recall@K and NDCG@K. The model the warm update starts from, not updated
(``stale``), and popularity (counts up to the cut) are scored beside them. A user of the
slice known by nothing (no event up to the cut, not in the user table) is
answered with the most popular items by a served bundle, whichever model it holds; by
default (``unknown_users="popularity"``) such users are scored so and left out of the gaps
between two models, which compare the users the models serve (``model_users``).

With ``seeds`` > 1 the whole replay (first model, warm chain, full retrains) runs once per
seed (``seed``, ``seed + 1``, ...) and each model's per-user NDCG@20 is averaged over the
seeds before the gaps are taken: the training's own randomness, which at MovieLens size is
as large as the gaps, shrinks with the square root of the seed count. Full retrains depend
only on the config, the seed, the data up to the cut and the training code, so a replay
can reuse those of an earlier one (``reuse_full``: each records a fingerprint of what
made it beside its checkpoint).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from scipy.stats import bootstrap
from scipy.stats import t as t_distribution

from towers.data.eval_sets import build_eval_set
from towers.data.prepare import PreparedData, prepare_data
from towers.data.schema import TIMESTAMP, USER_ID, RawData
from towers.data.sources import load_data
from towers.data.split import (
    Split,
    in_chronological_order,
    prepare_interactions,
    recent_window,
    temporal_holdout,
)
from towers.evaluation.callback import module_scores_by_user
from towers.evaluation.ranking import popularity_scorer, scores_by_user
from towers.model.module import TwoTowerModule
from towers.model.warm_start import ShrinkPerturb
from towers.pipeline import feature_settings, fit_and_select, train_for_epochs

log = logging.getLogger(__name__)
KS = (10, 20, 50)
WARM_VALIDATIONS = ("none", "newer")
UNKNOWN_USERS = ("popularity", "model")
WARM_FROM = ("previous", "first")


@dataclass
class ContinuousSettings:
    """One replay: where the first model's data ends, the step, how warm updates train."""

    start: float = 0.8
    step: float = 0.05
    steps: int = 3
    warm_epochs: int = 2
    # "none": warm_epochs epochs, no selection; "newer": epochs by early stopping on a
    # validation of the events after the starting model's cut, then a refit on all of them
    warm_validation: str = "none"
    window_days: float | None = None
    # shrink and perturb of the carried weights (init_shrink, init_perturb) in the warm
    # updates only; 1 and 0 copy them as they are
    warm_shrink: float = 1.0
    warm_perturb: float = 0.0
    # tower pairs of both models (the MovieLens presets train 3 or 7; 1 keeps the replay
    # within minutes on two CPU cores)
    ensemble: int = 1
    target_ndcg_gap: float = 0.01
    # 1: at each update also retrain in full from seed + 1, how far two full retrains
    # are apart on the same slice (the noise a gap is judged against); 0: skip it
    second_full: int = 1
    # resamples of the users of a slice for the 95% interval of a gap (scipy's BCa
    # bootstrap of the mean per-user difference)
    resamples: int = 2000
    # replays from seeds seed, seed + 1, ...: per-user NDCG@20 averaged over them
    seeds: int = 1
    # the warm updates' learning rate as a multiple of the config's (model.optimizer.lr)
    warm_lr_scale: float = 1.0
    # config overrides (key=value) of the warm updates only
    warm_overrides: tuple[str, ...] = ()
    # the slice's users known by nothing (no event up to the cut, not in the user
    # table): "popularity" scores them with the most popular items, as a served
    # bundle answers them, and leaves them out of the gaps (every model gives them the
    # same items); "model" scores them with each model's own ranking, gaps included
    unknown_users: str = "popularity"
    # where each warm update starts: "previous", the previous step's warm model (a chain
    # of updates); "first", the first model, a full retrain (each update starts afresh
    # from the latest full model, as with a full retrain every few updates)
    warm_from: str = "previous"

    def __post_init__(self) -> None:
        """Settings that would fail at the first update fail here, before any training."""
        if self.warm_validation not in WARM_VALIDATIONS:
            raise ValueError(
                f"warm_validation must be one of {WARM_VALIDATIONS}, got {self.warm_validation!r}"
            )
        if self.warm_from not in WARM_FROM:
            raise ValueError(f"warm_from must be one of {WARM_FROM}, got {self.warm_from!r}")
        if self.unknown_users not in UNKNOWN_USERS:
            raise ValueError(
                f"unknown_users must be one of {UNKNOWN_USERS}, got {self.unknown_users!r}"
            )
        ShrinkPerturb(self.warm_shrink, self.warm_perturb)  # raises WarmStartError if out of range
        if not self.warm_lr_scale > 0:
            raise ValueError(f"warm_lr_scale must be above 0, got {self.warm_lr_scale}")
        if self.seeds < 1:
            raise ValueError(f"seeds must be at least 1, got {self.seeds}")
        self.warm_overrides = tuple(self.warm_overrides)
        warm_override_config(self.warm_overrides)  # raises ValueError naming a bad one


def warm_override_config(overrides: Sequence[str]) -> DictConfig:
    """``key=value`` overrides as a config to merge into the warm updates' (values parsed as
    YAML, as on the command line); one without ``=`` or with an empty key is an error."""
    for override in overrides:
        key, sep, _ = override.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"a warm override must be key=value, got {override!r}")
        if key.strip() in ("seed", "init_from", "init_shrink", "init_perturb"):
            raise ValueError(
                f"warm override {override!r}: {key} is set by the replay itself "
                "(--warm-shrink / --warm-perturb for shrink and perturb)"
            )
    return OmegaConf.from_dotlist(list(overrides))


@dataclass
class Slices:
    """The deduplicated events in time order and the cut points (timestamps)."""

    events: pd.DataFrame
    cuts: list[float]

    def known(self, step: int) -> pd.DataFrame:
        return self.events.loc[self.events[TIMESTAMP] <= self.cuts[step]]

    def next(self, step: int) -> pd.DataFrame:
        times = self.events[TIMESTAMP]
        return self.events.loc[(times > self.cuts[step]) & (times <= self.cuts[step + 1])]


def make_slices(raw: RawData, cfg: DictConfig, settings: ContinuousSettings) -> Slices:
    """The events up to each cut and each next slice (see :func:`cut_points`)."""
    events = prepare_interactions(raw.interactions, cfg.data.get("min_rating"))
    return Slices(events, cut_points(events[TIMESTAMP].to_numpy(), settings))


def cut_points(times: np.ndarray, settings: ContinuousSettings) -> list[float]:
    """Cut points at the ``start``, ``start + step``, ... quantiles of the event times, one
    per model, then the end of the last update's next slice at the ``start + (steps + 1)
    x step`` quantile (the newest event where that reaches 1): every next slice holds about
    ``step`` of the events, the last one too, so a replay that starts early is scored on
    its own slices only, never on the events after them."""
    whole = 1.0 - 1e-9  # a sum meant to be 1 may land a hair below it
    shares = [settings.start + k * settings.step for k in range(settings.steps + 2)]
    if shares[-2] > whole:
        raise ValueError(f"start + steps x step must stay below 1, got {shares[-2]:.2f}")
    if shares[-1] > whole:  # the last slice ends at the newest event
        shares[-1] = 1.0
    return [float(np.quantile(times, share, method="lower")) for share in shares]


def split_for(known: pd.DataFrame, next_events: pd.DataFrame, cfg: DictConfig) -> Split:
    """Train on everything ``known``; validation carved from it as the pipeline does;
    the next slice as test (scored separately, see :func:`score_next`)."""
    fit, validation = temporal_holdout(
        known, float(cfg.split.validation_fraction), int(cfg.split.min_interactions)
    )
    return Split(known, fit, validation, next_events, np.array([], dtype=object))


def split_for_warm(split: Split, since: float, cfg: DictConfig) -> Split:
    """``split`` with its validation held out of the events newer than ``since`` only (per
    user, the last ``cfg.split.validation_fraction`` of their newer events, as
    :func:`temporal_holdout` holds): a model trained on every event up to ``since`` has
    seen none of them, so early stopping on them measures what the update learns."""
    newer = split.train[TIMESTAMP] > since
    kept, validation = temporal_holdout(
        split.train.loc[newer],
        float(cfg.split.validation_fraction),
        int(cfg.split.min_interactions),
    )
    if validation.empty:
        raise ValueError(
            f"no user has {int(cfg.split.min_interactions)} events after the starting model's cut "
            "to validate a warm update on (split.min_interactions)"
        )
    fit = pd.concat([split.train.loc[~newer], kept], ignore_index=True)
    return dataclasses.replace(
        split, fit=in_chronological_order(fit).reset_index(drop=True), validation=validation
    )


@dataclass
class SliceScores:
    """One model on the next slice: its metrics (means over the slice's users, users known
    by nothing scored as :attr:`ContinuousSettings.unknown_users` says; popularity's under
    ``popularity/``; the model's own NDCG@20 on the users known by nothing under
    ``unknown/``), each user's NDCG@20 and whether the model serves them (both indexed by
    user id)."""

    metrics: dict[str, float]
    ndcg: pd.Series
    served: pd.Series

    def served_ndcg(self) -> pd.Series:
        """The NDCG@20 of the users the model serves: the ones a gap between two models
        compares (every model gives the others the same popular items)."""
        return self.ndcg.loc[self.served]


def served_by_model(
    user_ids: np.ndarray, known: pd.DataFrame, users: pd.DataFrame | None
) -> np.ndarray:
    """Which of ``user_ids`` a bundle of this model answers with the model, as
    :meth:`retrieval.Retriever.recommend` does: the users the bundle keeps, that is those
    with events up to the cut and every user of the user table (``users``; the export
    keeps those without events too, with their attributes). A user in neither gets the
    most popular items instead."""
    ids = pd.Index(user_ids)
    served = ids.isin(known[USER_ID].unique())
    if users is not None:
        served |= ids.isin(users[USER_ID])
    return np.asarray(served, dtype=bool)


def score_next(
    module: TwoTowerModule,
    raw: RawData,
    known: pd.DataFrame,
    next_events: pd.DataFrame,
    unknown_users: str = "popularity",
) -> SliceScores:
    """The model on the next slice (users of the slice, histories and exclusions from
    ``known``, the model's own encoders), with popularity's metrics. ``unknown_users``:
    ``"popularity"`` scores the users the model does not serve (:func:`served_by_model`)
    with popularity's ranking, as a served bundle answers them; ``"model"`` scores every
    user with the model's own ranking."""
    encoders = module.feature_encoders
    assert encoders is not None
    catalogue = raw.items.reset_index(drop=True)
    eval_set = build_eval_set(known, next_events, catalogue, raw.users, encoders)
    users, values = module_scores_by_user(module, encoders.item_inputs(catalogue), eval_set, KS)
    popular_users, popular = scores_by_user(
        popularity_scorer(eval_set), len(catalogue), eval_set, KS
    )
    assert np.array_equal(users, popular_users)  # one evaluation set, one order of users
    if unknown_users == "popularity":
        served = served_by_model(users, known, raw.users)
    else:
        served = np.ones(len(users), dtype=bool)
    shown = {name: np.where(served, mine, popular[name]) for name, mine in values.items()}
    metrics = {name: float(np.mean(per_user)) for name, per_user in shown.items()}
    metrics.update({f"popularity/{name}": float(np.mean(v)) for name, v in popular.items()})
    if not served.all():
        metrics["unknown/ndcg@20"] = float(np.mean(values["ndcg@20"][~served]))
        metrics["popularity_unknown/ndcg@20"] = float(np.mean(popular["ndcg@20"][~served]))
    index = pd.Index(users, name=USER_ID)
    return SliceScores(
        metrics, pd.Series(shown["ndcg@20"], index=index), pd.Series(served, index=index)
    )


def mean_interval(values: np.ndarray, resamples: int, seed: int = 0) -> tuple[float, float, float]:
    """The mean of ``values`` (per-user differences) and its 95% interval: scipy's BCa
    bootstrap over the users, ``resamples`` draws, seeded."""
    if len(values) < 2 or np.all(values == values[0]):  # no spread to resample
        mean = float(values.mean()) if len(values) else float("nan")
        return mean, mean, mean
    interval = bootstrap(
        (values,),
        np.mean,
        n_resamples=resamples,
        confidence_level=0.95,
        method="BCa",
        random_state=np.random.default_rng(seed),
    ).confidence_interval
    return float(values.mean()), float(interval.low), float(interval.high)


def user_differences(a: pd.Series, b: pd.Series) -> np.ndarray:
    """Per-user ``a - b``, aligned by user id: both models scored the same users (the
    slice's users with a target), anything else is an error."""
    if not same_users(a, b):
        raise ValueError(
            f"the two models scored different users ({len(a)} and {len(b)}): "
            "their evaluation sets should hold the same slice"
        )
    return (a - b.reindex(a.index)).to_numpy()


def prepared(raw: RawData, split: Split, cfg: DictConfig, fit_on: str) -> PreparedData:
    return prepare_data(raw, split, feature_settings(cfg.features), fit_on)


def select_and_refit(
    cfg: DictConfig, raw: RawData, split: Split, out: Path
) -> tuple[TwoTowerModule, int, Path]:
    """As the pipeline trains (from scratch, or from ``cfg.init_from``): early stopping on
    validation, then (``train.refit``) a refit on all of the data for the chosen epoch
    count. The model, its epoch count and checkpoint."""
    selection = fit_and_select(cfg, out, prepared(raw, split, cfg, "fit"))
    assert selection is not None and selection.best is not None
    epochs = int(torch.load(selection.best, map_location="cpu", weights_only=False)["epoch"]) + 1
    if not cfg.train.get("refit"):
        return selection.module, epochs, selection.best
    pl.seed_everything(cfg.seed, workers=True)
    checkpoints = out / "checkpoints" / "refit"
    module = train_for_epochs(cfg, prepared(raw, split, cfg, "train"), epochs, checkpoints)
    return module, epochs, checkpoints / "last.ckpt"


def warm_config(cfg: DictConfig, previous: Path, settings: ContinuousSettings) -> DictConfig:
    """The warm updates' config: ``cfg`` with ``settings.warm_overrides``, ``init_from``
    ``previous`` shrunk and perturbed as set, and the learning rate (``model.optimizer.lr``,
    the Adam step; a row-wise Adagrad ``sparse_lr`` is left as it is) scaled by
    ``settings.warm_lr_scale``. A key the config does not have is an error."""
    warm_cfg = OmegaConf.merge(
        cfg,
        warm_override_config(settings.warm_overrides),
        {
            "init_from": str(previous),
            "init_shrink": settings.warm_shrink,
            "init_perturb": settings.warm_perturb,
        },
    )
    if settings.warm_lr_scale != 1.0:  # of the learning rate the overrides leave
        warm_cfg.model.optimizer.lr = float(warm_cfg.model.optimizer.lr) * settings.warm_lr_scale
    return warm_cfg


def warm_update(
    cfg: DictConfig,
    raw: RawData,
    split: Split,
    previous: Path,
    since: float,
    settings: ContinuousSettings,
    out: Path,
) -> tuple[TwoTowerModule, Path, int]:
    """``previous`` (trained on the events up to ``since``) updated with the data of
    ``split`` (``init_from``, :func:`warm_config`): ``warm_epochs`` epochs without
    selection, or, with ``warm_validation="newer"``, as many as early stopping picks on the
    newer events (:func:`split_for_warm`), then refitted (its checkpoints replace any an
    earlier replay left in ``out``). The model, its checkpoint and its epoch count."""
    warm_cfg = warm_config(cfg, previous, settings)
    if settings.window_days is not None:
        window = recent_window(split.train, settings.window_days)
        split = dataclasses.replace(split, train=window, fit=window)
    if settings.warm_validation == "newer":
        module, epochs, checkpoint = select_and_refit(
            warm_cfg, raw, split_for_warm(split, since, warm_cfg), out
        )
        return module, checkpoint, epochs
    pl.seed_everything(cfg.seed, workers=True)
    module = train_for_epochs(
        warm_cfg, prepared(raw, split, warm_cfg, "train"), settings.warm_epochs, out
    )
    return module, out / "last.ckpt", settings.warm_epochs


def timed(function: Any, *args: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


def table_digest(table: pd.DataFrame | None) -> str:
    """A digest of a table's content (every cell as text, in row order)."""
    if table is None:
        return ""
    hashed = pd.util.hash_pandas_object(table.astype(str), index=False).to_numpy()
    return hashlib.sha256(hashed.tobytes() + ",".join(map(str, table.columns)).encode()).hexdigest()


@functools.cache
def code_digest() -> str:
    """A digest of the training code (every ``towers`` module) and of torch's and
    Lightning's versions: what a full retrain's result depends on besides its inputs."""
    import towers

    digest = hashlib.sha256(f"{torch.__version__} {pl.__version__}".encode())
    for source in sorted(Path(towers.__file__).parent.rglob("*.py")):
        digest.update(source.read_bytes())
    return digest.hexdigest()


def data_digest(raw: RawData, known: pd.DataFrame) -> str:
    """A digest of what a step trains on: its events and the item and user tables."""
    return hashlib.sha256(
        "".join(table_digest(t) for t in (known, raw.items, raw.users)).encode()
    ).hexdigest()


def full_fingerprint(cfg: DictConfig, data: str) -> str:
    """What a full retrain's result depends on: its config (less where it writes:
    ``paths``, and every setting derived from ``paths.output_dir``, such as
    ``export.bundle_dir``, which is resolved with a fixed output directory, so the same
    retrain has one fingerprint however ``--workdir`` is spelled), its data
    (:func:`data_digest`), torch's thread count (which changes the floating-point sums) and
    the training code (:func:`code_digest`)."""
    anywhere = OmegaConf.merge(cfg, {"paths": {"output_dir": "<output_dir>"}})
    config = OmegaConf.to_container(anywhere, resolve=True)
    assert isinstance(config, dict)
    config.pop("paths", None)
    what = {
        "config": config,
        "data": data,
        "threads": torch.get_num_threads(),
        "code": code_digest(),
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


FULL_RECORD = "full.json"


def full_retrain(
    cfg: DictConfig, raw: RawData, split: Split, out: Path, fingerprint: str, reuse: bool
) -> tuple[TwoTowerModule, int, Path, float]:
    """:func:`select_and_refit` from scratch into ``out``, timed: the model, its epoch
    count, checkpoint and seconds; a record of it (``out/full.json``: ``fingerprint``, the
    checkpoint, epochs, seconds) is written once it is done. With ``reuse``, a retrain
    already in ``out`` whose record holds the same ``fingerprint`` is loaded instead, with
    the seconds it took then; anything else is trained again (its checkpoints replacing
    those in ``out``)."""
    record = out / FULL_RECORD
    if reuse and record.exists():
        saved = json.loads(record.read_text())
        checkpoint = out / saved["checkpoint"]
        if saved.get("fingerprint") == fingerprint and checkpoint.exists():
            log.info("reusing the full retrain in %s", out)
            module = TwoTowerModule.load_from_checkpoint(
                checkpoint, map_location="cpu", weights_only=False
            )
            return module.cpu().eval(), int(saved["epochs"]), checkpoint, float(saved["seconds"])
    record.unlink(missing_ok=True)  # a retrain that stops half-way leaves no record
    (module, epochs, checkpoint), seconds = timed(select_and_refit, cfg, raw, split, out)
    saved = {
        "fingerprint": fingerprint,
        "checkpoint": str(checkpoint.relative_to(out)),
        "epochs": epochs,
        "seconds": seconds,
    }
    partial = record.with_suffix(".partial")
    partial.write_text(json.dumps(saved, indent=2))
    partial.replace(record)
    return module, epochs, checkpoint, seconds


def same_users(a: pd.Series, b: pd.Series) -> bool:
    """Whether two models' per-user values hold the same users (in any order)."""
    return a.index.sort_values().equals(b.index.sort_values())


def seed_average(per_seed: Sequence[pd.Series]) -> pd.Series:
    """Each user's value averaged over the seeds' models (all scored the same users)."""
    first = per_seed[0]
    if not all(same_users(first, other) for other in per_seed[1:]):
        raise ValueError("the seeds' models scored different users: they should share a slice")
    return pd.concat([series.reindex(first.index) for series in per_seed], axis=1).mean(axis=1)


@dataclass
class WarmChain:
    """One seed's warm chain: the model the next warm update starts from, its checkpoint
    and the cut up to which it has trained (``since``: the newer events are new to it)."""

    module: TwoTowerModule
    checkpoint: Path
    since: float


@dataclass
class StepModels:
    """One step of a replay: the data up to its cut and the next slice, and what its models
    scored there (each kind, ``full``, ``warm``, ``stale``, ``full_b``, once per seed),
    with their seconds and epoch counts."""

    raw: RawData
    known: pd.DataFrame
    next_events: pd.DataFrame
    split: Split
    data_digest: str  # of raw and known (:func:`data_digest`), for the full retrains
    unknown_users: str = "popularity"  # how users known by nothing are scored
    scores: dict[str, list[SliceScores]] = dataclasses.field(default_factory=dict)
    seconds: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    epochs: dict[str, list[int]] = dataclasses.field(default_factory=dict)

    def score(
        self,
        kind: str,
        module: TwoTowerModule,
        seconds: float | None = None,
        epochs: int | None = None,
    ) -> None:
        """Score ``module`` on the next slice as one more model of ``kind``."""
        self.scores.setdefault(kind, []).append(
            score_next(module, self.raw, self.known, self.next_events, self.unknown_users)
        )
        if seconds is not None:
            self.seconds.setdefault(kind, []).append(seconds)
        if epochs is not None:
            self.epochs.setdefault(kind, []).append(epochs)

    def retrain(
        self, cfg: DictConfig, seed: int, kind: str, out: Path, reuse: bool
    ) -> tuple[TwoTowerModule, Path]:
        """A full retrain from ``seed`` into ``out`` (:func:`full_retrain`; with ``reuse``,
        loaded when its fingerprint matches), scored as ``kind``; the model and its
        checkpoint."""
        seed_cfg = OmegaConf.merge(cfg, {"seed": seed})
        fingerprint = full_fingerprint(seed_cfg, self.data_digest)
        module, epochs, checkpoint, seconds = full_retrain(
            seed_cfg, self.raw, self.split, out, fingerprint, reuse
        )
        self.score(kind, module, seconds, epochs)
        return module, checkpoint

    def fill_row(self, row: dict[str, Any], resamples: int, step: int) -> dict[str, np.ndarray]:
        """Add to ``row`` the step's metrics, each the mean over the seeds, the number of
        users the models serve (``model_users``), and the warm and second retrain's gaps
        to the full retrain over those users: per-user NDCG@20 averaged over the seeds,
        then differenced, with a 95% interval over the users; with several seeds also each
        seed's own gap and a 95% t-interval over the seeds. The per-user differences, for
        pooling."""
        for kind, counts in self.epochs.items():
            same = len(set(counts)) == 1  # an int where every seed trained as long
            row[f"{kind}_epochs"] = counts[0] if same else float(np.mean(counts))
        for kind, seconds in self.seconds.items():
            row[f"{kind}_s"] = float(np.mean(seconds))
        if "warm_s" in row:
            row["warm_over_full"] = row["warm_s"] / row["full_s"]
        for kind, outcomes in self.scores.items():
            for k in KS:
                for metric in ("recall", "ndcg"):
                    key = f"{metric}@{k}"
                    row[f"{kind}_{key}"] = float(np.mean([o.metrics[key] for o in outcomes]))
            if "unknown/ndcg@20" in outcomes[0].metrics:  # the model's own ranking there
                row[f"{kind}_unknown_ndcg@20"] = float(
                    np.mean([o.metrics["unknown/ndcg@20"] for o in outcomes])
                )
        first = self.scores["full"][0]
        for k in KS:
            row[f"popularity_ndcg@{k}"] = first.metrics[f"popularity/ndcg@{k}"]
        if "popularity_unknown/ndcg@20" in first.metrics:
            row["popularity_unknown_ndcg@20"] = first.metrics["popularity_unknown/ndcg@20"]
        row["model_users"] = int(first.served.sum())
        full = seed_average([o.served_ndcg() for o in self.scores["full"]])
        differences: dict[str, np.ndarray] = {}
        for kind in ("warm", "full_b"):
            if kind not in self.scores:
                continue
            outcomes = self.scores[kind]
            differences[kind] = user_differences(
                seed_average([o.served_ndcg() for o in outcomes]), full
            )
            gap, low, high = mean_interval(differences[kind], resamples, seed=step)
            row[f"{kind}_minus_full_ndcg@20"] = gap
            row[f"{kind}_minus_full_low"], row[f"{kind}_minus_full_high"] = low, high
            if len(outcomes) > 1:
                by_seed = [
                    float(user_differences(mine.served_ndcg(), theirs.served_ndcg()).mean())
                    for mine, theirs in zip(outcomes, self.scores["full"], strict=True)
                ]
                row[f"{kind}_minus_full_by_seed"] = by_seed
                row[f"{kind}_minus_full_seed_low"], row[f"{kind}_minus_full_seed_high"] = (
                    seed_interval(by_seed)
                )
        return differences


def seed_interval(gaps: Sequence[float]) -> tuple[float, float]:
    """The 95% t-interval of the mean of the seeds' gaps (len(gaps) - 1 degrees of
    freedom: with 3 seeds the mean +- 4.30 standard errors)."""
    values = np.asarray(gaps, dtype=float)
    half = t_distribution.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return float(values.mean() - half), float(values.mean() + half)


def replay(
    name: str,
    cfg: DictConfig,
    settings: ContinuousSettings,
    workdir: Path,
    reuse_full: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, tuple[float, float, float]]]:
    """The whole replay on the data of ``cfg``: one row per step (step 0 is the first
    model, trained in full and scored on the first next slice), and the gaps to the
    full retrain over every update's users pooled (``warm``, ``full_b``: the mean
    per-user NDCG@20 difference and its 95% interval). With ``settings.seeds`` > 1, every
    model is trained once per seed and its metrics and per-user NDCG@20 averaged over
    them. Models are written to ``workdir/step<i>/<kind>/seed<s>``; ``reuse_full``: a full
    retrain already there with the same fingerprint (:func:`full_fingerprint`) is loaded,
    not trained again."""
    warm_config(cfg, Path("previous"), settings)  # a bad warm override fails before training
    raw = load_data(OmegaConf.to_container(cfg.data, resolve=True))  # type: ignore[arg-type]
    slices = make_slices(raw, cfg, settings)
    seeds = [int(cfg.seed) + k for k in range(settings.seeds)]
    rows: list[dict[str, Any]] = []
    gaps: dict[str, list[np.ndarray]] = {"warm": [], "full_b": []}
    chains: dict[int, WarmChain] = {}
    for step in range(settings.steps + 1):
        known, next_events = slices.known(step), slices.next(step)
        models = StepModels(
            raw,
            known,
            next_events,
            split_for(known, next_events, cfg),
            data_digest(raw, known),
            settings.unknown_users,
        )
        log.info(
            "%s step %d: %d events up to %s, next slice %d events",
            name,
            step,
            len(known),
            pd.to_datetime(slices.cuts[step], unit="s").date(),
            len(next_events),
        )
        where = workdir / f"step{step}"
        for seed in seeds:
            module, checkpoint = models.retrain(
                cfg, seed, "full", where / "full" / f"seed{seed}", reuse_full
            )
            chain = chains.get(seed)
            if chain is None:  # the first model: the warm chain starts from it
                chains[seed] = WarmChain(module, checkpoint, slices.cuts[step])
                continue
            models.score("stale", chain.module)
            (warm, warm_checkpoint, warm_epochs), seconds = timed(
                warm_update,
                OmegaConf.merge(cfg, {"seed": seed}),
                raw,
                models.split,
                chain.checkpoint,
                chain.since,
                settings,
                where / "warm" / f"seed{seed}",
            )
            if settings.warm_from == "previous":  # the next update starts from this one
                chains[seed] = WarmChain(warm, warm_checkpoint, slices.cuts[step])
            models.score("warm", warm, seconds, warm_epochs)
            if settings.second_full:  # from a seed none of the replays uses
                second = seed + len(seeds)
                models.retrain(cfg, second, "full_b", where / "full" / f"seed{second}", reuse_full)
        row: dict[str, Any] = {
            "dataset": name,
            "step": step,
            "cut": str(pd.to_datetime(slices.cuts[step], unit="s").date()),
            "train_events": len(known),
            "next_events": len(next_events),
            "next_users": int(next_events[USER_ID].nunique()),
            "returning_users": int(
                next_events[USER_ID].drop_duplicates().isin(known[USER_ID]).sum()
            ),
            "seeds": len(seeds),
        }
        for kind, differences in models.fill_row(row, settings.resamples, step).items():
            gaps[kind].append(differences)
        log.info("%s", {k: v for k, v in row.items() if not k.endswith(("@10", "@50"))})
        rows.append(row)
    pooled = {
        model: mean_interval(np.concatenate(differences), settings.resamples)
        for model, differences in gaps.items()
        if differences
    }
    return rows, pooled


def summary(
    rows: Sequence[dict[str, Any]],
    settings: ContinuousSettings,
    pooled: dict[str, dict[str, tuple[float, float, float]]],
) -> dict[str, Any]:
    """Per dataset: the mean and the worst warm - full NDCG@20 gap over the update steps,
    the mean time ratio, whether the target (every gap within ``target_ndcg_gap``) holds;
    from ``pooled`` (:func:`replay`'s second result, by dataset), the gap over every
    update's users with its 95% interval and whether that interval lies above
    ``-target_ndcg_gap``; with a second full retrain, how far it is from the first."""
    out: dict[str, Any] = {}
    for name in dict.fromkeys(row["dataset"] for row in rows):
        updates = [r for r in rows if r["dataset"] == name and "warm_s" in r]
        if not updates:
            continue
        gaps = [r["warm_minus_full_ndcg@20"] for r in updates]
        total: dict[str, Any] = {
            "steps": len(updates),
            "mean_gap": float(np.mean(gaps)),
            "worst_gap": float(min(gaps)),
            "mean_warm_over_full": float(np.mean([r["warm_over_full"] for r in updates])),
            "warm_s": float(np.sum([r["warm_s"] for r in updates])),
            "full_s": float(np.sum([r["full_s"] for r in updates])),
            "target_met": all(g >= -settings.target_ndcg_gap for g in gaps),
        }
        by_model = pooled.get(name, {})
        if "warm" in by_model:
            total["pooled_gap"] = list(by_model["warm"])
            total["pooled_above_target"] = by_model["warm"][1] >= -settings.target_ndcg_gap
        if "full_b" in by_model:
            seconds = [abs(r["full_b_minus_full_ndcg@20"]) for r in updates]
            total["full_b_pooled_gap"] = list(by_model["full_b"])
            total["full_b_mean_abs_gap"] = float(np.mean(seconds))
            total["full_b_worst_abs_gap"] = float(max(seconds))
        out[name] = total
    return out
