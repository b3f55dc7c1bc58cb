"""The task table: every prediction task the platform trains, tunes, evaluates, promotes and serves,
declared once and looked up by name (as Feast's ``*_CLASS_FOR_TYPE`` or RecBole's ``get_model``).

A :class:`Task` says what the task is (its data, label and split; the model families it accepts and the
head and loss each uses; its evaluation protocol, primary metric and baselines; its pyfunc; its API route;
its promotion metric) and where its code lives (``package``: the folder under ``training/`` with what is
particular to it). The runtime, promotion, serving, the CLI and ``jobs submit`` read this table; none of
them names a task. docs/architecture.md describes the contract and how to add a task.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType

from shopsight.platform import ShopsightError


@dataclass(frozen=True)
class Metric:
    """A metric of the task's protocol: its key in the evaluation's results and how it is printed."""

    key: str
    label: str
    higher_is_better: bool = True


@dataclass(frozen=True)
class Data:
    """What a task learns from: a sequence source or a Feast feature service, the label, the split."""

    source: str  # "interactions" (an event or SASRec-format file) or a feature service's name
    label: str | None
    split: str
    # how many days past its snapshot the label looks (buy_next_1d: 1, churn_3d: 3); a time split keeps
    # this many days between the last training snapshot and the validation day, so that no training
    # label has seen the days the validation labels are about
    horizon_days: int = 0


@dataclass(frozen=True)
class Pyfunc:
    """The registered MLflow pyfunc: its class (``module:Class``, with ``from_folder`` and ``predict``),
    its input columns, output columns and params."""

    python_model: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    params: dict[str, int] = field(default_factory=dict)

    def load_class(self) -> type:
        module, _, name = self.python_model.partition(":")
        return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Route:
    """How the task is served: the HTTP route, the predictor kind and the feature service it reads."""

    path: str
    predictor: str  # "ranking" (top k items) or "probability" (one probability per user)
    service: str
    summary: str


@dataclass(frozen=True)
class FollowUp:
    """What follows a served prediction in the events, and so labels it for the monitor.

    ``kind``: ``next_item`` (the first item the user touches after the prediction), ``happens`` (whether
    the user has an event of ``behaviors`` within ``horizon_days``: any behaviour when empty) or ``absent``
    (whether the user has none). The window starts at the time the answer's features describe (its
    ``as_of``) and lasts ``horizon_days``; a prediction whose window is not over in the events yet is
    pending, not a negative.
    """

    kind: str
    horizon_days: int
    behaviors: tuple[str, ...] = ()
    # on simulated data: the oracle's file under truth/ and its column of true outcome probabilities, so
    # that the monitor's own numbers can be checked against the truth
    truth: tuple[str, str] | None = None


@dataclass(frozen=True)
class Task:
    """One prediction task of the platform."""

    name: str
    description: str
    package: str  # the module with the task's own code: data, evaluation, pyfunc
    registered_model: str
    experiment: str
    data: Data
    models: dict[str, str]  # model family -> the head and loss it uses for this task
    metric: Metric  # the primary metric: early stopping, checkpoints, Tune, the gate
    baselines: tuple[str, ...]
    pyfunc: Pyfunc
    reported: tuple[Metric, ...]  # the test metrics printed beside the primary one (`models show`, the gate)
    unit: Metric  # what the protocol evaluates (users, rows) and the key counting them
    route: Route | None = None
    default_model: str = "sasrec"  # what the demo trains
    curves: tuple[str, ...] = ()  # per-epoch metrics plotted for each run (default: loss, the metric)
    guard: Metric | None = None  # a second metric the gate holds a candidate to (calibration)
    follow_up: FollowUp | None = None  # how the monitor labels the served answers

    @property
    def learning_curves(self) -> tuple[str, ...]:
        return self.curves or ("loss", f"valid_{self.metric.key}")

    @property
    def code(self) -> ModuleType:
        """The task's package, imported on first use (its dependencies load only when needed)."""
        return importlib.import_module(self.package)

    def check_model(self, model: str) -> None:
        """ShopsightError unless ``model`` is a family this task accepts."""
        if model not in self.models:
            raise ShopsightError(
                f"the {self.name} task has no model {model!r}: choose one of {', '.join(self.models)}"
            )


