"""Where served models and the popularity fallback come from: the MLflow registry (by alias) and Feast.

The popularity fallback (for users with no history the next-item model knows) is computed when a next-item
version is loaded: the model's own item vocabulary, ranked by each item's events in the widest window of
the ``item_stats`` feature view, read from the online store. So it is live shop popularity, restricted to
items the model can also recommend, and it needs nothing stored beside the model. When ``item_stats`` holds
nothing online (never materialised), the fallback is the network's answer to an empty history, flagged
``source="model_prior"``.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from shopsight.data.schema import BEHAVIORS
from shopsight.platform import Settings
from shopsight.serving.predictor import LoadedModel, Popularity, VersionRef


class MlflowModelSource:
    """A registered model's versions by alias, loaded in process for fast scoring.

    Args:
        tracking_uri: the MLflow server.
        registered_name: e.g. ``shopsight-next-item``.
        pyfunc: the task's pyfunc class (``Task.pyfunc.load_class()``), loaded with ``from_folder``.
        popularity: for ranking models, item ids -> their popularity (see :func:`item_popularity`).
    """

    def __init__(
        self,
        tracking_uri: str,
        registered_name: str,
        pyfunc: type,
        popularity: Callable[[np.ndarray], Popularity | None] | None = None,
    ) -> None:
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.registered_name = registered_name
        self.pyfunc = pyfunc
        self.popularity = popularity
        self.client = MlflowClient(tracking_uri)

    def resolve(self, alias: str) -> VersionRef | None:
        from mlflow.exceptions import MlflowException

        try:
            version = self.client.get_model_version_by_alias(self.registered_name, alias)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
                return None
            raise
        return VersionRef(version=str(version.version), run_id=version.run_id)

    def load(self, ref: VersionRef, alias: str) -> LoadedModel:
        import mlflow

        folder = Path(tempfile.mkdtemp(prefix="shopsight-serve-"))
        try:
            mlflow.set_tracking_uri(self.tracking_uri)
            root = mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{self.registered_name}/{ref.version}", dst_path=str(folder)
            )
            # everything is read into memory: the files can go
            model = self.pyfunc.from_folder(_artifact_dir(Path(root)))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        popularity = None
        if self.popularity is not None:
            popularity = self.popularity(model.item_ids[1:])
        return LoadedModel(
            name=self.registered_name,
            version=ref.version,
            alias=alias,
            model=model,
            run_id=ref.run_id,
            popularity=popularity,
        )


def _artifact_dir(root: Path) -> Path:
    """The folder the pyfunc logged as its ``model_dir`` artifact (MLflow names it after the source
    folder, so it is read from the MLmodel file rather than assumed)."""
    import yaml

    meta = yaml.safe_load((root / "MLmodel").read_text())
    artifacts = meta.get("flavors", {}).get("python_function", {}).get("artifacts", {})
    path = (artifacts.get("model_dir") or {}).get("path", "artifacts/model_dir")
    return root / path


class ItemStatsReader:
    """Online ``item_stats`` rows for many items at once (the provider's own read, as the serving path)."""

    def __init__(self, settings: Settings) -> None:
        from shopsight.features.store import feature_store

        store = feature_store(settings)
        self._config = store.config
        self._provider = store._get_provider()
        self._view = store.get_feature_view("item_stats")
        widest = max(settings.features.windows)
        self.columns = [f"n_{b}_{widest}d" for b in BEHAVIORS]

    def events(self, item_ids: Sequence[int]) -> np.ndarray:
        """Events of each item in the widest window (NaN where the store has no row)."""
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        keys = [EntityKey(join_keys=["item_id"], entity_values=[Value(int64_val=int(i))]) for i in item_ids]
        rows = self._provider.online_read(
            config=self._config, table=self._view, entity_keys=keys, requested_features=list(self.columns)
        )
        out = np.full(len(keys), np.nan)
        for n, (_, values) in enumerate(rows):
            if values:
                out[n] = sum(values[c].int64_val for c in self.columns if c in values)
        return out


def item_popularity(settings: Settings) -> Callable[[np.ndarray], Popularity | None]:
    """``item_ids -> Popularity`` from the online ``item_stats`` (None when it holds none of them)."""

    def rank(item_ids: np.ndarray) -> Popularity | None:
        try:
            events = ItemStatsReader(settings).events(item_ids)
        except Exception:  # noqa: BLE001 - no item_stats online: the fallback becomes the model prior
            return None
        known = ~np.isnan(events) & (events > 0)
        if not known.any():
            return None
        order = np.argsort(-events[known], kind="stable")
        return Popularity(
            item_ids=np.asarray(item_ids)[known][order].astype(np.int64), scores=events[known][order]
        )

    return rank
