"""The purchase model as MLflow stores and serves it: a pyfunc holding the network's config and weights
and the fitted :class:`~shopsight.training.purchase_data.PurchaseFeatures`, so that it takes the rows of
the ``purchase_propensity_v1`` feature service as Feast returns them.

Input: a DataFrame with the service's columns (``user_id``, the activity features, ``seq_*`` arrays,
``segment_id``) and optionally ``event_timestamp``, the instant the features describe (naive = UTC; by
default now, as in serving). Output: a column ``probability`` of buying tomorrow. Any batch size and
sequence length work: the weights load into the eager module.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch

from shopsight.training.models import build_model
from shopsight.training.purchase import predict_purchase
from shopsight.training.purchase_data import SNAPSHOT, PurchaseFeatures

WEIGHTS, CONFIG, FEATURES = "weights.pt", "config.json", "features.json"


class PurchasePropensity(mlflow.pyfunc.PythonModel):
    """Probability that each user buys anything tomorrow."""

    def load_context(self, context) -> None:
        self._load(Path(context.artifacts["model_dir"]))

    def _load(self, folder: Path) -> None:
        meta = json.loads((folder / CONFIG).read_text())
        self.model_name = meta["model"]
        self.model = build_model(meta["model"], **meta["config"])
        self.model.load_state_dict(torch.load(folder / WEIGHTS, map_location="cpu", weights_only=True))
        self.model.eval()
        self.features = PurchaseFeatures.load(folder / FEATURES)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        frame = model_input
        if SNAPSHOT not in frame.columns:
            frame = frame.assign(**{SNAPSHOT: pd.Timestamp.now(tz="UTC")})
        tensors = self.features.transform(frame, need_label=False)
        return pd.DataFrame({"probability": predict_purchase(self.model, tensors).astype(np.float64)})


def save_model_dir(folder: Path, model_name: str, model: torch.nn.Module, features: PurchaseFeatures) -> Path:
    """Write what :class:`PurchasePropensity` loads: config, weights, fitted feature transform."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG).write_text(json.dumps({"model": model_name, "config": asdict(model.cfg)}, indent=2))
    torch.save(model.state_dict(), folder / WEIGHTS)
    features.save(folder / FEATURES)
    return folder


def input_example(rows: pd.DataFrame) -> pd.DataFrame:
    """Feature rows as MLflow can store them: arrays as lists, the snapshot as naive UTC, integers as int64.

    Integers are widened because the signature comes from this example: the training set stores some
    features as int32, Feast's online store returns int64, and MLflow accepts a wider input type than its
    signature (int32 into int64) but refuses a narrower one.
    """
    example = rows.drop(columns=["buy_next_1d"], errors="ignore").reset_index(drop=True).copy()
    for column in example.columns:
        if pd.api.types.is_integer_dtype(example[column].dtype):
            example[column] = example[column].astype(
                "Int64" if isinstance(example[column].dtype, pd.api.extensions.ExtensionDtype) else np.int64
            )
        elif example[column].dtype == object:
            example[column] = [list(v) if isinstance(v, np.ndarray | list) else v for v in example[column]]
    if SNAPSHOT in example.columns:
        example[SNAPSHOT] = pd.to_datetime(example[SNAPSHOT], utc=True).dt.tz_localize(None)
    return example


def log_purchase_model(folder: Path, example: pd.DataFrame, registered_name: str | None = None):
    """Log the pyfunc in the active run (with signature and input example); returns the ModelInfo."""
    from mlflow.models import infer_signature

    loaded = PurchasePropensity()
    loaded._load(folder)
    signature = infer_signature(example, loaded.predict(None, example))
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=PurchasePropensity(),
        artifacts={"model_dir": str(folder)},
        signature=signature,
        input_example=example,
        registered_model_name=registered_name,
        pip_requirements=[
            f"torch=={torch.__version__.split('+')[0]}",
            f"mlflow=={mlflow.__version__}",
            "numpy",
            "pandas",
        ],
    )
