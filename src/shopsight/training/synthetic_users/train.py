"""Train the synthetic-user GAN end to end: Ray Train, MLflow tracking, the synthetic-data protocol,
registration.

The data is a point-in-time training set (``shopsight features training-set``): one row per user and
snapshot day. The GAN learns the user's feature row (every numeric feature, the segment as a category)
given ``buy_next_1d``; ids, the snapshot instant and the behaviour sequence (arrays) are not generated.
Users, not rows, are split 70/10/20 (seeded): the GAN trains on the first part, the validation users pick
the best epoch (TSTR / TRTR on their rows), and the test users are the
real held-out rows of docs/architecture.md's protocol (TSTR / TRTR, per-column distances, correlation
difference, distance to closest record), so no test user was seen by the GAN or chose its epoch.

One MLflow run records the parameters, the dataset's identity, per-epoch losses and validation distance,
the report (markdown, the per-column distances as PNG, learning curves, 1,000 synthetic rows as parquet)
and the generator as a pyfunc (:class:`~shopsight.training.synthetic_users.pyfunc.SyntheticUsers`)
registered with the alias ``challenger``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from shopsight.platform import Settings, ShopsightError
from shopsight.training.binary.data import SNAPSHOT, read_training_set
from shopsight.training.models.gan import GANConfig, TabularGAN
from shopsight.training.runtime.tracking import (
    Candidate,
    Prepared,
    TrainSummary,
    dataset_identity,
    default_run_name,
    train_prepared,
)
from shopsight.training.synthetic_users.pyfunc import (
    GAN_FILE,
    SyntheticUsers,  # also here: the GANs registered before it moved unpickle it from this module
)
from shopsight.training.tasks import get_task

TASK = get_task("synthetic_users")
LABEL = TASK.data.label  # the condition of the generated rows
SERVICE = TASK.data.source
SPLIT = (0.7, 0.1, 0.2)  # users: train, validation, test
CATEGORICAL = ("segment_id",)
_NOT_GENERATED = {"user_id", SNAPSHOT, LABEL}


@dataclass
class GanData:
    """A training set's rows split by user, and the columns the GAN generates."""

    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame
    numeric: list[str]
    categorical: list[str]
    label: str = LABEL

    @classmethod
    def read(cls, path: Path | str, seed: int = 0) -> GanData:
        """Read and split; ShopsightError names the file and the problem (no label, no features, too few
        users for three parts with both classes)."""
        frame = read_training_set(path, check=False)
        source = str(path)
        if frame.empty:
            raise ShopsightError(f"{source}: the training set is empty (no rows)")
        missing = [c for c in ("user_id", LABEL) if c not in frame.columns]
        if missing:
            raise ShopsightError(
                f"{source}: missing column(s) {', '.join(missing)}; expected a training set of {SERVICE} "
                "(`shopsight features training-set`)"
            )
        categorical = [c for c in CATEGORICAL if c in frame.columns]
        numeric = [
            c
            for c in frame.columns
            if c not in _NOT_GENERATED
            and c not in categorical
            and pd.api.types.is_numeric_dtype(frame[c].dtype)
            and not pd.api.types.is_bool_dtype(frame[c].dtype)
            and frame[c].notna().any()
        ]
        if not numeric:
            raise ShopsightError(f"{source}: no numeric feature columns to generate")
        users = np.sort(frame["user_id"].unique())
        order = np.random.default_rng(seed).permutation(users)
        cut = np.cumsum([int(round(share * len(users))) for share in SPLIT[:-1]])
        parts = [frame[frame["user_id"].isin(chunk)].reset_index(drop=True) for chunk in np.split(order, cut)]
        for name, part in zip(("training", "validation", "test"), parts, strict=True):
            if part[LABEL].nunique() < 2:
                raise ShopsightError(
                    f"{source}: the {name} users ({len(part)} rows) lack buyers or non-buyers; "
                    f"{len(users)} users are too few to split {SPLIT[0]:.0%}/{SPLIT[1]:.0%}/{SPLIT[2]:.0%}"
                )
        return cls(*parts, numeric=numeric, categorical=categorical)

    def describe(self) -> dict[str, str]:
        def users(part: pd.DataFrame) -> str:
            return f"{part['user_id'].nunique():,} users, {len(part):,} rows, {part[LABEL].mean():.1%} buyers"

        return {"train": users(self.train), "valid": users(self.valid), "test": users(self.test)}


