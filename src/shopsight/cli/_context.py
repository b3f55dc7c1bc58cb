"""Global CLI options (profile, config file, overrides) and the settings they resolve to; the checks and
conventions every command's options share (input paths, days, model URIs, renamed options)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperCommand

from shopsight.platform import ConfigError, ResolvedSettings, Settings, load_settings, parse_setting_value
from shopsight.platform._logs import capture_engine_output


@dataclass
class CliState:
    profile: str | None = None
    config_file: Path | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    # set by a caller that parses a command's options for another machine (`jobs submit`): the inputs are
    # read there, so their existence is that caller's to check, not the options'
    inputs_elsewhere: bool = False
    _resolved: ResolvedSettings | None = None

    def resolved(self) -> ResolvedSettings:
        if self._resolved is None:
            self._resolved = load_settings(self.profile, self.config_file, self.overrides)
            # from here on the command may start the engines: their output goes to the data dir's log
            capture_engine_output(self._resolved.settings.data_dir)
        return self._resolved

    @property
    def settings(self) -> Settings:
        return self.resolved().settings


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` pairs as settings: the value is YAML, as in the environment
    (``features.windows=[1,3]``, ``mlflow.tracking_uri=null``); the key is split at the first ``=``."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE (for example spark.master=local[2]), got {pair!r}")
        key = key.strip()
        overrides[key] = parse_setting_value(key, value, f"--set {key}")
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


def input_path(ctx: typer.Context, param: typer.CallbackParam, value: Path | None) -> Path | None:
    """A ``--data``-like option: the file or folder must exist. A missing one is a usage error (exit 2),
    reported before anything starts, like any other bad option value."""
    if value is None or getattr(ctx.obj, "inputs_elsewhere", False) or Path(value).exists():
        return value
    raise typer.BadParameter(f"{value} does not exist", ctx=ctx, param=param)


def one_input(option: Path | None, argument: Path | None) -> Path:
    """The input of a command that takes it as ``--data PATH`` or, as it once did, as its argument."""
    if option is not None and argument is not None:
        raise typer.BadParameter(f"give the input once: {argument} or {option}", param_hint="--data")
    if option is None and argument is None:
        raise typer.BadParameter("the input file or folder is required", param_hint="--data")
    return Path(option if option is not None else argument)  # type: ignore[arg-type]


def renamed_options(**renamed: str) -> type[TyperCommand]:
    """A command class that still accepts options by their former names (``renamed_options(events="data")``
    reads ``--events X`` as ``--data X``), so that scripts written for them keep working; help shows only
    the current names."""
    spelled = {f"--{old.replace('_', '-')}": f"--{new.replace('_', '-')}" for old, new in renamed.items()}

    class RenamedOptions(TyperCommand):
        former_names = spelled  # `jobs submit` reads it to find an option under either name

        def parse_args(self, ctx, args: list[str]) -> list[str]:
            return super().parse_args(ctx, [_current_name(arg, spelled) for arg in args])

    return RenamedOptions


def _current_name(arg: str, spelled: dict[str, str]) -> str:
    name, sep, value = arg.partition("=")
    return spelled[name] + sep + value if name in spelled else arg
