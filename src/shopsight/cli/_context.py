"""Global CLI options (profile, config file, overrides) and the settings they resolve to."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import typer

from shopsight.platform import ConfigError, ResolvedSettings, Settings, load_settings


@dataclass
class CliState:
    profile: str | None = None
    config_file: Path | None = None
    overrides: dict[str, str] = field(default_factory=dict)
    _resolved: ResolvedSettings | None = None

    def resolved(self) -> ResolvedSettings:
        if self._resolved is None:
            self._resolved = load_settings(self.profile, self.config_file, self.overrides)
        return self._resolved

    @property
    def settings(self) -> Settings:
        return self.resolved().settings


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE (for example spark.master=local[2]), got {pair!r}")
        overrides[key.strip()] = value
    return overrides


def state(ctx: typer.Context) -> CliState:
    """The CLI state of the root command, from any sub-command's context."""
    root = ctx.find_root()
    if root.obj is None:
        root.obj = CliState()
    return root.obj


def parse_day(text: str, option: str) -> date:
    """A YYYY-MM-DD option value, or a usage error naming the option."""
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a day (YYYY-MM-DD)", param_hint=option) from None


_MODEL_URI = re.compile(r"^(models:/[^/@]+(@[\w-]+|/\d+)|runs:/[0-9a-f]+/.+)$")


def model_uri_option(text: str) -> str:
    """A ``--model-uri`` value, checked before any server starts: ``models:/NAME@ALIAS``,
    ``models:/NAME/VERSION``, ``runs:/RUN_ID/PATH`` or an existing local model folder."""
    if _MODEL_URI.match(text) or Path(text).is_dir():
        return text
    raise typer.BadParameter(
        f"{text!r} is not a model: use models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/PATH "
        "or a local model folder",
        param_hint="--model-uri",
    )
