"""Errors a user can cause and fix. The CLI prints their message on one line, without a traceback."""

from __future__ import annotations


class ShopsightError(Exception):
    """Base of every error with a message meant for the user (bad input, bad config, missing piece)."""


class InputFormatError(ShopsightError):
    """A file is not of the declared format at all (binary, JSON, empty, wrong layout)."""


class ConfigError(ShopsightError):
    """Settings that cannot be used: unknown keys, wrong types, unknown profile, unreadable file."""


class MissingDependencyError(ShopsightError):
    """An optional dependency is not installed; the message names the ``pip install`` that fixes it."""
