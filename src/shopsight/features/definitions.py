"""The Feast repository, defined in code: entities, sources, feature views, feature services.

Nothing here touches a store; :func:`repository` returns the objects for ``FeatureStore.apply``.
Sources point at the feature build's output (``<data_dir>/features/<table>``): file sources in the
``local`` profile, Spark sources in ``cluster``. The user activity and sequence views are fed by
push sources, so fresh events reach the online store without a batch run.

Every field has a description and every view an owner, so that other teams can read the catalog
(``shopsight features describe NAME``) without reading this file.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureService, FeatureView, Field, FileSource, PushSource, ValueType
from feast.types import Array, Bool, Float32, Float64, Int64, String

from shopsight.data.schema import BEHAVIORS
from shopsight.features.jobs import CREATED_TS, DAY_PARTS, SNAPSHOT_TS
from shopsight.platform import Settings

OWNER = "shopsight_features"  # a team: the one whose key may change these definitions and grant reads
EMBEDDING_OWNER = "shopsight_training"  # written by the training side's embedding job
PLATFORM_OWNERS = (OWNER, EMBEDDING_OWNER)
# A snapshot row is valid until the next day's row replaces it; two days tolerate a late build.
SNAPSHOT_TTL = timedelta(days=2)

_OWNED = {"owner": OWNER}
user = Entity(
    name="user", join_keys=["user_id"], value_type=ValueType.INT64, description="A shopper.", tags=_OWNED
)
item = Entity(
    name="item",
    join_keys=["item_id"],
    value_type=ValueType.INT64,
    description="A catalogue item.",
    tags=_OWNED,
)
category = Entity(
    name="category",
    join_keys=["category_id"],
    value_type=ValueType.INT64,
    description="An item category.",
    tags=_OWNED,
)

_BEHAVIOR_WORDS = {"pv": "page views", "cart": "add-to-carts", "fav": "add-to-favourites", "buy": "purchases"}


def _field(name, dtype, description, owner=OWNER) -> Field:
    return Field(name=name, dtype=dtype, description=description, tags={"owner": owner})


def user_activity_fields(windows) -> list[Field]:
    fields = []
    for w in windows:
        span = f"in the last {w} day{'s' if w > 1 else ''} before the snapshot"
        fields += [_field(f"n_{b}_{w}d", Int64, f"Number of {_BEHAVIOR_WORDS[b]} {span}.") for b in BEHAVIORS]
        fields += [
            _field(f"n_items_{w}d", Int64, f"Distinct items acted on {span}."),
            _field(f"n_categories_{w}d", Int64, f"Distinct categories acted on {span}."),
            _field(f"active_days_{w}d", Int64, f"Days with at least one event {span}."),
            _field(f"n_sessions_{w}d", Int64, f"Sessions (30 min inactivity gap) started {span}."),
            _field(f"mean_session_events_{w}d", Float64, f"Events per session {span} (0 if none)."),
            _field(f"cvr_buy_pv_{w}d", Float64, f"Smoothed purchase/view rate (buys+1)/(views+45) {span}."),
            _field(
                f"cvr_buy_cart_{w}d", Float64, f"Smoothed purchase/cart rate (buys+1.1)/(carts+3) {span}."
            ),
        ]
    widest = max(windows)
    fields += [
        _field(
            f"share_{p}", Float64, f"Share of the last {widest} days' events in the {p} (shop-local time)."
        )
        for p in DAY_PARTS
    ]
    fields += [
        _field(
            f"hours_since_{b}",
            Float64,
            f"Hours since the last of the user's {_BEHAVIOR_WORDS[b]}; null if none.",
        )
        for b in BEHAVIORS
    ]
    fields += [
        _field(
            "top_categories", Array(Int64), f"The 3 categories with most events in the last {widest} days."
        ),
        _field("top_category_share", Float64, "Share of those events in the top category."),
        _field("n_carted_not_bought", Int64, "Distinct items carted and not bought since."),
    ]
    return fields


SEQUENCE_FIELDS = [
    _field("seq_item_ids", Array(Int64), "The user's last events' item ids, oldest first (at most 50)."),
    _field("seq_category_ids", Array(Int64), "Categories of those items, aligned with seq_item_ids."),
    _field("seq_behaviors", Array(String), "Behaviours (pv/cart/fav/buy) of those events, aligned."),
    _field("seq_ts", Array(Int64), "Unix seconds of those events, aligned."),
    _field("seq_length", Int64, "Number of events in the sequence."),
]


def _stats_fields(windows, what) -> list[Field]:
    fields = []
    for w in windows:
        span = f"in the last {w} day{'s' if w > 1 else ''}"
        fields += [
            _field(f"n_{b}_{w}d", Int64, f"{_BEHAVIOR_WORDS[b].capitalize()} of the {what} {span}.")
            for b in BEHAVIORS
        ]
        fields.append(_field(f"n_users_{w}d", Int64, f"Distinct users acting on the {what} {span}."))
    fields.append(
        _field(
            f"cvr_buy_pv_{max(windows)}d",
            Float64,
            f"Smoothed purchase/view rate of the {what}, last {max(windows)} days.",
        )
    )
    return fields


def _source(settings: Settings, table: str):
    path = Path(settings.data_dir).absolute() / "features" / table
    if settings.feast.offline_store == "spark":
        from feast.infra.offline_stores.contrib.spark_offline_store.spark_source import SparkSource

        return SparkSource(
            name=f"{table}_source",
            path=str(path),
            file_format="parquet",
            timestamp_field=SNAPSHOT_TS,
            created_timestamp_column=CREATED_TS,
            tags=_OWNED,
        )
    return FileSource(
        name=f"{table}_source",
        path=str(path),
        timestamp_field=SNAPSHOT_TS,
        created_timestamp_column=CREATED_TS,
        tags=_OWNED,
    )


def repository(settings: Settings) -> list:
    """Every Feast object of the repository, for ``FeatureStore.apply``."""
    windows = settings.features.windows
    activity_push = PushSource(
        name="user_activity_push", batch_source=_source(settings, "user_activity"), tags=_OWNED
    )
    sequence_push = PushSource(
        name="user_sequence_push", batch_source=_source(settings, "user_sequence"), tags=_OWNED
    )
    tags = {"owner": OWNER}

    user_activity = FeatureView(
        name="user_activity",
        entities=[user],
        ttl=SNAPSHOT_TTL,
        source=activity_push,
        online=True,
        tags=tags,
        schema=[Field(name="user_id", dtype=Int64), *user_activity_fields(windows)],
        description="Daily snapshot of each user's activity: counts, sessions, conversion, recency.",
    )
    user_sequence = FeatureView(
        name="user_sequence",
        entities=[user],
        ttl=SNAPSHOT_TTL,
        source=sequence_push,
        online=True,
        tags=tags,
        schema=[Field(name="user_id", dtype=Int64), *SEQUENCE_FIELDS],
        description="Each user's most recent behaviour sequence, for the sequence models.",
    )
    item_stats = FeatureView(
        name="item_stats",
        entities=[item],
        ttl=SNAPSHOT_TTL,
        source=_source(settings, "item_stats"),
        online=True,
        schema=[
            Field(name="item_id", dtype=Int64),
            *_stats_fields(windows, "item"),
            _field("category_id", Int64, "The item's category."),
        ],
        tags=tags,
        description="Daily item popularity and conversion.",
    )
    category_stats = FeatureView(
        name="category_stats",
        entities=[category],
        ttl=SNAPSHOT_TTL,
        source=_source(settings, "category_stats"),
        online=True,
        schema=[Field(name="category_id", dtype=Int64), *_stats_fields(windows, "category")],
        tags=tags,
        description="Daily category popularity and conversion.",
    )
    user_segment = FeatureView(
        name="user_segment",
        entities=[user],
        ttl=SNAPSHOT_TTL,
        source=_source(settings, "user_segment"),
        online=True,
        tags=tags,
        schema=[
            Field(name="user_id", dtype=Int64),
            _field(
                "segment_id",
                Int64,
                "KMeans segment of the user's standardised activity (see segment_profile).",
            ),
        ],
        description="User segments: who is a heavy browser, a loyal buyer, a newcomer.",
    )
    user_embedding = FeatureView(
        name="user_embedding",
        entities=[user],
        ttl=SNAPSHOT_TTL,
        source=_source(settings, "user_embedding"),
        online=True,
        tags={"owner": EMBEDDING_OWNER},
        schema=[
            Field(name="user_id", dtype=Int64),
            _field(
                "embedding",
                Array(Float32),
                "The user's behaviour sequence encoded by the registered next-item model (its last hidden "
                "state); compare users by cosine similarity.",
                EMBEDDING_OWNER,
            ),
            _field("embedding_model", String, "The model URI that produced the embedding.", EMBEDDING_OWNER),
        ],
        description="User embeddings from the next-item model (`shopsight features embed`).",
    )
    labels = FeatureView(
        name="labels",
        entities=[user],
        ttl=SNAPSHOT_TTL,
        source=_source(settings, "labels"),
        online=False,
        schema=[
            Field(name="user_id", dtype=Int64),
            _field("buy_next_1d", Bool, "Whether the user buys anything on the day after the snapshot."),
            _field(
                "churn_3d",
                Bool,
                "Whether the user has no event at all on the 3 days after the snapshot; null where those "
                "days were not all observed yet.",
            ),
        ],
        tags=tags,
        description="Training labels (offline only).",
    )

    profile_fields = [f"n_{b}_{max(windows)}d" for b in BEHAVIORS] + [
        f"cvr_buy_pv_{max(windows)}d",
        "top_categories",
        "top_category_share",
        *[f"share_{p}" for p in DAY_PARTS],
    ]
    services = [
        FeatureService(
            name="purchase_propensity_v1",
            features=[user_activity, user_sequence, user_segment],
            tags=tags,
            description="Inputs of the purchase propensity models (activity, sequence, segment).",
        ),
        FeatureService(
            name="churn_risk_v1",
            features=[user_activity, user_sequence, user_segment],
            tags=tags,
            description="Inputs of the churn models (label churn_3d): the purchase models' inputs, since "
            "the same sequence models serve both with their own binary head.",
        ),
        FeatureService(
            name="next_item_v1",
            features=[user_sequence],
            tags=tags,
            description="Inputs of the next-item models: the behaviour sequence.",
        ),
        FeatureService(
            name="user_profile_v1",
            features=[user_activity[profile_fields], user_segment, user_embedding],
            tags=tags,
            description="A user's portrait for other teams: weekly activity, tastes, segment.",
        ),
    ]
    return [
        user,
        item,
        category,
        activity_push,
        sequence_push,
        user_activity,
        user_sequence,
        item_stats,
        category_stats,
        user_segment,
        user_embedding,
        labels,
        *services,
    ]
