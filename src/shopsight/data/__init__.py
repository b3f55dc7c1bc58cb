"""Event data: the schema contract, readers with quarantine, a day-partitioned writer, the simulator."""

from shopsight.data._readers import (
    FORMATS,
    EventReader,
    ReadReport,
    TimeWindow,
    detect_format,
    quarantine_file,
)
from shopsight.data._simulator import (
    ACTIVITY_PROFILES,
    SHIFTABLE,
    SimulationResult,
    SimulatorConfig,
    continue_simulation,
    parse_shift,
    simulate,
)
from shopsight.data._stats import EventStats
from shopsight.data._writer import DayPartitionedWriter, publish_dir

__all__ = [
    "ACTIVITY_PROFILES",
    "FORMATS",
    "SHIFTABLE",
    "DayPartitionedWriter",
    "EventReader",
    "EventStats",
    "ReadReport",
    "SimulationResult",
    "SimulatorConfig",
    "TimeWindow",
    "continue_simulation",
    "detect_format",
    "parse_shift",
    "publish_dir",
    "quarantine_file",
    "simulate",
]
