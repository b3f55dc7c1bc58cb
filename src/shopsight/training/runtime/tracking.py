"""One MLflow run per training run, for every task: what train, tune and the GAN share.

:func:`tracked_run` opens the run in the task's experiment with the dataset's identity (path and content
hash, plus what the task adds), the model and task tags and the parameters; :meth:`TrackedRun.train` runs
the task's Ray worker with every epoch logged live into it and returns the best checkpoint by the task's
metric. The task then evaluates that checkpoint on its test protocol and hands back a :class:`Candidate`,
which :func:`register` records the same way for every task: the test metrics (``test_*``) beside the
baselines' (``<baseline>_*``), the learning curves and the task's own figures, the evaluation report, the
model as a pyfunc registered with the alias ``challenger`` and tagged with the model, task and dataset,
and a round trip: the registered version, loaded back as serving loads it, must predict what the trained
model predicted.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from shopsight.platform import Settings, ShopsightError
from shopsight.platform.mlflow_server import quick_requests, tracking_uri, wait_for_server
from shopsight.platform.ray_cluster import storage_path
from shopsight.training.runtime.loop import LoopConfig
from shopsight.training.tasks import Task

CHALLENGER = "challenger"


def dataset_identity(path: Path) -> dict[str, str]:
    """Path and sha256 of the data (all files of a folder, in name order)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return {"dataset.path": str(path.absolute()), "dataset.sha256": digest.hexdigest()}


DIGEST_CHARS = 12  # of the sha256 as the MLflow dataset's digest (MLflow keeps 36; reports print 12)


def log_dataset(identity: dict[str, str], context: str = "training") -> None:
    """The run's data as an MLflow dataset input of the active run (the run's Inputs, the Datasets column):
    its path as the source, the first :data:`DIGEST_CHARS` hex digits of its sha256 as the digest, and the
    rest of its identity (the whole sha256, the feature service, the snapshot range) as the input's tags.
    Metadata only: nothing is read again, the data may be gigabytes."""
    import warnings

    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    path = identity.get("dataset.path")
    if not path:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MLflow's local source is registered for two schemes and says so
        source = resolve_dataset_source(path)
    digest = identity.get("dataset.sha256", "")[:DIGEST_CHARS] or None  # None: MLflow derives one
    tags = {k.removeprefix("dataset."): v for k, v in identity.items() if k != "dataset.path"}
    mlflow.log_input(MetaDataset(source, name=Path(path).name, digest=digest), context=context, tags=tags)


def mlflow_name(key: str) -> str:
    """A metric key as MLflow accepts it (no '@')."""
    return key.replace("@", "_at_")


def public(metrics: dict[str, Any]) -> dict[str, float]:
    """The metrics without the per-unit arrays a protocol also returns (keys starting with '_')."""
    return {k: float(v) for k, v in metrics.items() if not k.startswith("_")}


@dataclass
class Candidate:
    """A trained model as its task evaluated it, ready to be recorded and registered.

    ``save(folder)`` writes the model's files (what its pyfunc loads); ``pyfunc`` is the task's pyfunc
    class (``from_folder``, ``predict``); ``example`` its input example and ``params`` the predict params.
    """

    model_name: str
    metrics: dict[str, float]  # the model's test metrics
    baselines: dict[str, dict[str, float]]  # baseline -> the same metrics
    report: str  # the evaluation report, markdown
    save: Callable[[Path], Path]
    pyfunc: type
    example: pd.DataFrame
    params: dict[str, Any] | None = None
    figures: Callable[[Path], None] | None = None  # writes the task's own plots into a folder
    requirements: tuple[str, ...] = ()  # pip requirements beyond model_code.BASE_REQUIREMENTS
    tags: dict[str, str] = field(default_factory=dict)  # extra version tags


@dataclass
class Prepared:
    """A task's data made ready on the driver for training runs (``train`` runs one, ``tune`` many).

    ``worker`` and ``config`` go to :func:`~shopsight.training.runtime.ray_train.train_with_ray` (a
    sweep overrides ``config["model_config"]`` per trial); ``finish(state, model_config)`` turns the best
    checkpoint into the evaluated :class:`Candidate`.
    """

    task: Task
    model_name: str
    worker: Callable
    config: dict[str, Any]
    identity: dict[str, str]
    params: dict[str, Any]  # what the data and the task's options add to the run's parameters
    finish: Callable[[dict[str, Any], dict[str, Any]], Candidate]
    tags: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # lines for the console as training starts (e.g. the defaults chosen)


