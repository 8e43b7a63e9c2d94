"""The continuous-retraining benchmark's statistics: paired per-user gaps, their
bootstrap intervals and the per-dataset summary (the replay itself needs MovieLens and
tens of minutes: ``twotower bench continuous``)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from benchmarks import continuous
from benchmarks.bench_continuous import (
    columns,
    interval_cell,
    unknown_users_text,
    verdict,
    warm_protocol,
)
from benchmarks.continuous import (
    ContinuousSettings,
    cut_points,
    mean_interval,
    split_for_warm,
    summary,
    user_differences,
)
from tests.conftest import TINY_OVERRIDES, compose_config
from towers.data.eval_sets import build_eval_set
from towers.data.sources import load_data
from towers.data.split import Split, prepare_interactions
from towers.evaluation.ranking import popularity_scorer, scores_by_user


def test_differences_pair_users_by_id_and_refuse_different_users() -> None:
    warm = pd.Series([0.5, 0.2, 1.0], index=["a", "b", "c"])
    full = pd.Series([0.1, 0.4, 0.3], index=["c", "a", "b"])
    differences = dict(zip(warm.index, user_differences(warm, full).tolist(), strict=True))
    assert differences == pytest.approx({"a": 0.1, "b": -0.1, "c": 0.9})
    with pytest.raises(ValueError, match="different users"):
        user_differences(warm, pd.Series([0.1, 0.4, 0.3], index=["c", "a", "d"]))


def test_interval_holds_the_mean_narrows_with_more_users_and_is_seeded() -> None:
    rng = np.random.default_rng(0)
    few, many = rng.normal(0.02, 0.1, 40), rng.normal(0.02, 0.1, 4000)
    mean, low, high = mean_interval(few, 500)
    assert low < mean < high and mean == pytest.approx(few.mean())
    _, many_low, many_high = mean_interval(many, 500)
    assert many_high - many_low < (high - low) / 5  # about 1/sqrt(100) as wide
    assert many_low < 0.02 < many_high
    assert mean_interval(few, 500, seed=3) == mean_interval(few, 500, seed=3)


def test_interval_of_values_without_spread_is_the_value_itself() -> None:
    assert mean_interval(np.zeros(5), 100) == (0.0, 0.0, 0.0)
    assert mean_interval(np.array([0.3]), 100) == (0.3, 0.3, 0.3)
    assert all(np.isnan(mean_interval(np.array([]), 100)))


def update(step: int, gap: float, second: float) -> dict[str, object]:
    return {
        "dataset": "d",
        "step": step,
        "warm_minus_full_ndcg@20": gap,
        "full_b_minus_full_ndcg@20": second,
        "warm_minus_full_low": gap - 0.02,
        "warm_minus_full_high": gap + 0.02,
        "warm_s": 10.0,
        "full_s": 100.0,
        "warm_over_full": 0.1,
    }


def test_summary_judges_every_step_and_the_pooled_interval() -> None:
    settings = ContinuousSettings(target_ndcg_gap=0.01)
    rows = [{"dataset": "d", "step": 0}, update(1, -0.005, 0.02), update(2, -0.015, -0.01)]
    pooled = {"d": {"warm": (-0.01, -0.03, 0.01), "full_b": (0.005, -0.01, 0.02)}}
    total = summary(rows, settings, pooled)["d"]
    assert total["steps"] == 2 and total["worst_gap"] == -0.015
    assert total["mean_gap"] == pytest.approx(-0.01)
    assert not total["target_met"]  # step 2 is 0.015 behind
    assert total["pooled_gap"] == [-0.01, -0.03, 0.01]
    assert not total["pooled_above_target"]  # its interval reaches -0.03
    assert total["full_b_mean_abs_gap"] == pytest.approx(0.015)
    assert total["full_b_worst_abs_gap"] == pytest.approx(0.02)
    assert total["warm_s"] == 20.0 and total["full_s"] == 200.0
    text = verdict("d", total, settings)
    assert "; missed)" in text and "[-0.0300, +0.0100] (not above -0.01)" in text
    assert "0.0150 from the first on average" in text

    met = summary([update(1, 0.0, 0.0)], settings, {"d": {"warm": (0.0, -0.005, 0.005)}})["d"]
    assert met["target_met"] and met["pooled_above_target"] and "full_b_mean_abs_gap" not in met
    assert "; met)" in verdict("d", met, settings)


def test_interval_cells_are_blank_where_a_model_was_not_trained() -> None:
    assert interval_cell(update(1, 0.01, 0.0), "warm") == "[-0.010, +0.030]"
    assert interval_cell({"step": 0}, "warm") == ""


def test_warm_validation_holds_out_only_events_after_the_previous_cut() -> None:
    # user a: 6 events before the cut (t 0..5) and 10 after (t 10..19); user b: 8 before,
    # 3 after (fewer than min_interactions); user c: only newer events (12)
    rows = [("a", f"i{t}", t) for t in [*range(6), *range(10, 20)]]
    rows += [("b", f"j{t}", t) for t in [*range(8), 11, 12, 13]]
    rows += [("c", f"k{t}", t) for t in range(10, 22)]
    events = prepare_interactions(pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]))
    split = Split(events, events, events.iloc[:0], events.iloc[:0], np.array([], dtype=object))
    cfg = OmegaConf.create({"split": {"validation_fraction": 0.2, "min_interactions": 5}})
    warm = split_for_warm(split, since=9, cfg=cfg)
    held = warm.validation.groupby("user_id")["timestamp"].apply(list).to_dict()
    assert held == {"a": [18, 19], "c": [20, 21]}  # the last 20% of each user's newer events
    assert len(warm.fit) + len(warm.validation) == len(events)
    assert set(zip(warm.fit["user_id"], warm.fit["timestamp"], strict=True)).isdisjoint(
        zip(warm.validation["user_id"], warm.validation["timestamp"], strict=True)
    )
    assert warm.fit["user_id"].is_monotonic_increasing  # each user's rows together, in time
    assert warm.train is split.train
    with pytest.raises(ValueError, match="no user has 5 events after the starting model's cut"):
        split_for_warm(split, since=20, cfg=cfg)


def test_warm_updates_alone_shrink_and_perturb_the_carried_weights(
    monkeypatch, tmp_path: Path
) -> None:
    seen: dict[str, object] = {}

    def train(cfg, data, epochs, out):  # type: ignore[no-untyped-def]
        seen.update(cfg=cfg, epochs=epochs)
        return "model"

    monkeypatch.setattr(continuous, "train_for_epochs", train)
    monkeypatch.setattr(continuous, "prepared", lambda *args: None)
    cfg = OmegaConf.create({"seed": 0, "init_from": None, "init_shrink": 1.0, "init_perturb": 0.0})
    settings = ContinuousSettings(warm_shrink=0.5, warm_perturb=0.1)
    events = pd.DataFrame({"user_id": [], "item_id": [], "timestamp": []})
    split = Split(events, events, events, events, np.array([], dtype=object))
    out = tmp_path / "out"
    _, checkpoint, epochs = continuous.warm_update(
        cfg, None, split, Path("prev.ckpt"), 0.0, settings, out
    )
    warm_cfg = seen["cfg"]
    assert (warm_cfg.init_from, warm_cfg.init_shrink, warm_cfg.init_perturb) == (
        "prev.ckpt",
        0.5,
        0.1,
    )
    assert (cfg.init_from, cfg.init_shrink) == (None, 1.0)  # the full retrains' config is untouched
    assert (epochs, checkpoint) == (2, out / "last.ckpt")
    assert "0.5 x previous + 0.1 x fresh" in warm_protocol(settings)
    assert "shrunk" not in warm_protocol(ContinuousSettings())


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"warm_validation": "later"}, "warm_validation must be one of"),
        ({"warm_shrink": 0.0}, "init_shrink must be in"),
        ({"warm_perturb": 2.0}, "init_perturb must be in"),
        ({"unknown_users": "skip"}, "unknown_users must be one of"),
        ({"warm_from": "last"}, "warm_from must be one of"),
    ],
)
def test_settings_that_would_fail_at_the_first_update_fail_at_once(settings, message) -> None:
    with pytest.raises(ValueError, match=message):
        ContinuousSettings(**settings)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"warm_overrides": ("model.optimizer.lr",)}, "must be key=value"),
        ({"warm_overrides": ("=1",)}, "must be key=value"),
        ({"warm_overrides": ("seed=3",)}, "seed is set by the replay"),
        ({"warm_overrides": ("init_shrink=0.5",)}, "--warm-shrink"),
        ({"seeds": 0}, "seeds must be at least 1"),
        ({"warm_lr_scale": 0.0}, "warm_lr_scale must be above 0"),
    ],
)
def test_seeds_and_warm_overrides_are_checked_at_once(settings, message) -> None:
    with pytest.raises(ValueError, match=message):
        ContinuousSettings(**settings)


def test_every_next_slice_holds_one_step_of_the_events_the_last_one_too() -> None:
    times = np.arange(1000.0)
    late = cut_points(times, ContinuousSettings())  # 0.8, 0.85, 0.9, 0.95, then the end
    assert late == [799.0, 849.0, 899.0, 949.0, 999.0]
    early = cut_points(times, ContinuousSettings(start=0.65))
    assert early == [649.0, 699.0, 749.0, 799.0, 849.0]  # not the rest of the data
    assert np.diff(early).tolist() == [50.0] * 4
    ragged = cut_points(times, ContinuousSettings(start=0.82))
    assert ragged[-1] == 999.0  # a last slice that would reach past the end stops there
    with pytest.raises(ValueError, match="must stay below 1"):
        cut_points(times, ContinuousSettings(start=0.85))


def test_warm_overrides_change_the_warm_updates_only(monkeypatch, tmp_path: Path) -> None:
    seen: dict[str, object] = {}
    monkeypatch.setattr(continuous, "train_for_epochs", lambda cfg, *_: seen.update(cfg=cfg))
    monkeypatch.setattr(continuous, "prepared", lambda *args: None)
    cfg = OmegaConf.create({"seed": 0, "model": {"optimizer": {"lr": 0.001}}})
    settings = ContinuousSettings(warm_overrides=("model.optimizer.lr=0.0003",))
    events = pd.DataFrame({"user_id": [], "item_id": [], "timestamp": []})
    split = Split(events, events, events, events, np.array([], dtype=object))
    continuous.warm_update(cfg, None, split, Path("prev.ckpt"), 0.0, settings, tmp_path)
    assert seen["cfg"].model.optimizer.lr == 0.0003  # type: ignore[union-attr]
    assert cfg.model.optimizer.lr == 0.001
    assert "with `model.optimizer.lr=0.0003`" in warm_protocol(settings)
    scaled = ContinuousSettings(warm_lr_scale=0.25)
    continuous.warm_update(cfg, None, split, Path("prev.ckpt"), 0.0, scaled, tmp_path)
    assert seen["cfg"].model.optimizer.lr == pytest.approx(0.00025)  # type: ignore[union-attr]
    assert cfg.model.optimizer.lr == 0.001
    assert "at 0.25 x the learning rate" in warm_protocol(scaled)
    both = dataclasses.replace(scaled, warm_overrides=settings.warm_overrides)
    continuous.warm_update(cfg, None, split, Path("prev.ckpt"), 0.0, both, tmp_path)
    assert seen["cfg"].model.optimizer.lr == pytest.approx(0.000075)  # type: ignore[union-attr]


def test_served_by_model_follows_the_retrievers_popularity_fallback() -> None:
    # a bundle keeps the users with events and every user of the user table
    known = pd.DataFrame({"user_id": ["old"], "item_id": ["i1"], "timestamp": [1]})
    users = pd.DataFrame({"user_id": ["old", "described"], "age": [30, 40]})
    ids = np.array(["old", "described", "stranger"], dtype=object)
    assert continuous.served_by_model(ids, known, users).tolist() == [True, True, False]
    assert continuous.served_by_model(ids, known, None).tolist() == [True, False, False]


def slice_scores(ndcg: dict[str, float], unserved: set[str]) -> continuous.SliceScores:
    values = pd.Series(ndcg)
    served = pd.Series([user not in unserved for user in values.index], index=values.index)
    metrics = {f"{m}@{k}": float(values.mean()) for m in ("recall", "ndcg") for k in (10, 20, 50)}
    metrics.update({f"popularity/ndcg@{k}": 0.0 for k in (10, 20, 50)})
    return continuous.SliceScores(metrics, values, served)


def test_gaps_leave_out_the_users_the_models_do_not_serve() -> None:
    # "z" is served by popularity: 0.9 in every model; were it compared, warm's 0.1 there
    # (a model's own ranking) would move the gap
    models = continuous.StepModels(None, None, None, None, "")  # type: ignore[arg-type]
    models.scores = {
        "full": [
            slice_scores({"a": 0.2, "b": 0.4, "z": 0.9}, {"z"}),
            slice_scores({"a": 0.4, "b": 0.2, "z": 0.9}, {"z"}),
        ],
        "warm": [
            slice_scores({"a": 0.3, "b": 0.1, "z": 0.1}, {"z"}),
            slice_scores({"a": 0.5, "b": 0.3, "z": 0.1}, {"z"}),
        ],
    }
    row: dict[str, object] = {}
    differences = models.fill_row(row, resamples=50, step=1)
    assert row["model_users"] == 2
    assert sorted(differences["warm"].tolist()) == pytest.approx([-0.1, 0.1])
    assert row["warm_minus_full_ndcg@20"] == pytest.approx(0.0)
    assert row["warm_minus_full_by_seed"] == pytest.approx([-0.1, 0.1])


def test_users_known_by_nothing_get_popular_items_and_stay_out_of_the_gaps(
    trained, monkeypatch
) -> None:
    real = continuous.module_scores_by_user

    def shifted(*args):  # type: ignore[no-untyped-def]
        users, values = real(*args)  # the model's own metrics, moved out of [0, 1]
        return users, {name: per_user + 10 for name, per_user in values.items()}

    monkeypatch.setattr(continuous, "module_scores_by_user", shifted)
    raw = load_data(OmegaConf.to_container(compose_config(TINY_OVERRIDES).data, resolve=True))
    events = prepare_interactions(raw.interactions, None)
    cut = events["timestamp"].quantile(0.8)
    known, next_events = events[events["timestamp"] <= cut], events[events["timestamp"] > cut]
    described = next_events["user_id"].iloc[0]  # new at the cut, attributes in the table
    known = known[known["user_id"] != described]
    popular = known["item_id"].value_counts().index[:3]  # popularity's top three
    stranger = pd.DataFrame(  # no events before the cut, not in the user table
        {"user_id": "stranger", "item_id": popular, "timestamp": cut + 1}
    )
    next_events = pd.concat([next_events, stranger], ignore_index=True)
    module = trained.module.cpu().eval()

    served = continuous.score_next(module, raw, known, next_events, "popularity")
    own = continuous.score_next(module, raw, known, next_events, "model")
    assert not served.served["stranger"] and served.served[described]
    assert served.served.drop("stranger").all() and own.served.all()
    assert "stranger" not in served.served_ndcg().index
    # the stranger's NDCG@20 is popularity's, everyone else's the model's own
    eval_set = build_eval_set(known, next_events, raw.items, raw.users, module.feature_encoders)
    users, popular = scores_by_user(
        popularity_scorer(eval_set), len(raw.items), eval_set, continuous.KS
    )
    by_user = pd.Series(popular["ndcg@20"], index=users)
    assert served.ndcg["stranger"] == pytest.approx(by_user["stranger"])
    assert own.ndcg["stranger"] >= 10  # the model's own value, not popularity's
    assert served.ndcg.drop("stranger").equals(own.ndcg.drop("stranger"))
    assert served.metrics["ndcg@20"] == pytest.approx(served.ndcg.mean())
    assert served.metrics["unknown/ndcg@20"] == pytest.approx(own.ndcg["stranger"])
    assert served.metrics["popularity/ndcg@20"] == pytest.approx(by_user.mean())
    assert "unknown/ndcg@20" not in own.metrics


def test_seed_average_pairs_users_by_id() -> None:
    first = pd.Series([0.1, 0.2, 0.3], index=["a", "b", "c"])
    second = pd.Series([0.5, 0.6, 0.7], index=["c", "a", "b"])
    averaged = continuous.seed_average([first, second])
    assert averaged.to_dict() == pytest.approx({"a": 0.35, "b": 0.45, "c": 0.4})
    with pytest.raises(ValueError, match="scored different users"):
        continuous.seed_average([first, pd.Series([0.5], index=["a"])])


def test_seed_interval_is_a_t_interval_over_the_seeds() -> None:
    low, high = continuous.seed_interval([0.0, 0.01, 0.02])
    half = 4.302653 * 0.01 / np.sqrt(3)  # t(0.975, 2 degrees of freedom)
    assert (low, high) == pytest.approx((0.01 - half, 0.01 + half))


def test_seed_columns_appear_only_with_several_seeds() -> None:
    assert "warm_minus_full_seeds" not in columns(ContinuousSettings())
    several = columns(ContinuousSettings(seeds=3))
    at = several.index("warm_minus_full_95%")
    assert several[at + 1 : at + 3] == ["warm_minus_full_seeds", "warm_minus_full_seed_95%"]


def test_the_report_says_how_users_known_by_nothing_are_scored() -> None:
    assert "model_users" in columns(ContinuousSettings())
    assert "most popular items" in unknown_users_text(ContinuousSettings())
    assert "model's own ranking" in unknown_users_text(ContinuousSettings(unknown_users="model"))


def test_a_warm_override_the_config_lacks_fails_before_any_training(monkeypatch) -> None:
    def no_data(*args):  # type: ignore[no-untyped-def]
        raise AssertionError("read the data before checking the warm overrides")

    monkeypatch.setattr(continuous, "load_data", no_data)
    cfg = compose_config(TINY_OVERRIDES)
    settings = ContinuousSettings(warm_overrides=("model.optimiser.lr=0.001",))
    with pytest.raises(Exception, match="optimiser"):
        continuous.replay("tiny", cfg, settings, Path("unused"))


def test_a_full_retrains_fingerprint_does_not_depend_on_where_it_writes() -> None:
    def fingerprint(*overrides: str) -> str:
        cfg = compose_config([*TINY_OVERRIDES, *overrides])
        return continuous.full_fingerprint(cfg, "data")

    here = fingerprint("paths.output_dir=outputs/bench")
    # export.bundle_dir is ${paths.output_dir}/bundle: the spelling of the workdir used to
    # give the same retrain another fingerprint, and --reuse-full trained it again
    assert fingerprint("paths.output_dir=./outputs/bench") == here
    assert fingerprint("paths.output_dir=/elsewhere/bench") == here
    assert fingerprint("paths.output_dir=outputs/bench", "seed=7") != here
    assert fingerprint("paths.output_dir=outputs/bench", "trainer.max_epochs=3") != here


def test_seeded_replay_averages_the_seeds_and_reuses_its_full_retrains(
    tmp_path: Path, monkeypatch
) -> None:
    cfg = compose_config(
        [*TINY_OVERRIDES, "trainer.max_epochs=2", "logger=none", f"paths.output_dir={tmp_path}"]
    )
    settings = ContinuousSettings(
        start=0.8, step=0.08, steps=2, warm_epochs=1, second_full=0, seeds=2, resamples=50
    )
    rows, pooled = continuous.replay("tiny", cfg, settings, tmp_path, reuse_full=True)
    update = rows[1]
    by_seed = update["warm_minus_full_by_seed"]
    assert update["seeds"] == 2 and len(by_seed) == 2
    assert update["warm_minus_full_ndcg@20"] == pytest.approx(np.mean(by_seed))
    assert update["warm_ndcg@20"] - update["full_ndcg@20"] == pytest.approx(np.mean(by_seed))
    assert update["model_users"] == update["next_users"]  # every synthetic user has attributes
    step_gaps = [row["warm_minus_full_ndcg@20"] for row in rows[1:]]
    assert min(step_gaps) - 1e-12 <= pooled["warm"][0] <= max(step_gaps) + 1e-12
    low, high = continuous.seed_interval(by_seed)
    assert (update["warm_minus_full_seed_low"], update["warm_minus_full_seed_high"]) == (low, high)
    assert {p.parent.name for p in tmp_path.glob("step*/full/seed*/full.json")} == {
        "seed42",
        "seed43",
    }

    def no_training(*args):  # type: ignore[no-untyped-def]
        raise AssertionError("a full retrain with the same fingerprint was trained again")

    monkeypatch.setattr(continuous, "select_and_refit", no_training)
    again, _ = continuous.replay("tiny", cfg, settings, tmp_path, reuse_full=True)
    for before, after in zip(rows, again, strict=True):  # the loaded models score the same
        assert {k: v for k, v in after.items() if k not in ("warm_s", "warm_over_full")} == {
            k: v for k, v in before.items() if k not in ("warm_s", "warm_over_full")
        }

    # other warm updates into the same directory: each starts from this replay's previous
    # warm model, not from the one an earlier replay left there
    starts: list[Path] = []
    train = continuous.train_for_epochs

    def recording(cfg, *args):  # type: ignore[no-untyped-def]
        starts.append(Path(cfg.init_from))
        return train(cfg, *args)

    monkeypatch.setattr(continuous, "train_for_epochs", recording)
    began = time.time()
    scaled = dataclasses.replace(settings, warm_lr_scale=0.5)
    continuous.replay("tiny", cfg, scaled, tmp_path, reuse_full=True)
    chained = [start for start in starts if start.parts[-3] == "warm"]
    assert len(chained) == 2  # step 2 of both seeds
    assert all(start.stat().st_mtime >= began for start in chained)
    assert not list(tmp_path.rglob("*-v*.ckpt"))

    longer = OmegaConf.merge(cfg, {"trainer": {"max_epochs": 3}})  # another fingerprint
    with pytest.raises(AssertionError, match="trained again"):
        continuous.replay("tiny", longer, settings, tmp_path, reuse_full=True)


def test_warm_updates_from_the_first_model_all_start_from_it(tmp_path: Path, monkeypatch) -> None:
    cfg = compose_config(
        [*TINY_OVERRIDES, "trainer.max_epochs=2", "logger=none", f"paths.output_dir={tmp_path}"]
    )
    settings = ContinuousSettings(
        start=0.8, step=0.08, steps=2, warm_epochs=1, second_full=0, resamples=50
    )
    starts: list[tuple[Path, float]] = []
    update = continuous.warm_update

    def recording(cfg, raw, split, previous, since, *args):  # type: ignore[no-untyped-def]
        starts.append((Path(previous), since))
        return update(cfg, raw, split, previous, since, *args)

    monkeypatch.setattr(continuous, "warm_update", recording)
    chained, _ = continuous.replay("tiny", cfg, settings, tmp_path / "chain")
    anchored, _ = continuous.replay(
        "tiny", cfg, dataclasses.replace(settings, warm_from="first"), tmp_path / "first"
    )
    (chain_1, cut_0), (chain_2, cut_1), (first_1, since_1), (first_2, since_2) = starts
    assert chain_2.parts[-3:-1] == ("warm", "seed42") and cut_1 > cut_0  # a chain
    assert first_1 == first_2 and "full" in first_2.parts  # both from the first model
    assert chain_1.relative_to(tmp_path / "chain") == first_1.relative_to(tmp_path / "first")
    assert since_1 == since_2 == cut_0  # the events after the first cut are new to it
    # the same first update
    assert chained[1]["warm_ndcg@20"] == pytest.approx(anchored[1]["warm_ndcg@20"])
