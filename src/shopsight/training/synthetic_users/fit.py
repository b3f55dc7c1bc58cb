"""The GAN's Ray worker: the conditional WGAN-GP trains with its own loop on one worker (its gradient
penalty differentiates the critic's gradient, a double backward that DistributedDataParallel does not
support), reporting and checkpointing through the runtime's :class:`Reporter` every epoch."""

from __future__ import annotations

from typing import Any

from shopsight.training.models import build_model
from shopsight.training.runtime.ray_train import Reporter, load_checkpoint, quiet_checkpoint_logs
from shopsight.training.synthetic_users.evaluate import column_distances, tstr_ratio

METRIC = "tstr_ratio"  # the validation metric the best epoch is picked by


def gan_worker(config: dict[str, Any]) -> None:
    """The GAN's fit on one worker, checkpointed every epoch with everything a resume needs (both
    networks, both optimizers, the random generators). Validated on the validation users: TSTR / TRTR
    (gradient-boosted trees fitted on 2,000 synthetic rows, and on 2,000 real training rows with the same
    labels, scored on the validation rows) picks the best epoch; the mean Kolmogorov-Smirnov distance of
    the synthetic rows to the validation rows is logged beside it. Marginals alone would pick an early
    epoch: they settle before the columns' joint structure, which the utility measure needs."""
    import ray.train
    import ray.train.torch

    quiet_checkpoint_logs()
    from shopsight.training.synthetic_users.train import GanData

    data = GanData.read(config["data"], seed=config["split_seed"])
    device = ray.train.torch.get_device()
    gan = build_model("gan", **{**config["model_config"], "device": str(device), "log_every": 1})
    checkpoint, resume = load_checkpoint()
    reporter = Reporter(config, ray.train.get_context().get_world_rank(), resume)
    reporter.announce(1, checkpoint, resume["epoch"] if resume else 0)
    reference = data.valid.sample(min(len(data.valid), 2000), random_state=0)
    real = data.train.sample(min(len(data.train), 2000), random_state=0)
    features = [*data.numeric, *data.categorical]

    def on_epoch(entry: dict[str, float], state: dict[str, Any]) -> None:
        epoch = int(entry["epoch"])
        synthetic = gan.sample(len(real), list(real[data.label]), seed=epoch)
        distances = column_distances(reference, synthetic, data.numeric, data.categorical)["mean"]
        utility = tstr_ratio(real, synthetic, reference, data.label, features, categorical=data.categorical)
        metrics = {
            "epoch": epoch,
            "loss": entry["critic_loss"],
            "generator_loss": entry["generator_loss"],
            "wasserstein": entry["wasserstein"],
            "samples_per_second": len(data.train) / entry["seconds"],
            "epoch_seconds": entry["seconds"],
            "valid_tstr_ratio": utility["ratio"],
            "valid_tstr_auc": utility["tstr_auc"],
            "valid_ks": distances["ks"],
            "valid_tvd": distances.get("tvd", 0.0),
        }
        reporter.say(
            f"epoch {epoch:>3}  critic {entry['critic_loss']:.4f}  generator {entry['generator_loss']:.4f}  "
            f"wasserstein {entry['wasserstein']:.4f}  valid TSTR/TRTR {utility['ratio']:.4f} "
            f"KS {distances['ks']:.4f}  "
            f"{metrics['samples_per_second']:>9,.0f} rows/s  {entry['seconds']:.1f} s"
        )
        reporter.report(metrics, state)

    gan.fit(
        data.train,
        data.label,
        numeric=data.numeric,
        categorical=data.categorical,
        log=None,
        resume=resume,
        on_epoch=on_epoch,
    )


gan_worker.single_worker = (
    "its gradient penalty needs a double backward, which DistributedDataParallel does not support"
)
