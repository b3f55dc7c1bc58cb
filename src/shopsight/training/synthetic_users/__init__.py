"""The synthetic-users task: a conditional GAN that generates user rows of the purchase feature service
(TSTR / TRTR, per-column distances, correlation difference and distance to closest record on held-out
users). Its entry in :data:`shopsight.training.tasks.TASKS` names this package."""

from __future__ import annotations

from pathlib import Path


def check_data(data: Path) -> None:
    """Fail before Ray and MLflow start when ``data`` cannot be split and learnt."""
    from shopsight.training.synthetic_users.train import GanData

    GanData.read(data)


# The GAN's own loop has no validation plateau to stop at (its best epoch by TSTR/TRTR is kept, training
# is not stopped): without --epochs it trains this many
EPOCHS = 20


def loop(options):
    """The run's settings from ``shopsight train``'s options (the GAN has its own loop: epochs, seed)."""
    from shopsight.training.runtime.loop import LoopConfig

    return LoopConfig(epochs=options.epochs or EPOCHS, seed=options.seed)


def prepare(settings, model: str, data: Path, options, loop, model_config: dict | None = None):
    """The data made ready for a run (see :func:`shopsight.training.synthetic_users.train.prepare`)."""
    from shopsight.platform import ShopsightError
    from shopsight.training.synthetic_users.fit import gan_worker
    from shopsight.training.synthetic_users.train import prepare as prepare_data

    if options.workers != 1:
        raise ShopsightError(f"the GAN trains on one worker: {gan_worker.single_worker}")
    config: dict = {"epochs": options.epochs or EPOCHS, **(model_config or {})}
    if options.batch_size:
        config["batch_size"] = options.batch_size
    if options.lr:
        config.update(lr_generator=options.lr, lr_critic=options.lr)
    return prepare_data(settings, data, model_config=config, seed=options.seed)
