"""The platform's own small client of its feature server (other teams use Feast's: see docs/features.md).

    from shopsight.features.client import FeatureClient

    client = FeatureClient("http://127.0.0.1:6566", api_key=KEY)
    profile = client.get("user_profile_v1", user_ids=[738, 1001])
    profile["n_buy_7d"]          # [6, 0]: one value per user, None where unknown

It calls Feast's HTTP feature server (``shopsight features serve``) and returns ``{feature: [values]}``,
in the order of ``user_ids``. Other entities (item_id, category_id) go through ``entities=``.
"""

from __future__ import annotations

from collections.abc import Sequence

import requests

from shopsight.platform import ShopsightError


class FeatureClient:
    """HTTP client of a Feast feature server.

    Args:
        url: the server's base URL, e.g. ``http://127.0.0.1:6566``.
        api_key: the team's API key (sent as ``Authorization: Bearer``).
        timeout: seconds before a request gives up.
    """

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._session = requests.Session()
        if api_key:
            self._session.headers["Authorization"] = f"Bearer {api_key}"

    def get(
        self, service: str, user_ids: Sequence[int] | None = None, *, entities: dict[str, list] | None = None
    ) -> dict[str, list]:
        """Online values of a feature service.

        Raises:
            ShopsightError: the server refused (no key, no grant, an unknown service: its message), or
                is unreachable.
        """
        entities = entities or {"user_id": [int(u) for u in (user_ids or [])]}
        try:
            response = self._session.post(
                f"{self.url}/get-online-features",
                json={"feature_service": service, "entities": entities},
                timeout=self.timeout,
            )
        except requests.RequestException as exc:
            raise ShopsightError(f"feature server {self.url} unreachable: {exc}") from None
        if response.status_code != 200:
            try:
                reason = response.json()["error"]
            except (ValueError, KeyError, TypeError):
                reason = response.text[:200]
            raise ShopsightError(f"feature server {self.url} answered {response.status_code}: {reason}")
        body = response.json()
        names = body["metadata"]["feature_names"]
        return {name: result["values"] for name, result in zip(names, body["results"], strict=True)}

    def health(self) -> bool:
        try:
            return self._session.get(f"{self.url}/health", timeout=self.timeout).status_code == 200
        except requests.RequestException:
            return False
