"""The synthetic-users GAN as MLflow stores and serves it: a pyfunc holding the fitted
:class:`~shopsight.training.models.gan.TabularGAN` (its schema, transforms and weights), which generates
user rows in the training set's feature schema on demand.

Input: a DataFrame with one row per wanted user and the GAN's condition column (``buy_next_1d``: True for
buyers). Params: ``seed`` (an int; -1, the default, draws fresh rows each call). Output: the generated
feature rows, the condition included. The registered model carries this module and what it imports
(MLflow ``code``): it loads without Shopsight.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd

from shopsight.training._errors import user_error
from shopsight.training.models.gan import TabularGAN
from shopsight.training.runtime.pyfunc import FolderModel

GAN_FILE = "gan.pt"


class SyntheticUsers(FolderModel, mlflow.pyfunc.PythonModel):
    """Synthetic users in the training set's feature schema, conditioned on the label."""

    def load(self, folder: Path) -> None:
        self.gan = TabularGAN.load(Path(folder) / GAN_FILE)

    @property
    def condition(self) -> str:
        """The column the GAN is conditioned on (the task's label), as it was fitted."""
        return self.gan.schema["condition"]["name"]

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        label = self.condition
        if label not in model_input.columns:
            raise user_error(f"the input needs a column {label!r}: the condition of each wanted row")
        seed = int((params or {}).get("seed", -1))
        wanted = [bool(v) for v in model_input[label]]
        return self.gan.sample(len(wanted), wanted, seed=None if seed < 0 else seed)


__all__ = ["GAN_FILE", "SyntheticUsers"]
