"""A binary model of user snapshots (purchase, churn) as MLflow stores and serves it: a pyfunc holding the
network's config and weights, the fitted
:class:`~shopsight.training.binary.features.SnapshotFeatures` and the
:class:`~shopsight.training.binary.calibration.Calibration` fitted on the validation day, so that it takes
the rows of the task's feature service as Feast returns them and answers calibrated probabilities. The
registered model carries this module and what it imports (MLflow ``code``): it loads without Shopsight.

Input: a DataFrame with the service's columns (``user_id``, the activity features, ``seq_*`` arrays,
``segment_id``) and optionally ``event_timestamp``, the instant the features describe (naive = UTC; by
default now, as in serving). Output: a column ``probability`` of the task's label. Any batch size and
sequence length work: the weights load into the eager module.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch

from shopsight.training.binary.calibration import Calibration
from shopsight.training.binary.features import SNAPSHOT, SnapshotFeatures, predict_probabilities
from shopsight.training.runtime.pyfunc import FolderModel, load_network, save_network

FEATURES, CALIBRATION = "features.json", "calibration.json"  # beside the network's files (save_network)


class SnapshotClassifier(FolderModel, mlflow.pyfunc.PythonModel):
    """The calibrated probability of the task's label for each user snapshot."""

    def load(self, folder: Path) -> None:
        self.model_name, self.model = load_network(folder)
        self.features = SnapshotFeatures.load(folder / FEATURES)
        self.calibration = Calibration.load(folder / CALIBRATION)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        frame = model_input
        if SNAPSHOT not in frame.columns:
            frame = frame.assign(**{SNAPSHOT: pd.Timestamp.now(tz="UTC")})
        tensors = self.features.transform(frame, need_label=False)
        raw = predict_probabilities(self.model, tensors)
        return pd.DataFrame({"probability": self.calibration(raw).astype(np.float64)})


def save_model_dir(
    folder: Path,
    model_name: str,
    model: torch.nn.Module,
    features: SnapshotFeatures,
    calibration: Calibration | None = None,
) -> Path:
    """Write what :class:`SnapshotClassifier` loads: config, weights, fitted feature transform and the
    calibration (none: the network's probabilities as they are)."""
    save_network(folder, model_name, model)
    features.save(folder / FEATURES)
    (calibration or Calibration()).save(folder / CALIBRATION)
    return folder


def input_example(rows: pd.DataFrame) -> pd.DataFrame:
    """Feature rows as MLflow can store them: arrays as lists, the snapshot as naive UTC, integers as int64.

    Integers are widened because the signature comes from this example: the training set stores some
    features as int32, Feast's online store returns int64, and MLflow accepts a wider input type than its
    signature (int32 into int64) but refuses a narrower one.
    """
    from shopsight.training.binary.data import LABELS  # the platform's side: examples are made in training

    example = rows.drop(columns=list(LABELS), errors="ignore").reset_index(drop=True).copy()
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


def log_snapshot_model(folder: Path, example: pd.DataFrame, registered_name: str | None = None):
    """Log the pyfunc in the active run (with signature and input example); returns the ModelInfo."""
    from shopsight.training.runtime.tracking import log_pyfunc

    return log_pyfunc(SnapshotClassifier, folder, example, registered_name)