_SEQUENCE_HEAD = "the user's last hidden state -> a binary tower beside dense features; weighted BCE"


def user_snapshot_task(
    name: str,
    description: str,
    service: str,
    label: str,
    horizon_days: int,
    route: Route | None,
    follow_up: FollowUp | None = None,
) -> Task:
    """A binary task on user snapshots (one label per user and snapshot day, a point-in-time training
    set of ``service``), trained, calibrated, evaluated and served by :mod:`shopsight.training.binary`:
    what purchase and churn share, with the task's own name, label, service and route."""
    return Task(
        name=name,
        description=description,
        package=f"shopsight.training.{name}",
        registered_model=f"shopsight-{name.replace('_', '-')}",
        experiment=name.replace("_", "-"),
        data=Data(
            service,
            label,
            "by time: the last snapshot day tests, the day before validates, and the days whose labels "
            "end before the validation day train",
            horizon_days,
        ),
        models={"sasrec": _SEQUENCE_HEAD, "lstm": _SEQUENCE_HEAD},
        metric=Metric("roc_auc", "ROC-AUC (last snapshot day)"),
        baselines=("trees", "oracle"),
        pyfunc=Pyfunc(
            "shopsight.training.binary.pyfunc:SnapshotClassifier",
            inputs=(f"{service} fields",),
            outputs=("probability",),
        ),
        reported=(
            Metric("roc_auc", "ROC-AUC"),
            Metric("pr_auc", "PR-AUC"),
            Metric("log_loss", "log-loss", higher_is_better=False),
            Metric("ece", "ECE", higher_is_better=False),
            Metric("brier", "Brier score", higher_is_better=False),
        ),
        unit=Metric("n", "rows"),
        guard=Metric("ece", "ECE (calibration error)", higher_is_better=False),
        route=route,
        follow_up=follow_up,
        # on the simulator's benchmark (benchmarks/results/purchase.md, churn.md, 20,000 users) the LSTM
        # ranks as well as SASRec or better, and its calibrated probabilities are within 0.02 of the
        # observed rate in every decile, SASRec's within 0.03
        default_model="lstm",
    )


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            name="next_item",
            description="The next item a user interacts with, ranked over the catalogue.",
            package="shopsight.training.next_item",
            registered_model="shopsight-next-item",
            experiment="next-item",
            data=Data("interactions", None, "leave-one-out: last item tests, second-to-last validates"),
            models={
                "sasrec": "item scores = hidden state . item embedding; bce, sampled_softmax, gbce, softmax",
                "lstm": "item scores = hidden state . item embedding; bce, sampled_softmax, gbce, softmax",
            },
            metric=Metric("ndcg@10", "NDCG@10 (100 sampled negatives)"),
            baselines=("popularity",),
            pyfunc=Pyfunc(
                "shopsight.training.next_item.pyfunc:NextItemRecommender",
                inputs=("item_ids",),
                outputs=("items", "scores"),
                params={"k": 10},
            ),
            reported=(
                Metric("ndcg@10", "NDCG@10"),
                Metric("hr@10", "HR@10"),
                Metric("hr@10_full", "HR@10 full"),
                Metric("ndcg@10_full", "NDCG@10 full"),
            ),
            unit=Metric("users", "users"),
            route=Route("/v1/recommendations", "ranking", "next_item_v1", "Top-k next items of a user"),
            follow_up=FollowUp("next_item", horizon_days=1),
        ),
        user_snapshot_task(
            name="purchase",
            description="Whether a user buys anything on the day after the snapshot.",
            service="purchase_propensity_v1",
            label="buy_next_1d",
            horizon_days=1,
            route=Route(
                "/v1/purchase-propensity",
                "probability",
                "purchase_propensity_v1",
                "Probability that each user buys tomorrow",
            ),
            follow_up=FollowUp(
                "happens",
                horizon_days=1,
                behaviors=("buy",),
                truth=("next_day_buy.parquet", "p_buy_next_day"),
            ),
        ),
        user_snapshot_task(
            name="churn",
            description="Whether a user has no event at all in the 3 days after the snapshot.",
            service="churn_risk_v1",
            label="churn_3d",
            horizon_days=3,
            route=Route(
                "/v1/churn-risk",
                "probability",
                "churn_risk_v1",
                "Probability that each user has no event in the next 3 days",
            ),
            follow_up=FollowUp("absent", horizon_days=3, truth=("churn_3d.parquet", "p_churn_3d")),
        ),
        Task(
            name="synthetic_users",
            description="Synthetic user rows of the purchase feature service, conditioned on the label.",
            package="shopsight.training.synthetic_users",
            registered_model="shopsight-synthetic-users",
            experiment="synthetic-users",
            data=Data(
                "purchase_propensity_v1", "buy_next_1d", "by user: 70% train, 10% validate, 20% test", 1
            ),
            models={"gan": "conditional WGAN-GP; the critic's Wasserstein loss with gradient penalty"},
            metric=Metric("tstr_ratio", "TSTR / TRTR (validation users)"),
            baselines=("real rows (TRTR)",),
            pyfunc=Pyfunc(
                "shopsight.training.synthetic_users.pyfunc:SyntheticUsers",
                inputs=("buy_next_1d",),
                outputs=("purchase_propensity_v1 fields",),
                params={"seed": -1},
            ),
            reported=(
                Metric("tstr_ratio", "TSTR / TRTR"),
                Metric("ks_mean", "mean KS", higher_is_better=False),
                Metric("tvd_mean", "mean TVD", higher_is_better=False),
                Metric("dcr_median_ratio", "DCR median ratio"),
            ),
            unit=Metric("n", "rows"),
            default_model="gan",
            curves=("loss", "wasserstein", "valid_tstr_ratio", "valid_ks"),
        ),
    )
}


