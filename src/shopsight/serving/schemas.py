"""The HTTP API's request and response bodies.

Requests are strict (no coercion of ``"5"`` to 5, no unknown fields) and bounded, so that anything a
client can send that the models cannot answer is a 422 naming the field, never a 500. Every response
names the model version that produced it.
"""

from __future__ import annotations

import functools
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

MAX_K = 100
MAX_USER_ID = 2**63 - 1  # the online store keys users as int64
DEFAULT_MAX_USER_IDS = 100

UserId = Annotated[int, Field(ge=0, le=MAX_USER_ID, description="A shopper's user_id (int64).")]
Variant = Literal["champion", "challenger"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RecommendationRequest(_Request):
    """The next items one user is likely to act on."""

    user_id: UserId
    k: int = Field(10, ge=1, le=MAX_K, description="How many items to return (1..100).")
    exclude_seen: bool = Field(True, description="Leave out items already in the user's recent history.")


def _user_ids_description(most: int) -> str:
    return f"Users to score, in answer order: at most {most} (more is a 422 naming the limit)."


class PropensityRequest(_Request):
    """The probability of a task's label for several users (at most ``serving.max_user_ids``)."""

    user_ids: list[UserId] = Field(
        ...,
        min_length=1,
        max_length=DEFAULT_MAX_USER_IDS,
        description=_user_ids_description(DEFAULT_MAX_USER_IDS),
    )


def propensity_request_model(max_user_ids: int) -> type[PropensityRequest]:
    """:class:`PropensityRequest` with the configured bound on ``user_ids`` (also in the OpenAPI spec)."""
    if max_user_ids == DEFAULT_MAX_USER_IDS:
        return PropensityRequest
    return create_model(
        "PropensityRequest",
        __base__=PropensityRequest,
        __doc__=PropensityRequest.__doc__,
        user_ids=(
            list[UserId],
            Field(
                ..., min_length=1, max_length=max_user_ids, description=_user_ids_description(max_user_ids)
            ),
        ),
    )


class ModelRef(_Response):
    """The registered model version that answered."""

    name: str = Field(description="Registered model name in MLflow.")
    version: str = Field(description="Registered model version.")
    alias: Variant = Field(description="Which alias it was served as.")


class ScoredItem(_Response):
    item_id: int
    score: float


_FEATURES_UNAVAILABLE = (
    "True when the online feature store could not be read (down, or slower than its client's timeout): "
    "the answer is the fallback for users without history, not an error; the next request reads the store "
    "again."
)


class RecommendationResponse(_Response):
    user_id: int
    items: list[ScoredItem] = Field(description="Best first; fewer than k when fewer items qualify.")
    model: ModelRef
    fallback: bool = Field(
        description="True when the user has no history the model knows, or none could be read "
        "(`features_unavailable`): the items are the most popular ones."
    )
    source: Literal["model", "popularity", "model_prior"] = Field(
        description="model: the network on the user's history; popularity: item popularity (no history); "
        "model_prior: the network on an empty history (no history and no item popularity online)."
    )
    features_unavailable: bool = Field(False, description=_FEATURES_UNAVAILABLE)


class UserProbability(_Response):
    user_id: int
    probability: float = Field(
        description="Calibrated probability of the task's label (e.g. buying tomorrow, churning)."
    )
    has_history: bool = Field(
        description="False when the online store holds no features of the user, or could not be read "
        "(`features_unavailable`): a fallback, the model scores an empty history."
    )


class PropensityResponse(_Response):
    predictions: list[UserProbability]
    model: ModelRef
    as_of: datetime = Field(description="The instant the recency features were computed for (UTC).")
    features_unavailable: bool = Field(False, description=_FEATURES_UNAVAILABLE)


class ServedVersion(_Response):
    version: str
    run_id: str | None = None
    loaded_at: datetime


class ServedModel(_Response):
    name: str = Field(description="Registered model name.")
    champion: ServedVersion | None = Field(description="None: no champion yet (requests get 503).")
    challenger: ServedVersion | None = Field(description="Loaded only when canary or shadow routing is on.")
    canary_share: float
    shadow: bool
    error: str | None = Field(
        None, description="The last problem resolving or loading its versions, if any (details: server log)."
    )
    champion_error: str | None = Field(
        None,
        description="Why the version the champion alias points at is not the one served (no such alias, "
        "or it cannot be loaded; an older champion may still answer); None: it is served.",
    )


@functools.cache
def models_response_model(tasks: tuple[str, ...]) -> type[_Response]:
    """The body of ``GET /v1/models``: one :class:`ServedModel` per served task, named after it."""
    return create_model(
        "ModelsResponse",
        __base__=_Response,
        __doc__="The model versions served, per task.",
        **{task: (ServedModel, ...) for task in tasks},
    )


class HealthResponse(_Response):
    status: Literal["ok", "degraded"] = Field(
        description="degraded (HTTP 503): a model has no loadable champion: none is loaded, or the version "
        "the champion alias points at cannot be loaded."
    )
    models: dict[str, str | None] = Field(description="Champion version served per model (None: none).")
    problems: dict[str, str] = Field(
        default_factory=dict,
        description="Why each degraded model is degraded (`*`: the models did not answer).",
    )


class ErrorResponse(_Response):
    error: str
    detail: list | str | None = None
