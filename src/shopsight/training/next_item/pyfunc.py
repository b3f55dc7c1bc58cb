"""The next-item model as MLflow stores and serves it: a pyfunc holding the network's config and weights
and the item-id mapping, so that it takes and returns the shop's own item ids.

Input: a DataFrame with a column ``item_ids`` (a list of the user's item ids, oldest first, any length;
unknown ids are skipped). Param ``k`` (default 10). Output: columns ``items`` (the top-k item ids, best
first, excluding every item of the input, also those before the last ``max_len``) and ``scores``. Any
batch size and sequence length work: the weights are loaded into the eager PyTorch module, not a traced
graph of fixed shapes. The registered model carries this module and what it imports (MLflow ``code``): it
loads without Shopsight.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch

from shopsight.training.runtime.pyfunc import FolderModel, load_network, save_network

ITEMS = "item_ids.npy"  # beside the network's files (save_network)


class NextItemRecommender(FolderModel, mlflow.pyfunc.PythonModel):
    """Top-k next items for sequences of original item ids."""

    def load(self, folder: Path) -> None:
        self.model_name, self.model = load_network(folder)
        self.max_len = self.model.cfg.max_len
        self.item_ids = np.load(folder / ITEMS)
        self.index = {int(item): k for k, item in enumerate(self.item_ids) if k > 0}

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        k = int((params or {}).get("k", 10))
        seqs = np.zeros((len(model_input), self.max_len), dtype=np.int64)
        seen = []
        for row, items in enumerate(model_input["item_ids"]):
            known = [self.index[int(i)] for i in (items if items is not None else []) if int(i) in self.index]
            tail = known[-self.max_len :]
            if tail:
                seqs[row, self.max_len - len(tail) :] = tail
            seen.append(known)
        with torch.no_grad():
            scores = self.model.predict(torch.as_tensor(seqs)).float()
        for row, known in enumerate(seen):
            # every item of the input, also those before the model's window: none is recommended again
            scores[row, known] = float("-inf")
        top = torch.topk(scores, min(k, self.model.cfg.n_items), dim=1)
        return pd.DataFrame(
            {
                "items": [self.item_ids[idx].tolist() for idx in top.indices.numpy()],
                "scores": [vals.tolist() for vals in top.values.numpy()],
            }
        )


def save_model_dir(folder: Path, model_name: str, model: torch.nn.Module, item_ids: np.ndarray) -> Path:
    """Write what :class:`NextItemRecommender` loads: config, weights, item mapping."""
    save_network(folder, model_name, model)
    np.save(folder / ITEMS, item_ids)
    return folder


def log_next_item_model(folder: Path, example: pd.DataFrame, registered_name: str | None = None):
    """Log the pyfunc in the active run (with signature and input example); returns the ModelInfo."""
    from shopsight.training.runtime.tracking import log_pyfunc

    return log_pyfunc(NextItemRecommender, folder, example, registered_name, params={"k": 10})