def get_task(name: str) -> Task:
    """The task called ``name`` (``next-item`` is read as ``next_item``); ShopsightError if unknown."""
    task = TASKS.get(name.replace("-", "_"))
    if task is None:
        raise ShopsightError(f"unknown task {name!r}: choose one of {', '.join(TASKS)}")
    return task


def task_of_model(model: str) -> Task:
    """The task whose models are registered under ``model``; ShopsightError if none is."""
    for task in TASKS.values():
        if task.registered_model == model:
            return task
    raise ShopsightError(
        f"{model} is not a registered model of any task: "
        + ", ".join(task.registered_model for task in TASKS.values())
    )


def model_families() -> list[str]:
    """Every model family some task accepts, in table order."""
    return list(dict.fromkeys(model for task in TASKS.values() for model in task.models))


def task_for(model: str, labels: list[str]) -> Task:
    """The task that trains ``model`` on data holding ``labels`` (the label columns of a training set;
    none for interactions); ShopsightError when no task or several fit."""
    fitting = [task for task in TASKS.values() if model in task.models]
    if len(fitting) > 1:
        fitting = [
            task
            for task in fitting
            if (task.data.label in labels if labels else task.data.source == "interactions")
        ]
    if len(fitting) != 1:
        data = f"a training set of {', '.join(labels)}" if labels else "interactions"
        raise ShopsightError(
            f"no single task trains {model} on {data}; name one with --task ({', '.join(TASKS)})"
        )
    return fitting[0]


def served_tasks() -> list[Task]:
    """The tasks with an API route, in table order."""
    return [task for task in TASKS.values() if task.route is not None]


__all__ = [
    "TASKS",
    "Data",
    "FollowUp",
    "Metric",
    "Pyfunc",
    "Route",
    "Task",
    "get_task",
    "model_families",
    "served_tasks",
    "task_for",
    "task_of_model",
]
