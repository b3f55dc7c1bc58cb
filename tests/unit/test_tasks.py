"""The task table: every task declares its contract in one place, and the platform finds it by name."""

from __future__ import annotations

import pytest

from shopsight.platform import ShopsightError, load_settings
from shopsight.training.tasks import TASKS, get_task, model_families, served_tasks, task_for, task_of_model

HOOKS = ("check_data", "loop", "prepare")  # what train, tune and jobs call on every task's package


def test_every_task_is_complete_and_its_package_has_the_hooks():
    for name, task in TASKS.items():
        assert task.name == name and "-" not in name, "one spelling: snake_case"
        assert task.models and task.metric.key and task.reported and task.baselines
        for hook in HOOKS:
            assert callable(getattr(task.code, hook, None)), f"{name}: no {hook}"
        python_model = task.pyfunc.load_class()
        assert callable(python_model.from_folder) and callable(python_model.predict)
        assert task.default_model in task.models


def test_served_tasks_have_distinct_routes_and_the_feature_services_exist():
    from feast import FeatureService

    from shopsight.features.definitions import repository
    from shopsight.serving.predictor import PREDICTORS

    settings = load_settings(environ={}).settings
    services = {o.name: o for o in repository(settings) if isinstance(o, FeatureService)}
    labels = next(o for o in repository(settings) if getattr(o, "name", None) == "labels")
    label_fields = {f.name for f in labels.schema}
    served = served_tasks()
    assert {t.name for t in served} == {"next_item", "purchase", "churn"}
    assert len({t.route.path for t in served}) == len(served)
    for task in served:
        assert task.route.predictor in PREDICTORS
        assert task.route.service in services, task.route.service
        # what the promotion gate and the pyfunc read: the gate evaluates every served task's versions
        assert callable(getattr(task.code, "evaluate_version", None))
        assert callable(getattr(task.code, "paired_difference", None))
        if task.data.label:
            assert task.data.label in label_fields, f"{task.name}: no Feast label {task.data.label}"
            assert task.data.source == task.route.service


def test_lookups_by_name_model_and_data():
    assert get_task("next-item") is get_task("next_item")  # the tags of older runs still resolve
    with pytest.raises(ShopsightError, match="unknown task 'ranking': choose one of next_item, purchase"):
        get_task("ranking")
    assert task_of_model("shopsight-churn").name == "churn"
    assert task_for("sasrec", []).name == "next_item"
    assert task_for("sasrec", ["buy_next_1d"]).name == "purchase"
    assert task_for("lstm", ["churn_3d"]).name == "churn"
    assert task_for("gan", ["buy_next_1d"]).name == "synthetic_users"
    with pytest.raises(ShopsightError, match="no single task trains sasrec on a training set of x"):
        task_for("sasrec", ["x"])
    assert set(model_families()) == {"sasrec", "lstm", "gan"}
    with pytest.raises(ShopsightError, match="the churn task has no model 'gan'"):
        get_task("churn").check_model("gan")