def prepare(settings: Settings, data: Path, *, model_config: dict | None = None, seed: int = 0) -> Prepared:
    """The training set read and split by user once on the driver, the GAN's configuration checked."""
    from shopsight.training.synthetic_users.evaluate import synthetic_report
    from shopsight.training.synthetic_users.fit import gan_worker

    split = GanData.read(data, seed=seed)
    try:
        cfg = GANConfig(**{"seed": seed, **(model_config or {})})
    except (TypeError, ValueError) as exc:
        raise ShopsightError(f"bad configuration for gan: {exc}") from None
    days = pd.to_datetime(split.train[SNAPSHOT], utc=True).dt.date if SNAPSHOT in split.train else None
    identity = {
        **dataset_identity(data),
        "dataset.feature_service": SERVICE,
        "dataset.snapshot_range": f"{days.min()}..{days.max()}" if days is not None else "-",
    }

    def finish(state: dict, model_config: dict) -> Candidate:
        gan = TabularGAN.from_state_dict(state["gan"])
        synthetic = gan.sample(len(split.train), seed=seed)  # conditions at the training buyers' ratio
        report = synthetic_report(
            split.train, synthetic, split.test, LABEL, split.numeric, split.categorical, seed=seed
        )

        def figures(folder: Path) -> None:
            (folder / "report.json").write_text(json.dumps(report, indent=2))
            _column_distances(report, folder)
            synthetic.head(1000).to_parquet(folder / "synthetic_sample.parquet")

        def save(folder: Path) -> Path:
            folder.mkdir(parents=True, exist_ok=True)
            gan.save(folder / GAN_FILE)
            return folder

        return Candidate(
            model_name="gan",
            metrics=_flat_metrics(report),
            baselines={},
            report=_report(report, identity, split, int(state["epoch"])),
            save=save,
            pyfunc=SyntheticUsers,
            example=pd.DataFrame({LABEL: [True, False, True, False, False]}),
            params={"seed": 0},
            figures=figures,
            requirements=("scipy",),
        )

    return Prepared(
        task=TASK,
        model_name="gan",
        worker=gan_worker,
        config={
            "model": "gan",
            "model_config": {k: v for k, v in asdict(cfg).items() if k not in ("device", "log_every")},
            "data": data,
            "split_seed": seed,
        },
        identity=identity,
        params={
            "numeric_columns": len(split.numeric),
            "categorical_columns": ",".join(split.categorical) or "none",
            "split": "/".join(f"{s:g}" for s in SPLIT),
        },
        finish=finish,
        tags=split.describe(),
    )


def train_gan_model(
    settings: Settings,
    data: Path,
    *,
    gpus_per_worker: float = 0,
    model_config: dict | None = None,
    seed: int = 0,
    run_name: str | None = None,
    registered_model: str = TASK.registered_model,
    log=print,
) -> TrainSummary:
    """Train the GAN on one Ray Train worker, report the protocol on the test users, register it."""
    from shopsight.training.runtime.loop import LoopConfig

    prepared = prepare(settings, data, model_config=model_config, seed=seed)
    return train_prepared(
        settings,
        prepared,
        loop=LoopConfig(epochs=prepared.config["model_config"]["epochs"], seed=seed),
        gpus_per_worker=gpus_per_worker,
        run_name=run_name or default_run_name("gan"),
        registered_model=registered_model,
        log=log,
    )


