"""The ground floor: settings and profiles, user-facing errors, console helpers. It imports no stage."""

from shopsight.platform._console import Stopwatch, console, print_summary, progress_bar
from shopsight.platform._errors import ConfigError, InputFormatError, MissingDependencyError, ShopsightError
from shopsight.platform._settings import (
    PROFILES,
    DataSettings,
    FeastSettings,
    FeatureSettings,
    MlflowSettings,
    ObjectStoreSettings,
    RaySettings,
    ResolvedSettings,
    Settings,
    SparkSettings,
    load_settings,
)

__all__ = [
    "PROFILES",
    "ConfigError",
    "DataSettings",
    "FeastSettings",
    "FeatureSettings",
    "InputFormatError",
    "MissingDependencyError",
    "MlflowSettings",
    "ObjectStoreSettings",
    "RaySettings",
    "ResolvedSettings",
    "Settings",
    "ShopsightError",
    "SparkSettings",
    "Stopwatch",
    "console",
    "load_settings",
    "print_summary",
    "progress_bar",
]
