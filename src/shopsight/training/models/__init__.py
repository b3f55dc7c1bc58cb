"""Models by short name, imported lazily: ``build_model("sasrec", n_items=...)``.

Every model shares one contract over left-padded item-id sequences (B, T):
``loss(seq, pos, neg)`` for training, ``score(seq, candidates)`` -> (B, C) and ``predict(seq)`` ->
(B, n_items + 1) for ranking.
The ``gan`` model (:class:`~shopsight.training.models.gan.TabularGAN`) is the exception: it generates
tabular rows, so it has ``fit(frame, condition_column, ...)`` and ``sample(n, condition)`` instead.
"""

from __future__ import annotations

import importlib
from typing import Any

# ShopsightError in the platform (the GPU checks and a registered model's code run without it)
from shopsight.training._errors import user_error

# name -> (module, config class, model class)
MODELS = {
    "sasrec": ("shopsight.training.models.sasrec", "SASRecConfig", "SASRec"),
    "lstm": ("shopsight.training.models.lstm", "LSTMConfig", "LSTMRec"),
    "gan": ("shopsight.training.models.gan", "GANConfig", "TabularGAN"),
}
# the next-item training losses (see _next_item_loss), and the models Ray Tune has a search space for
# (shopsight.training.runtime.tune): here, where reading them imports no torch, for the CLI's choices
LOSSES = ("bce", "sampled_softmax", "softmax", "gbce")
TUNABLE_MODELS = ("lstm", "sasrec")


def build_model(name: str, **config: Any):
    """The model called ``name`` with its config built from ``config``; ShopsightError if unknown."""
    if name not in MODELS:
        raise user_error(f"unknown model {name!r}: choose one of {', '.join(sorted(MODELS))}")
    module_name, config_name, model_name = MODELS[name]
    module = importlib.import_module(module_name)
    try:
        cfg = getattr(module, config_name)(**config)
    except (TypeError, ValueError) as exc:
        raise user_error(f"bad configuration for {name}: {exc}") from None
    return getattr(module, model_name)(cfg)


def __getattr__(name: str):
    # the user head's public helpers, imported on first use like the models (the head needs torch)
    if name in ("N_GAP_BUCKETS", "transfer_pretrained"):
        from shopsight.training.models import _user_head

        return getattr(_user_head, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MODELS", "N_GAP_BUCKETS", "build_model", "transfer_pretrained"]