def _flat_metrics(report: dict) -> dict[str, float]:
    """The report's headline numbers as MLflow metrics (names without '@' or spaces)."""
    means = report["columns"]["mean"]
    return {
        "tstr_ratio": report["tstr"]["ratio"],
        "tstr_auc": report["tstr"]["tstr_auc"],
        "trtr_auc": report["tstr"]["trtr_auc"],
        "ks_mean": means.get("ks", float("nan")),
        "wasserstein_mean": means.get("wasserstein", float("nan")),
        "tvd_mean": means.get("tvd", float("nan")),
        "correlation_mean_abs": report["correlation"]["mean_abs"],
        "correlation_max_abs": report["correlation"]["max_abs"],
        "dcr_median_ratio": report["dcr"]["median_ratio"],
        "dcr_p05_ratio": report["dcr"]["p05_ratio"],
        "dcr_exact_share": report["dcr"]["synthetic_exact_share"],
    }


def _column_distances(report: dict, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = {k: v for k, v in report["columns"].items() if k != "mean"}
    names = list(columns)
    values = [columns[n].get("ks", columns[n].get("tvd")) for n in names]
    fig, axis = plt.subplots(figsize=(8, 0.25 * len(names) + 1.5))
    axis.barh(names, values, color=["tab:blue" if "ks" in columns[n] else "tab:orange" for n in names])
    axis.invert_yaxis()
    axis.set(xlabel="KS (numeric, blue) or TVD (categorical and missing shares, orange)",
             title="synthetic vs real training rows, per column")  # fmt: skip
    fig.tight_layout()
    fig.savefig(folder / "column_distances.png", dpi=100)
    plt.close(fig)


def _report(report: dict, identity: dict, split: GanData, epoch: int) -> str:
    tstr, corr, dcr, means = report["tstr"], report["correlation"], report["dcr"], report["columns"]["mean"]
    described = split.describe()
    worst = sorted(
        ((k, v["ks"]) for k, v in report["columns"].items() if k != "mean" and "ks" in v),
        key=lambda pair: -pair[1],
    )[:5]
    lines = [
        f"# Synthetic users: gan (best epoch {epoch}, by validation TSTR / TRTR)",
        "",
        f"Data: {identity['dataset.path']} ({identity['dataset.feature_service']}, snapshots "
        f"{identity['dataset.snapshot_range']}, sha256 {identity['dataset.sha256'][:12]}).",
        f"Train {described['train']}; validation {described['valid']}; test {described['test']}.",
        f"{len(split.numeric)} numeric columns, categorical: {', '.join(split.categorical) or 'none'}; "
        f"condition {LABEL}. As many synthetic rows as real training rows, at the real buyer ratio.",
        "",
        "| measure | value |",
        "| --- | ---: |",
        f"| TSTR ROC-AUC (trained on synthetic, tested on real test users) | {tstr['tstr_auc']:.4f} |",
        f"| TRTR ROC-AUC (trained on real) | {tstr['trtr_auc']:.4f} |",
        f"| **TSTR / TRTR** | **{tstr['ratio']:.4f}** |",
        f"| mean KS, numeric columns | {means.get('ks', float('nan')):.4f} |",
        f"| mean Wasserstein (real SDs) | {means.get('wasserstein', float('nan')):.4f} |",
        f"| mean TVD, categories and missing shares | {means.get('tvd', float('nan')):.4f} |",
        f"| correlation difference, mean / max | {corr['mean_abs']:.4f} / {corr['max_abs']:.4f} |",
        f"| DCR median, synthetic / real holdout | {dcr['synthetic_median']:.4f} / "
        f"{dcr['holdout_median']:.4f} (ratio {dcr['median_ratio']:.3f}) |",
        f"| DCR 5th percentile ratio | {dcr['p05_ratio']:.3f} |",
        f"| synthetic rows identical to a training row | {dcr['synthetic_exact_share']:.2%} |",
        "",
        "Farthest numeric columns (KS): " + ", ".join(f"{name} {ks:.3f}" for name, ks in worst) + ".",
    ]
    return "\n".join(lines) + "\n"
