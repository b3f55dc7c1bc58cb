"""Training-serving skew: the feature values an answer was served with against the values the offline
store gives for the same user at the same time (Feast's point-in-time join, as training sets are built).

Both should be the same numbers: the online store is loaded from the offline one. A feature that differs
for many answers means serving and training do not see the same thing (a transformation applied on one
side only, a stale or broken materialisation, a view reading another source), and a model judged offline
is then not the model that serves. Reported per feature as the share of sampled answers whose values
differ; a value missing on one side only counts as a mismatch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from shopsight.platform import Settings

REL_TOLERANCE = 1e-6  # float32 in one store, float64 in the other
ABS_TOLERANCE = 1e-9


@dataclass
class FeatureSkew:
    feature: str
    mismatch_rate: float
    compared: int
    example: dict | None  # one mismatch: user, as_of, served, offline

    def as_dict(self) -> dict:
        return {
            "feature": self.feature,
            "mismatch_rate": self.mismatch_rate,
            "compared": self.compared,
            "example": self.example,
        }


def same(served, offline) -> bool:
    """Whether a served and an offline value agree (numbers within float precision, lists element-wise)."""
    if _missing(served) or _missing(offline):
        return _missing(served) and _missing(offline)
    if isinstance(served, list | tuple | np.ndarray) or isinstance(offline, list | tuple | np.ndarray):
        a, b = list(served), list(offline)
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(served, int | float | np.integer | np.floating) and isinstance(
        offline, int | float | np.integer | np.floating
    ):
        return math.isclose(float(served), float(offline), rel_tol=REL_TOLERANCE, abs_tol=ABS_TOLERANCE)
    return str(served) == str(offline)


def _missing(value) -> bool:
    if value is None:
        return True
    if isinstance(value, float | np.floating):
        return math.isnan(value)
    return value is pd.NaT


def offline_values(settings: Settings, service: str, sample: pd.DataFrame) -> pd.DataFrame:
    """The service's features for the sample's users as of each answer's ``as_of``, from the offline
    store, in the sample's order."""
    from shopsight.features.store import features_as_of

    entity_df = pd.DataFrame(
        {
            "user_id": sample["user_id"].astype("int64").to_numpy(),
            "event_timestamp": pd.to_datetime(sample["as_of"], utc=True),
        }
    )
    return features_as_of(settings, service, entity_df)


def skew(served: pd.DataFrame, offline: pd.DataFrame) -> list[FeatureSkew]:
    """Per feature, the share of answers whose served value differs from the offline one; the worst
    first. ``served``: the logged answers (``features`` JSON, user_id, as_of); ``offline``: their
    offline values, row for row."""
    served_values = [json.loads(text) for text in served["features"]]
    names = sorted({name for values in served_values for name in values} & set(offline.columns))
    out = []
    for name in names:
        mismatches, example = 0, None
        for row, values in enumerate(served_values):
            mine, theirs = values.get(name), _plain(offline[name].iloc[row])
            if not same(mine, theirs):
                mismatches += 1
                if example is None:
                    example = {
                        "user_id": int(served["user_id"].iloc[row]),
                        "as_of": str(served["as_of"].iloc[row]),
                        "served": mine,
                        "offline": theirs,
                    }
        out.append(FeatureSkew(name, mismatches / max(len(served_values), 1), len(served_values), example))
    return sorted(out, key=lambda s: (-s.mismatch_rate, s.feature))


def _plain(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    return value
