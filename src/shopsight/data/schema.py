"""The event data contract: one name and one dtype per column, from the Spark job to the serving request.

An event is one user action on one item, in the schema of the Taobao UserBehavior dataset:

=============  =====================  ==============================================================
column         dtype                  meaning
=============  =====================  ==============================================================
user_id        int64                  the shopper (>= 0)
item_id        int64                  the item acted on (>= 0)
category_id    int64                  the item's category (>= 0; 0 = unknown, as in SASRec files)
behavior       string                 one of ``pv``, ``cart``, ``fav``, ``buy``
ts             timestamp[us, UTC]     when it happened; sources give unix seconds
=============  =====================  ==============================================================

Event files on disk are parquet, partitioned by the shop's local calendar day (``day=YYYY-MM-DD``),
the day in :data:`SHOP_TIMEZONE` unless the settings say otherwise: the Taobao data is in China time,
and "the user buys tomorrow" means the shop's tomorrow, not UTC's.
"""

from __future__ import annotations

from enum import StrEnum

import pyarrow as pa

__all__ = [
    "BEHAVIORS",
    "Behavior",
    "CATEGORY_ID",
    "BEHAVIOR",
    "DAY",
    "EVENT_COLUMNS",
    "EVENT_SCHEMA",
    "ITEM_ID",
    "SHOP_TIMEZONE",
    "TAOBAO_BEHAVIOR_MIX",
    "TAOBAO_WINDOW",
    "TS",
    "USER_ID",
    "ID_COLUMNS",
]

USER_ID = "user_id"
ITEM_ID = "item_id"
CATEGORY_ID = "category_id"
BEHAVIOR = "behavior"
TS = "ts"
#: Partition column of event folders: the shop-local calendar day, ``YYYY-MM-DD``.
DAY = "day"

ID_COLUMNS = (USER_ID, ITEM_ID, CATEGORY_ID)
EVENT_COLUMNS = (USER_ID, ITEM_ID, CATEGORY_ID, BEHAVIOR, TS)


class Behavior(StrEnum):
    """What the user did to the item, in funnel order."""

    PV = "pv"  # page view
    CART = "cart"  # added to cart
    FAV = "fav"  # added to favourites
    BUY = "buy"  # bought


BEHAVIORS: tuple[str, ...] = tuple(b.value for b in Behavior)

EVENT_SCHEMA = pa.schema(
    [
        pa.field(USER_ID, pa.int64(), nullable=False),
        pa.field(ITEM_ID, pa.int64(), nullable=False),
        pa.field(CATEGORY_ID, pa.int64(), nullable=False),
        pa.field(BEHAVIOR, pa.string(), nullable=False),
        pa.field(TS, pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)

#: The shop's calendar: Taobao's data is recorded in China time (UTC+8).
SHOP_TIMEZONE = "Asia/Shanghai"

#: The Taobao UserBehavior dataset's 9 days, [start, end) in shop-local dates.
TAOBAO_WINDOW = ("2017-11-25", "2017-12-04")

#: Behaviour mix of the full Taobao UserBehavior dataset (about 100M events), in percent.
TAOBAO_BEHAVIOR_MIX = {"pv": 89.5, "cart": 5.5, "fav": 2.9, "buy": 2.0}
