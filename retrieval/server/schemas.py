"""The HTTP contract: every request and response is a Pydantic model, unknown fields
are refused, and numbers that are not finite are a 422."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from retrieval.requests import MAX_K

MAX_BATCH = 256
MAX_ID_LENGTH = 256


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScoredItem(Strict):
    item_id: str
    score: float


class Recommendation(Strict):
    user_id: str | None = None
    served_by: Literal["model", "history", "popularity"] = Field(
        "model",
        description=(
            "what produced the list: the model (a known user or given attributes), the "
            "user tower on recent items alone (history), or the popularity fallback "
            "(nothing known about the user, or an unknown item for /similar; scores are "
            "training counts, not cosines)"
        ),
    )
    items: list[ScoredItem]


class UserQuery(Strict):
    user_id: str | None = Field(None, min_length=1, max_length=MAX_ID_LENGTH)
    history: list[str] | None = Field(
        None, max_length=1000, description="recent item ids, oldest first"
    )
    user_features: dict[str, str | int | float | bool | None] | None = None


class RecommendRequest(Strict):
    users: list[UserQuery] = Field(min_length=1, max_length=MAX_BATCH)
    k: int = Field(10, ge=1, le=MAX_K)
    exclude_seen: bool = True
    exclude: list[str] | None = Field(None, max_length=10_000)
    filter: dict[str, str | int | float | list[str | int | float]] | None = None
    search_params: dict[str, int | float] | None = None
    new_item_boost: float = Field(
        0.0,
        allow_inf_nan=False,
        description="added to the scores of items without a training event",
    )


class RecommendResponse(Strict):
    results: list[Recommendation]


class Event(Strict):
    user_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    item_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    timestamp: float | None = None


class EventsRequest(Strict):
    events: list[Event] = Field(min_length=1, max_length=10_000)


class EventsResponse(Strict):
    accepted: int


class ItemsRequest(Strict):
    items: list[dict[str, str | int | float | bool | None]] = Field(min_length=1, max_length=10_000)


class ItemsResponse(Strict):
    added: int
    catalogue_size: int


class RemoveRequest(Strict):
    item_ids: list[Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH)]] = Field(
        min_length=1, max_length=10_000
    )


class RemoveResponse(Strict):
    removed: int = Field(description="items newly hidden (unknown or hidden ones are not)")
    catalogue_size: int


class ReloadRequest(Strict):
    bundle: str | None = Field(
        None,
        min_length=1,
        max_length=255,
        description="name of a bundle under the server's bundle root (e.g. latest); "
        "default: the bundle being served",
    )


class Status(Strict):
    status: str
    bundle: str | None = Field(None, description="the served bundle's name under the root")
    created_at: str | None = Field(None, description="when the served bundle was exported")
    items: int | None = None
    detail: str | None = None
    worker: int | None = Field(None, description="process id of the worker that answered")


