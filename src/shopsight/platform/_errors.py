"""Errors a user can cause and fix. The CLI prints their message on one line, without a traceback, on
stderr, and exits with the error's ``exit_code``."""

from __future__ import annotations


class ShopsightError(Exception):
    """Base of every error with a message meant for the user (bad input, bad config, missing piece)."""

    exit_code = 1  # the CLI's exit status: 1 is "the command failed"


class UsageError(ShopsightError):
    """A command called wrongly, found after the parser: the options `jobs submit` passes on to the command
    it runs on the cluster. Exit status 2, as for the parser's own usage errors."""

    exit_code = 2


class PromotionRefused(ShopsightError):
    """The quality gate refused a candidate. Its own exit status, 3, lets a script tell "the model was not
    good enough" from a command that could not run (1) or was called wrongly (2)."""

    exit_code = 3


class InputFormatError(ShopsightError):
    """A file is not of the declared format at all (binary, JSON, empty, wrong layout)."""


class ConfigError(ShopsightError):
    """Settings that cannot be used: unknown keys, wrong types, unknown profile, unreadable file."""


class MissingDependencyError(ShopsightError):
    """An optional dependency is not installed; the message names the ``pip install`` that fixes it."""
