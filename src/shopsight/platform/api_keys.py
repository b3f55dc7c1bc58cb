"""Teams and their API keys: one identity for the prediction API, the feature server and the CLI.

``serving.api_keys`` maps a team to the sha256 hex digest of its key (``shopsight serve key TEAM`` makes
one), so the settings never hold a key. A request sends its key as ``X-API-Key: KEY`` or ``Authorization:
Bearer KEY`` (the form Feast's clients send a token in); a command that acts for a team (granting reads of
a feature service, changing its definitions) reads the key from ``SHOPSIGHT_API_KEY``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping

from shopsight.platform._errors import ShopsightError
from shopsight.platform._settings import API_KEY_VARIABLE, Settings


def hash_key(key: str) -> str:
    """The digest stored in ``serving.api_keys`` for an API key."""
    return hashlib.sha256(key.encode()).hexdigest()


def key_of(headers: Mapping[str, str]) -> str | None:
    """The key a request carries (``X-API-Key``, else ``Authorization: Bearer``); header names lowercase."""
    key = headers.get("x-api-key")
    if key is None:
        scheme, _, token = (headers.get("authorization") or "").partition(" ")
        key = token.strip() if scheme.lower() == "bearer" else None
    return key or None


def team_of_key(key: str | None, keys: Mapping[str, str]) -> str | None:
    """The team whose key this is; None for no key or an unknown one."""
    if not key:
        return None
    digest = hash_key(key)
    team = None
    for name, expected in keys.items():  # every team is compared: the time does not tell which matched
        if hmac.compare_digest(digest, expected) and team is None:
            team = name
    return team


def authenticate(headers: Mapping[str, str], keys: Mapping[str, str]) -> str | None:
    """The team whose key the request carries; else None."""
    return team_of_key(key_of(headers), keys)


def acting_team(settings: Settings) -> str:
    """The team this command acts for: the owner of ``SHOPSIGHT_API_KEY``; ShopsightError without one."""
    key = os.environ.get(API_KEY_VARIABLE)
    if not key:
        raise ShopsightError(
            f"this needs a team: set {API_KEY_VARIABLE} to your team's API key (`shopsight serve key TEAM` "
            "makes one)"
        )
    team = team_of_key(key, settings.serving.api_keys)
    if team is None:
        raise ShopsightError(f"{API_KEY_VARIABLE} is no team's key (serving.api_keys)")
    return team
