"""The ground floor: settings and profiles, user-facing errors, console helpers. It imports no stage."""

from shopsight.platform._console import (
    Stopwatch,
    console,
    err_console,
    print_summary,
    progress_bar,
    summary_table,
)
from shopsight.platform._errors import (
    ConfigError,
    InputFormatError,
    MissingDependencyError,
    PromotionRefused,
    ShopsightError,
    UsageError,
)
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
    parse_setting_value,
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
    "PromotionRefused",
    "RaySettings",
    "ResolvedSettings",
    "Settings",
    "ShopsightError",
    "SparkSettings",
    "UsageError",
    "Stopwatch",
    "console",
    "err_console",
    "load_settings",
    "parse_setting_value",
    "print_summary",
    "progress_bar",
    "summary_table",
]
