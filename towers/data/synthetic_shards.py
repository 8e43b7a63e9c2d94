"""Synthetic data at scale, written as Parquet shards in O(events) time and bounded memory.

The built-in generator (:mod:`towers.data.synthetic`) draws every event with a Gumbel-max
over the whole catalogue: O(events x items), fine for the default 90k events, hopeless
for the scale ladder (2M events x 20k items did not finish in 10 minutes). This one
plants the same structure — topics, Zipf-like popularity, region- and age-driven taste,
two interests per user, sessions and drift — but draws each event in two steps:

1. a topic from the session's interest, sharpened as the built-in generator's logits are
   (``softmax(taste_sharpness * sqrt(n_topics) * interest)``);
2. an item of that primary topic, in proportion to ``exp(popularity_weight * popularity)``
   (a binary search in the topic's cumulative weights).

So an event costs O(n_topics + log items). Users are generated in chunks of
``users_per_shard``, each chunk written as one interactions shard, so memory stays
bounded by one chunk whatever the total. The output is a directory::

    interactions/part-00000.parquet ...   user_id, item_id, timestamp (sorted by user, time)
    items.parquet                         item_id, category, tags, quality
    users.parquet                         user_id, region, age

which ``data=csv data.interactions=DIR/interactions data.items=DIR/items.parquet
data.users=DIR/users.parquet`` reads (a directory of Parquet shards is one table).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from towers.data.schema import ITEM_ID, TIMESTAMP, USER_ID

log = logging.getLogger(__name__)

_DAY = 86_400.0
INTERACTIONS_DIR = "interactions"
ITEMS_FILE = "items.parquet"
USERS_FILE = "users.parquet"
SETTINGS_FILE = "synthetic.json"


@dataclass(frozen=True)
class ShardedSyntheticSettings:
    """Sizes and knobs of :func:`write_synthetic_shards` (see the module doc)."""

    n_users: int = 50_000
    n_items: int = 10_000
    n_topics: int = 12
    n_regions: int = 6
    mean_events_per_user: float = 20.0
    min_events_per_user: int = 5
    mean_session_length: float = 6.0
    taste_sharpness: float = 4.0
    popularity_weight: float = 1.0
    users_per_shard: int = 250_000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_users <= 0 or self.n_items <= 0 or self.n_topics <= 0:
            raise ValueError("n_users, n_items and n_topics must be positive")
        if self.users_per_shard <= 0:
            raise ValueError(f"users_per_shard must be positive, got {self.users_per_shard}")


def _ids(prefix: str, numbers: np.ndarray) -> pa.Array:
    """``prefix + str(n)`` for each number, built in Arrow (no Python loop)."""
    import pyarrow.compute as pc

    return pc.binary_join_element_wise(
        pa.scalar(prefix), pc.cast(pa.array(numbers, pa.int64()), pa.string()), ""
    )


def _dirichlet_rows(rng: np.random.Generator, alpha: np.ndarray) -> np.ndarray:
    """One Dirichlet draw per row of ``alpha`` (vectorised through Gamma draws)."""
    draws = rng.gamma(alpha)
    return draws / draws.sum(axis=1, keepdims=True)


@dataclass
class _Catalogue:
    """What event sampling needs of the items: per-topic cumulative popularity."""

    order: np.ndarray  # item numbers sorted by primary topic
    cumulative: np.ndarray  # topic t's segment holds t + cumulative share, in (t, t + 1]

    def draw(self, topics: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """An item of each given topic, in proportion to its popularity weight."""
        position = np.searchsorted(self.cumulative, topics + rng.random(len(topics)))
        return self.order[np.minimum(position, len(self.order) - 1)]


def _items(s: ShardedSyntheticSettings, rng: np.random.Generator) -> tuple[pa.Table, _Catalogue]:
    primary = rng.integers(0, s.n_topics, s.n_items)
    # every topic needs an item to draw; give empty topics one each (tiny catalogues only)
    missing = np.setdiff1d(np.arange(s.n_topics), primary)
    primary[: len(missing)] = missing
    popularity = -0.6 * np.log1p(rng.permutation(s.n_items).astype(float))
    popularity -= popularity.mean()
    second = (primary + 1 + rng.integers(0, s.n_topics - 1, s.n_items)) % max(s.n_topics, 2)
    noise = np.where(rng.random(s.n_items) < 0.2, rng.integers(0, s.n_topics, s.n_items), -1)
    tag_lists = [
        sorted({f"t{a}", f"t{b}"} | ({f"t{n}"} if n >= 0 else set()))
        for a, b, n in zip(primary.tolist(), second.tolist(), noise.tolist(), strict=True)
    ]
    table = pa.table(
        {
            ITEM_ID: _ids("i", np.arange(s.n_items)),
            "category": _ids("c", primary),
            "tags": pa.array(["|".join(tags) for tags in tag_lists], pa.string()),
            "quality": np.round(popularity + rng.normal(0.0, 0.5, s.n_items), 3),
        }
    )
    order = np.argsort(primary, kind="stable")
    weights = np.exp(s.popularity_weight * popularity[order])
    topic_of = primary[order]
    totals = np.bincount(topic_of, weights=weights, minlength=s.n_topics)
    cumulative = np.cumsum(weights)
    segment_start = np.concatenate([[0.0], np.cumsum(totals)[:-1]])
    share = (cumulative - segment_start[topic_of]) / totals[topic_of]
    return table, _Catalogue(order, topic_of + share)


def _user_chunk(
    s: ShardedSyntheticSettings,
    rng: np.random.Generator,
    first: int,
    count: int,
    region_mix: np.ndarray,
    catalogue: _Catalogue,
) -> tuple[pa.Table, pa.Table]:
    """Users ``first .. first+count-1`` and all their events."""
    region = rng.integers(0, s.n_regions, count)
    age = rng.integers(18, 70, count)
    mix = region_mix[region]
    old = age >= 45
    mix[old] = np.roll(mix[old], 1, axis=1)  # older users lean to the next topic
    interests = np.stack(
        [_dirichlet_rows(rng, 1.0 + 20.0 * mix), _dirichlet_rows(rng, 1.0 + 20.0 * mix)], axis=1
    )
    logits = s.taste_sharpness * math.sqrt(s.n_topics) * interests
    topic_p = np.exp(logits - logits.max(axis=2, keepdims=True))
    topic_cdf = np.cumsum(topic_p / topic_p.sum(axis=2, keepdims=True), axis=2)

    counts = s.min_events_per_user + rng.poisson(
        max(0.0, s.mean_events_per_user - s.min_events_per_user), count
    )
    user = np.repeat(np.arange(count), counts)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    position = np.arange(len(user)) - np.repeat(starts, counts)
    lifetime = position / np.maximum(np.repeat(counts, counts) - 1, 1)
    new_session = (position == 0) | (rng.random(len(user)) < 1.0 / s.mean_session_length)
    session = np.cumsum(new_session) - 1
    follows_second = (rng.random(session[-1] + 1) < 0.15 + 0.7 * lifetime[new_session])[session]
    cdf = topic_cdf[user, follows_second.astype(np.int64)]
    topics = np.minimum((cdf < rng.random(len(user))[:, None]).sum(axis=1), s.n_topics - 1)
    items = catalogue.draw(topics, rng)

    gaps = np.where(
        new_session, rng.exponential(3 * _DAY, len(user)), rng.exponential(600.0, len(user))
    )
    gaps[position == 0] = rng.uniform(0, 120 * _DAY, count)
    total = np.cumsum(gaps)
    times = 1_600_000_000.0 + np.floor(total - np.repeat(total[starts] - gaps[starts], counts))
    numbers = first + np.arange(count)
    users = pa.table(
        {USER_ID: _ids("u", numbers), "region": _ids("r", region), "age": age.astype(np.int64)}
    )
    events = pa.table(
        {
            USER_ID: _ids("u", numbers[user]),
            ITEM_ID: _ids("i", items),
            TIMESTAMP: times,
        }
    )
    return users, events


def write_synthetic_shards(
    directory: str | Path, settings: ShardedSyntheticSettings | None = None
) -> Path:
    """Write the interactions shards, the item table and the user table under ``directory``
    (created; it must not exist yet, or be empty). Returns the directory."""
    s = settings or ShardedSyntheticSettings()
    root = Path(directory)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root}: exists and is not empty")
    (root / INTERACTIONS_DIR).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(s.seed)
    items, catalogue = _items(s, rng)
    pq.write_table(items, root / ITEMS_FILE)
    region_mix = _dirichlet_rows(rng, np.full((s.n_regions, s.n_topics), 0.4))
    user_tables: list[pa.Table] = []
    n_events = 0
    shards = range(0, s.n_users, s.users_per_shard)
    for shard, first in enumerate(tqdm(shards, desc="synthetic shards", unit="shard")):
        count = min(s.users_per_shard, s.n_users - first)
        chunk_rng = np.random.default_rng([s.seed, shard])
        users, events = _user_chunk(s, chunk_rng, first, count, region_mix, catalogue)
        pq.write_table(events, root / INTERACTIONS_DIR / f"part-{shard:05d}.parquet")
        user_tables.append(users)
        n_events += events.num_rows
    pq.write_table(pa.concat_tables(user_tables), root / USERS_FILE)
    (root / SETTINGS_FILE).write_text(json.dumps({**asdict(s), "events": n_events}, indent=2))
    log.info(
        "wrote %d events of %d users over %d items to %s", n_events, s.n_users, s.n_items, root
    )
    return root
