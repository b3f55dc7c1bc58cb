"""What every task's pyfunc builds on: a network's files (family, config, weights) and the mixin that loads
a pyfunc from its folder.

A registered pyfunc carries this module among its own code (MLflow ``code``; see
:mod:`~shopsight.training.runtime.model_code`), so it imports torch and the networks only: a model loads
wherever its requirements are installed, Shopsight or not.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from shopsight.training.models import build_model

NETWORK_CONFIG, NETWORK_WEIGHTS = "config.json", "weights.pt"


class FolderModel:
    """Mixin for a task's pyfunc whose files live in one folder (the ``model_dir`` artifact): MLflow's
    ``load_context`` and the platform's ``from_folder`` both end in the class's ``load(folder)``."""

    def load_context(self, context) -> None:
        self.load(Path(context.artifacts["model_dir"]))

    @classmethod
    def from_folder(cls, folder: Path):
        loaded = cls()
        loaded.load(Path(folder))
        return loaded

    def load(self, folder: Path) -> None:
        raise NotImplementedError


def save_network(folder: Path, model_name: str, model: torch.nn.Module) -> None:
    """A network's family, config and weights in ``folder``, as :func:`load_network` reads them."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model": model_name, "config": asdict(model.cfg)}
    (folder / NETWORK_CONFIG).write_text(json.dumps(config, indent=2))
    torch.save(model.state_dict(), folder / NETWORK_WEIGHTS)


def load_network(folder: Path) -> tuple[str, torch.nn.Module]:
    """``(family, network)`` from what :func:`save_network` wrote, in eval mode on the CPU."""
    meta = json.loads((folder / NETWORK_CONFIG).read_text())
    model = build_model(meta["model"], **meta["config"])
    model.load_state_dict(torch.load(folder / NETWORK_WEIGHTS, map_location="cpu", weights_only=True))
    return meta["model"], model.eval()


__all__ = ["NETWORK_CONFIG", "NETWORK_WEIGHTS", "FolderModel", "load_network", "save_network"]