@dataclass
class TrainSummary:
    """What a training run produced: its run, the registered version, its test metrics beside the
    baselines'."""

    run_id: str
    model_uri: str
    registered_model: str
    version: str
    test: dict[str, float]
    baselines: dict[str, dict[str, float]]
    epochs: int  # the best epoch (the registered weights')
    seconds: float
    stopped_epoch: int = 0  # the last epoch trained: the plateau's end, or the epochs cap
    epochs_cap: int = 0
    cpu_seconds_to_best: float | None = None  # process CPU seconds of the fit loop up to the best epoch
    cpu_seconds: float | None = None  # ... and up to the last

    def convergence(self) -> str:
        """How training ended, in words: the best epoch, where it stopped and why, the CPU it took."""
        why = "the epochs cap" if self.stopped_epoch >= self.epochs_cap else "the validation plateau"
        text = f"best epoch {self.epochs}, stopped at epoch {self.stopped_epoch} ({why})"
        if self.cpu_seconds_to_best is not None:
            text += f", {self.cpu_seconds_to_best:,.0f} CPU s to the best"
        return text


def model_dir(settings: Settings, model_uri: str) -> Path:
    """The folder of a registered Shopsight pyfunc's files (what its ``from_folder`` loads)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(settings))
    try:
        return Path(mlflow.artifacts.download_artifacts(model_uri)) / "artifacts" / "model_dir"
    except Exception as exc:  # noqa: BLE001 - MLflow raises several kinds for a missing model
        raise ShopsightError(f"cannot load {model_uri}: {str(exc).splitlines()[0]}") from None


@dataclass
class TrackedRun:
    settings: Settings
    task: Task
    uri: str
    run_id: str
    name: str
    log: Callable[[str], None] = print
    stopped_epoch: int = 0  # after train(): the last epoch the run trained
    cpu_seconds: float = 0.0  # after train(): the run's process CPU seconds (the fit loop's tasks)

    def train(
        self,
        worker: Callable,
        config: dict[str, Any],
        *,
        loop: LoopConfig,
        workers: int = 1,
        gpus_per_worker: float = 0,
    ) -> dict[str, Any]:
        """Run the task's worker under Ray Train (epochs logged into this run); returns the state of the
        best checkpoint by the task's validation metric.

        The tracking server may go away during training (the workers keep the epochs it does not take): the
        run then waits for it (:func:`~shopsight.platform.mlflow_server.wait_for_server`) and logs the epochs
        it missed, or fails in one line with its checkpoints kept for a resumption."""
        import mlflow

        from shopsight.training.runtime.ray_train import (
            CHECKPOINT_FILE,
            CHECKPOINT_SCORE,
            epoch_history,
            log_missing_epochs,
            train_with_ray,
        )

        storage = storage_path(self.settings)
        result = train_with_ray(
            worker,
            config,
            metric=self.task.metric.key,
            name=self.name,
            storage_path=storage,
            workers=workers,
            worker_resources=self.settings.ray.worker_resources,
            gpus_per_worker=gpus_per_worker,
            loop=loop,
            mlflow=(self.uri, self.run_id),
        )
        if result.error is not None:
            raise ShopsightError(f"training failed: {result.error}")
        try:
            self.uri = wait_for_server(self.settings, self.uri, log=self.log)
        except ShopsightError as exc:
            raise ShopsightError(
                f"{exc}: training finished, but the model is not registered. Its checkpoints are kept in "
                f"{storage}/{self.name}; the same command with --name {self.name} resumes from them"
            ) from None
        mlflow.set_tracking_uri(self.uri)
        missed = log_missing_epochs(self.uri, self.run_id, epoch_history(result))
        if missed:
            self.log(f"logged {missed} epochs' metrics that MLflow missed during training")
        # the best validated epoch (the earliest of equals)
        best = max(
            result.best_checkpoints,
            key=lambda pair: (pair[1].get(CHECKPOINT_SCORE, -np.inf), -pair[1].get("epoch", 0)),
        )[0]
        self.stopped_epoch = int((result.metrics or {}).get("epoch", 0))
        self.cpu_seconds = float((result.metrics or {}).get("cpu_seconds", 0.0))
        with best.as_directory() as folder:
            return torch.load(Path(folder) / CHECKPOINT_FILE, weights_only=False)


@contextmanager
def tracked_run(
    settings: Settings,
    task: Task,
    run_name: str,
    *,
    model_name: str,
    identity: dict[str, str],
    params: dict[str, Any],
    tags: dict[str, str] | None = None,
    log: Callable[[str], None] = print,
) -> Iterator[TrackedRun]:
    """An MLflow run of ``task``'s experiment with the dataset's identity, tags and parameters."""
    import mlflow

    uri = tracking_uri(settings)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(task.experiment)
    run = mlflow.start_run(run_name=run_name)
    try:
        mlflow.set_tags({**identity, "model": model_name, "task": task.name, **(tags or {})})
        log_dataset(identity)
        mlflow.log_params(params)
        log(f"MLflow run {run.info.run_id} at {uri}")
        yield TrackedRun(settings, task, uri, run.info.run_id, run_name, log)
    except BaseException:
        # one quick try: the failure may be the server's, and MLflow's retries would hold its report back for
        # minutes; a run it cannot mark FAILED stays RUNNING in the store, which the error explains
        with contextlib.suppress(Exception), quick_requests():
            mlflow.end_run("FAILED")  # it takes the run off MLflow's stack before it calls the server
        raise
    mlflow.end_run()


def train_prepared(
    settings: Settings,
    prepared: Prepared,
    *,
    loop: LoopConfig,
    workers: int = 1,
    gpus_per_worker: float = 0,
    run_name: str | None = None,
    registered_model: str | None = None,
    log: Callable[[str], None] = print,
) -> TrainSummary:
    """The one training pipeline of every task: a tracked run, the task's worker on Ray Train, the best
    checkpoint evaluated by the task, registered as the challenger."""
    from dataclasses import asdict

    import mlflow

    started = time.perf_counter()
    task, model_name = prepared.task, prepared.model_name
    registered_model = registered_model or task.registered_model
    params = {
        "model": model_name,
        "workers": workers,
        "gpus_per_worker": gpus_per_worker,
        **prepared.params,
        **{f"model.{k}": v for k, v in prepared.config["model_config"].items()},
        **{f"loop.{k}": v for k, v in asdict(loop).items()},
        "loop.patience": loop.patience_epochs,  # in epochs, as the loop counts it
    }
    run_name = run_name or default_run_name(f"{task.name}-{model_name}")
    with tracked_run(
        settings,
        task,
        run_name,
        model_name=model_name,
        identity=prepared.identity,
        params=params,
        tags=prepared.tags,
        log=log,
    ) as run:
        for line in prepared.notes:
            log(line)
        state = run.train(
            prepared.worker, prepared.config, loop=loop, workers=workers, gpus_per_worker=gpus_per_worker
        )
        convergence = {
            "best_epoch": int(state["epoch"]),
            "stopped_epoch": max(run.stopped_epoch, int(state["epoch"])),
            **({"cpu_seconds_to_best": float(state["cpu_seconds"])} if "cpu_seconds" in state else {}),
            **({"cpu_seconds": run.cpu_seconds} if run.cpu_seconds else {}),
        }
        mlflow.log_metrics(convergence)
        candidate = prepared.finish(state, prepared.config["model_config"])
        version = register(run.uri, run.run_id, task, candidate, registered_model, prepared.identity)
        log(candidate.report)
    return TrainSummary(
        run_id=run.run_id,
        model_uri=f"models:/{registered_model}@{CHALLENGER}",
        registered_model=registered_model,
        version=version,
        test=candidate.metrics,
        baselines=candidate.baselines,
        epochs=convergence["best_epoch"],
        seconds=time.perf_counter() - started,
        stopped_epoch=convergence["stopped_epoch"],
        epochs_cap=loop.epochs,
        cpu_seconds_to_best=convergence.get("cpu_seconds_to_best"),
        cpu_seconds=convergence.get("cpu_seconds"),
    )


def train_task(settings: Settings, task: Task, model: str, data: Path, options, log=print) -> TrainSummary:
    """``shopsight train`` for any task: its package prepares the data and sets the loop from the
    options (:class:`~shopsight.training.runtime.options.TrainOptions`), then :func:`train_prepared`."""
    loop = task.code.loop(options)
    run_name = options.name or default_run_name(f"{task.name}-{model}")
    prepared = task.code.prepare(settings, model, data, options, loop)
    return train_prepared(
        settings,
        prepared,
        loop=loop,
        workers=options.workers,
        gpus_per_worker=options.gpus_per_worker,
        run_name=run_name,
        log=log,
    )


def register(
    uri: str,
    run_id: str,
    task: Task,
    candidate: Candidate,
    registered_model: str,
    identity: dict[str, str],
) -> str:
    """Record ``candidate`` in the active run ``run_id`` and register it as the ``challenger`` of
    ``registered_model``; returns the new version. Raises ShopsightError when the registered version,
    loaded back, predicts otherwise than the trained model."""
    import mlflow
    from mlflow import MlflowClient

    mlflow.log_metrics({f"test_{mlflow_name(k)}": v for k, v in candidate.metrics.items()})
    for name, metrics in candidate.baselines.items():
        mlflow.log_metrics({f"{name}_{mlflow_name(k)}": v for k, v in metrics.items()})
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        figures = tmp / "evaluation"
        figures.mkdir()
        learning_curves(MlflowClient(uri), run_id, task.learning_curves, figures)
        if candidate.figures:
            candidate.figures(figures)
        (figures / "evaluation.md").write_text(candidate.report)
        mlflow.log_artifacts(str(figures), artifact_path="evaluation")
        folder = candidate.save(tmp / "model_dir")
        expected = candidate.pyfunc.from_folder(folder).predict(None, candidate.example, candidate.params)
        info = log_pyfunc(
            candidate.pyfunc,
            folder,
            candidate.example,
            registered_model,
            params=candidate.params,
            requirements=candidate.requirements,
        )
    version = str(info.registered_model_version)
    client = MlflowClient(uri)
    client.set_registered_model_alias(registered_model, CHALLENGER, version)
    version_tags = {"model": candidate.model_name, "task": task.name, **identity, **candidate.tags}
    for key, value in version_tags.items():
        client.set_model_version_tag(registered_model, version, key, value)
    uri_of_version = f"models:/{registered_model}/{version}"
    got = mlflow.pyfunc.load_model(uri_of_version).predict(candidate.example, params=candidate.params)
    if not same_predictions(expected, got):
        raise ShopsightError(f"{uri_of_version} loaded back predicts otherwise than the trained model")
    return version


def log_pyfunc(
    pyfunc: type,
    folder: Path,
    example: pd.DataFrame,
    registered_model: str | None,
    *,
    params: dict[str, Any] | None = None,
    requirements: tuple[str, ...] = (),
):
    """Log a task's pyfunc (``pyfunc.from_folder(folder)`` loads it) in the active run, with its signature
    and input example, and register it under ``registered_model``; returns MLflow's ModelInfo.

    The model travels: it carries the Shopsight modules it loads with (MLflow ``code``) and lists its
    pinned requirements (:mod:`~shopsight.training.runtime.model_code`), so that ``mlflow.pyfunc.load_model``
    and ``mlflow models serve`` work where only those are installed."""
    import mlflow
    from mlflow.models import infer_signature

    from shopsight.training.runtime.model_code import copy_code
    from shopsight.training.runtime.model_code import requirements as pinned

    output = pyfunc.from_folder(folder).predict(None, example, params)
    with tempfile.TemporaryDirectory() as code:
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=pyfunc(),  # unloaded: the weights travel as the artifact, not in the pickle
            artifacts={"model_dir": str(folder)},
            code_paths=[str(copy_code(pyfunc, Path(code)))],
            signature=infer_signature(example, output, params=params),
            input_example=(example, params) if params else example,
            registered_model_name=registered_model,
            # listed, not inferred: inference would load the model in a fresh process just to guess these
            pip_requirements=pinned(requirements),
        )


def same_predictions(expected: pd.DataFrame, got: pd.DataFrame) -> bool:
    """Whether two pyfunc outputs agree: integer and boolean columns exactly, the others within 1e-6."""
    if list(expected.columns) != list(got.columns) or len(expected) != len(got):
        return False
    for column in expected.columns:
        a, b = np.array(expected[column].tolist()), np.array(got[column].tolist())
        if a.shape != b.shape:
            return False
        if a.dtype.kind in "fc" or b.dtype.kind in "fc":
            if not np.allclose(a.astype(float), b.astype(float), atol=1e-6, equal_nan=True):
                return False
        elif not np.array_equal(a, b):
            return False
    return True


def learning_curves(client, run_id: str, keys: tuple[str, ...], folder: Path) -> None:
    """``learning_curves.png``: the run's per-epoch history of each metric in ``keys``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.5), squeeze=False)
    for key, axis in zip(keys, axes[0], strict=True):
        history = client.get_metric_history(run_id, mlflow_name(key))
        axis.plot([m.step for m in history], [m.value for m in history], marker=".")
        axis.set(xlabel="epoch", title=key)
    fig.tight_layout()
    fig.savefig(folder / "learning_curves.png", dpi=100)
    plt.close(fig)


def default_run_name(prefix: str) -> str:
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


__all__ = [
    "CHALLENGER",
    "Candidate",
    "Prepared",
    "TrackedRun",
    "TrainSummary",
    "dataset_identity",
    "log_dataset",
    "default_run_name",
    "learning_curves",
    "log_pyfunc",
    "mlflow_name",
    "model_dir",
    "public",
    "register",
    "same_predictions",
    "tracked_run",
    "train_prepared",
    "train_task",
]
