"""Built-in synthetic data with planted structure, so that learning is measurable.

What is planted (all seeded):

- **Topics.** Items live in a space of ``n_topics`` latent topics. Each item has a
  primary topic (its ``category`` attribute), a topic vector concentrated on it, and
  ``tags`` naming its two strongest topics (plus a noise tag now and then).
- **Popularity skew.** Each item has a Zipf-like popularity bias; the numeric
  ``quality`` attribute is that bias plus noise, so attributes also predict popularity.
- **User attributes drive taste.** A user's ``region`` fixes a preferred topic mix and
  ``age`` shifts it; each user draws two interests from that mix.
- **Sessions and drift.** Events come in sessions; each session follows one interest,
  and the chance of following the second interest grows over the user's lifetime, so
  recent events predict the next ones better than old ones.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from towers.data.schema import ITEM_ID, TIMESTAMP, USER_ID, RawData
from twotower.encoding import FeatureColumns

_DAY = 86_400.0


def generate_synthetic(
    n_users: int = 3000,
    n_items: int = 1500,
    n_topics: int = 12,
    n_regions: int = 6,
    mean_events_per_user: float = 30.0,
    min_events_per_user: int = 5,
    mean_session_length: float = 6.0,
    taste_sharpness: float = 4.0,
    popularity_weight: float = 1.0,
    seed: int = 0,
) -> RawData:
    """Interactions, items and users with the planted structure described in the module doc."""
    rng = np.random.default_rng(seed)

    # Items: topic vectors concentrated on a primary topic, Zipf-like popularity.
    primary = rng.integers(0, n_topics, n_items)
    item_topics = rng.dirichlet(np.full(n_topics, 0.3), n_items) * 0.5
    item_topics[np.arange(n_items), primary] += 1.0
    item_topics /= np.linalg.norm(item_topics, axis=1, keepdims=True)
    popularity = -0.6 * np.log1p(rng.permutation(n_items).astype(float))
    popularity -= popularity.mean()
    strongest = np.argsort(-item_topics, axis=1)[:, :2]
    noise_tag = np.where(rng.random(n_items) < 0.2, rng.integers(0, n_topics, n_items), -1)
    tags = [
        "|".join(sorted({f"t{a}", f"t{b}"} | ({f"t{n}"} if n >= 0 else set())))
        for (a, b), n in zip(strongest, noise_tag, strict=True)
    ]
    items = pd.DataFrame(
        {
            ITEM_ID: [f"i{i}" for i in range(n_items)],
            "category": [f"c{p}" for p in primary],
            "tags": tags,
            "quality": np.round(popularity + rng.normal(0.0, 0.5, n_items), 3),
        }
    )

    # Users: region -> topic preferences; age shifts them; two interests each.
    region = rng.integers(0, n_regions, n_users)
    age = rng.integers(18, 70, n_users)
    region_mix = rng.dirichlet(np.full(n_topics, 0.4), n_regions)
    age_shift = np.roll(np.eye(n_topics), 1, axis=1)  # older users lean to the next topic
    old = (age >= 45)[:, None]
    user_mix = np.where(old, region_mix[region] @ age_shift, region_mix[region])
    interests = np.stack(
        [
            np.stack([rng.dirichlet(1.0 + 20.0 * mix) for mix in user_mix]),
            np.stack([rng.dirichlet(1.0 + 20.0 * mix) for mix in user_mix]),
        ],
        axis=1,
    )  # (users, 2, topics)
    users = pd.DataFrame(
        {
            USER_ID: [f"u{u}" for u in range(n_users)],
            "region": [f"r{r}" for r in region],
            "age": age,
        }
    )

    # Events: sessions following one interest; the second interest takes over with time.
    counts = min_events_per_user + rng.poisson(
        max(0.0, mean_events_per_user - min_events_per_user), n_users
    )
    event_user = np.repeat(np.arange(n_users), counts)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    position = np.arange(len(event_user)) - np.repeat(starts, counts)
    lifetime = position / np.maximum(np.repeat(counts, counts) - 1, 1)
    new_session = (position == 0) | (rng.random(len(event_user)) < 1.0 / mean_session_length)
    session_id = np.cumsum(new_session) - 1
    session_choice = rng.random(session_id[-1] + 1)
    session_lifetime = lifetime[new_session]
    follows_second = (session_choice < 0.15 + 0.7 * session_lifetime)[session_id]
    event_taste = interests[event_user, follows_second.astype(int)]

    chosen = np.empty(len(event_user), dtype=np.int64)
    for lo in range(0, len(event_user), 8192):
        hi = min(lo + 8192, len(event_user))
        logits = taste_sharpness * (event_taste[lo:hi] @ item_topics.T) * n_topics**0.5
        logits += popularity_weight * popularity
        chosen[lo:hi] = np.argmax(logits + rng.gumbel(size=logits.shape), axis=1)

    gaps = np.where(
        new_session,
        rng.exponential(3 * _DAY, len(event_user)),
        rng.exponential(600.0, len(event_user)),
    )
    gaps[position == 0] = rng.uniform(0, 120 * _DAY, n_users)
    times = 1_600_000_000.0 + np.floor(
        np.cumsum(gaps) - np.repeat(np.cumsum(gaps)[starts] - gaps[starts], counts)
    )
    interactions = pd.DataFrame(
        {
            USER_ID: users[USER_ID].to_numpy()[event_user],
            ITEM_ID: items[ITEM_ID].to_numpy()[chosen],
            TIMESTAMP: times,
        }
    )
    return RawData(
        interactions,
        items,
        users,
        FeatureColumns(categorical=["category"], multi_hot=["tags"], numeric=["quality"]),
        FeatureColumns(categorical=["region"], numeric=["age"]),
        "synthetic",
        {"seed": str(seed)},
    )
